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

import os

from nswrap.config import Protocol
from nswrap.datatypes import datatype
from nswrap.facts import HOST_PREFIX, Facts
from nswrap.objects import SCOPE_UNIVERSE, IPAddress

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


@datatype
class Fast:
    """The fast path's programs (the interfaces they are attached to) and endpoints."""

    uplinks: frozenset[str] = frozenset()
    veths: frozenset[str] = frozenset()
    endpoints: frozenset[Endpoint] = frozenset()
    stale: int = 0  # entries of `published` naming an interface that is gone (a dead instance's veth)

    def __bool__(self) -> bool:
        return bool(self.uplinks or self.veths or self.endpoints or self.stale)


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


def helped(instance, proto: str, port: int) -> bool:
    """A port whose flows a conntrack helper follows (TFTP's data from a new port of the server
    is expected from the request's entry): conntrack must see them, so they stay on nft."""
    return "tftp" in instance.helpers and proto == "udp" and port == 69


def wanted(facts: Facts, allocation, instances) -> Fast:
    """What the kernel must hold for the live `bpf` instances (allocation: the datapath's, with
    its uplinks' marks). An uplink serves an instance's family when the nft datapath would."""
    from nswrap.datapath import _addresses, instance_uplinks  # the nft datapath's own choices

    uplinks: set[str] = set()
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
                uplink = allocation.uplink(ifname)
                if uplink is None or not ethernet(facts, ifname):
                    continue
                uplinks.add(ifname)
                mark = allocation.mark(uplink.index)
                for address in asked:
                    for p in instance.ports:
                        for i in range(p.count):
                            if helped(instance, p.proto, p.outer_lo + i):
                                continue
                            endpoints.add(Endpoint(ifname, address, p.proto, p.outer_lo + i, instance.veth, mark,
                                                   server, p.inner_lo + i))
    return Fast(frozenset(uplinks), frozenset(veths), frozenset(endpoints))


def endpoint_count(facts: Facts, instance) -> int:
    """How many endpoints an instance needs, counted without making them (a range of 65,535 ports
    on every address of every uplink would be millions)."""
    from nswrap.datapath import _addresses, instance_uplinks

    total = 0
    for version in instance.families:
        addresses = len([a for a in _addresses(instance, version) if a is not None]) or len(host_addresses(facts, version))
        uplinks = [u for u in instance_uplinks(facts, instance, version) if ethernet(facts, u)]
        total += sum(p.count for p in instance.ports) * addresses * len(uplinks)
    return total
