"""Read-only probes of the host namespace, as plain frozen data.

Nothing here changes the host. `Facts` is what the plan is computed from, so unit tests can build
one by hand and pin the plan without root.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from nswrap import firewall
from nswrap.firewall import FirewallFacts

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
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    scope: int = RT_SCOPE_UNIVERSE


@dataclass(frozen=True)
class Route:
    table: int
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    dev: str | None
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
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
    family: int = 4


@dataclass(frozen=True)
class Facts:
    links: tuple[Link, ...]
    addresses: tuple[Address, ...]
    routes: tuple[Route, ...]
    rules: tuple[Rule, ...]
    forwarding: dict = field(default_factory=dict)  # ifname -> IPv4 forwarding before any nswrap
    forwarding6: dict = field(default_factory=dict)  # ifname -> IPv6 force_forwarding; "all" -> global
    ipv6_per_interface: bool = True  # Linux >= 6.17: per-interface IPv6 forwarding (force_forwarding)
    firewall: FirewallFacts = FirewallFacts(())
    loopback_listeners: frozenset = frozenset()  # (proto, port) a host process serves on 127.0.0.1
    resolv_conf: str = ""  # the host's /etc/resolv.conf
    resolved_upstreams: str = ""  # systemd-resolved's /run/systemd/resolve/resolv.conf, if any

    def link(self, ifname: str) -> Link | None:
        return next((link for link in self.links if link.ifname == ifname), None)

    def global_addresses(self, ifname: str, version: int = 4) -> list:
        return [
            a.address for a in self.addresses if a.ifname == ifname and a.scope == RT_SCOPE_UNIVERSE and a.address.version == version
        ]

    def main_routes(self, ifname: str) -> list[Route]:
        return [r for r in self.routes if r.table == RT_TABLE_MAIN and r.dev == ifname]


def _sysctls(pattern: str, names) -> dict:
    values = {}
    for name in names:
        try:
            with open(pattern.format(name)) as f:
                values[name] = f.read().strip()
        except OSError:
            pass
    return values


def _loopback_listeners() -> frozenset:
    """Ports a host process already serves on 127.0.0.1 (bound to it or to 0.0.0.0)."""
    import psutil  # lazy: only a running instance needs it

    found = set()
    for kind, proto in (("udp", "udp"), ("tcp", "tcp")):
        for conn in psutil.net_connections(kind=kind):
            if conn.laddr and conn.laddr.ip in ("127.0.0.1", "0.0.0.0", "::1", "::") and (proto == "udp" or conn.status == "LISTEN"):
                found.add((proto, conn.laddr.port))
    return frozenset(found)


def gather(netlink, handed_over: dict | None = None) -> Facts:
    """One dump each of links, addresses, routes (all tables) and rules, plus the firewall.

    `handed_over`: sysctl values live instances recorded before they changed them, so that
    "was forwarding on before nswrap?" has the host's answer, not another instance's.
    """
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
            ipaddress.ip_address(r["prefsrc"]) if r["prefsrc"] else None,
            r["metric"],
            r["proto"],
        )
        for r in netlink.routes()
    )
    rules = tuple(Rule(r["priority"], r["table"], r["fwmark"], r["fwmask"], r["protocol"], r["family"]) for r in netlink.rules())
    names = [link.ifname for link in links]
    forwarding = _sysctls("/proc/sys/net/ipv4/conf/{}/forwarding", names)
    forwarding6 = _sysctls("/proc/sys/net/ipv6/conf/{}/force_forwarding", names)
    forwarding6.update(_sysctls("/proc/sys/net/ipv6/conf/{}/forwarding", ["all"]))
    for key, value in (handed_over or {}).items():
        parts = key.split("/")
        if len(parts) == 5 and parts[1] == "ipv4" and parts[4] == "forwarding" and parts[3] in forwarding:
            forwarding[parts[3]] = value
        if len(parts) == 5 and parts[1] == "ipv6" and parts[4] == "force_forwarding" and parts[3] in forwarding6:
            forwarding6[parts[3]] = value
    return Facts(
        links=links,
        addresses=addresses,
        routes=routes,
        rules=rules,
        forwarding=forwarding,
        forwarding6=forwarding6,
        ipv6_per_interface=os.path.exists("/proc/sys/net/ipv6/conf/lo/force_forwarding"),
        firewall=firewall.probe(),
        loopback_listeners=_loopback_listeners(),
        resolv_conf=_read("/etc/resolv.conf"),
        resolved_upstreams=_read("/run/systemd/resolve/resolv.conf"),
    )


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
