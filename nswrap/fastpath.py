"""Pure: what the tc-BPF fast path (`--datapath bpf`, docs/fastpath.md) must hold for the live
instances, and how it differs from what the kernel holds.

    wanted(facts, allocation, instances) -> Fast

The fast path is shared by the instances of a network namespace, like the nft table: one program
on the ingress of each uplink that serves a `bpf` instance, one on the host end of each such
instance's veth, and one map of published endpoints: (uplink, address asked, protocol, port) ->
(the server's veth, the uplink's mark, the server's address and port). An instance published on
every address of the host has one endpoint per address (the nft datapath asks `fib daddr type
local` instead), so the endpoints follow the host's addresses. Everything is named by interface
names here; the adapter (nswrap/bpf/fast.py) resolves their indexes when it writes.
"""

from __future__ import annotations

import heapq
import ipaddress
import os

from nswrap.config import DEFAULT_UDP_TIMEOUT, Protocol
from nswrap.datatypes import datatype, replace
from nswrap.facts import HOST_PREFIX, Facts
from nswrap.objects import SCOPE_UNIVERSE, IPAddress, IPNetwork

MAX_ENDPOINTS = 262144  # the `published` map's max_entries (nswrap/bpf/fastpath.bpf.c)
UPLINK_PROGRAM, VETH_PROGRAM = "nswrap_uplink", "nswrap_veth"  # names of the tc filters
FAST_PRIORITY = 65001  # nswrap's tc priority: late, so another tool's filters see packets first
FAST_OBJECT = os.path.join(os.path.dirname(__file__), "bpf", "fastpath.bpf.o")  # built from fastpath.bpf.c


@datatype(order=True)
class Endpoint:
    """One published (uplink, address, protocol, port): where its flows go."""

    uplink: str
    address: IPAddress
    proto: Protocol
    port: int
    veth: str
    mark: int
    server: IPAddress
    server_port: int
    timeout: int = DEFAULT_UDP_TIMEOUT  # seconds a quiet flow stays with its uplink (--udp-timeout)


@datatype(order=True)
class Source:
    """Which client addresses an uplink may bring (`sources`, the longest prefix wins)."""

    uplink: str
    network: IPNetwork
    allowed: bool


@datatype
class Fast:
    """The fast path's programs (the interfaces they are attached to) and endpoints."""

    uplinks: frozenset[str] = frozenset()
    veths: frozenset[str] = frozenset()
    endpoints: frozenset[Endpoint] = frozenset()
    sources: frozenset[Source] = frozenset()
    stale: int = 0  # entries of `published` naming an interface that is gone (a dead instance's veth)
    # the programs attached are to be replaced: an older nswrap's, or of two loads (bpf/fast.py, judge)
    outdated: bool = False
    # they are a newer nswrap's whose maps this one cannot write: only the filters are its to change
    foreign: bool = False

    def __bool__(self) -> bool:
        return bool(self.uplinks or self.veths or self.endpoints or self.sources or self.stale or self.outdated
                    or self.foreign)


def host_addresses(facts: Facts, version: int) -> list[IPAddress]:
    """The addresses a client may ask for "every address of the host": global ones, on any
    interface but lo and nswrap's veths (the weak host model: a client on eth1 may ask eth0's)."""
    found = [a.address.ip for a in facts.addresses
             if a.version == version and a.scope == SCOPE_UNIVERSE and not a.tentative
             and a.ifname != "lo" and not a.ifname.startswith(HOST_PREFIX)]
    return sorted(set(found), key=str)


def ethernet(facts: Facts, ifname: str) -> bool:
    """The programs parse Ethernet frames: an uplink without a link-layer address (WireGuard, a
    tun device) stays on the nft datapath."""
    link = facts.link(ifname)
    return link is not None and bool(link.mac)


TFTP: tuple[Protocol, int] = ("udp", 69)  # the port --helper tftp follows


def helped(instance, proto: str, port: int) -> bool:
    """A port whose flows a conntrack helper follows (TFTP's data from a new port of the server
    is expected from the request's entry): conntrack must see them, so they stay on nft."""
    return "tftp" in instance.helpers and (proto, port) == TFTP


# Sources no uplink brings: martians (RFC 6890's, as the kernel's own checks have them) and
# link-local ones (the host's stack knows their zone); the host's own addresses and nswrap's
# internal ranges are added from the facts.
MARTIANS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "169.254.0.0/16",
    "::/128", "::1/128", "fe80::/10", "ff00::/8"))


def sources(facts: Facts, dp, instances, uplink, versions) -> set[Source]:
    """What strict reverse-path filtering would let `uplink` bring, with nswrap's table for it:
    anything where the table has a default route, its routes' destinations otherwise; never a
    martian, one of the host's own addresses or a server's (the kernel's rp_filter never sees the
    fast path's packets)."""
    from nswrap.datapath import internal_ranges

    out: set[Source] = set()
    table = [r for r in dp.routes if r.table == uplink.table]
    for version in versions:
        anywhere = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
        routed = [r.dst for r in table if r.version == version]
        out.add(Source(uplink.ifname, anywhere, any(d.prefixlen == 0 for d in routed)))
        out.update(Source(uplink.ifname, d, True) for d in routed if d.prefixlen and not d.is_link_local)
        denied = [*internal_ranges(instances)[version], *(n for n in MARTIANS if n.version == version)]
        # (a veth's host end is in the internal ranges: its addresses, which come with each start,
        # would make every start look like a host change)
        denied += [ipaddress.ip_network(a.address.ip) for a in facts.addresses
                   if a.version == version and not a.ifname.startswith(HOST_PREFIX)]
        out.update(Source(uplink.ifname, n, False) for n in denied)
    # a denied network wins over an allowed one of the same prefix
    return {s for s in out if s.allowed is False or Source(s.uplink, s.network, False) not in out}


