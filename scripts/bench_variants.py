"""The servers scripts/bench.py measures, and the ways a user could run them (the variants).

A *variant* is how a server is made reachable on the multihomed lab host:

- ``direct``: the server bound on the host itself, nothing else (unbound with
  ``interface-automatic: yes``, so that it answers from the address asked);
- ``nswrap``: ``nswrap --ports ... -- SERVER`` (this tree's .venv), nft datapath;
- ``nswrap-bpf``: the same with ``--datapath bpf``, the tc-BPF fast path (nswrap/fastpath.py, issue 27);
- ``old``: the same with the nswrap before the shared datapath (``--compare-with``);
- ``handwritten``: scripts/bench_handwritten.sh, nswrap's design written by hand;
- ``bestalt``: the best a user could do without a namespace: unbound with
  ``interface-automatic: yes`` (IP_PKTINFO: answers from the asked address) plus one
  ``ip rule from ADDR lookup <table of ADDR's uplink>`` per address; no NAT, no conntrack;
- ``recipe2014``: the 2014 veth-loop recipe (scripts/bench_lab.recipe_2014).

Everything runs inside the lab's namespaces; nothing here touches the machine's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_lab import recipe_2014  # noqa: E402
from tests.lab import Lab, LabError, unbound_conf  # noqa: E402

# nswrap as installed for the benchmark (scripts/bench: a venv of its own, not editable)
VENV = pathlib.Path(os.environ.get("NSWRAP_BENCH_VENV") or ROOT / ".venv")
NSWRAP = str(VENV / "bin" / "nswrap")
HANDWRITTEN = str(ROOT / "scripts" / "bench_handwritten.sh")
TRAFFIC = [sys.executable, str(ROOT / "scripts" / "bench_traffic.py")]
START_TIMEOUT = 30
# The old nswrap gives every instance x uplink its own mark: the default mask (15 marks) holds
# 5 instances on the lab's 3 uplinks, the 6th fails. Where more run, it gets this mask.
OLD_WIDE_MASK = "0xff000000"
# The variants that run nswrap (this tree's or the old one): they get --ready-fd
NSWRAP_VARIANTS = ("nswrap", "nswrap-bpf", "old", "nswrap-global6")

# (ifname, address, gateway) of the lab host's uplinks (tests/lab), for the recipes without nswrap
LAB_UPLINKS = [("eth0", "192.0.2.10", "192.0.2.1"), ("eth1", "198.51.100.10", "198.51.100.1"),
               ("eth2", "203.0.113.65", None)]
LAB_ADDRESSES = {"eth0": ["192.0.2.10", "192.0.2.11"], "eth1": ["198.51.100.10"], "eth2": ["203.0.113.65"]}
LAB_ADDRESSES6 = {"eth0": ["2001:db8:1::10", "2001:db8:1::11"], "eth1": ["2001:db8:2::10"], "eth2": ["2001:db8:3::65"]}
LAB_GATEWAYS6 = {"eth0": "fe80::1", "eth1": "2001:db8:2::1"}


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- processes ----------------------------------------------------------------------------------


def wait_line(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """Read *proc*'s stdout until a line matches *pattern* (bounded by *timeout*).

    *proc* must be spawned with ``stdout=PIPE, bufsize=0`` (binary, unbuffered): with a buffered
    reader, select() would not see lines already sitting in Python's buffer.
    """
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline().decode(errors="replace")
            if regex.search(line):
                return line
            if not line:  # end of output
                proc.wait(5)
                raise LabError(f"{proc.args!r} exited with {proc.returncode} before printing {pattern!r}")
    raise TimeoutError(f"{proc.args!r}: no line matching {pattern!r} within {timeout}s")


def tree(pid: int, skip: str | None = None) -> list[int]:
    """*pid* and all its descendants (from /proc/<pid>/task/*/children), except any process
    named *skip* and what it runs."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if skip is not None and comm(p) == skip:
            continue
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def wrapper_pids(pid: int, server_comm: str) -> list[int]:
    """The wrapper's own processes under *pid*: everything but the server (and what it runs)."""
    return tree(pid, skip=server_comm)


def smaps(pid: int) -> dict[str, int]:
    """kB figures of /proc/<pid>/smaps_rollup (Rss, Pss, ...)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


def memory(pid: int, server_comm: str) -> dict:
    """PSS and RSS (MB) of the wrapper tree: the wrapper and its helpers, not the server."""
    pids = wrapper_pids(pid, server_comm)
    figures = [smaps(p) for p in pids]
    return {"pss_mb": sum(f.get("Pss", 0) for f in figures) / 1024,
            "rss_mb": sum(f.get("Rss", 0) for f in figures) / 1024,
            "processes": [comm(p) for p in pids]}


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of *pids*, plus what their reaped children used (cutime + cstime)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / TICK


# --- servers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Server:
    """A server program: how to start it bound to an address or everything, and when it is up."""

    kind: str  # sockperf, iperf3, echo, unbound, idle
    port: int
    conf_dir: str = ""  # unbound: where its two configs live

    @property
    def comm(self) -> str:
        return {"echo": "python", "idle": "python", "unbound": "unbound"}.get(self.kind, self.kind)

    @property
    def ports(self) -> str:
        """nswrap --ports spec."""
        return {"iperf3": f"{self.port},{self.port}/tcp", "unbound": "53,53/tcp"}.get(self.kind, str(self.port))

    @property
    def ready_line(self) -> str | None:
        return {"sockperf": r"to block on socket", "iperf3": r"Server listening", "echo": "listening",
                "idle": "listening"}.get(self.kind)

    def argv(self, address: str = "", automatic: bool = False) -> list[str]:
        p = str(self.port)
        if self.kind == "sockperf":
            return ["stdbuf", "-oL", "sockperf", "server", "-i", address or "0.0.0.0", "-p", p]
        if self.kind == "iperf3":
            # -i 0: no per-second reports into a pipe that nobody reads after the ready line
            return ["iperf3", "-s", "-p", p, "-i", "0", "--forceflush", *(["-B", address] if address else [])]
        if self.kind in ("echo", "idle"):
            return [*TRAFFIC, "echo", p, address or "0.0.0.0"]
        if self.kind == "unbound":
            return ["unbound", "-d", "-c", f"{self.conf_dir}/{'automatic' if automatic else 'wildcard'}.conf"]
        raise ValueError(self.kind)


def write_unbound_confs(directory: pathlib.Path) -> None:
    for name, automatic in (("wildcard", False), ("automatic", True)):
        unbound_conf(directory, ipv6=True, automatic=automatic, name=f"{name}.conf", tuned=True)


# --- variants -----------------------------------------------------------------------------------


@contextlib.contextmanager
def best_alternative(lab: Lab) -> Iterator[None]:
    """One routing table per uplink and one `ip rule from ADDR` per host address (both families),
    so that a server answering from the asked address (IP_PKTINFO) answers through its uplink."""
    batch, undo = [], []
    for i, (ifname, _, gateway) in enumerate(LAB_UPLINKS):
        table = 2000 + i
        connected = lab.exec(lab.host, ["ip", "-o", "route", "show", "dev", ifname, "proto", "kernel"]).stdout
        connected6 = lab.exec(lab.host, ["ip", "-6", "-o", "route", "show", "dev", ifname, "proto", "kernel"]).stdout
        batch += [f"route add {line.split()[0]} dev {ifname} table {table}" for line in connected.splitlines()]
        batch += [f"-6 route add {line.split()[0]} dev {ifname} table {table}" for line in connected6.splitlines()]
        if gateway:
            batch.append(f"route add default via {gateway} dev {ifname} table {table}")
        if ifname in LAB_GATEWAYS6:
            batch.append(f"-6 route add default via {LAB_GATEWAYS6[ifname]} dev {ifname} table {table}")
        batch += [f"rule add from {a} lookup {table} priority 2000" for a in LAB_ADDRESSES[ifname]]
        batch += [f"-6 rule add from {a} lookup {table} priority 2000" for a in LAB_ADDRESSES6[ifname]]
        undo += [f"route flush table {table}", f"-6 route flush table {table}"]
    undo += ["rule del priority 2000"] * 4 + ["-6 rule del priority 2000"] * 4
    try:
        # `ip -batch` has no per-line family switch: run each line as its own command
        for line in batch:
            lab.exec(lab.host, ["ip", *line.split()])
        yield
    finally:
        for line in undo:
            lab.exec(lab.host, ["ip", *line.split()], check=False)


@dataclasses.dataclass
class Running:
    proc: subprocess.Popen
    variant: str
    server: Server
    spawned: float  # time.monotonic() at spawn
    ready_r: int | None = None  # read end of --ready-fd (nswrap, old)

    def memory(self) -> dict:
        return memory(self.proc.pid, self.server.comm)

    def cpu_pids(self) -> list[int]:
        return tree(self.proc.pid)

    def ready_at(self, timeout: float) -> float | None:
        """When READY arrived on --ready-fd (time.monotonic()), or None within *timeout*."""
        if self.ready_r is None:
            return None
        if select.select([self.ready_r], [], [], timeout)[0] and os.read(self.ready_r, 64).startswith(b"READY"):
            os.close(self.ready_r)
            self.ready_r = None
            return time.monotonic()
        return None


def wrapper_argv(variant: str, ports: str, *, old: str | None = None, mask: str | None = None,
                 ready_fd: int | None = None) -> list[str]:
    """The command line that wraps a server for *variant* (nswrap, nswrap-bpf, old, handwritten)."""
    if variant in NSWRAP_VARIANTS:
        binary = f"{old}/.venv/bin/nswrap" if variant == "old" else NSWRAP
        # global6: the global IPv6 switch, as on a kernel before 6.17 (the test seam of nswrap/facts.py)
        seam = ["env", "NSWRAP_TEST_NO_FORCE_FORWARDING=1"] if variant == "nswrap-global6" else []
        return [*seam, binary, *(["--ipv6-forwarding", "global"] if seam else []),
                *(["--datapath", "bpf"] if variant == "nswrap-bpf" else []), *(["--mark-mask", mask] if mask else []),
                *(["--ready-fd", str(ready_fd)] if ready_fd is not None else []), "--ports", ports, "--"]
    if variant == "handwritten":
        return ["bash", HANDWRITTEN, *(["-m", mask] if mask else []), ports, "--"]
    return []


@contextlib.contextmanager
def serve(lab: Lab, variant: str, server: Server, *, pin: list[str] = (), old: str | None = None,
          mask: str | None = None, log: pathlib.Path | None = None, wait: bool = True) -> Iterator[Running]:
    """Run *server* the way *variant* does, until the block ends (then stop it, undo the rest).

    With *wait*, return once the server printed its ready line (not for unbound: the caller
    probes it, through the path it measures).
    """
    with contextlib.ExitStack() as stack:
        address, automatic = "", False
        if variant == "recipe2014":
            address = stack.enter_context(recipe_2014(lab, server.port, LAB_UPLINKS))
        elif variant == "bestalt":
            stack.enter_context(best_alternative(lab))
            automatic = True
        elif variant == "direct":
            automatic = True
        ready_r = ready_w = None
        if variant in NSWRAP_VARIANTS:
            ready_r, ready_w = os.pipe()
        argv = [*pin, *wrapper_argv(variant, server.ports, old=old, mask=mask, ready_fd=ready_w),
                *server.argv(address, automatic)]
        err = open(log, "ab") if log else subprocess.DEVNULL
        stack.callback(lambda: err.close() if log else None)
        spawned = time.monotonic()
        proc = lab.spawn(lab.host, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, bufsize=0,
                         pass_fds=(ready_w,) if ready_w is not None else ())
        if ready_w is not None:
            os.close(ready_w)
        running = Running(proc, variant, server, spawned, ready_r)

        def finish() -> None:
            if running.ready_r is not None:
                os.close(running.ready_r)
            lab.stop(proc, timeout=30)
            proc.stdout.close()

        stack.callback(finish)
        if wait and server.ready_line:
            wait_line(proc, server.ready_line, START_TIMEOUT)
        yield running


def stop_timed(lab: Lab, running: Running, timeout: float = 60) -> float:
    """SIGTERM the wrapper (or server) and return the seconds until it and its tree are gone."""
    t0 = time.monotonic()
    lab.stop(running.proc, timeout=timeout)
    return time.monotonic() - t0
