"""Netlink: the only module that speaks it.

rtnetlink for links, addresses, routes, rules and neighbours; ctnetlink for conntrack; nfnetlink
for nftables' events. A small codec over `socket` and `struct` instead of pyroute2: importing
pyroute2 cost ~330 ms and every request went through an asyncio loop, which dominated nswrap's
start (docs/design.md, "Why our own netlink"). Requests can be batched into one `sendmsg`.

Every kernel error leaves this module as `OSError(errno, message)`; callers treat ENOENT-like
errors ("already gone") as success where that is right, never here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator

from nswrap.datatypes import datatype
from nswrap.objects import (
    FAMILIES,
    FR_ACT_TO_TBL,
    PROTO,
    RT_TABLE_MAIN,
    Address,
    Link,
    Listener,
    Neighbour,
    Route,
    Rule,
)

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_NEWNETCONF = 80

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

# nfnetlink
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_NFTABLES = 1, 10
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_MARK, CTA_MARK_MASK, CTA_FILTER, CTA_STATUS_MASK = 1, 2, 3, 8, 21, 25, 26
IPS_DST_NAT = 1 << 5
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_SRC = {4: 1, 6: 3}
CTA_IP_DST = {4: 2, 6: 4}
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS = 1, 2
FILTER_IP_SRC, FILTER_IP_DST, FILTER_PROTO_NUM, FILTER_DST_PORT = 1 << 0, 1 << 1, 1 << 3, 1 << 5
NFT_MSG = {0: "newtable", 2: "deltable", 3: "newchain", 5: "delchain", 6: "newrule", 8: "delrule", 9: "newset",
           11: "delset", 12: "newsetelem", 14: "delsetelem", 15: "newgen", 18: "newobj", 20: "delobj"}
NFNLGRP_NFTABLES = 7

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian on the wire; always 0 here)


class NetlinkError(OSError):
    pass


class FlowsTruncated(Exception):
    """Counting flows stopped at its deadline; `flows` holds those found by then."""

    def __init__(self, flows: list):
        super().__init__(f"stopped after {len(flows)} flows")
        self.flows = flows


class DumpTruncated(Exception):
    """A dump stopped at its deadline; `messages` holds what arrived."""

    def __init__(self, messages: list):
        super().__init__(f"dump stopped after {len(messages)} messages")
        self.messages = messages


# --- attributes ------------------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (_align(length) - length)


def nested(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def u8(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=B", value))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def be16(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!H", value))


def be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!I", value))


def text(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


_ATTR = struct.Struct("=HH")  # an attribute's length and type


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """{type: payload} of the attributes in data[offset:] (nesting flags stripped; last wins)."""
    found = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += _align(length)
    return found


def _str(payload: bytes | None) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace") if payload else ""


def _u32(payload: bytes | None, default: int = 0) -> int:
    return struct.unpack("=I", payload[:4])[0] if payload else default


def _ip(payload: bytes | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    return ipaddress.ip_address(payload) if payload else None


# --- the socket ------------------------------------------------------------------------------


@datatype(frozen=False)
class Message:
    kind: int
    flags: int
    body: bytes  # everything after the netlink header


class Socket:
    """One netlink socket, bound to the network namespace the calling thread is in."""

    def __init__(self, protocol: int = NETLINK_ROUTE, groups: int = 0):
        self._protocol = protocol
        self._abandoned = False
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self._sock.bind((0, groups))
        self._seq = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def subscribe(self, group: int) -> None:
        self._sock.setsockopt(270, 1, group)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP

    def _pack(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self._seq += 1
        return self._seq, _HDR.pack(_HDR.size + len(body), kind, flags, self._seq, 0) + body

    def _receive(self) -> Iterator[tuple[int, Message]]:
        data = self._sock.recv(1 << 20)
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind, flags, seq, _ = _HDR.unpack_from(data, offset)
            yield seq, Message(kind, flags, data[offset + _HDR.size : offset + length])
            offset += _align(length)

    def dump(self, kind: int, body: bytes, deadline: float | None = None) -> list[Message]:
        """A dump request; every part of the answer. With a `deadline` (time.monotonic()), what
        arrived by then (DumpTruncated)."""
        out: list[Message] = []
        try:
            out.extend(self.dump_each(kind, body, deadline))
        except DumpTruncated:
            raise DumpTruncated(out) from None
        return out

    def dump_each(self, kind: int, body: bytes, deadline: float | None = None) -> Iterator[Message]:
        """The answer to a dump request, message by message. Past the `deadline` (the caller's
        work on each message included), DumpTruncated ends it and the socket is abandoned (the
        rest of the answer would follow)."""
        if self._abandoned:
            self._reopen()
        seq, packet = self._pack(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
        self._sock.send(packet)
        while True:
            if deadline is not None and time.monotonic() > deadline:
                self._abandoned = True
                raise DumpTruncated([])
            for got, message in self._receive():
                if got != seq:
                    continue
                if message.kind == NLMSG_DONE:
                    return
                if message.kind == NLMSG_ERROR:
                    _raise(message)
                yield message

    def _reopen(self) -> None:
        self._sock.close()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, self._protocol)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self._sock.bind((0, 0))
        self._abandoned = False

    def request(self, kind: int, flags: int, body: bytes) -> None:
        self.batch([(kind, flags, body)])

    def batch(self, requests: Iterable[tuple[int, int, bytes]], ignore: frozenset[int] = frozenset()) -> list[int]:
        """Send requests in as few writes as possible, each acknowledged; raise the first error
        not in `ignore`. Returns the errno of each request (0: done), in order."""
        packets = [self._pack(kind, flags | NLM_F_REQUEST | NLM_F_ACK, body) for kind, flags, body in requests]
        index = {seq: i for i, (seq, _) in enumerate(packets)}
        results = [0] * len(packets)
        for chunk in _chunks(packets, 1 << 16):
            self._sock.sendall(b"".join(packet for _, packet in chunk))
            waiting = {seq for seq, _ in chunk}
            while waiting:
                for seq, message in self._receive():
                    if message.kind == NLMSG_ERROR and seq in waiting:
                        waiting.discard(seq)
                        results[index[seq]] = -struct.unpack_from("=i", message.body)[0]
        for code in results:
            if code and code not in ignore:
                raise NetlinkError(code, os.strerror(code))
        return results

    def events(self) -> Iterator[Message]:
        """Messages queued on a subscribed socket (non-blocking); ENOBUFS yields an empty one."""
        while True:
            try:
                for _, message in self._receive_nowait():
                    yield message
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                yield Message(0, 0, b"")  # events were lost: the caller must look again

    def _receive_nowait(self) -> Iterator[tuple[int, Message]]:
        data = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind, flags, seq, _ = _HDR.unpack_from(data, offset)
            yield seq, Message(kind, flags, data[offset + _HDR.size : offset + length])
            offset += _align(length)


def _chunks(packets: list[tuple[int, bytes]], size: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    length = 0
    for item in packets:
        if chunk and length + len(item[1]) > size:
            yield chunk
            chunk, length = [], 0
        chunk.append(item)
        length += len(item[1])
    if chunk:
        yield chunk


def _raise(message: Message) -> None:
    code = -struct.unpack_from("=i", message.body)[0]
    if code:
        raise NetlinkError(code, os.strerror(code))


# --- rtnetlink -------------------------------------------------------------------------------

_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RULE = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")


@datatype
class LinkInfo:
    """A link as read, with its IPv4 per-interface settings (name -> value)."""

    link: Link
    inet: dict[str, int]


class Routing:
    """rtnetlink in one namespace: reads and writes links, addresses, routes, rules, neighbours."""

    def __init__(self) -> None:
        self.sock = Socket(NETLINK_ROUTE)
        self._index: dict[str, int] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Routing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # reading

    def links(self) -> list[LinkInfo]:
        out = []
        for m in self.sock.dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _family, _type, index, flags, _ = _IFINFO.unpack_from(m.body)
            a = parse_attrs(m.body, _IFINFO.size)
            mac = ":".join(f"{b:02x}" for b in a.get(IFLA_ADDRESS, b""))
            link = Link(index, _str(a.get(IFLA_IFNAME)), _u32(a.get(IFLA_MTU), 1500), mac, bool(flags & IFF_UP))
            self._index[link.ifname] = index
            out.append(LinkInfo(link, _inet_conf(a.get(IFLA_AF_SPEC))))
        return out

    def addresses(self, names: dict[int, str]) -> list[Address]:
        out = []
        for m in self.sock.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family, prefixlen, flags, scope, index = _IFADDR.unpack_from(m.body)
            a = parse_attrs(m.body, _IFADDR.size)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            flags = _u32(a.get(IFA_FLAGS), flags)
            address = ipaddress.ip_interface((ipaddress.ip_address(raw), prefixlen))
            out.append(Address(names.get(index, "?"), address, scope, bool(flags & IFA_F_TENTATIVE)))
        return out

    def routes(self, names: dict[int, str]) -> list[Route]:
        """Unicast routes of every table, both families, one entry per next hop."""
        out = []
        for family in FAMILIES.values():
            for m in self.sock.dump(RTM_GETROUTE, _RTMSG.pack(family.af, 0, 0, 0, 0, 0, 0, 0, 0)):
                _f, dst_len, _s, _t, table, proto, scope, kind, flags = _RTMSG.unpack_from(m.body)
                if kind != RTN_UNICAST:
                    continue
                a = parse_attrs(m.body, _RTMSG.size)
                dst = ipaddress.ip_network((_ip(a.get(RTA_DST)) or family.anywhere.network_address, dst_len))
                table = _u32(a.get(RTA_TABLE), table)
                metric, prefsrc = _u32(a.get(RTA_PRIORITY)), _ip(a.get(RTA_PREFSRC))
                for oif, gateway in _next_hops(a):
                    out.append(Route(dst, names.get(oif), gateway, table, scope, prefsrc, metric, proto,
                                     bool(flags & RTNH_F_ONLINK)))
        return out

    def rules(self) -> list[Rule]:
        out = []
        for family in FAMILIES.values():
            for m in self.sock.dump(RTM_GETRULE, _RULE.pack(family.af, 0, 0, 0, 0, 0, 0, 0, 0)):
                _f, dst_len, _s, _tos, table, _r1, _r2, action, _flags = _RULE.unpack_from(m.body)
                a = parse_attrs(m.body, _RULE.size)
                dst = ipaddress.ip_network((_ip(a[FRA_DST]), dst_len)) if FRA_DST in a else None
                fwmark = _u32(a.get(FRA_FWMARK))
                fwmask = _u32(a.get(FRA_FWMASK), 0xFFFFFFFF if fwmark else 0)
                suppress = struct.unpack("=i", a[FRA_SUPPRESS_PREFIXLEN])[0] if FRA_SUPPRESS_PREFIXLEN in a else -1
                out.append(Rule(family.version, _u32(a.get(FRA_PRIORITY)), _u32(a.get(FRA_TABLE), table), fwmark,
                                fwmask, dst, suppress, action, a[FRA_PROTOCOL][0] if FRA_PROTOCOL in a else 0))
        return out

    def index(self, ifname: str) -> int:
        if ifname not in self._index:
            for info in self.links():
                self._index[info.link.ifname] = info.link.index
        if ifname not in self._index:
            raise NetlinkError(errno.ENODEV, f"no such interface: {ifname}")
        return self._index[ifname]

    def forget(self, ifname: str) -> None:
        self._index.pop(ifname, None)

    # writing: each returns the request, so callers can batch them

    def veth(self, ifname: str, peer: str, peer_netns_fd: int, mtu: int, macs: tuple[str, str]) -> tuple:
        """A veth pair, the peer moved into `peer_netns_fd` (settings come after: `configure`)."""
        peer_info = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + text(IFLA_IFNAME, peer) + u32(IFLA_MTU, mtu)
                     + attr(IFLA_ADDRESS, _mac(macs[1])) + u32(IFLA_NET_NS_FD, peer_netns_fd))
        body = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + text(IFLA_IFNAME, ifname) + u32(IFLA_MTU, mtu)
                + attr(IFLA_ADDRESS, _mac(macs[0]))
                + nested(IFLA_LINKINFO, text(IFLA_INFO_KIND, "veth"), nested(IFLA_INFO_DATA, nested(VETH_INFO_PEER, peer_info))))
        return RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body

    def configure(self, ifname: str, inet: dict[str, int], up: bool = True) -> tuple:
        """Settings of a new interface, by netlink (so a read-only /proc/sys does not matter): IPv4
        per-interface settings, no IPv6 link-local address (nothing waits for duplicate address
        detection), and up."""
        spec = nested(socket.AF_INET6, u8(IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE))
        if inet:
            spec = _inet_conf_attr(inet) + spec
        flags = IFF_UP if up else 0
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, self.index(ifname), flags, IFF_UP) + nested(IFLA_AF_SPEC, spec)
        return RTM_NEWLINK, 0, body

    def link_up(self, ifname: str) -> tuple:
        return RTM_NEWLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, self.index(ifname), IFF_UP, IFF_UP)

    def link_del(self, ifname: str) -> tuple:
        return RTM_DELLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + text(IFLA_IFNAME, ifname)

    def set_inet(self, ifname: str, inet: dict[str, int]) -> tuple:
        """IPv4 per-interface settings by netlink: works where /proc/sys is read-only."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, self.index(ifname), 0, 0) + nested(IFLA_AF_SPEC, _inet_conf_attr(inet))
        return RTM_NEWLINK, 0, body

    def address(self, verb: str, address: Address) -> tuple:
        family = FAMILIES[address.version]
        body = _IFADDR.pack(family.af, address.address.network.prefixlen, IFA_F_NODAD, address.scope, self.index(address.ifname))
        body += attr(IFA_LOCAL, address.address.ip.packed) + attr(IFA_ADDRESS, address.address.ip.packed)
        body += u32(IFA_FLAGS, IFA_F_NODAD)
        return (RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body) if verb == "add" else (RTM_DELADDR, 0, body)

    def route(self, verb: str, route: Route) -> tuple:
        family = FAMILIES[route.version]
        table = route.table or RT_TABLE_MAIN
        adding = verb == "add"  # a delete matches any scope and type, as `ip route del` does
        body = _RTMSG.pack(family.af, route.dst.prefixlen, 0, 0, table if table < 256 else 252, route.proto,
                           route.scope if adding else 255, RTN_UNICAST if adding else 0,
                           RTNH_F_ONLINK if adding and route.onlink else 0)
        body += u32(RTA_TABLE, table)
        if route.dst.prefixlen:
            body += attr(RTA_DST, route.dst.network_address.packed)
        if route.dev:
            body += u32(RTA_OIF, self.index(route.dev))
        if route.gateway:
            body += attr(RTA_GATEWAY, route.gateway.packed)
        if route.prefsrc and verb == "add":
            body += attr(RTA_PREFSRC, route.prefsrc.packed)
        if route.metric:
            body += u32(RTA_PRIORITY, route.metric)
        return (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body) if verb == "add" else (RTM_DELROUTE, 0, body)

    def rule(self, verb: str, rule: Rule) -> tuple:
        family = FAMILIES[rule.version]
        table = rule.table if rule.action == FR_ACT_TO_TBL else 0
        dst_len = rule.dst.prefixlen if rule.dst else 0
        body = _RULE.pack(family.af, dst_len, 0, 0, table if table < 256 else 252, 0, 0, rule.action, 0)
        body += u32(FRA_PRIORITY, rule.priority) + u8(FRA_PROTOCOL, rule.proto)
        if table:
            body += u32(FRA_TABLE, table)
        if rule.dst is not None:
            body += attr(FRA_DST, rule.dst.network_address.packed)
        if rule.fwmask:
            body += u32(FRA_FWMARK, rule.fwmark) + u32(FRA_FWMASK, rule.fwmask)
        if rule.suppress_prefixlength >= 0:
            body += attr(FRA_SUPPRESS_PREFIXLEN, struct.pack("=i", rule.suppress_prefixlength))
        return (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, body) if verb == "add" else (RTM_DELRULE, 0, body)

    def neighbour(self, neighbour: Neighbour) -> tuple:
        family = FAMILIES[neighbour.address.version]
        body = _NDMSG.pack(family.af, self.index(neighbour.ifname), NUD_PERMANENT, 0, 0)
        body += attr(NDA_DST, neighbour.address.packed) + attr(NDA_LLADDR, _mac(neighbour.mac))
        return RTM_NEWNEIGH, NLM_F_CREATE | 0x100, body  # NLM_F_REPLACE

    def do(self, *requests: tuple, ignore: frozenset[int] = frozenset()) -> list[int]:
        return self.sock.batch(requests, ignore)


