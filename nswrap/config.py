"""What the user asked for, validated. Pure: no I/O, no host access.

Every check that can fail on bad input lives here, so bad input is refused (exit 2, one line)
before nswrap looks at, let alone changes, the host.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Literal, get_args

from nswrap.datatypes import datatype
from nswrap.errors import QUOTED, UsageError, cut, quoted
from nswrap.objects import IPAddress, Protocol

PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
IFNAMSIZ = 15  # the kernel's limit on interface names, without the NUL
Firewall = Literal["auto", "off"]  # --firewall
FIREWALL: tuple[Firewall, ...] = get_args(Firewall)
Ipv6Forwarding = Literal["auto", "global", "interface", "off"]  # --ipv6-forwarding (docs/design.md)
IPV6_FORWARDING: tuple[Ipv6Forwarding, ...] = get_args(Ipv6Forwarding)
DatapathKind = Literal["nft", "bpf"]  # --datapath (docs/fastpath.md)
DATAPATHS: tuple[DatapathKind, ...] = get_args(DatapathKind)
HELPERS = ("tftp",)  # conntrack helpers nswrap can attach (the server answers from a new port)
DEFAULT_MARK_MASK = 0xF0000000  # free of kube-proxy, wg-quick, Tailscale, Cilium, mwan3, OpenWrt pbr
MAX_STOP_TIMEOUT = 86400.0
MAX_ID = 0xFFFFFFFE  # uid/gid: (uid_t)-1 means "unchanged" to the kernel
# How long an answered UDP flow of a published port outlives its last packet (conntrack's
# `replied` state; the kernel's own is 120 s): a spoofed flood the server answers drains within
# it once the flood stops; a session that sends at least every DEFAULT/2 s (OpenVPN's
# `keepalive 10 60`) lives on (docs/design.md, "Floods").
DEFAULT_UDP_TIMEOUT = 20
MIN_UDP_TIMEOUT, MAX_UDP_TIMEOUT = 10, 86400  # never below `unreplied` (10 s); at most a day


@datatype(order=True)
class PortRange:
    """Published ports `outer_lo..outer_hi` of `proto`, delivered to `inner_lo..` in the server."""

    proto: Protocol
    outer_lo: int
    outer_hi: int
    inner_lo: int

    @property
    def count(self) -> int:
        return self.outer_hi - self.outer_lo + 1

    @property
    def remapped(self) -> bool:
        return self.inner_lo != self.outer_lo

    @property
    def inner_hi(self) -> int:
        return self.inner_lo + self.count - 1

    def overlaps(self, other: PortRange) -> bool:
        return self.proto == other.proto and self.outer_lo <= other.outer_hi and other.outer_lo <= self.outer_hi

    def __str__(self) -> str:
        outer = _span(self.outer_lo, self.outer_hi)
        if self.remapped:
            outer += ":" + _span(self.inner_lo, self.inner_hi)
        return f"{outer}/{self.proto}"


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


_PORT = r"[0-9]{1,5}"  # ASCII digits only (\d would take Arabic-Indic ones), and never 5000 of them
_ITEM = re.compile(rf"^(?P<outer>{_PORT}(?:-{_PORT})?)(?::(?P<inner>{_PORT}(?:-{_PORT})?))?(?:/(?P<proto>[a-z]+))?$")


def _parse_span(text: str, item: str) -> tuple[int, int]:
    lo_s, _, hi_s = text.partition("-")
    lo, hi = int(lo_s), int(hi_s or lo_s)
    for port in (lo, hi):
        if not 1 <= port <= 65535:
            raise UsageError(f"invalid port spec {quoted(item)}: port {port} is not in 1-65535")
    if hi < lo:
        raise UsageError(f"invalid port spec {quoted(item)}: range {text} ends before it starts")
    return lo, hi


def parse_port_item(item: str) -> PortRange:
    match = _ITEM.match(item.strip().lower())
    if not match:
        raise UsageError(f"invalid port spec {quoted(item)}: expected PORT, OUTER:INNER or A-B[:C-D], optionally /udp or /tcp")
    given = match["proto"] or "udp"
    proto = next((p for p in PROTOCOLS if p == given), None)  # the Protocol it names, if any
    if proto is None:
        raise UsageError(f"invalid port spec {quoted(item)}: protocol must be udp or tcp")
    outer_lo, outer_hi = _parse_span(match["outer"], item)
    inner_lo, inner_hi = _parse_span(match["inner"], item) if match["inner"] else (outer_lo, outer_hi)
    if inner_hi - inner_lo != outer_hi - outer_lo:
        raise UsageError(f"invalid port spec {quoted(item)}: both ranges must have the same length")
    return PortRange(proto, outer_lo, outer_hi, inner_lo)


def parse_ports(specs: tuple[str, ...] | list[str]) -> tuple[PortRange, ...]:
    """Parse repeatable `--ports` values; refuse overlaps, since one published port has one target."""
    items = []
    for spec in specs:
        for item in spec.split(","):
            if not item.strip():
                raise UsageError(f"invalid port spec {quoted(spec)}: empty item")
            items.append(parse_port_item(item))
    ranges = sorted(items)
    for before, after in zip(ranges, ranges[1:], strict=False):
        if before.overlaps(after):
            raise UsageError(f"invalid port spec: {before} and {after} publish the same port twice")
    return tuple(ranges)


@datatype
class UplinkSpec:
    ifname: str
    gateway: IPAddress | None = None

    def __str__(self) -> str:
        return self.ifname + (f"={self.gateway}" if self.gateway else "")


_IFNAME = re.compile(r"[A-Za-z0-9_.@+-]{1,15}")


def valid_ifname(name: str) -> bool:
    """Names nswrap can quote safely in nft and shell lines (the kernel allows more: quotes, say)."""
    return bool(_IFNAME.fullmatch(name)) and name not in (".", "..")


def check_ifname(name: str, what: str = "interface name") -> str:
    if not valid_ifname(name):
        raise UsageError(f"invalid {what} {quoted(name)}: 1-{IFNAMSIZ} characters of A-Z a-z 0-9 _ . @ + -")
    return name


def parse_uplink(text: str) -> UplinkSpec:
    ifname, sep, gateway = text.partition("=")
    check_ifname(ifname, "uplink")
    if not sep:
        return UplinkSpec(ifname)
    try:
        address = ipaddress.ip_address(gateway)
    except ValueError:
        raise UsageError(f"invalid uplink {quoted(text)}: {quoted(gateway)} is not a gateway address") from None
    problem = _not_plain(address) or _not_unicast(address)
    if problem:
        raise UsageError(f"invalid uplink {quoted(text)}: {problem}")
    return UplinkSpec(ifname, address)


LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def _not_plain(address: IPAddress) -> str | None:
    """Why an address is not one nswrap can use as it is: an IPv6 zone (`fe80::1%eth0`) is text
    that would reach shell lines and nft (the uplink is the zone); an IPv4-mapped IPv6 address is
    an IPv4 address, never on a link as IPv6."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return "give it without a %zone"
        if address.ipv4_mapped is not None:
            return f"{address} is an IPv4-mapped IPv6 address: give {address.ipv4_mapped}"
    return None


