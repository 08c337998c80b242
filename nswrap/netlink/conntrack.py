"""ctnetlink (conntrack entries: dumped, counted, deleted) and sock_diag (who listens).

`parse_flow`, `mark_and_reply_source` and `parse_listener` are pure, fed in the tests with bytes
captured from a real kernel.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable

from nswrap.datatypes import datatype
from nswrap.netlink import codec
from nswrap.netlink.codec import NETLINK_NETFILTER, NETLINK_SOCK_DIAG, NFGEN, Message
from nswrap.netlink.transport import Client, DumpTruncated, Socket
from nswrap.objects import FAMILIES, IPAddress, Listener, Protocol

PROTO_NUMBERS = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_MARK, CTA_MARK_MASK, CTA_FILTER, CTA_STATUS_MASK = 1, 2, 3, 8, 21, 25, 26
IPS_DST_NAT = 1 << 5
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_SRC = {4: 1, 6: 3}
CTA_IP_DST = {4: 2, 6: 4}
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3
CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS = 1, 2
FILTER_IP_DST, FILTER_PROTO_NUM, FILTER_DST_PORT = 1 << 1, 1 << 3, 1 << 5


class FlowsTruncated(Exception):
    """Counting flows stopped at its deadline; `flows` holds those found by then."""

    def __init__(self, flows: list[Flow]):
        super().__init__(f"stopped after {len(flows)} flows")
        self.flows = flows


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


def ct(kind: int) -> int:
    """A ctnetlink message type (nfnetlink: the subsystem in the high byte)."""
    return NFNL_SUBSYS_CTNETLINK << 8 | kind


def _be(payload: bytes, size: int) -> int:
    return int.from_bytes(payload[:size], "big")


def parse_flow(m: Message) -> Flow:
    """A conntrack entry (IPCTNL_MSG_CT_NEW, as dumps send them)."""
    a = codec.parse_attrs(m.body, NFGEN.size)
    orig = codec.parse_attrs(a.get(CTA_TUPLE_ORIG, b""))
    ip, l4 = codec.parse_attrs(orig.get(CTA_TUPLE_IP, b"")), codec.parse_attrs(orig.get(CTA_TUPLE_PROTO, b""))
    version = 6 if CTA_IP_DST[6] in ip else 4
    reply_ip = codec.parse_attrs(codec.parse_attrs(a.get(CTA_TUPLE_REPLY, b"")).get(CTA_TUPLE_IP, b""))
    return Flow(
        orig=codec.attr(CTA_TUPLE_ORIG | codec.NLA_F_NESTED, a.get(CTA_TUPLE_ORIG, b"")),
        mark=_be(a[CTA_MARK], 4) if CTA_MARK in a else 0,
        version=version,
        proto=l4[CTA_PROTO_NUM][0] if l4.get(CTA_PROTO_NUM) else -1,
        status=_be(a[CTA_STATUS], 4) if CTA_STATUS in a else 0,
        dport=_be(l4[CTA_PROTO_DST_PORT], 2) if CTA_PROTO_DST_PORT in l4 else -1,
        dst=codec.address(ip.get(CTA_IP_DST[version])),
        reply_src=codec.address(reply_ip.get(CTA_IP_SRC[version])),
    )


def mark_and_reply_source(body: bytes) -> tuple[int, bytes] | None:
    """(ct mark, packed source address of the replies) of a DNATed entry (None otherwise: kernels
    before 5.x ignore the status filter of a dump). Read in place: no copy, no Flow."""
    top = codec.spans(body, NFGEN.size)
    status, reply = top.get(CTA_STATUS), top.get(CTA_TUPLE_REPLY)
    if status is None or reply is None or not int.from_bytes(body[status[0]:status[1]], "big") & IPS_DST_NAT:
        return None
    ip = codec.spans(body, *reply).get(CTA_TUPLE_IP)
    if ip is None:
        return None
    addresses = codec.spans(body, *ip)
    source = addresses.get(CTA_IP_SRC[4]) or addresses.get(CTA_IP_SRC[6])
    if source is None:
        return None
    mark = top.get(CTA_MARK)
    return (int.from_bytes(body[mark[0]:mark[1]], "big") if mark else 0), body[source[0]:source[1]]


def tuple_attrs(version: int, dst: IPAddress | None = None, proto: int | None = None, dport: int | None = None) -> bytes:
    """The inside of a CTA_TUPLE_*: what a dump filter matches on."""
    ip = codec.attr(CTA_IP_DST[version], dst.packed) if dst is not None else b""
    l4 = codec.u8(CTA_PROTO_NUM, proto) if proto is not None else b""
    l4 += codec.be16(CTA_PROTO_DST_PORT, dport) if dport is not None else b""
    return codec.nested(CTA_TUPLE_IP, ip) + (codec.nested(CTA_TUPLE_PROTO, l4) if l4 else b"")


class Conntrack(Client):
    """ctnetlink: dumps the kernel filters (Linux >= 5.8), deletions batched, flushes by mark."""

    def __init__(self) -> None:
        self.sock = Socket(NETLINK_NETFILTER)

    @staticmethod
    def request(version: int | None, *, orig_proto: int | None = None, orig_dport: int | None = None,
                orig_dst: IPAddress | None = None, dnat_only: bool = False) -> bytes:
        """The body of the dump request `flows` sends."""
        body = NFGEN.pack(FAMILIES[version].af if version is not None else socket.AF_UNSPEC, 0, 0)
        if orig_proto is not None or orig_dst is not None:
            assert version is not None, "tuple filters need a family"
            body += codec.nested(CTA_TUPLE_ORIG, tuple_attrs(version, dst=orig_dst, proto=orig_proto, dport=orig_dport))
            flags = ((FILTER_PROTO_NUM if orig_proto is not None else 0) | (FILTER_DST_PORT if orig_dport is not None else 0)
                     | (FILTER_IP_DST if orig_dst is not None else 0))
            body += codec.nested(CTA_FILTER, codec.u32(CTA_FILTER_ORIG_FLAGS, flags), codec.u32(CTA_FILTER_REPLY_FLAGS, 0))
        if dnat_only:
            body += codec.be32(CTA_STATUS, IPS_DST_NAT) + codec.be32(CTA_STATUS_MASK, IPS_DST_NAT)
        return body

    def flows(self, version: int | None, *, orig_proto: int | None = None, orig_dport: int | None = None,
              orig_dst: IPAddress | None = None, dnat_only: bool = False, deadline: float | None = None) -> list[Flow]:
        """Entries, filtered in the kernel (and again here): of one family by the original protocol, port and
        destination; or, with `version` None, of both families at once (one walk of the whole
        conntrack hash, which is what a dump costs: ~20 ms here), e.g. the DNATed ones."""
        body = self.request(version, orig_proto=orig_proto, orig_dport=orig_dport, orig_dst=orig_dst, dnat_only=dnat_only)
        out: list[Flow] = []
        try:  # parsed as they arrive: the deadline bounds the parsing too
            for m in self.sock.dump_each(ct(IPCTNL_MSG_CT_GET), body, deadline):
                f = parse_flow(m)
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
        body = self.request(None, dnat_only=True)
        counts: dict[tuple[int, bytes], int] = {}
        try:
            for m in self.sock.dump_each(ct(IPCTNL_MSG_CT_GET), body, deadline):
                key = mark_and_reply_source(m.body)
                if key is not None:
                    counts[key] = counts.get(key, 0) + 1
        except DumpTruncated:
            return counts, False
        return counts, True

    def delete(self, flows: Iterable[Flow]) -> int:
        """Delete entries (already gone is fine); how many were deleted."""
        requests = [(ct(IPCTNL_MSG_CT_DELETE), 0, NFGEN.pack(FAMILIES[f.version].af, 0, 0) + f.orig) for f in flows]
        results = self.sock.batch(requests, ignore=frozenset({errno.ENOENT})) if requests else []
        return sum(1 for code in results if code == 0)

    def flush_mark(self, mark: int, mask: int) -> None:
        """Delete every entry, of both families, whose ct mark under `mask` is `mark` (in the kernel)."""
        if not mark & mask:
            raise ValueError("refusing to flush by an empty mark")
        body = NFGEN.pack(socket.AF_UNSPEC, 0, 0) + codec.be32(CTA_MARK, mark) + codec.be32(CTA_MARK_MASK, mask)
        self.sock.batch([(ct(IPCTNL_MSG_CT_DELETE), 0, body)], ignore=frozenset({errno.ENOENT}))


# --- sockets (sock_diag) ---------------------------------------------------------------------

SOCK_DIAG_BY_FAMILY = 20
TCP_CLOSE, TCP_LISTEN = 7, 10  # a UDP socket is TCP_CLOSE until connect()ed
INET_DIAG_SKV6ONLY = 11  # sent for IPv6 sockets in TCP_LISTEN or TCP_CLOSE
DIAG_REQ = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, id
# inet_diag_msg: family, state, timer, retrans, sport, dport, src, dst, if, cookie, expires, rqueue, wqueue, uid, inode
DIAG_MSG = struct.Struct("=BBBBHH16s16sI8sIIIII")
LISTENING: tuple[tuple[Protocol, int, int], ...] = (
    ("udp", socket.IPPROTO_UDP, TCP_CLOSE), ("tcp", socket.IPPROTO_TCP, TCP_LISTEN))


def parse_listener(m: Message, proto: Protocol, state: int) -> Listener | None:
    """A socket of a sock_diag dump, if it is in `state` and bound to a port."""
    af, got, _t, _r, sport, _d, src, _dst, _if, _c, _e, _rq, _wq, _uid, inode = codec.unpack(DIAG_MSG, m.body)
    port = socket.ntohs(sport)
    if got != state or not port:  # the kernel filters by state: this is a second look
        return None
    found = ipaddress.ip_address(src[:4] if af == socket.AF_INET else src)
    v6only = False
    if found.version == 6:
        mapped = found.ipv4_mapped
        if mapped is not None:
            found = mapped
        else:
            v6only = codec.parse_attrs(m.body, DIAG_MSG.size).get(INET_DIAG_SKV6ONLY, b"\0")[:1] != b"\0"
    return Listener(proto, found, port, inode, v6only)


def listeners() -> list[Listener]:
    """The TCP sockets listening and the UDP sockets bound but not connected in the calling
    thread's network namespace: those a client's first packet can reach. A connected UDP socket
    (a client's query socket on an ephemeral port) takes only its peer's packets: not one.
    sock_diag walks only what it must (TCP: the listening hash), where /proc/net/tcp formats
    every connection of the host: milliseconds each time."""
    found = []
    with Socket(NETLINK_SOCK_DIAG) as sock:
        for proto, number, state in LISTENING:
            for family in FAMILIES.values():
                for m in sock.dump(SOCK_DIAG_BY_FAMILY, DIAG_REQ.pack(family.af, number, 0, 1 << state)):
                    listener = parse_listener(m, proto, state)
                    if listener is not None:
                        found.append(listener)
    return found


def listening() -> set[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(proto, address, port) of `listeners()`."""
    return {(s.proto, s.address, s.port) for s in listeners()}
