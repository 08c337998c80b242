"""Netlink and namespaces: the only module that imports pyroute2 or calls setns/unshare.

Reads links, addresses, routes and rules of the current (host) namespace, creates the server's
network namespace, and carries out the link/address/route/rule steps of a plan, in the host
namespace or inside the server namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import ipaddress
import os
import socket
from collections.abc import Iterator


def _load_pyroute2_lazily() -> None:
    """pyroute2's package __init__ imports every module it has (IPDB, NDB, WireGuard, Plan 9...),
    about 40 ms of a 400 ms start. Register the package without running it, so importing the
    submodules below loads only what nswrap uses. Harmless if pyroute2 is already imported."""
    import importlib.util
    import sys

    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.submodule_search_locations:
            sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)


_load_pyroute2_lazily()

from pyroute2.conntrack import Conntrack  # noqa: E402
from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # noqa: E402

from nswrap.errors import NswrapError

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
IFA_F_NODAD = 0x02  # our addresses are unique by construction: usable at once, never "tentative"
FAMILIES = (socket.AF_INET, socket.AF_INET6)
GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def new_netns() -> int:
    """Create an anonymous network namespace; return an fd that holds it (the caller closes it).

    Anonymous on purpose: once nswrap drops its fd, only the server's processes hold the namespace,
    so it (and the server end of the veth, and with it the host end) vanishes with them even if
    nswrap is SIGKILLed. The calling thread is back in its original namespace on return.
    """
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            setns(host)
    finally:
        os.close(host)


@contextlib.contextmanager
def inside(netns_fd: int) -> Iterator[None]:
    """Run the block in the namespace `netns_fd`; sockets opened there stay bound to it."""
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(netns_fd)
        try:
            yield
        finally:
            setns(host)
    finally:
        os.close(host)


def child_setup(netns_fd: int):
    """preexec_fn for the server: enter its namespace; die with nswrap (set after any uid change)."""

    def setup() -> None:
        setns(netns_fd)
        _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL: no server outlives its wrapper

    return setup


def _nh_oifs(route) -> list[tuple[int, str | None]]:
    """(oif, gateway) of each next hop, whether the route is single- or multipath."""
    if route.get("multipath"):
        return [(nh.get("oif") or nh["oif"], nh.get("gateway")) for nh in route.get("multipath")]
    return [(route.get("oif"), route.get("gateway"))]


def _as_oserror(method):
    """Netlink errors leave this module as OSError, so callers need not know pyroute2."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except NetlinkError as e:
            raise OSError(e.code, os.strerror(e.code)) from None

    return wrapper


class Netlink:
    """One rtnetlink socket, bound to the namespace it was opened in."""

    def __init__(self, netns_fd: int | None = None):
        self._indexes: dict[str, int] = {}  # each lookup is a netlink round trip: ask once per name
        if netns_fd is None:
            self._ipr = IPRoute()
        else:
            with inside(netns_fd):
                self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading -------------------------------------------------------------------------

    def links(self) -> list[dict]:
        return [
            {
                "index": link["index"],
                "ifname": link.get("ifname"),
                "mtu": link.get("mtu"),
                "kind": link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
            }
            for link in self._ipr.get_links()
        ]

    def addresses(self) -> list[dict]:
        return [
            {
                "index": a["index"],
                "address": ipaddress.ip_interface(f"{a.get('address')}/{a['prefixlen']}"),
                "scope": a["scope"],
            }
            for family in FAMILIES
            for a in self._ipr.get_addr(family=family)
        ]

    def routes(self) -> list[dict]:
        """Unicast IPv4 and IPv6 routes of every table, one entry per next hop."""
        out = []
        for family in FAMILIES:
            out += self._routes(family)
        return out

    def _routes(self, family: int) -> list[dict]:
        out = []
        anywhere = "0.0.0.0" if family == socket.AF_INET else "::"
        for r in self._ipr.get_routes(family=family):
            if r["type"] != RTN_UNICAST:
                continue
            dst = ipaddress.ip_network(f"{r.get('dst') or anywhere}/{r['dst_len']}")
            for oif, gateway in _nh_oifs(r):
                out.append(
                    {
                        "table": r.get("table") or r["table"],
                        "dst": dst,
                        "oif": oif,
                        "gateway": ipaddress.ip_address(gateway) if gateway else None,
                        "scope": r["scope"],
                        "prefsrc": r.get("prefsrc"),
                        "metric": r.get("priority") or 0,
                        "proto": r["proto"],
                    }
                )
        return out

    def rules(self) -> list[dict]:
        return [
            {
                "family": 4 if family == socket.AF_INET else 6,
                "priority": r.get("priority") or 0,
                "table": r.get("table") or r["table"],
                "fwmark": r.get("fwmark") or 0,
                "fwmask": r.get("fwmask") if r.get("fwmask") is not None else (0xFFFFFFFF if r.get("fwmark") else 0),
                "protocol": r.get("protocol") or 0,
            }
            for family in FAMILIES
            for r in self._ipr.get_rules(family=family)
        ]

    def index(self, ifname: str) -> int:
        if ifname not in self._indexes:
            found = self._ipr.link_lookup(ifname=ifname)
            if not found:
                raise NswrapError(f"no such interface: {ifname}")
            self._indexes[ifname] = found[0]
        return self._indexes[ifname]

    # --- changing ------------------------------------------------------------------------

    @_as_oserror
    def veth_add(self, ifname: str, peer: str, peer_netns_fd: int, mtu: int) -> None:
        self._ipr.link(
            "add", ifname=ifname, kind="veth", mtu=mtu, peer={"ifname": peer, "net_ns_fd": peer_netns_fd, "mtu": mtu}
        )

    @_as_oserror
    def link_up(self, ifname: str) -> None:
        self._ipr.link("set", index=self.index(ifname), state="up")

    @_as_oserror
    def link_del(self, ifname: str) -> None:
        with _gone_ok():
            self._indexes.pop(ifname, None)
            found = self._ipr.link_lookup(ifname=ifname)
            if found:
                self._ipr.link("del", index=found[0])

    @_as_oserror
    def addr_add(self, ifname: str, address) -> None:
        self._ipr.addr(
            "add", index=self.index(ifname), address=str(address.ip), prefixlen=address.network.prefixlen, flags=IFA_F_NODAD
        )

    def _route_args(self, route) -> dict:
        args = {"dst": str(route.dst), "table": route.table, "proto": route.proto, "scope": route.scope}
        args["family"] = socket.AF_INET6 if route.dst.version == 6 else socket.AF_INET
        if route.dev:
            args["oif"] = self.index(route.dev)
        if route.gateway:
            args["gateway"] = str(route.gateway)
        if route.prefsrc:
            args["prefsrc"] = str(route.prefsrc)
        return args

    @_as_oserror
    def route_add(self, route) -> None:
        self._ipr.route("add", **self._route_args(route))

    @_as_oserror
    def route_del(self, route) -> None:
        with _gone_ok():
            args = self._route_args(route)
            self._ipr.route("del", **args)

    @_as_oserror
    def rule_add(self, rule) -> None:
        self._ipr.rule("add", **_rule_args(rule))

    @_as_oserror
    def rule_del(self, rule) -> None:
        with _gone_ok():
            self._ipr.rule("del", **_rule_args(rule))


