"""Helpers shared by the system tests: how nswrap and the fixture servers are started in the lab."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.lab import group_members, unbound_conf, wait_until
from tests.system.holdlog import STEP_LINE

HERE = Path(__file__).parent
NSWRAP = [sys.executable, "-m", "nswrap"]
SIGECHO = [sys.executable, str(HERE / "sigecho.py")]  # prints "ready", echoes signals, exits 3 on SIGTERM
UDPECHO = [sys.executable, str(HERE / "udpecho.py")]
HOLDLOG = [sys.executable, str(HERE / "holdlog.py")]  # nswrap held between two host changes


def processes_running(marker: str, name: str | None = None) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line mentions `marker` (a unique tmp path, say),
    optionally only those called `name`. Unlike `pgrep -x NAME`, never someone else's server."""
    found = []
    for p in psutil.process_iter(["cmdline", "status", "name"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or (name and p.info["name"] != name):
            continue
        if any(marker in arg for arg in p.info["cmdline"] or ()):
            found.append(p)
    return found


def datapath() -> str:
    """The datapath this test's nswrap runs with (the `lab` fixture's parameter, tests/conftest.py)."""
    return os.environ.get("NSWRAP_DATAPATH", "nft")


def spoofing_client(lab, sources: tuple[str, ...]) -> str:
    """c1, ready to send a flood from `sources` (extra addresses of its /26) with
    scripts/bench_traffic.py: the answers reach no socket there (the tool reads them raw), so no
    port unreachable goes back. Returns c1's namespace."""
    c1 = lab.ns("c1")
    lab.exec(c1, ["ip", "-batch", "-"], input="".join(f"addr add {a}/26 dev eth0\n" for a in sources))
    lab.exec(c1, ["nft", "add table ip flood; add chain ip flood out { type filter hook output priority 0; };"
                      " add rule ip flood out icmp type destination-unreachable drop"])
    return c1


def fast_flows(lab, uplink: str = "eth0") -> list[dict]:
    """The fast path's flow map, as bpftool dumps it (an oracle independent of nswrap): found from
    the program of nswrap's filter on the uplink (tc), and that program's maps (bpftool)."""
    shown = json.loads(lab.exec(lab.host, ["tc", "-j", "filter", "show", "dev", uplink, "ingress"]).stdout or "[]")
    ids = [f["options"]["prog"]["id"] for f in shown if f.get("options", {}).get("bpf_name") == "nswrap_uplink"]
    if not ids:
        return []

    def bpftool(*args: str):
        return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)

    for map_id in bpftool("prog", "show", "id", str(ids[0]))["map_ids"]:
        if bpftool("map", "show", "id", str(map_id))["name"] == "flows":
            return bpftool("map", "dump", "id", str(map_id))
    return []


def fast_flow(entry: dict) -> dict:
    """One entry of fast_flows, decoded by this test's own reading of the layout in
    nswrap/bpf/fastpath.bpf.c (struct flow_key -> struct flow): the client's address, the client
    port the server sees (the key's) and the client's own (the value's), the address and port asked."""
    key, value = (bytes(int(b, 16) for b in entry[part]) for part in ("key", "value"))
    size = 4 if key[36] == 4 else 16
    return {"client": str(ipaddress.ip_address(key[:size])), "port_seen": int.from_bytes(key[32:34], "big"),
            "client_port": int.from_bytes(value[18:20], "big"), "asked": str(ipaddress.ip_address(value[:size])),
            "asked_port": int.from_bytes(value[16:18], "big")}


def nswrap(lab, *args, timeout=60, env: dict[str, str] | None = None):
    """Run nswrap to completion in the lab's host namespace (env: variables added)."""
    prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
    return lab.exec(lab.host, [*prefix, *NSWRAP, *args], check=False, timeout=timeout)


def start(lab, directory: Path, *args, name="nswrap", **popen_kwargs):
    """Start nswrap in the background; stdout/stderr go to directory/<name>.out|.err."""
    with (directory / f"{name}.out").open("w") as out, (directory / f"{name}.err").open("w") as err:
        return lab.spawn(lab.host, [*NSWRAP, *args], stdout=out, stderr=err, **popen_kwargs)


def output(directory: Path, name="nswrap", stream="out") -> str:
    return (directory / f"{name}.{stream}").read_text()


def records(log: str) -> list[str]:
    """nswrap's stderr split into what it logged: messages (`nswrap: ...`, continued on the lines
    after) and, with -v, host changes as shell lines, each change followed by an empty line."""
    found: list[str] = []
    open_shell = False  # inside a change's lines (they end with an empty line)
    open_message = False
    for line in log.splitlines():
        if not line:
            open_shell = open_message = False
        elif line.startswith("nswrap: "):
            found.append(line)
            open_shell, open_message = False, True
        elif open_shell or (open_message and not line.startswith(STEP_LINE)):
            found[-1] += "\n" + line
        else:
            found.append(line)
            open_shell, open_message = True, False
    return found


def count_steps(log: str) -> int:
    """How many host changes an -v log records (each logged before it is carried out)."""
    return sum(record.startswith(STEP_LINE) for record in records(log))


def setup_steps(log: str) -> int:
    """How many host changes the -v log of a start that reached "serving" made before serving."""
    lines = log.splitlines()
    serving = next((i for i, line in enumerate(lines) if line.startswith("nswrap: ") and ": serving " in line), None)
    assert serving is not None, f"no 'serving' line in the log:\n{log}"
    return count_steps("\n".join(lines[:serving]))


class Held:
    """`nswrap -v ARGS` in the lab's host namespace, held right after its `after`-th host change
    (tests/system/holdlog.py): a signal sent now lands exactly there. Deterministic, unlike polling
    the log, which a fast setup outruns. Output in directory/nswrap.out and .err."""

    def __init__(self, lab, directory: Path, after: int, *args):
        self.lab, self.directory = lab, directory
        held_r, held_w = os.pipe()
        go_r, self.go_w = os.pipe()
        try:
            argv = [*HOLDLOG, str(after), str(held_w), str(go_r), "--", "-v", *args]
            with (directory / "nswrap.out").open("w") as out, (directory / "nswrap.err").open("w") as err:
                self.proc = lab.spawn(lab.host, argv, stdout=out, stderr=err, pass_fds=(held_w, go_r))
        finally:
            os.close(held_w)
            os.close(go_r)
        with os.fdopen(held_r, "rb") as held:  # a line once held; EOF if nswrap exited before
            ready = select.select([held], [], [], 30)[0]
            self.where = held.readline().decode().strip() if ready else ""
        if not self.where.startswith("held before: "):
            self.finish(signal.SIGKILL)
            raise AssertionError(f"nswrap was not held after change {after}:\n{output(directory, stream='err')}")

    def finish(self, sig: int) -> int:
        """Send `sig` where nswrap is held, let it go on, and return its exit status."""
        self.proc.send_signal(sig)
        os.close(self.go_w)
        if sig == signal.SIGKILL:
            # nswrap's init (if it started one) dies of PDEATHSIG, which the kernel delivers on its
            # own time: wait for it before the lab checks that the process group is empty
            self.proc.wait(10)
            wait_until(lambda: not group_members(self.proc.pid), 10, what="nswrap's init dies with it")
        return self.lab.stop(self.proc)


def wait_ready(directory: Path, name="nswrap", timeout=20) -> None:
    """Wait for a fixture server's "ready" line (printed once it is bound, inside the namespace)."""
    wait_until(lambda: "ready" in output(directory, name), timeout, what=f"{name}: server ready")


def echo_answered(lab, client: str, address: str, port: int, sport: int = 0, source: str | None = None) -> bool:
    argv = [*UDPECHO, "ask", address, str(port)] + ([str(sport)] if sport or source else []) + ([source] if source else [])
    return lab.exec(client, argv, check=False, timeout=30).returncode == 0


BIG = [f"big.example. TXT \"{i:02d}{'x' * 198}\"" for i in range(18)]  # ~3.7 KB, under EDNS 4096: fragments on a 1500 MTU


def dual_stack_unbound(tmp_path, port: int) -> list[str]:
    with open(unbound_conf(tmp_path)) as f:
        text = f.read()
    text = text.replace("interface: 0.0.0.0", "interface: 0.0.0.0\n    interface: ::0").replace("do-ip6: no", "do-ip6: yes")
    text = text.replace("port: 53", f"port: {port}")
    text = text.replace("access-control: 0.0.0.0/0 allow", "access-control: 0.0.0.0/0 allow\n    access-control: ::/0 allow")
    extra = "    max-udp-size: 4096\n    edns-buffer-size: 4096\n" + "".join(f"    local-data: '{record}'\n" for record in BIG)
    text = text.replace("remote-control:", extra + "\nremote-control:")
    conf = tmp_path / "dual.conf"
    conf.write_text(text)
    return ["unbound", "-d", "-c", str(conf)]