def wanted(facts: Facts, dp, instances) -> Fast:
    """What the kernel must hold for the live `bpf` instances (dp: the datapath computed for them,
    with its uplinks' marks and tables). An uplink serves an instance's family when the nft
    datapath would."""
    from nswrap.datapath import _addresses, instance_uplinks  # the nft datapath's own choices

    uplinks: dict[str, set[int]] = {}
    veths: set[str] = set()
    endpoints: set[Endpoint] = set()
    for instance in instances:
        if instance.datapath != "bpf":
            continue
        veths.add(instance.veth)
        for version in instance.families:
            server = instance.server(version)
            asked = [a for a in _addresses(instance, version) if a is not None] or host_addresses(facts, version)
            for ifname in instance_uplinks(facts, instance, version):
                uplink = dp.allocation.uplink(ifname)
                if uplink is None or not ethernet(facts, ifname):
                    continue
                uplinks.setdefault(ifname, set()).add(version)
                mark = dp.allocation.mark(uplink.index)
                for address in asked:
                    for p in instance.ports:
                        for i in range(p.count):
                            if helped(instance, p.proto, p.outer_lo + i):
                                continue
                            endpoints.add(Endpoint(ifname, address, p.proto, p.outer_lo + i, instance.veth, mark,
                                                   server, p.inner_lo + i, instance.udp_timeout))
    allowed: set[Source] = set()
    for ifname, versions in uplinks.items():
        allowed |= sources(facts, dp, instances, dp.allocation.uplink(ifname), sorted(versions))
    return Fast(frozenset(uplinks), frozenset(veths), frozenset(endpoints), frozenset(allowed))


SPILLED = "the fast path's map of published endpoints is full"  # the warning's fixed part: said once


def _key(e: Endpoint) -> tuple:
    """What the map is keyed by: an endpoint with another value is the same entry, rewritten."""
    return (e.uplink, e.address, e.proto, e.port)


def _fill_order(e: Endpoint) -> tuple:
    """IPv6 first (the nft datapath beneath serves IPv6 only where the host forwards it; IPv4 it
    always serves), then uplink, address, protocol, port."""
    return (-e.address.version, e.uplink, int(e.address), e.proto, e.port)


def fit(want: Fast, have: Fast | None) -> tuple[Fast, int]:
    """`want` cut to what the map holds, and how many endpoints it left out. A start is refused
    beyond it (precheck.check_endpoints); the host may grow past it while serving (new addresses):
    the entries the map holds that are still wanted stay, with their wanted values, so no flow
    changes path; the others fill it in _fill_order. What is left out takes the nft datapath.
    Beside a newer nswrap's programs whose maps this one cannot write (`Fast.foreign`), only the
    filters are wanted: that nswrap's instances write the maps."""
    if have is not None and have.foreign:  # a newer nswrap's maps, which this one cannot write (nor read)
        return replace(want, endpoints=frozenset(), sources=frozenset(), foreign=True), 0
    spill = len(want.endpoints) - MAX_ENDPOINTS
    if spill <= 0:
        return want, 0
    held = {_key(e) for e in have.endpoints} if have else set()
    kept = [e for e in want.endpoints if _key(e) in held]  # at most the map's size (the permanent `published`: bpf/fast.py)
    room = MAX_ENDPOINTS - len(kept)
    new = heapq.nsmallest(room, (e for e in want.endpoints if _key(e) not in held), key=_fill_order)
    return replace(want, endpoints=frozenset(kept) | frozenset(new)), spill


def spilled(count: int) -> str:
    """The warning: its words before the first colon are SPILLED alone (datapath.topic)."""
    return (f"{SPILLED}: {count} endpoints the live bpf instances publish on this host's addresses now, beyond its "
            f"{MAX_ENDPOINTS}, take the nft datapath (IPv6 ones are served only where the host forwards IPv6), and a "
            "bpf start is refused until fewer are published (--uplink, --address)")


def endpoint_count(facts: Facts, instance) -> int:
    """How many endpoints an instance needs, counted without making them (a range of 65,535 ports
    on every address of every uplink would be millions)."""
    from nswrap.datapath import _addresses, instance_uplinks

    total = 0
    for version in instance.families:
        addresses = len([a for a in _addresses(instance, version) if a is not None]) or len(host_addresses(facts, version))
        uplinks = [u for u in instance_uplinks(facts, instance, version) if ethernet(facts, u)]
        ports = sum(p.count for p in instance.ports) - sum(
            1 for p in instance.ports if p.outer_lo <= TFTP[1] < p.outer_lo + p.count and helped(instance, p.proto, TFTP[1]))
        total += ports * addresses * len(uplinks)
    return total