class Monitor:
    """Readable whenever links, addresses, routes, rules or per-interface settings change here.

    A plain rtnetlink socket subscribed to those multicast groups: nswrap recomputes its plan from
    a fresh dump on any event, so the events need no parsing. Overflow (ENOBUFS) counts as one.
    """

    GROUPS = (
        0x1  # RTMGRP_LINK
        | 0x10 | 0x40 | 0x80  # IPv4: addresses, routes, rules
        | 0x100 | 0x400  # IPv6: addresses, routes
        | 1 << (19 - 1)  # RTNLGRP_IPV6_RULE
        | 1 << (24 - 1) | 1 << (25 - 1)  # RTNLGRP_IPV4_NETCONF, RTNLGRP_IPV6_NETCONF (forwarding)
    )

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, self.GROUPS))

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        """Read whatever is queued; True if anything was."""
        seen = False
        while True:
            try:
                if not self._sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                seen = True

    def close(self) -> None:
        self._sock.close()


def _rule_args(rule) -> dict:
    return {
        "family": socket.AF_INET6 if rule.family == 6 else socket.AF_INET,
        "priority": rule.priority,
        "fwmark": rule.fwmark,
        "fwmask": rule.fwmask,
        "table": rule.table,
        "protocol": rule.proto,
    }


def conntrack_count(mark: int | None = None, mask: int = 0xFFFFFFFF) -> int:
    """Tracked flows: all of them, or those whose ct mark under `mask` is `mark` (kernel-filtered)."""
    if mark is None:
        with Conntrack() as ct:
            return ct.count()
    total = 0
    for family in FAMILIES:  # ctnetlink dumps one address family per request
        with Conntrack(nfgen_family=family) as ct:
            total += sum(1 for _ in ct.dump_entries(mark=mark, mark_mask=mask))
    return total


def flush_conntrack(ports, marks=(), mask: int = 0) -> int:
    """Delete the conntrack entries whose original destination port is published.

    Flows created before our DNAT existed (a client that kept sending while the server restarted)
    would bypass it until they expire; and at teardown no flow may keep going to a dead server.
    `ports` holds (proto, first, last, ...) items, keyed by the host (outer) port. Flows carrying
    one of `marks` (this instance's, under `mask`) are flushed by the kernel in one message each;
    the rest are found by dumps the kernel filters by protocol and port (Linux >= 5.8; older
    kernels return everything and the port check below still holds), so a busy conntrack table
    never travels through Python. Every request covers one address family: ctnetlink's way.
    """
    numbers = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}
    deleted = 0
    for family in FAMILIES:
        with Conntrack(nfgen_family=family) as ct:
            for mark in marks:
                with _gone_ok():
                    ct.flush(mark=mark, mark_mask=mask)
            for proto, lo, hi, *_ in ports:
                number = numbers[proto]
                wanted = range(lo, hi + 1) if hi - lo < 64 else [None]  # a wide range: by protocol
                for port in wanted:
                    match = NFCTAttrTuple(family=family, proto=number, dport=port) if port else NFCTAttrTuple(family=family, proto=number)
                    for entry in list(ct.dump_entries(tuple_orig=match)):
                        t = entry.tuple_orig
                        if t.proto == number and lo <= (t.dport or 0) <= hi:
                            with _gone_ok():
                                ct.entry("del", tuple_orig=t)
                                deleted += 1
    return deleted


def enter(namespace_fds) -> None:
    """preexec_fn of `nswrap exec`: join an instance's network and mount namespaces."""
    for fd, flag in zip(namespace_fds, (CLONE_NEWNET, 0x00020000)):  # CLONE_NEWNS
        _check(_libc.setns(fd, flag), "setns")


@contextlib.contextmanager
def _gone_ok() -> Iterator[None]:
    """Undo treats 'already gone' as success: the object may have vanished with its namespace."""
    try:
        yield
    except NetlinkError as e:
        if e.code not in GONE:
            raise
    except NswrapError:
        pass  # the interface a route or address hung on is already gone
