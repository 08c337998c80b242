"""Kernel objects as plain data: what nswrap/netlink/ reads and writes, what the datapath wants.

Pure: no I/O. Each object renders as the `ip` command that creates it (`render("add")`) or
deletes it (`render("del")`), so a logged change is a line you can paste into a shell.
The address family is a dimension (`FAMILIES[4]`, `FAMILIES[6]`), never a pair of twin fields.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Literal, Union

from nswrap.datatypes import datatype

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

Protocol = Literal["udp", "tcp"]  # of a published port, a listening socket, a flow

PROTO = 110  # rtnetlink protocol tag of every route and rule nswrap makes: `ip rule show proto 110`
RT_TABLE_MAIN = 254
SCOPE_UNIVERSE, SCOPE_LINK, SCOPE_HOST = 0, 253, 254


@datatype
class Family:
    """One address family: the names its tools give it."""

    version: int
    af: int  # AF_INET / AF_INET6
    nft: str  # nftables' "ip" / "ip6"
    anywhere: IPNetwork
    loopback: IPAddress

    @property
    def ip(self) -> str:
        """`ip` itself, with the family flag where iproute2 needs one."""
        return "ip" if self.version == 4 else "ip -6"

    def network(self, text: str) -> IPNetwork:
        return ipaddress.ip_network(text, strict=False)


FAMILIES = {
    4: Family(4, socket.AF_INET, "ip", ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("127.0.0.1")),
    6: Family(6, socket.AF_INET6, "ip6", ipaddress.ip_network("::/0"), ipaddress.ip_address("::1")),
}


@datatype
class Link:
    index: int
    ifname: str
    mtu: int = 1500
    mac: str = ""
    up: bool = True


@datatype
class LinkInfo:
    """A link as read, with its IPv4 per-interface settings (name -> value)."""

    link: Link
    inet: dict[str, int]


@datatype
class Address:
    ifname: str
    address: IPInterface
    scope: int = SCOPE_UNIVERSE
    tentative: bool = False  # IPv6 duplicate address detection still running

    @property
    def version(self) -> int:
        return self.address.version

    def render(self, verb: str, netns: str | None = None) -> str:
        nodad = " nodad" if self.version == 6 and verb == "add" else ""
        return f"{_ip(self.version, netns)} addr {verb} {self.address} dev {self.ifname}{nodad}"


@datatype
class Route:
    """A unicast route; `table` 0 means main when written (the server namespace's own routes)."""

    dst: IPNetwork
    dev: str | None = None
    gateway: IPAddress | None = None
    table: int = RT_TABLE_MAIN
    scope: int = SCOPE_UNIVERSE
    prefsrc: IPAddress | None = None
    metric: int = 0
    proto: int = PROTO
    onlink: bool = False  # the gateway is on the link though no connected route says so (a /32 VPS)

    @property
    def version(self) -> int:
        return self.dst.version

    @property
    def is_default(self) -> bool:
        return self.dst.prefixlen == 0

    def key(self) -> tuple[object, ...]:
        """What identifies the route to the kernel (and to us, when comparing states)."""
        return (self.version, self.table, self.dst, self.metric, self.dev, self.gateway)

    def render(self, verb: str, netns: str | None = None) -> str:
        words = [_ip(self.version, netns), "route", verb, "default" if self.is_default else str(self.dst)]
        if self.gateway:
            words += ["via", str(self.gateway)]
        if self.dev:
            words += ["dev", self.dev]
        if verb == "add":
            if self.onlink:
                words.append("onlink")
            if self.scope == SCOPE_LINK:
                words += ["scope", "link"]
            if self.prefsrc:
                words += ["src", str(self.prefsrc)]
        if self.table != RT_TABLE_MAIN:
            words += ["table", str(self.table)]
        if self.proto:
            words += ["proto", str(self.proto)]
        if self.metric:
            words += ["metric", str(self.metric)]
        return " ".join(words)


@datatype
class Listener:
    """A socket of the host that clients reach: TCP listening, or UDP bound and not connected.
    An IPv4-mapped address (::ffff:a.b.c.d) is stored as the IPv4 address it is."""

    proto: Protocol
    address: IPAddress  # 0.0.0.0 or :: for every address
    port: int
    inode: int = 0  # the socket's inode, to find its owner in /proc/*/fd
    v6only: bool = False  # an IPv6 socket that takes no IPv4 (IPV6_V6ONLY)

    def __str__(self) -> str:
        return f"{self.port}/{self.proto} on {self.address}"


FR_ACT_TO_TBL, FR_ACT_UNREACHABLE = 1, 7


@datatype
class Rule:
    """A policy routing rule: `fwmark`/`dst` selectors, then a table lookup or `unreachable`."""

    version: int
    priority: int
    table: int = 0  # 0 with action unreachable
    fwmark: int = 0
    fwmask: int = 0
    dst: IPNetwork | None = None
    suppress_prefixlength: int = -1  # -1: none; 0: ignore default routes of the table
    action: int = FR_ACT_TO_TBL
    proto: int = PROTO

    def render(self, verb: str) -> str:
        words = [_ip(self.version, None), "rule", verb]
        if self.dst is not None:
            words += ["to", str(self.dst)]
        if self.fwmask:
            words += ["fwmark", f"{self.fwmark:#x}/{self.fwmask:#x}"]
        if self.action == FR_ACT_UNREACHABLE:
            words.append("unreachable")
        else:
            words += ["lookup", str(self.table)]
        if self.suppress_prefixlength >= 0:
            words += ["suppress_prefixlength", str(self.suppress_prefixlength)]
        words += ["priority", str(self.priority), "protocol", str(self.proto)]
        return " ".join(words)


@datatype
class Neighbour:
    """A permanent neighbour entry: the veth's far end never needs ARP or neighbour discovery."""

    ifname: str
    address: IPAddress
    mac: str

    def render(self, verb: str, netns: str | None = None) -> str:
        tail = f" lladdr {self.mac} nud permanent" if verb == "add" else ""
        return f"{_ip(self.address.version, netns)} neigh {verb} {self.address} dev {self.ifname}{tail}"


def _ip(version: int, netns: str | None) -> str:
    words = ["ip"] + (["-n", netns] if netns else []) + (["-6"] if version == 6 else [])
    return " ".join(words)