def _next_hops(a: dict[int, bytes]) -> list[tuple[int, object]]:
    if RTA_MULTIPATH not in a:
        return [(_u32(a.get(RTA_OIF)), _ip(a.get(RTA_GATEWAY)))]
    hops, data, offset = [], a[RTA_MULTIPATH], 0
    while offset + 8 <= len(data):
        length, _flags, _hops, oif = struct.unpack_from("=HBBi", data, offset)
        sub = parse_attrs(data[offset + 8 : offset + length])
        hops.append((oif, _ip(sub.get(RTA_GATEWAY))))
        offset += _align(length)
    return hops


def _inet_conf(af_spec: bytes | None) -> dict[str, int]:
    """IPv4 settings from a link dump: IFLA_INET_CONF is an array of u32, index = id - 1."""
    if not af_spec:
        return {}
    inet = parse_attrs(parse_attrs(af_spec).get(socket.AF_INET, b"")).get(IFLA_INET_CONF)
    if not inet:
        return {}
    values = struct.unpack(f"={len(inet) // 4}I", inet[: len(inet) // 4 * 4])
    return {name: values[i - 1] for name, i in IPV4_DEVCONF.items() if i <= len(values)}


def _inet_conf_attr(inet: dict[str, int]) -> bytes:
    return nested(socket.AF_INET, nested(IFLA_INET_CONF, *(u32(IPV4_DEVCONF[k], v) for k, v in inet.items())))


def _mac(text_mac: str) -> bytes:
    return bytes(int(part, 16) for part in text_mac.split(":"))


# --- conntrack -------------------------------------------------------------------------------

PROTO_NUMBERS = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}


def _ct(kind: int) -> int:
    return NFNL_SUBSYS_CTNETLINK << 8 | kind


def _flow(a: dict[int, bytes]) -> Flow:
    orig = parse_attrs(a.get(CTA_TUPLE_ORIG, b""))
    ip, l4 = parse_attrs(orig.get(CTA_TUPLE_IP, b"")), parse_attrs(orig.get(CTA_TUPLE_PROTO, b""))
    version = 6 if CTA_IP_DST[6] in ip else 4
    reply_ip = parse_attrs(parse_attrs(a.get(CTA_TUPLE_REPLY, b"")).get(CTA_TUPLE_IP, b""))
    return Flow(
        orig=attr(CTA_TUPLE_ORIG | NLA_F_NESTED, a.get(CTA_TUPLE_ORIG, b"")),
        mark=struct.unpack("!I", a[CTA_MARK])[0] if CTA_MARK in a else 0,
        version=version,
        proto=l4[CTA_PROTO_NUM][0] if CTA_PROTO_NUM in l4 else -1,
        status=struct.unpack("!I", a[CTA_STATUS])[0] if CTA_STATUS in a else 0,
        dport=struct.unpack("!H", l4[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in l4 else -1,
        dst=_ip(ip.get(CTA_IP_DST[version])),
        reply_src=_ip(reply_ip.get(CTA_IP_SRC[version])),
    )


def _spans(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """{type: (start, end) of its payload} of the attributes in data[start:end], without copying."""
    found = {}
    while start + 4 <= end:
        length, kind = _ATTR.unpack_from(data, start)
        if length < 4:
            break
        found[kind & 0x3FFF] = (start + 4, start + length)
        start += _align(length)
    return found


def _mark_and_reply_source(body: bytes) -> tuple[int, bytes] | None:
    """(ct mark, packed source address of the replies) of a DNATed entry (None otherwise: kernels
    before 5.x ignore the status filter of a dump)."""
    top = _spans(body, _NFGEN.size, len(body))
    status, reply = top.get(CTA_STATUS), top.get(CTA_TUPLE_REPLY)
    if status is None or reply is None or not int.from_bytes(body[status[0]:status[1]], "big") & IPS_DST_NAT:
        return None
    ip = _spans(body, *reply).get(CTA_TUPLE_IP)
    if ip is None:
        return None
    addresses = _spans(body, *ip)
    source = addresses.get(CTA_IP_SRC[4]) or addresses.get(CTA_IP_SRC[6])
    if source is None:
        return None
    mark = top.get(CTA_MARK)
    return (int.from_bytes(body[mark[0]:mark[1]], "big") if mark else 0), body[source[0]:source[1]]


def _tuple(version: int, src=None, dst=None, proto: int | None = None, dport: int | None = None) -> bytes:
    ip = b""
    if src is not None:
        ip += attr(CTA_IP_SRC[version], src.packed)
    if dst is not None:
        ip += attr(CTA_IP_DST[version], dst.packed)
    l4 = u8(CTA_PROTO_NUM, proto) if proto is not None else b""
    l4 += be16(CTA_PROTO_DST_PORT, dport) if dport is not None else b""
    return nested(CTA_TUPLE_IP, ip) + (nested(CTA_TUPLE_PROTO, l4) if l4 else b"")


@datatype
class Flow:
    orig: bytes  # the CTA_TUPLE_ORIG attribute as the kernel sent it: enough to delete the entry
    mark: int
    version: int  # the address family
    dport: int = -1  # the original destination port
    dst: object = None  # the original destination address
    reply_src: object = None  # where the replies come from: a server's address, for DNATed flows
    proto: int = -1  # the original protocol number
    status: int = 0  # IPS_* bits


class Conntrack:
    """ctnetlink: dumps the kernel filters (Linux >= 5.8), deletions batched, flushes by mark."""

    def __init__(self) -> None:
        self.sock = Socket(NETLINK_NETFILTER)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flows(self, version: int | None, *, orig_proto: int | None = None, orig_dport: int | None = None,
              orig_dst=None, dnat_only: bool = False, deadline: float | None = None) -> list[Flow]:
        """Entries, filtered in the kernel (and again here): of one family by the original protocol, port and
        destination; or, with `version` None, of both families at once (one walk of the whole
        conntrack hash, which is what a dump costs: ~20 ms here), e.g. the DNATed ones."""
        af = FAMILIES[version].af if version is not None else socket.AF_UNSPEC
        body = _NFGEN.pack(af, 0, 0)
        if orig_proto is not None or orig_dst is not None:
            assert version is not None, "tuple filters need a family"
            body += nested(CTA_TUPLE_ORIG, _tuple(version, dst=orig_dst, proto=orig_proto, dport=orig_dport))
            flags = ((FILTER_PROTO_NUM if orig_proto is not None else 0) | (FILTER_DST_PORT if orig_dport is not None else 0)
                     | (FILTER_IP_DST if orig_dst is not None else 0))
            body += nested(CTA_FILTER, u32(CTA_FILTER_ORIG_FLAGS, flags), u32(CTA_FILTER_REPLY_FLAGS, 0))
        if dnat_only:
            body += be32(CTA_STATUS, IPS_DST_NAT) + be32(CTA_STATUS_MASK, IPS_DST_NAT)
        out = []
        try:  # parsed as they arrive: the deadline bounds the parsing too
            for m in self.sock.dump_each(_ct(IPCTNL_MSG_CT_GET), body, deadline):
                f = _flow(parse_attrs(m.body, _NFGEN.size))
                # and here too: kernels before 5.8 ignore CTA_FILTER in dumps (older ones the status too)
                if ((version is None or f.version == version) and orig_proto in (None, f.proto)
                        and orig_dport in (None, f.dport) and orig_dst in (None, f.dst)
                        and (not dnat_only or f.status & IPS_DST_NAT)):
                    out.append(f)
        except DumpTruncated:
            raise FlowsTruncated(out) from None
        return out

    def tally_dnat(self, deadline: float | None = None) -> tuple[dict[tuple[int, bytes], int], bool]:
        """How many DNATed flows of both families there are per (ct mark, packed source address
        of the replies: the server's), and whether the count finished before the `deadline`.
        Read straight from the messages, without building a Flow each: a full table (262,144
        entries) is counted in about a second."""
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0) + be32(CTA_STATUS, IPS_DST_NAT) + be32(CTA_STATUS_MASK, IPS_DST_NAT)
        counts: dict[tuple[int, bytes], int] = {}
        try:
            for m in self.sock.dump_each(_ct(IPCTNL_MSG_CT_GET), body, deadline):
                key = _mark_and_reply_source(m.body)
                if key is not None:
                    counts[key] = counts.get(key, 0) + 1
        except DumpTruncated:
            return counts, False
        return counts, True

    def delete(self, flows: Iterable[Flow]) -> int:
        """Delete entries (already gone is fine); how many were deleted."""
        requests = [(_ct(IPCTNL_MSG_CT_DELETE), 0, _NFGEN.pack(FAMILIES[f.version].af, 0, 0) + f.orig) for f in flows]
        results = self.sock.batch(requests, ignore=frozenset({errno.ENOENT})) if requests else []
        return sum(1 for code in results if code == 0)

    def flush_mark(self, mark: int, mask: int) -> None:
        """Delete every entry, of both families, whose ct mark under `mask` is `mark` (in the kernel)."""
        if not mark & mask:
            raise ValueError("refusing to flush by an empty mark")
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0) + be32(CTA_MARK, mark) + be32(CTA_MARK_MASK, mask)
        self.sock.batch([(_ct(IPCTNL_MSG_CT_DELETE), 0, body)], ignore=frozenset({errno.ENOENT}))


# --- sockets (sock_diag) ---------------------------------------------------------------------

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10  # a UDP socket is TCP_CLOSE until connect()ed
INET_DIAG_SKV6ONLY = 11  # sent for IPv6 sockets in TCP_LISTEN or TCP_CLOSE
_DIAG_REQ = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, id
# inet_diag_msg: family, state, timer, retrans, sport, dport, src, dst, if, cookie, expires, rqueue, wqueue, uid, inode
_DIAG_MSG = struct.Struct("=BBBBHH16s16sI8sIIIII")


def listeners() -> list[Listener]:
    """The TCP sockets listening and the UDP sockets bound but not connected in the calling
    thread's network namespace: those a client's first packet can reach. A connected UDP socket
    (a client's query socket on an ephemeral port) takes only its peer's packets: not one.
    sock_diag walks only what it must (TCP: the listening hash), where /proc/net/tcp formats
    every connection of the host: milliseconds each time."""
    found = []
    with Socket(NETLINK_SOCK_DIAG) as sock:
        for proto, number, state in (("udp", socket.IPPROTO_UDP, TCP_CLOSE), ("tcp", socket.IPPROTO_TCP, TCP_LISTEN)):
            for family in FAMILIES.values():
                for m in sock.dump(SOCK_DIAG_BY_FAMILY, _DIAG_REQ.pack(family.af, number, 0, 1 << state)):
                    af, got, _t, _r, sport, _d, src, _dst, _if, _c, _e, _rq, _wq, _uid, inode = _DIAG_MSG.unpack_from(m.body)
                    port = socket.ntohs(sport)
                    if got != state or not port:  # the kernel filters by state: this is a second look
                        continue
                    address = ipaddress.ip_address(src[:4] if af == socket.AF_INET else src)
                    v6only = False
                    if address.version == 6:
                        mapped = address.ipv4_mapped
                        if mapped is not None:
                            address = mapped
                        else:
                            v6only = parse_attrs(m.body, _DIAG_MSG.size).get(INET_DIAG_SKV6ONLY, b"\0")[:1] != b"\0"
                    found.append(Listener(proto, address, port, inode, v6only))
    return found


def listening() -> set[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(proto, address, port) of `listeners()`."""
    return {(s.proto, s.address, s.port) for s in listeners()}


# --- events ----------------------------------------------------------------------------------

RTMGRP = (0x1  # links
          | 0x10 | 0x40 | 0x80  # IPv4 addresses, routes, rules
          | 0x100 | 0x400  # IPv6 addresses, routes
          | 1 << (19 - 1)  # IPv6 rules
          | 1 << (24 - 1) | 1 << (25 - 1))  # IPv4 / IPv6 netconf (forwarding)


@datatype
class Event:
    """What changed, as much as is needed to tell nswrap's own objects from the host's."""

    what: str  # link, addr, route, rule, netconf, nft, lost
    deleted: bool = False
    ifindex: int = 0
    ifname: str = ""
    proto: int = 0  # routes and rules: the rtnetlink protocol tag
    table: str = ""  # nft events: the table's name


def parse_event(m: Message) -> Event:
    kind = m.kind
    if kind == 0:
        return Event("lost")
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        index = _IFINFO.unpack_from(m.body)[2]
        return Event("link", kind == RTM_DELLINK, index, _str(parse_attrs(m.body, _IFINFO.size).get(IFLA_IFNAME)))
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        return Event("addr", kind == RTM_DELADDR, _IFADDR.unpack_from(m.body)[4])
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        oif = _u32(parse_attrs(m.body, _RTMSG.size).get(RTA_OIF))
        return Event("route", kind == RTM_DELROUTE, oif, proto=_RTMSG.unpack_from(m.body)[5])
    if kind in (RTM_NEWRULE, RTM_DELRULE):
        a = parse_attrs(m.body, _RULE.size)
        return Event("rule", kind == RTM_DELRULE, proto=a[FRA_PROTOCOL][0] if FRA_PROTOCOL in a else 0)
    if kind == RTM_NEWNETCONF:
        a = parse_attrs(m.body, 4)
        index = struct.unpack("=i", a[1])[0] if 1 in a else 0  # NETCONFA_IFINDEX
        return Event("netconf", ifindex=index)
    if kind >> 8 == NFNL_SUBSYS_NFTABLES:
        name = NFT_MSG.get(kind & 0xFF, "")
        if not name.startswith("del") or name == "delsetelem":  # one event per element: only the kind matters
            return Event("nft", name.startswith("del"), ifname=name)
        table = _str(parse_attrs(m.body, _NFGEN.size).get(1))  # NFTA_*_TABLE / NFTA_TABLE_NAME
        return Event("nft", True, table=table, ifname=name)
    return Event("other")


class Monitor:
    """Readable whenever links, addresses, routes, rules, forwarding settings or nftables change."""

    def __init__(self) -> None:
        self.route = Socket(NETLINK_ROUTE, RTMGRP)
        self.nft = Socket(NETLINK_NETFILTER)
        self.nft.subscribe(NFNLGRP_NFTABLES)

    def filenos(self) -> list[int]:
        return [self.route.fileno(), self.nft.fileno()]

    def events(self) -> list[Event]:
        return [parse_event(m) for sock in (self.route, self.nft) for m in sock.events()]

    def close(self) -> None:
        self.route.close()
        self.nft.close()


__all__ = ["PROTO", "Conntrack", "Event", "Monitor", "Routing", "Socket", "NetlinkError"]
