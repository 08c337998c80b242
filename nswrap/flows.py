"""Pure: which conntrack flows nswrap forgets, and how to ask the kernel for them.

Stale flows (docs/design.md, "Stale conntrack entries"): flows to a published port that began
before the DNAT existed would bypass it until they expire; a start forgets them. The kernel
filters a dump by family, protocol, one port and one address: `stale_dumps` says which dumps
to ask for, `stale` keeps what they return that a published range covers. At stop, an
instance's own flows are those whose replies come from its server (`mine`).

The dumps are the conntrack adapter's (netlink.Conntrack.flows); the deletion is a Change
(changes.ForgetFlows), run by a transaction like every host change.
"""

from __future__ import annotations

from collections.abc import Iterable

from nswrap.config import PROTOCOLS, PortRange
from nswrap.datapath import Instance
from nswrap.datatypes import datatype
from nswrap.facts import Facts
from nswrap.objects import IPAddress, Protocol

PROTO_NUMBERS = {"udp": 17, "tcp": 6}


@datatype
class Dump:
    """One kernel-filtered dump: a family, a protocol, one port (None: every port of the
    protocol, a range is matched here) and one original destination (None: any)."""

    version: int
    proto: Protocol
    ports: frozenset[int]
    address: IPAddress | None = None

    @property
    def single_port(self) -> int | None:
        return next(iter(self.ports)) if len(self.ports) == 1 else None

    def render(self) -> str:
        """The same filter as a conntrack(8) command line (for one port; a range: its first)."""
        words = ["conntrack", "-D", "-f", "ipv4" if self.version == 4 else "ipv6", "-p", self.proto,
                 "--orig-port-dst", str(min(self.ports))]
        if self.address is not None:
            words += ["--orig-dst", str(self.address)]
        return " ".join(words)


def stale_dumps(instance: Instance, facts: Facts) -> list[Dump]:
    """The dumps that find the flows a start must forget: per family the instance serves (IPv6
    only if the host has a global IPv6 address: else no IPv6 client reached it, and a walk of
    the whole hash is spared), per published address, per protocol with a published port."""
    addresses: list[IPAddress | None] = [a for a in instance.addresses if not a.is_loopback] or [None]
    items: tuple[PortRange, ...] = (*instance.ports, *instance.loopback_ports)
    dumps = []
    for version in instance.families:
        if version == 6 and not any(a.version == 6 and a.scope == 0 for a in facts.addresses):
            continue
        for address in (a for a in addresses if a is None or a.version == version):
            for proto in PROTOCOLS:
                ports = frozenset(port for p in items if p.proto == proto for port in range(p.outer_lo, p.outer_hi + 1))
                if ports:
                    dumps.append(Dump(version, proto, ports, address))
    return dumps


def stale(dump: Dump, flows: Iterable) -> list:
    """What a dump returned that its ports cover (the kernel filtered by one port at most)."""
    return [f for f in flows if f.dport in dump.ports]


def mine(instance: Instance, flows: Iterable) -> list:
    """An instance's own flows: DNATed to its server, whose address its replies come from."""
    servers = {instance.server(v) for v in instance.families}
    return [f for f in flows if f.reply_src in servers]
