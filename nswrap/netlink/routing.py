"""rtnetlink: links, addresses, routes, rules and neighbours, read and written in one namespace.

Each message type has a pure parser (`parse_link`, `parse_address`, `parse_route`, `parse_rule`),
which the tests feed with bytes captured from a real kernel; `Routing` dumps and parses, and builds
requests for `Routing.do` to send in one batch.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from nswrap.netlink import codec
from nswrap.netlink.codec import NETLINK_ROUTE, Malformed, Message, NetlinkError
from nswrap.netlink.transport import Client, Socket
from nswrap.objects import FAMILIES, FR_ACT_TO_TBL, RT_TABLE_MAIN, Address, Link, LinkInfo, Neighbour, Route, Rule

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_AF_SPEC = 1, 3, 4, 18, 28, 26
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_INET_CONF, IFLA_INET6_ADDR_GEN_MODE = 1, 8
IN6_ADDR_GEN_MODE_NONE = 1
IFF_UP = 0x1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD, IFA_F_TENTATIVE = 0x02, 0x40
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 7, 9, 15
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4
FRA_DST, FRA_PRIORITY, FRA_FWMARK, FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 1, 6, 10, 14, 15, 16, 21
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80

# IPv4 per-interface settings (include/uapi/linux/ip.h): index into IFLA_INET_CONF, 1-based
IPV4_DEVCONF = {"forwarding": 1, "rp_filter": 8, "src_valid_mark": 24, "route_localnet": 26}

IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
RULE = struct.Struct("=BBBBBBBBI")  # fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, ifindex, state, flags, type
RTNEXTHOP = struct.Struct("=HBBi")  # rtnexthop: length, flags, hops, ifindex


def _version(af: int) -> int:
    version = {f.af: f.version for f in FAMILIES.values()}.get(af)
    if version is None:
        raise Malformed(f"address family {af}")
    return version


def parse_link(m: Message) -> LinkInfo:
    _family, _type, index, flags, _ = codec.unpack(IFINFO, m.body)
    a = codec.parse_attrs(m.body, IFINFO.size)
    mac = ":".join(f"{b:02x}" for b in a.get(IFLA_ADDRESS, b""))
    link = Link(index, codec.string(a.get(IFLA_IFNAME)), codec.number(a.get(IFLA_MTU), 1500), mac, bool(flags & IFF_UP))
    return LinkInfo(link, _inet_conf(a.get(IFLA_AF_SPEC)))


def parse_address(m: Message, names: dict[int, str]) -> Address | None:
    """An IPv4 or IPv6 address (None: another family's)."""
    family, prefixlen, flags, scope, index = codec.unpack(IFADDR, m.body)
    if family not in (socket.AF_INET, socket.AF_INET6):  # e.g. MCTP's one-byte endpoint ids
        return None
    a = codec.parse_attrs(m.body, IFADDR.size)
    raw = codec.address(a.get(IFA_LOCAL) or a.get(IFA_ADDRESS))
    if raw is None:
        return None
    flags = codec.number(a.get(IFA_FLAGS), flags)
    return Address(names.get(index, "?"), ipaddress.ip_interface((raw, prefixlen)), scope, bool(flags & IFA_F_TENTATIVE))


def parse_route(m: Message, names: dict[int, str]) -> list[Route]:
    """A unicast route, one entry per next hop (nothing for other types: local, broadcast, ...)."""
    af, dst_len, _s, _t, table, proto, scope, kind, flags = codec.unpack(RTMSG, m.body)
    if kind != RTN_UNICAST:
        return []
    family = FAMILIES[_version(af)]
    a = codec.parse_attrs(m.body, RTMSG.size)
    dst = ipaddress.ip_network((codec.address(a.get(RTA_DST)) or family.anywhere.network_address, dst_len))
    table = codec.number(a.get(RTA_TABLE), table)
    metric, prefsrc = codec.number(a.get(RTA_PRIORITY)), codec.address(a.get(RTA_PREFSRC))
    return [Route(dst, names.get(oif), gateway, table, scope, prefsrc, metric, proto, bool(flags & RTNH_F_ONLINK))
            for oif, gateway in _next_hops(a)]


def parse_rule(m: Message) -> Rule:
    af, dst_len, _s, _tos, table, _r1, _r2, action, _flags = codec.unpack(RULE, m.body)
    a = codec.parse_attrs(m.body, RULE.size)
    raw = codec.address(a.get(FRA_DST))
    dst = ipaddress.ip_network((raw, dst_len)) if raw is not None else None
    fwmark = codec.number(a.get(FRA_FWMARK))
    fwmask = codec.number(a.get(FRA_FWMASK), 0xFFFFFFFF if fwmark else 0)
    suppress = struct.unpack("=i", a[FRA_SUPPRESS_PREFIXLEN][:4])[0] if FRA_SUPPRESS_PREFIXLEN in a else -1
    return Rule(_version(af), codec.number(a.get(FRA_PRIORITY)), codec.number(a.get(FRA_TABLE), table), fwmark, fwmask, dst,
                suppress, action, a[FRA_PROTOCOL][0] if a.get(FRA_PROTOCOL) else 0)


class Routing(Client):
    """rtnetlink in one namespace: reads and writes links, addresses, routes, rules, neighbours."""

    def __init__(self) -> None:
        self.sock = Socket(NETLINK_ROUTE)
        self._index: dict[str, int] = {}

    # reading

    def links(self) -> list[LinkInfo]:
        out = [parse_link(m) for m in self.sock.dump(RTM_GETLINK, IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]
        self._index.update((info.link.ifname, info.link.index) for info in out)
        return out

    def addresses(self, names: dict[int, str]) -> list[Address]:
        found = (parse_address(m, names) for m in self.sock.dump(RTM_GETADDR, IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)))
        return [a for a in found if a is not None]

    def routes(self, names: dict[int, str]) -> list[Route]:
        """Unicast routes of every table, both families, one entry per next hop."""
        return [route for family in FAMILIES.values()
                for m in self.sock.dump(RTM_GETROUTE, RTMSG.pack(family.af, 0, 0, 0, 0, 0, 0, 0, 0))
                for route in parse_route(m, names)]

    def rules(self) -> list[Rule]:
        return [parse_rule(m) for family in FAMILIES.values()
                for m in self.sock.dump(RTM_GETRULE, RULE.pack(family.af, 0, 0, 0, 0, 0, 0, 0, 0))]

    def index(self, ifname: str) -> int:
        if ifname not in self._index:
            self.links()
        if ifname not in self._index:
            raise NetlinkError(errno.ENODEV, f"no such interface: {ifname}")
        return self._index[ifname]

    def forget(self, ifname: str) -> None:
        self._index.pop(ifname, None)

    # writing: each returns the request, so callers can batch them

    def veth(self, ifname: str, peer: str, peer_netns_fd: int, mtu: int, macs: tuple[str, str]) -> tuple[int, int, bytes]:
        """A veth pair, the peer moved into `peer_netns_fd` (settings come after: `configure`)."""
        peer_info = (IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + codec.text(IFLA_IFNAME, peer) + codec.u32(IFLA_MTU, mtu)
                     + codec.attr(IFLA_ADDRESS, _mac(macs[1])) + codec.u32(IFLA_NET_NS_FD, peer_netns_fd))
        body = (IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + codec.text(IFLA_IFNAME, ifname) + codec.u32(IFLA_MTU, mtu)
                + codec.attr(IFLA_ADDRESS, _mac(macs[0]))
                + codec.nested(IFLA_LINKINFO, codec.text(IFLA_INFO_KIND, "veth"),
                               codec.nested(IFLA_INFO_DATA, codec.nested(VETH_INFO_PEER, peer_info))))
        return RTM_NEWLINK, codec.NLM_F_CREATE | codec.NLM_F_EXCL, body

    def configure(self, ifname: str, inet: dict[str, int], up: bool = True) -> tuple[int, int, bytes]:
        """Settings of a new interface, by netlink (so a read-only /proc/sys does not matter): IPv4
        per-interface settings, no IPv6 link-local address (nothing waits for duplicate address
        detection), and up."""
        spec = codec.nested(socket.AF_INET6, codec.u8(IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE))
        if inet:
            conf = (codec.u32(IPV4_DEVCONF[k], v) for k, v in inet.items())
            spec = codec.nested(socket.AF_INET, codec.nested(IFLA_INET_CONF, *conf)) + spec
        flags = IFF_UP if up else 0
        body = IFINFO.pack(socket.AF_UNSPEC, 0, self.index(ifname), flags, IFF_UP) + codec.nested(IFLA_AF_SPEC, spec)
        return RTM_NEWLINK, 0, body

    def link_up(self, ifname: str) -> tuple[int, int, bytes]:
        return RTM_NEWLINK, 0, IFINFO.pack(socket.AF_UNSPEC, 0, self.index(ifname), IFF_UP, IFF_UP)

    def link_del(self, ifname: str) -> tuple[int, int, bytes]:
        return RTM_DELLINK, 0, IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + codec.text(IFLA_IFNAME, ifname)

    def address(self, verb: str, address: Address) -> tuple[int, int, bytes]:
        family = FAMILIES[address.version]
        body = IFADDR.pack(family.af, address.address.network.prefixlen, IFA_F_NODAD, address.scope, self.index(address.ifname))
        body += codec.attr(IFA_LOCAL, address.address.ip.packed) + codec.attr(IFA_ADDRESS, address.address.ip.packed)
        body += codec.u32(IFA_FLAGS, IFA_F_NODAD)
        return (RTM_NEWADDR, codec.NLM_F_CREATE | codec.NLM_F_EXCL, body) if verb == "add" else (RTM_DELADDR, 0, body)

    def route(self, verb: str, route: Route) -> tuple[int, int, bytes]:
        family = FAMILIES[route.version]
        table = route.table or RT_TABLE_MAIN
        adding = verb == "add"  # a delete matches any scope and type, as `ip route del` does
        body = RTMSG.pack(family.af, route.dst.prefixlen, 0, 0, table if table < 256 else 252, route.proto,
                          route.scope if adding else 255, RTN_UNICAST if adding else 0,
                          RTNH_F_ONLINK if adding and route.onlink else 0)
        body += codec.u32(RTA_TABLE, table)
        if route.dst.prefixlen:
            body += codec.attr(RTA_DST, route.dst.network_address.packed)
        if route.dev:
            body += codec.u32(RTA_OIF, self.index(route.dev))
        if route.gateway:
            body += codec.attr(RTA_GATEWAY, route.gateway.packed)
        if route.prefsrc and verb == "add":
            body += codec.attr(RTA_PREFSRC, route.prefsrc.packed)
        if route.metric:
            body += codec.u32(RTA_PRIORITY, route.metric)
        return (RTM_NEWROUTE, codec.NLM_F_CREATE | codec.NLM_F_EXCL, body) if verb == "add" else (RTM_DELROUTE, 0, body)

    def rule(self, verb: str, rule: Rule) -> tuple[int, int, bytes]:
        family = FAMILIES[rule.version]
        table = rule.table if rule.action == FR_ACT_TO_TBL else 0
        dst_len = rule.dst.prefixlen if rule.dst else 0
        body = RULE.pack(family.af, dst_len, 0, 0, table if table < 256 else 252, 0, 0, rule.action, 0)
        body += codec.u32(FRA_PRIORITY, rule.priority) + codec.u8(FRA_PROTOCOL, rule.proto)
        if table:
            body += codec.u32(FRA_TABLE, table)
        if rule.dst is not None:
            body += codec.attr(FRA_DST, rule.dst.network_address.packed)
        if rule.fwmask:
            body += codec.u32(FRA_FWMARK, rule.fwmark) + codec.u32(FRA_FWMASK, rule.fwmask)
        if rule.suppress_prefixlength >= 0:
            body += codec.attr(FRA_SUPPRESS_PREFIXLEN, struct.pack("=i", rule.suppress_prefixlength))
        return (RTM_NEWRULE, codec.NLM_F_CREATE | codec.NLM_F_EXCL, body) if verb == "add" else (RTM_DELRULE, 0, body)

    def neighbour(self, neighbour: Neighbour) -> tuple[int, int, bytes]:
        family = FAMILIES[neighbour.address.version]
        body = NDMSG.pack(family.af, self.index(neighbour.ifname), NUD_PERMANENT, 0, 0)
        body += codec.attr(NDA_DST, neighbour.address.packed) + codec.attr(NDA_LLADDR, _mac(neighbour.mac))
        return RTM_NEWNEIGH, codec.NLM_F_CREATE | codec.NLM_F_REPLACE, body

    def do(self, *requests: tuple[int, int, bytes], ignore: frozenset[int] = frozenset()) -> list[int]:
        return self.sock.batch(requests, ignore)


def _next_hops(a: dict[int, bytes]) -> list[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address | None]]:
    if RTA_MULTIPATH not in a:
        return [(codec.number(a.get(RTA_OIF)), codec.address(a.get(RTA_GATEWAY)))]
    hops, data, offset = [], a[RTA_MULTIPATH], 0
    while offset < len(data):
        length, _flags, _hops, oif = codec.unpack(RTNEXTHOP, data[offset:])
        if length < RTNEXTHOP.size or offset + length > len(data):
            raise Malformed(f"next hop of length {length} at {offset} in {len(data)} bytes")
        hops.append((oif, codec.address(codec.parse_attrs(data[offset + RTNEXTHOP.size : offset + length]).get(RTA_GATEWAY))))
        offset += codec.align(length)
    return hops


def _inet_conf(af_spec: bytes | None) -> dict[str, int]:
    """IPv4 settings from a link dump: IFLA_INET_CONF is an array of u32, index = id - 1."""
    inet = codec.parse_attrs(codec.parse_attrs(af_spec or b"").get(socket.AF_INET, b"")).get(IFLA_INET_CONF)
    if not inet:
        return {}
    values = struct.unpack(f"={len(inet) // 4}I", inet[: len(inet) // 4 * 4])
    return {name: values[i - 1] for name, i in IPV4_DEVCONF.items() if i <= len(values)}


def _mac(text_mac: str) -> bytes:
    return bytes(int(part, 16) for part in text_mac.split(":"))
