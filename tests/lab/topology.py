"""The simulated multihomed host: namespaces, links, addresses, routes (see the package
docstring for the picture), and :class:`Lab`, which builds it and runs things in it."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from typing import Any

from tests.lab.processes import Processes
from tests.lab.shell import LabError, netns_names, run
from tests.lab.snapshot import snapshot
from tests.lab.wait import wait_until

NS_PREFIX = "nswt-"
ROLES = ("host", "r1", "r2", "c1", "c2", "c3")


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

# Sysctls of a new namespace by kind, set before its links exist (so "default" applies to them).
# New namespaces inherit the IPv4 conf/all and conf/default values from the initial namespace
# (net.core.devconf_inherit_init_net=0), so every value that matters is set explicitly. IPv6
# duplicate address detection is off: addresses are never "tentative", snapshots are stable.
_NO_DAD = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
BASELINE_SYSCTLS = {
    "host": {
        "net.ipv4.ip_forward": "0",
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.default.rp_filter": "1",
        **_NO_DAD,
    },
    "router": {
        "net.ipv4.ip_forward": "1",
        "net.ipv6.conf.all.forwarding": "1",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        **_NO_DAD,
    },
    "client": {
        "net.ipv4.ip_forward": "0",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        **_NO_DAD,
    },
}
# Set explicitly as well, in case "default" was not applied to the new links.
_HOST_UPLINK_SYSCTLS = {f"net.ipv4.conf.{ifname}.rp_filter": "1" for ifname in ("eth0", "eth1", "eth2")}

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


def _kind(role: str) -> str:
    return "host" if role == "host" else "router" if role[0] == "r" else "client"


def netns_cookie(enter: list[str]) -> int:
    """The kernel's cookie (SO_NETNS_COOKIE) of the network namespace that the command prefix
    *enter* runs a command in, e.g. ``["nsenter", "--net=/proc/<pid>/ns/net"]``."""
    probe = ("import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
             "print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))")
    return int(run([*enter, sys.executable, "-c", probe]).stdout)


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
    add = run(["ip", "netns", "add", probe], check=False)
    if add.returncode != 0:
        return f"cannot create a network namespace: {add.stderr.strip()}"
    delete = run(["ip", "netns", "del", probe], check=False)
    if delete.returncode != 0:
        return f"cannot delete network namespace {probe}: {delete.stderr.strip()}"
    return None


class Lab:
    """The simulated multihomed host (see the package docstring).

    ``__init__`` builds everything; use as a context manager or call
    :meth:`close`. A different topology (e.g. the benchmarks' host with many
    uplinks) subclasses it and overrides :meth:`build` with the public
    building blocks :meth:`add_namespace`, :meth:`sysctl` and
    :meth:`wait_settled`; every lab has a "host" namespace, the one
    :meth:`state` describes.
    """

    def __init__(self) -> None:
        self.prefix = f"{NS_PREFIX}{secrets.token_hex(3)}"
        self.host = f"{self.prefix}-host"
        self.paths: tuple[Path, ...] = ()
        self.paths6: tuple[Path, ...] = ()
        self._ns: dict[str, str] = {}  # role -> namespace, in creation order
        self._processes = Processes()
        self._closed = False
        try:
            self.build()
        except BaseException as e:
            try:
                self.close()
            except LabError as cleanup:
                e.add_note(f"cleaning up the half-built lab also failed: {cleanup}")
            raise

    # -- construction -----------------------------------------------------

    def build(self) -> None:
        """Build the topology of the package docstring (subclasses build their own)."""
        for role in ROLES:
            self.add_namespace(role, _kind(role))
        for role, ifname, peer_role, peer_ifname in _LINKS:
            # Run inside `role`'s namespace: nothing ever appears in ours.
            self.exec(
                self._ns[role],
                ["ip", "link", "add", ifname, "type", "veth",
                 "peer", "name", peer_ifname, "netns", self._ns[peer_role]],
            )
        self.sysctl(self.host, _HOST_UPLINK_SYSCTLS)
        for role, script in _IP_CONFIG.items():
            lines = "\n".join(line.strip() for line in script.strip().splitlines())
            self.exec(self._ns[role], ["ip", "-batch", "-"], input=lines + "\n")
        for role, (subnet, subnet6) in _ROUTER_SUBNETS.items():
            self.exec(self._ns[role], ["nft", "-f", "-"], input=_ANTISPOOF.format(subnet=subnet, subnet6=subnet6))
        self.paths, self.paths6 = (
            tuple(
                Path(name=f"{client} -> {address} ({desc})", client=self._ns[client], address=address, uplink=uplink)
                for client, address, uplink, desc in table
            )
            for table in (_PATHS, _PATHS6)
        )
        self.wait_settled()

    def add_namespace(self, role: str, kind: str = "client") -> str:
        """Create namespace ``<prefix>-<role>`` with the baseline sysctls of *kind* ("host",
        "router" or "client": see ``BASELINE_SYSCTLS``) and return its name.

        It belongs to the lab from then on: :meth:`close` deletes it. Created with ``ip netns
        add`` run directly, never inside ``ip netns exec`` (whose mounts are private: the new
        namespace's bind mount would not be seen outside).
        """
        if role in self._ns:
            raise LabError(f"{self.prefix}: namespace {role!r} exists already")
        name = f"{self.prefix}-{role}"
        run(["ip", "netns", "add", name])
        self._ns[role] = name
        self.sysctl(name, BASELINE_SYSCTLS[kind])
        return name

    def delete_namespace(self, role: str) -> None:
        """Delete the namespace of *role* now (the kernel deletes its veths' peers with it)."""
        run(["ip", "netns", "del", self.ns(role)])
        del self._ns[role]

    def sysctl(self, ns: str, values: dict[str, str]) -> None:
        """Write sysctls (``{"net.ipv4.ip_forward": "0", ...}``) in namespace *ns*."""
        self.exec(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    def wait_settled(self, timeout: float = 10) -> None:
        """Wait until the host's links are all up and none of its addresses is tentative."""
        wait_until(self._settled, timeout=timeout, what=f"{self.host}: links did not come up")

    def _settled(self) -> bool:
        links = json.loads(self.exec(self.host, ["ip", "-json", "link", "show"]).stdout)
        addrs = json.loads(self.exec(self.host, ["ip", "-json", "addr", "show"]).stdout)
        up = all(link["operstate"] == "UP" for link in links if link["ifname"] != "lo")
        tentative = any(a.get("tentative") for link in addrs for a in link.get("addr_info", []))
        return up and not tentative

    # -- running things ---------------------------------------------------

    def ns(self, role: str) -> str:
        """Namespace name of *role*: host, r1, r2, c1, c2, c3 (or one added later)."""
        try:
            return self._ns[role]
        except KeyError:
            raise KeyError(f"unknown role {role!r}; expected one of {', '.join(self._ns)}") from None

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
        return run(["ip", "netns", "exec", ns, *map(str, argv)],
                   timeout=timeout, check=check, input=input)

    def netns_cookie(self, ns: str) -> int:
        """The kernel's cookie of namespace *ns*: unlike its inode, never reused."""
        return netns_cookie(["ip", "netns", "exec", ns])

    def spawn(self, ns: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start *argv* in namespace *ns* in a new session and track it.

        ``ip netns exec`` execs the command, so ``proc.pid`` is the command
        itself and also its process group id -- but only once ``ip`` has
        switched namespaces and exec'd it: a signal sent right after spawning
        may hit ``ip`` instead, so wait until the command is up (e.g.
        answering) before signalling it. :meth:`close` kills whatever tracked
        process (group) is left.
        """
        return self._processes.spawn(ns, argv, **popen_kwargs)

    def stop(self, proc: subprocess.Popen, *, sig: int = signal.SIGTERM,
             timeout: float = 10) -> int:
        """Send *sig* to *proc* only, wait for it to exit and return its status.

        Afterwards nothing of its process group may survive.  Raises
        :class:`TimeoutError` if it did not exit within *timeout* seconds and
        :class:`LabError` if it left processes behind; in both cases the whole
        group is killed first.
        """
        return self._processes.stop(proc, sig=sig, timeout=timeout)

    def stop_all(self) -> None:
        """Kill every tracked process (group) still running and reap it."""
        self._processes.stop_all()

    def state(self) -> dict[str, Any]:
        """Snapshot of the host namespace, for before/after comparisons (:func:`diff_states`)."""
        return snapshot(lambda argv: self.exec(self.host, argv).stdout)

    # -- the end ----------------------------------------------------------

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
        for name in reversed(list(self._ns.values())):
            res = run(["ip", "netns", "del", name], check=False)
            if res.returncode != 0:
                errors.append(f"ip netns del {name}: {res.stderr.strip()}")
        self._ns.clear()
        left = [n for n in netns_names() if n.startswith(self.prefix + "-")]
        if left:
            errors.append(f"namespaces left behind: {' '.join(left)}")
        if errors:
            raise LabError("; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
