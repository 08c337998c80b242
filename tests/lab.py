"""A simulated multihomed host built from throwaway network namespaces.

This module deliberately does not import nswrap: it is the independent
test bench (and oracle) the nswrap system tests and ``scripts/demo`` run on.
Pure standard library; needs root, ``ip`` (iproute2), ``nft``, ``sysctl``
and, for the DNS helpers, ``unbound`` and ``dig``.

Topology (every box is its own network namespace, named
``nswt-<6 hex>-<role>``)::

     c1 (203.0.113.2/26) ── r1 ──  host eth0  192.0.2.10/24 + 192.0.2.11/24 (secondary)   default via 192.0.2.1   metric 100
     c2 (203.0.113.130/26) ─ r2 ── host eth1  198.51.100.10/24                            default via 198.51.100.1 metric 200
     c3 (203.0.113.66/26) ──────── host eth2  203.0.113.65/26   (no gateway: c3 is on the same subnet)

- r1: eth0 192.0.2.1/24 (toward host), eth1 203.0.113.1/26 (toward c1).
  r2: eth0 198.51.100.1/24 (toward host), eth1 203.0.113.129/26 (toward c2).
  Routers forward, know only their two connected subnets and are
  anti-spoofing ISPs: their nft forward hook drops packets arriving from
  the host side whose source is not in their host-facing subnet.
- c1 default via 203.0.113.1, c2 default via 203.0.113.129,
  c3 default via 203.0.113.65.
- host: strict reverse path filtering (all, default and every uplink
  rp_filter=1), ip_forward=0.

Without help, a UDP server bound to 0.0.0.0 on the host answers c1 asking
192.0.2.11 from 192.0.2.10 (dig ignores the reply), and c2's query never
reaches it (rp_filter drops it: the best route back is via eth0; and if it
did get through, the reply would leave via eth0 and r1 would drop it).

Determinism notes: new namespaces inherit the IPv4 ``conf/all`` and
``conf/default`` sysctls from the initial namespace
(``net.core.devconf_inherit_init_net=0``), so every value that matters is
set explicitly; IPv6 duplicate address detection is switched off
(``accept_dad=0``) so link-local addresses are never "tentative" and
:meth:`Lab.state` is stable right after construction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "TEST_ANSWER",
    "TEST_NAME",
    "Lab",
    "LabError",
    "Path",
    "diff_states",
    "dig",
    "dig_from",
    "missing_requirements",
    "unbound_conf",
    "wait_answered",
    "wait_until",
]

T = TypeVar("T")

NS_PREFIX = "nswt-"
ROLES = ("host", "r1", "r2", "c1", "c2", "c3")
TEST_NAME = "test.example"
TEST_ANSWER = "192.0.2.99"


class LabError(RuntimeError):
    """A lab command failed or the lab could not be cleaned up."""


@dataclasses.dataclass(frozen=True)
class Path:
    """One way a client reaches the host."""

    name: str  # e.g. "c1 -> 192.0.2.11 (eth0, secondary)"
    client: str  # client namespace name
    address: str  # the host address the client asks
    uplink: str  # host interface the query arrives on


# (client role, host address, uplink, description) for Lab.paths.
_PATHS = (
    ("c1", "192.0.2.10", "eth0", "eth0"),
    ("c1", "192.0.2.11", "eth0", "eth0, secondary"),
    ("c2", "198.51.100.10", "eth1", "eth1"),
    ("c3", "203.0.113.65", "eth2", "eth2, same subnet"),
)
# The same for IPv6 (Lab.paths6): eth0's IPv6 gateway is link-local (fe80::1), as with RAs.
_PATHS6 = (
    ("c1", "2001:db8:1::10", "eth0", "eth0"),
    ("c1", "2001:db8:1::11", "eth0", "eth0, secondary"),
    ("c2", "2001:db8:2::10", "eth1", "eth1"),
    ("c3", "2001:db8:3::65", "eth2", "eth2, same subnet"),
)

# veth pairs: (namespace role creating it, its ifname, peer role, peer ifname)
_LINKS = (
    ("host", "eth0", "r1", "eth0"),
    ("host", "eth1", "r2", "eth0"),
    ("host", "eth2", "c3", "eth0"),
    ("r1", "eth1", "c1", "eth0"),
    ("r2", "eth1", "c2", "eth0"),
)

# `ip -batch` scripts per role (run after the links exist).
_IP_CONFIG = {
    "host": """
        link set lo up
        link set eth0 up
        link set eth1 up
        link set eth2 up
        addr add 192.0.2.10/24 dev eth0
        addr add 192.0.2.11/24 dev eth0
        addr add 198.51.100.10/24 dev eth1
        addr add 203.0.113.65/26 dev eth2
        route add default via 192.0.2.1 dev eth0 metric 100
        route add default via 198.51.100.1 dev eth1 metric 200
        addr add 2001:db8:1::10/64 dev eth0
        addr add 2001:db8:1::11/64 dev eth0
        addr add 2001:db8:2::10/64 dev eth1
        addr add 2001:db8:3::65/64 dev eth2
        route add ::/0 via fe80::1 dev eth0 metric 100
        route add ::/0 via 2001:db8:2::1 dev eth1 metric 200
    """,
    "r1": """
        link set lo up
        link set eth0 up
        link set eth1 up
        addr add 192.0.2.1/24 dev eth0
        addr add 203.0.113.1/26 dev eth1
        addr add fe80::1/64 dev eth0
        addr add 2001:db8:1::1/64 dev eth0
        addr add 2001:db8:a::1/64 dev eth1
    """,
    "r2": """
        link set lo up
        link set eth0 up
        link set eth1 up
        addr add 198.51.100.1/24 dev eth0
        addr add 203.0.113.129/26 dev eth1
        addr add 2001:db8:2::1/64 dev eth0
        addr add 2001:db8:b::1/64 dev eth1
    """,
    "c1": """
        link set lo up
        link set eth0 up
        addr add 203.0.113.2/26 dev eth0
        route add default via 203.0.113.1 dev eth0
        addr add 2001:db8:a::2/64 dev eth0
        route add ::/0 via 2001:db8:a::1 dev eth0
    """,
    "c2": """
        link set lo up
        link set eth0 up
        addr add 203.0.113.130/26 dev eth0
        route add default via 203.0.113.129 dev eth0
        addr add 2001:db8:b::2/64 dev eth0
        route add ::/0 via 2001:db8:b::1 dev eth0
    """,
    "c3": """
        link set lo up
        link set eth0 up
        addr add 203.0.113.66/26 dev eth0
        route add default via 203.0.113.65 dev eth0
        addr add 2001:db8:3::66/64 dev eth0
        route add ::/0 via 2001:db8:3::65 dev eth0
    """,
}

# Sysctls set before the links are created (so "default" applies to them).
_SYSCTL_EARLY = {
    "host": {
        "net.ipv4.ip_forward": "0",
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.default.rp_filter": "1",
    },
    "router": {
        "net.ipv4.ip_forward": "1",
        "net.ipv6.conf.all.forwarding": "1",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
    },
    "client": {
        "net.ipv4.ip_forward": "0",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
    },
}
_SYSCTL_COMMON = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}
# Set explicitly as well, in case "default" was not applied to the new links.
_SYSCTL_HOST_UPLINKS = {
    f"net.ipv4.conf.{ifname}.rp_filter": "1" for ifname in ("eth0", "eth1", "eth2")
}

_ANTISPOOF = """
table inet antispoof {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "eth0" ip saddr != {subnet} counter drop
        iifname "eth0" ip6 saddr != {subnet6} counter drop
    }}
}}
"""
_ROUTER_SUBNETS = {"r1": ("192.0.2.0/24", "2001:db8:1::/64"), "r2": ("198.51.100.0/24", "2001:db8:2::/64")}

# Sysctls reported by Lab.state() (globs relative to the host namespace).
_STATE_SYSCTLS = (
    "/proc/sys/net/ipv4/conf/*/forwarding",
    "/proc/sys/net/ipv4/conf/*/rp_filter",
    "/proc/sys/net/ipv4/conf/*/src_valid_mark",
    "/proc/sys/net/ipv4/conf/*/route_localnet",
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/*/forwarding",
    "/proc/sys/net/ipv6/conf/*/force_forwarding",
)


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Call *predicate* until it returns something truthy and return that.

    Raises ``TimeoutError(what)`` once *timeout* seconds have passed (the
    predicate is always tried at least once, and once more at the deadline).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(what or f"condition not met within {timeout}s")
        time.sleep(min(interval, remaining))


def _run(cmd: list[str], *, timeout: float = 30, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess:
    """Run *cmd* (text mode, output captured); LabError quoting stderr on failure."""
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr.strip()}")
    return res


def missing_requirements() -> str | None:
    """Why the lab cannot run here, or None when it can.

    Checks root, the needed commands and that a network namespace can be
    created (and deleted) with ``ip netns``.
    """
    if os.geteuid() != 0:
        return "needs root"
    missing = [c for c in ("ip", "nft", "sysctl", "unbound", "dig") if not shutil.which(c)]
    if missing:
        return f"missing commands: {' '.join(missing)} (run scripts/setup)"
    probe = f"{NS_PREFIX}probe-{secrets.token_hex(3)}"
    add = _run(["ip", "netns", "add", probe], check=False)
    if add.returncode != 0:
        return f"cannot create a network namespace: {add.stderr.strip()}"
    delete = _run(["ip", "netns", "del", probe], check=False)
    if delete.returncode != 0:
        return f"cannot delete network namespace {probe}: {delete.stderr.strip()}"
    return None


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid*."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is the state, fields[2] the process group
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Lab:
    """The simulated multihomed host (see the module docstring).

    ``__init__`` builds everything; use as a context manager or call
    :meth:`close`.
    """

    def __init__(self) -> None:
        self.prefix = f"{NS_PREFIX}{secrets.token_hex(3)}"
        self._ns = {role: f"{self.prefix}-{role}" for role in ROLES}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self.host = self._ns["host"]
        self.paths, self.paths6 = (
            tuple(
                Path(name=f"{client} -> {address} ({desc})", client=self._ns[client], address=address, uplink=uplink)
                for client, address, uplink, desc in table
            )
            for table in (_PATHS, _PATHS6)
        )
        try:
            self._build()
        except BaseException as e:
            try:
                self.close()
            except LabError as cleanup:
                e.add_note(f"cleaning up the half-built lab also failed: {cleanup}")
            raise

    # -- construction -----------------------------------------------------

    def _build(self) -> None:
        for role in ROLES:
            _run(["ip", "netns", "add", self._ns[role]])
            self._created.append(self._ns[role])
        for role in ROLES:
            kind = "host" if role == "host" else "router" if role[0] == "r" else "client"
            self._sysctl(self._ns[role], {**_SYSCTL_EARLY[kind], **_SYSCTL_COMMON})
        for role, ifname, peer_role, peer_ifname in _LINKS:
            # Run inside `role`'s namespace: nothing ever appears in ours.
            self.exec(
                self._ns[role],
                ["ip", "link", "add", ifname, "type", "veth",
                 "peer", "name", peer_ifname, "netns", self._ns[peer_role]],
            )
        self._sysctl(self.host, _SYSCTL_HOST_UPLINKS)
        for role, script in _IP_CONFIG.items():
            lines = "\n".join(line.strip() for line in script.strip().splitlines())
            self.exec(self._ns[role], ["ip", "-batch", "-"], input=lines + "\n")
        for role, (subnet, subnet6) in _ROUTER_SUBNETS.items():
            self.exec(self._ns[role], ["nft", "-f", "-"], input=_ANTISPOOF.format(subnet=subnet, subnet6=subnet6))
        wait_until(self._settled, timeout=10, what=f"{self.host}: links did not come up")

    def _settled(self) -> bool:
        """All host uplinks are up and no address is still tentative."""
        links = json.loads(self.exec(self.host, ["ip", "-json", "link", "show"]).stdout)
        addrs = json.loads(self.exec(self.host, ["ip", "-json", "addr", "show"]).stdout)
        up = all(link["operstate"] == "UP" for link in links if link["ifname"] != "lo")
        tentative = any(a.get("tentative") for link in addrs for a in link.get("addr_info", []))
        return up and not tentative

    def _sysctl(self, ns: str, values: dict[str, str]) -> None:
        self.exec(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    # -- public API -------------------------------------------------------

    def ns(self, role: str) -> str:
        """Namespace name of *role*: host, r1, r2, c1, c2 or c3."""
        try:
            return self._ns[role]
        except KeyError:
            raise KeyError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}") from None

    def exec(
        self,
        ns: str,
        argv: list[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run *argv* in namespace *ns* (text mode, output captured).

        With *check*, a non-zero exit raises :class:`LabError` quoting stderr.
        A timeout raises :class:`subprocess.TimeoutExpired` (the command is
        killed).
        """
        return _run(["ip", "netns", "exec", ns, *map(str, argv)],
                    timeout=timeout, check=check, input=input)

    def spawn(self, ns: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start *argv* in namespace *ns* in a new session and track it.

        ``ip netns exec`` execs the command, so ``proc.pid`` is the command
        itself and also its process group id -- but only once ``ip`` has
        switched namespaces and exec'd it: a signal sent right after spawning
        may hit ``ip`` instead, so wait until the command is up (e.g.
        answering) before signalling it. :meth:`close` kills whatever tracked
        process (group) is left.
        """
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *map(str, argv)], start_new_session=True, **popen_kwargs
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, *, sig: int = signal.SIGTERM,
             timeout: float = 10) -> int:
        """Send *sig* to *proc* only, wait for it to exit and return its status.

        Afterwards nothing of its process group may survive.  Raises
        :class:`TimeoutError` if it did not exit within *timeout* seconds and
        :class:`LabError` if it left processes behind; in both cases the whole
        group is killed first.
        """
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise TimeoutError(
                    f"{proc.args!r} did not exit within {timeout}s of signal {sig}; killed"
                ) from None
        leftovers = _group_members(proc.pid)
        if leftovers:
            self._kill(proc)
            raise LabError(f"{proc.args!r} exited but left processes {leftovers}; killed")
        # Fully gone: stop tracking it, so its (reusable) pid is never signalled.
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def _kill(self, proc: subprocess.Popen, grace: float = 5) -> None:
        """SIGTERM, then SIGKILL, the process group of *proc*; reap *proc*."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is None or _group_members(proc.pid):
                _signal_group(proc.pid, sig)
            try:
                proc.wait(grace)
                wait_until(lambda: not _group_members(proc.pid), grace)
                return
            except (subprocess.TimeoutExpired, TimeoutError):
                continue
        raise LabError(f"could not kill {proc.args!r} (pid {proc.pid})")

    def stop_all(self) -> None:
        """Kill every tracked process (group) still running and reap it."""
        errors = []
        for proc in self._procs:
            try:
                self._kill(proc)
            except LabError as e:
                errors.append(str(e))
        self._procs = [p for p in self._procs if p.poll() is None]
        if errors:
            raise LabError("; ".join(errors))

    def state(self) -> dict[str, Any]:
        """Snapshot of the host namespace, for before/after comparisons.

        Links, addresses, IPv4/IPv6 policy rules and routes of all tables, the
        nftables ruleset (counter values zeroed: traffic moves them, e.g. in
        iptables-nft's rules), iptables-legacy's rules when its tables are
        loaded, and the forwarding/rp_filter/src_valid_mark/route_localnet
        sysctls. Two snapshots are equal when nothing changed.
        """
        def ip_json(*args: str) -> Any:
            return json.loads(self.exec(self.host, ["ip", "-json", *args]).stdout or "[]")

        sysctl_out = self.exec(
            self.host, ["sh", "-c", "grep -H '' " + " ".join(_STATE_SYSCTLS)]
        ).stdout
        sysctls = {}
        for line in sysctl_out.splitlines():
            path, _, value = line.rpartition(":")
            sysctls[path.removeprefix("/proc/sys/")] = value
        return {
            "link": ip_json("link", "show"),
            "addr": ip_json("addr", "show"),
            "rule4": ip_json("-4", "rule", "show"),
            "rule6": ip_json("-6", "rule", "show"),
            "route4": ip_json("-4", "route", "show", "table", "all"),
            "route6": ip_json("-6", "route", "show", "table", "all"),
            "nft": _zero_counters(
                json.loads(self.exec(self.host, ["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
            ),
            "iptables_legacy": self.exec(
                self.host, ["sh", "-c", "grep -q . /proc/net/ip_tables_names && iptables-legacy-save -c"
                            " | sed -e '/^#/d' -e 's/\\[[0-9]*:[0-9]*\\]/[0:0]/g' || true"]
            ).stdout,
            "sysctl": sysctls,
        }

    def close(self) -> None:
        """Kill tracked processes and delete the namespaces (idempotent).

        Raises :class:`LabError` if a namespace of this lab remains.
        """
        if self._closed:
            return
        self._closed = True
        errors = []
        try:
            self.stop_all()
        except LabError as e:
            errors.append(str(e))
        for name in reversed(self._created):
            res = _run(["ip", "netns", "del", name], check=False)
            if res.returncode != 0:
                errors.append(f"ip netns del {name}: {res.stderr.strip()}")
        self._created.clear()
        left = [n for n in _netns_names() if n.startswith(self.prefix + "-")]
        if left:
            errors.append(f"namespaces left behind: {' '.join(left)}")
        if errors:
            raise LabError("; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zero_counters(node: Any) -> Any:
    """The same JSON with every counter's packets/bytes set to 0."""
    if isinstance(node, list):
        return [_zero_counters(v) for v in node]
    if isinstance(node, dict):
        if set(node) == {"packets", "bytes"}:
            return {"packets": 0, "bytes": 0}
        return {k: _zero_counters(v) for k, v in node.items()}
    return node


def diff_states(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Human-readable difference of two :meth:`Lab.state` snapshots ("" if equal).

    Lists are compared as multisets of entries ("-" only before, "+" only
    after); dicts key by key.
    """
    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

    out = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        out.append(f"{key}:")
        if isinstance(a, list) and isinstance(b, list):
            ca, cb = Counter(map(dump, a)), Counter(map(dump, b))
            out += [f"  - {e}" for e in (ca - cb).elements()]
            out += [f"  + {e}" for e in (cb - ca).elements()]
            if ca == cb:
                out.append("  (same entries, different order)")
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a.keys() | b.keys()):
                if a.get(k) != b.get(k):
                    out.append(f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
        else:
            out.append(f"  - {dump(a)}\n  + {dump(b)}")
    return "\n".join(out)


def unbound_conf(directory: str | os.PathLike) -> str:
    """Write ``unbound.conf`` into *directory* and return its path.

    A self-contained config for ``unbound -d -c <path>`` as root: listens on
    0.0.0.0:53 (UDP and TCP), serves ``test.example. A 192.0.2.99`` and uses
    nothing under /etc/unbound (no chroot, no privilege drop, no pidfile, no
    trust anchors, no remote control, logs errors to stderr). Validated with
    ``unbound-checkconf`` when that is installed.
    """
    directory = pathlib.Path(directory).resolve()
    path = directory / "unbound.conf"
    path.write_text(f"""\
server:
    directory: "{directory}"
    interface: 0.0.0.0
    port: 53
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    do-daemonize: no
    chroot: ""
    username: ""
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    so-reuseport: no
    access-control: 0.0.0.0/0 allow
    module-config: "iterator"
    local-zone: "example." static
    local-data: "{TEST_NAME}. A {TEST_ANSWER}"

remote-control:
    control-enable: no
""")
    if shutil.which("unbound-checkconf"):
        res = _run(["unbound-checkconf", str(path)], check=False)
        if res.returncode != 0:
            raise LabError(f"unbound-checkconf {path}: {(res.stderr or res.stdout).strip()}")
    return str(path)


def dig_from(lab: Lab, ns: str, address: str, name: str = TEST_NAME, tcp: bool = False,
             timeout: float = 2) -> str | None:
    """Ask *address* for the A record of *name* from namespace *ns*.

    Returns the answer (e.g. "192.0.2.99") or None when there was no valid
    answer. dig ignores replies from an unexpected source address, so an
    answer means the reply came from *address*.
    """
    argv = ["dig", f"@{address}", name, "A", "+short", "+tries=1", f"+time={max(1, round(timeout))}"]
    if tcp:
        argv.append("+tcp")
    try:
        res = lab.exec(ns, argv, timeout=2 * timeout + 5, check=False)
    except subprocess.TimeoutExpired:
        return None
    answer = [l for l in res.stdout.splitlines() if l.strip() and not l.startswith(";")]
    return "\n".join(answer) if res.returncode == 0 and answer else None


def dig(lab: Lab, path: Path, name: str = TEST_NAME, tcp: bool = False,
        timeout: float = 2) -> str | None:
    """:func:`dig_from` along *path*: from its client to its address."""
    return dig_from(lab, path.client, path.address, name, tcp=tcp, timeout=timeout)


def wait_answered(lab: Lab, path: Path, tcp: bool = False, timeout: float = 15) -> str:
    """Poll :func:`dig` along *path* until it is answered; TimeoutError otherwise."""
    return wait_until(
        lambda: dig(lab, path, tcp=tcp, timeout=1),
        timeout,
        interval=0.1,
        what=f"{path.name}{' (tcp)' if tcp else ''}: no answer within {timeout}s",
    )
