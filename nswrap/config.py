"""What the user asked for, validated. Pure: no I/O, no host access.

Every check that can fail on bad input lives here, so bad input is refused before nswrap looks
at (let alone changes) the host.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from nswrap.errors import UsageError

PROTOCOLS = ("udp", "tcp")
IFNAMSIZ = 15  # the kernel's limit on interface names, without the NUL
DEFAULT_POOL = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking range: rarely routed
DEFAULT_MARK_MASK = 0xF0000000
HELPERS = ("tftp",)  # conntrack helpers nswrap can attach (the server answers from a new port)  # free of kube-proxy, wg-quick, Tailscale, Cilium, mwan3, OpenWrt pbr


@dataclass(frozen=True, order=True)
class PortRange:
    """Published ports `outer_lo..outer_hi` of `proto`, delivered to `inner_lo..` in the server."""

    proto: str
    outer_lo: int
    outer_hi: int
    inner_lo: int

    @property
    def count(self) -> int:
        return self.outer_hi - self.outer_lo + 1

    @property
    def remapped(self) -> bool:
        return self.inner_lo != self.outer_lo

    def __str__(self) -> str:
        outer = _span(self.outer_lo, self.outer_hi)
        if self.remapped:
            inner_hi = self.inner_lo + self.count - 1
            outer += ":" + _span(self.inner_lo, inner_hi)
        return f"{outer}/{self.proto}"


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


_ITEM = re.compile(r"^(?P<outer>\d+(?:-\d+)?)(?::(?P<inner>\d+(?:-\d+)?))?(?:/(?P<proto>[a-z]+))?$")


def _parse_span(text: str, item: str) -> tuple[int, int]:
    lo_s, _, hi_s = text.partition("-")
    lo, hi = int(lo_s), int(hi_s or lo_s)
    for port in (lo, hi):
        if not 1 <= port <= 65535:
            raise UsageError(f"invalid port spec {item!r}: port {port} is not in 1-65535")
    if hi < lo:
        raise UsageError(f"invalid port spec {item!r}: range {text} ends before it starts")
    return lo, hi


def parse_port_item(item: str) -> PortRange:
    match = _ITEM.match(item.strip().lower())
    if not match:
        raise UsageError(f"invalid port spec {item!r}: expected PORT, OUTER:INNER or A-B[:C-D], optionally /udp or /tcp")
    proto = match["proto"] or "udp"
    if proto not in PROTOCOLS:
        raise UsageError(f"invalid port spec {item!r}: protocol must be udp or tcp")
    outer_lo, outer_hi = _parse_span(match["outer"], item)
    inner_lo, inner_hi = _parse_span(match["inner"], item) if match["inner"] else (outer_lo, outer_hi)
    if inner_hi - inner_lo != outer_hi - outer_lo:
        raise UsageError(f"invalid port spec {item!r}: both ranges must have the same length")
    return PortRange(proto, outer_lo, outer_hi, inner_lo)


def parse_ports(specs: tuple[str, ...] | list[str]) -> tuple[PortRange, ...]:
    """Parse repeatable `--ports` values; refuse overlaps, since one published port has one target."""
    items = []
    for spec in specs:
        for item in spec.split(","):
            if not item.strip():
                raise UsageError(f"invalid port spec {spec!r}: empty item")
            items.append(parse_port_item(item))
    ranges = sorted(items)
    for before, after in zip(ranges, ranges[1:]):
        if before.proto == after.proto and after.outer_lo <= before.outer_hi:
            raise UsageError(f"invalid port spec: {before} and {after} publish the same port twice")
    return tuple(ranges)


@dataclass(frozen=True)
class UplinkSpec:
    ifname: str
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    def __str__(self) -> str:
        return self.ifname + (f"={self.gateway}" if self.gateway else "")


def check_ifname(name: str, what: str = "interface name") -> str:
    if not name or len(name) > IFNAMSIZ or name in (".", "..") or re.search(r"[\s/:]", name):
        raise UsageError(f"invalid {what} {name!r}: 1-{IFNAMSIZ} characters, no '/', ':' or spaces")
    return name


def parse_uplink(text: str) -> UplinkSpec:
    ifname, sep, gateway = text.partition("=")
    check_ifname(ifname, "uplink")
    if not sep:
        return UplinkSpec(ifname)
    try:
        return UplinkSpec(ifname, ipaddress.ip_address(gateway))
    except ValueError:
        raise UsageError(f"invalid uplink {text!r}: {gateway!r} is not a gateway address") from None


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"invalid address {text!r}: expected an address of this host") from None


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise UsageError(f"invalid subnet {text!r}: {e}") from None
    if net.prefixlen > 30:
        raise UsageError(f"invalid subnet {text!r}: needs at least a /30 (two addresses)")
    return net


def parse_mark_mask(text: str) -> int:
    try:
        mask = int(text, 0)
    except ValueError:
        raise UsageError(f"invalid mark mask {text!r}: expected a number such as 0xf0000000") from None
    if not 0 < mask <= 0xFFFFFFFF:
        raise UsageError(f"invalid mark mask {text!r}: must be a non-zero 32-bit value")
    low = mask & -mask
    if (mask + low) & mask:
        raise UsageError(f"invalid mark mask {text!r}: must be one contiguous run of bits")
    return mask


@dataclass(frozen=True)
class Config:
    command: tuple[str, ...]
    ports: tuple[PortRange, ...]
    uplinks: tuple[UplinkSpec, ...] = ()  # empty: every interface with a global address
    subnet: ipaddress.IPv4Network | None = None  # None: allocate inside DEFAULT_POOL
    mark_mask: int = DEFAULT_MARK_MASK
    dry_run: bool = False
    verbosity: int = 0
    user: str | None = None  # USER[:GROUP] the server runs as
    stop_timeout: float = 10.0  # after forwarding SIGTERM/SIGINT, SIGKILL the server's tree after this
    ready_fd: int | None = None  # write a line here once the rules are live and the server started
    addresses: tuple = ()  # publish only on these host addresses (IPv4 and IPv6)
    firewall: str = "auto"  # auto: make room in iptables FORWARD/DOCKER-USER; off: refuse if blocked
    outbound: bool = True  # the server may open its own connections, masqueraded
    helpers: tuple[str, ...] = ()  # conntrack helpers for protocols that open related flows

    def __post_init__(self) -> None:
        if not self.ports:
            raise UsageError("no ports to publish: give --ports, e.g. --ports 53,53/tcp")
        if not self.command and not self.dry_run:
            raise UsageError("no command given: nswrap [OPTIONS] -- COMMAND [ARG...]")
        if self.firewall not in ("auto", "off"):
            raise UsageError(f"invalid --firewall {self.firewall!r}: auto or off")
        for helper in self.helpers:
            if helper not in HELPERS:
                raise UsageError(f"invalid --helper {helper!r}: one of {', '.join(HELPERS)}")
        if self.stop_timeout < 0:
            raise UsageError(f"invalid stop timeout {self.stop_timeout}: must be 0 or more seconds")
        seen = {}
        for u in self.uplinks:  # once, or twice: with an IPv4 and with an IPv6 gateway
            version = u.gateway.version if u.gateway else None
            if u.ifname in seen and (version is None or seen[u.ifname] in (None, version)):
                raise UsageError(f"invalid uplink {u.ifname!r}: given twice (twice is fine with one IPv4 and one IPv6 gateway)")
            seen[u.ifname] = version