def _not_unicast(address: IPAddress) -> str | None:
    """Why a gateway cannot be one: the kernel refuses these, or routes to them nowhere useful."""
    for kind, bad in (("a multicast address", address.is_multicast), ("the unspecified address", address.is_unspecified),
                      ("a loopback address", address.is_loopback), ("the broadcast address", address == LIMITED_BROADCAST),
                      ("in 'this network' (0.0.0.0/8)", address.version == 4 and address in THIS_NETWORK)):
        if bad:
            return f"{address} is {kind}, not a unicast gateway"
    return None


def parse_address(text: str) -> IPAddress:
    """An address of the host to publish on: a unicast one, or 127.0.0.1 (its own clients)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"invalid address {quoted(text)}: expected an address of this host") from None
    problem = _not_plain(address)
    if problem:
        raise UsageError(f"invalid address {quoted(text)}: {problem}")
    if address.is_unspecified:
        raise UsageError(f"invalid address {quoted(text)}: for every address of the host, leave --address out")
    if address.is_loopback and address != ipaddress.IPv4Address("127.0.0.1"):
        raise UsageError(f"invalid address {quoted(text)}: of the loopback addresses, only 127.0.0.1 is served")
    if address.is_multicast or address.is_link_local or address == LIMITED_BROADCAST:
        raise UsageError(f"invalid address {quoted(text)}: expected a unicast address of this host")
    return address



def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise UsageError(f"invalid subnet {quoted(text)}: {cut(str(e), QUOTED * 2)}") from None  # e quotes text too
    if net.prefixlen != 30:
        raise UsageError(f"invalid subnet {quoted(text)}: must be a /30 (the host's end and the server's)")
    for kind, bad in (("multicast", net.is_multicast), ("loopback", net.is_loopback), ("link-local", net.is_link_local),
                      ("reserved", net.is_reserved), ("'this network' (0.0.0.0/8)", net.subnet_of(THIS_NETWORK))):
        if bad:
            raise UsageError(f"invalid subnet {quoted(text)}: a {kind} range cannot be routed to the server")
    return net


def parse_mark_mask(text: str) -> int:
    if not re.fullmatch(r"(0[xX][0-9a-fA-F]{1,8}|[0-9]{1,10})", text.strip()):
        raise UsageError(f"invalid mark mask {quoted(text)}: expected a number such as 0xf0000000")
    mask = int(text, 0)
    if not 0 < mask <= 0xFFFFFFFF:
        raise UsageError(f"invalid mark mask {quoted(text)}: must be a non-zero 32-bit value")
    low = mask & -mask
    if (mask + low) & mask:
        raise UsageError(f"invalid mark mask {quoted(text)}: must be one contiguous run of bits")
    return mask


def parse_user(spec: str) -> tuple[str, str]:
    """USER[:GROUP], names or numbers; the lookup itself happens at start (it reads /etc/passwd)."""
    user, sep, group = spec.partition(":")
    for what, value in (("user", user), ("group", group)):
        if not value and (what == "user" or sep):
            raise UsageError(f"invalid --user {quoted(spec)}: empty {what} name")
        if re.fullmatch(r"[0-9]+", value) and (len(value) > 10 or int(value) > MAX_ID):
            raise UsageError(f"invalid --user {quoted(spec)}: {what} id {cut(value, 10)} is out of range")
        if value and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?", value):
            raise UsageError(f"invalid --user {quoted(spec)}: {quoted(value)} is not a {what} name or number")
    return user, group


def command_problem(command: tuple[str, ...] | list[str]) -> str | None:
    """Why nswrap cannot exec this command: exec takes a program name, and C strings (a NUL byte,
    which only a config file's "\\u0000" can give, would end an argument early, or fail the exec)."""
    if not command:
        return "empty command"
    if not command[0]:
        return "empty command name"
    nul = next((i for i, arg in enumerate(command) if "\0" in arg), None)
    if nul is not None:
        return f"a NUL byte in {'the command name' if nul == 0 else f'argument {nul} of the command'}"
    return None


def publishes_tftp(ports: tuple[PortRange, ...]) -> bool:
    return any(p.proto == "udp" and p.outer_lo <= 69 <= p.outer_hi for p in ports)


def resolve_helpers(given: tuple[str, ...] | list[str], ports: tuple[PortRange, ...]) -> tuple[str, ...]:
    """--helper: what was given, `none` for no helper at all, or by default the tftp helper when
    udp 69 is published (a TFTP server sends its data from a new port: without the helper only
    the uplink of the host's default route would carry it, from the wrong address)."""
    given = tuple(given)
    if "none" in given:
        if len(given) > 1:
            raise UsageError(f"invalid --helper: none cannot go with {', '.join(h for h in given if h != 'none')}")
        return ()
    if not given and publishes_tftp(ports):
        return ("tftp",)
    return tuple(dict.fromkeys(given))


def require_ports(ports: tuple[PortRange, ...]) -> tuple[PortRange, ...]:
    if not ports:
        raise UsageError("no ports to publish: give --ports, e.g. --ports 53,53/tcp")
    return ports


def check_ready_fd_number(fd: int | None) -> int | None:
    if fd is not None and not 0 <= fd < 1 << 20:
        raise UsageError(f"invalid --ready-fd {cut(str(fd), 20)}: not a file descriptor number")
    return fd


def check_stop_timeout(value: float) -> float:
    if not math.isfinite(value) or not 0 <= value <= MAX_STOP_TIMEOUT:
        raise UsageError(f"invalid --stop-timeout {value}: 0 to {MAX_STOP_TIMEOUT:g} seconds")
    return value


def check_udp_timeout(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_UDP_TIMEOUT <= value <= MAX_UDP_TIMEOUT:
        raise UsageError(f"invalid --udp-timeout {value}: {MIN_UDP_TIMEOUT} to {MAX_UDP_TIMEOUT} seconds")
    return value


@datatype
class Config:
    command: tuple[str, ...]
    ports: tuple[PortRange, ...]
    uplinks: tuple[UplinkSpec, ...] = ()  # empty: every interface with a global address
    subnet: ipaddress.IPv4Network | None = None  # None: allocate inside the pool
    mark_mask: int = DEFAULT_MARK_MASK
    dry_run: bool = False
    user: str | None = None  # USER[:GROUP] the server runs as
    stop_timeout: float = 10.0  # after forwarding SIGTERM/SIGINT, SIGKILL the server's tree after this
    ready_fd: int | None = None  # write a line here once every published path forwards
    addresses: tuple[IPAddress, ...] = ()  # publish only on these host addresses (IPv4 and IPv6)
    firewall: Firewall = "auto"  # auto: make room in iptables FORWARD/DOCKER-USER; off: refuse if blocked
    outbound: bool = True  # the server may open its own connections, masqueraded
    helpers: tuple[str, ...] = ()  # conntrack helpers for protocols that open related flows
    ipv6_forwarding: Ipv6Forwarding = "auto"  # how IPv6 is forwarded to the server: IPV6_FORWARDING
    take_over: bool = False  # publish even where a host socket serves the port (its clients go to the server)
    udp_timeout: int = DEFAULT_UDP_TIMEOUT  # answered UDP flows: seconds after their last packet (per host)
    datapath: DatapathKind = "nft"  # bpf: published flows through the tc-BPF fast path (docs/fastpath.md)

    def __post_init__(self) -> None:
        require_ports(self.ports)
        if not self.command and not self.dry_run:
            raise UsageError("no command given: nswrap [OPTIONS] -- COMMAND [ARG...]")
        problem = command_problem(self.command) if self.command else None
        if problem:
            raise UsageError(f"{problem}: nswrap [OPTIONS] -- COMMAND [ARG...]")
        if self.firewall not in FIREWALL:
            raise UsageError(f"invalid --firewall {quoted(self.firewall)}: auto or off")
        if self.ipv6_forwarding not in IPV6_FORWARDING:
            raise UsageError(f"invalid --ipv6-forwarding {quoted(self.ipv6_forwarding)}: one of {', '.join(IPV6_FORWARDING)}")
        if self.datapath not in DATAPATHS:
            raise UsageError(f"invalid --datapath {quoted(self.datapath)}: one of {', '.join(DATAPATHS)}")
        for helper in self.helpers:
            if helper not in HELPERS:
                raise UsageError(f"invalid --helper {quoted(helper)}: one of {', '.join(HELPERS)}")
        if "tftp" in self.helpers and not publishes_tftp(self.ports):
            raise UsageError("--helper tftp needs udp port 69 published (e.g. --ports 69)")
        check_stop_timeout(self.stop_timeout)
        if self.user is not None:
            parse_user(self.user)
        check_ready_fd_number(self.ready_fd)
        check_udp_timeout(self.udp_timeout)
        seen: dict[str, int | None] = {}
        for u in self.uplinks:  # once, or twice: with an IPv4 and with an IPv6 gateway
            version = u.gateway.version if u.gateway else None
            if u.ifname in seen and (version is None or seen[u.ifname] in (None, version)):
                raise UsageError(f"invalid uplink {u.ifname!r}: given twice (twice is fine with one IPv4 and one IPv6 gateway)")
            seen[u.ifname] = version
