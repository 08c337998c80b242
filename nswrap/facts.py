"""Read-only probes of the host namespace, as plain frozen data.

Nothing here changes the host. `Facts` is what the plan is computed from, so unit tests can build
one by hand and pin the plan without root.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

RT_SCOPE_UNIVERSE = 0
RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class Link:
    index: int
    ifname: str
    mtu: int
    kind: str | None = None


@dataclass(frozen=True)
class Address:
    ifname: str
    address: ipaddress.IPv4Interface
    scope: int = RT_SCOPE_UNIVERSE


@dataclass(frozen=True)
class Route:
    table: int
    dst: ipaddress.IPv4Network
    dev: str | None
    gateway: ipaddress.IPv4Address | None = None
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: ipaddress.IPv4Address | None = None
    metric: int = 0
    proto: int = 0

    @property
    def is_default(self) -> bool:
        return self.dst.prefixlen == 0


@dataclass(frozen=True)
class Rule:
    priority: int
    table: int
    fwmark: int = 0
    fwmask: int = 0
    proto: int = 0


@dataclass(frozen=True)
class Facts:
    links: tuple[Link, ...]
    addresses: tuple[Address, ...]
    routes: tuple[Route, ...]
    rules: tuple[Rule, ...]

    def link(self, ifname: str) -> Link | None:
        return next((link for link in self.links if link.ifname == ifname), None)

    def global_addresses(self, ifname: str) -> list[ipaddress.IPv4Interface]:
        return [a.address for a in self.addresses if a.ifname == ifname and a.scope == RT_SCOPE_UNIVERSE]

    def main_routes(self, ifname: str) -> list[Route]:
        return [r for r in self.routes if r.table == RT_TABLE_MAIN and r.dev == ifname]


def gather(netlink) -> Facts:
    """One dump each of links, addresses, routes (all tables) and rules."""
    links = tuple(Link(l["index"], l["ifname"], l["mtu"], l["kind"]) for l in netlink.links())
    names = {link.index: link.ifname for link in links}
    addresses = tuple(Address(names.get(a["index"], "?"), a["address"], a["scope"]) for a in netlink.addresses())
    routes = tuple(
        Route(
            r["table"],
            r["dst"],
            names.get(r["oif"]),
            r["gateway"],
            r["scope"],
            ipaddress.IPv4Address(r["prefsrc"]) if r["prefsrc"] else None,
            r["metric"],
            r["proto"],
        )
        for r in netlink.routes()
    )
    rules = tuple(Rule(r["priority"], r["table"], r["fwmark"], r["fwmask"], r["protocol"]) for r in netlink.rules())
    return Facts(links, addresses, routes, rules)
