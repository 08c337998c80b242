"""The netlink codec: headers and attributes packed and parsed, pure (transport.py sends them).

Nothing here knows a protocol's messages (routing.py, conntrack.py, events.py do). Bytes that do
not parse as netlink (a header or attribute whose length is shorter than itself or runs past its
buffer, a fixed header cut short) raise `Malformed`, an `OSError` like every kernel error
(`NetlinkError`): never a loop, never a silently shortened message.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Iterator
from typing import Any

from nswrap.datatypes import datatype

NETLINK_ROUTE, NETLINK_SOCK_DIAG, NETLINK_NETFILTER = 0, 4, 12
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big endian on the wire; always 0 here)
_ATTR = struct.Struct("=HH")  # nlattr: length, type


class NetlinkError(OSError):
    pass


class Malformed(NetlinkError):
    """Bytes that do not parse as netlink messages or attributes."""

    def __init__(self, what: str):
        super().__init__(errno.EBADMSG, f"malformed netlink message: {what}")


# --- attributes ------------------------------------------------------------------------------


def align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (align(length) - length)


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


def walk(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(type, start, end of its payload) of each attribute in data[start:end], in order, repeats
    kept (a list's elements), nesting flags stripped."""
    end = len(data) if end is None else end
    while start < end:
        if end - start < _ATTR.size:
            raise Malformed(f"{end - start} bytes left where an attribute starts")
        length, kind = _ATTR.unpack_from(data, start)
        if length < _ATTR.size or start + length > end:
            raise Malformed(f"attribute {kind & 0x3FFF} of length {length} at {start} in {end} bytes")
        yield kind & 0x3FFF, start + _ATTR.size, start + length
        start += align(length)


def spans(data: bytes, start: int = 0, end: int | None = None) -> dict[int, tuple[int, int]]:
    """{type: (start, end) of its payload} of the attributes in data[start:end], without copying
    (nesting flags stripped; the last of a type wins)."""
    return {kind: (first, last) for kind, first, last in walk(data, start, end)}


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """{type: payload} of the attributes in data[offset:] (nesting flags stripped; last wins)."""
    return {kind: data[start:end] for kind, (start, end) in spans(data, offset).items()}


def unpack(layout: struct.Struct, body: bytes) -> tuple[Any, ...]:
    """A message's fixed header (ifinfomsg, rtmsg, ...), or Malformed when the body is shorter."""
    if len(body) < layout.size:
        raise Malformed(f"{len(body)} bytes where a {layout.size}-byte header is due")
    return layout.unpack_from(body)


def string(payload: bytes | None) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace") if payload else ""


def number(payload: bytes | None, default: int = 0) -> int:
    """A native-endian u32 attribute."""
    if not payload:
        return default
    if len(payload) < 4:
        raise Malformed(f"a {len(payload)}-byte attribute where a u32 is due")
    return int(struct.unpack_from("=I", payload)[0])


def address(payload: bytes | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not payload:
        return None
    if len(payload) not in (4, 16):
        raise Malformed(f"a {len(payload)}-byte address")
    return ipaddress.ip_address(payload)


# --- messages --------------------------------------------------------------------------------


@datatype(frozen=False)
class Message:
    kind: int
    flags: int
    body: bytes  # everything after the netlink header
    seq: int = 0


def messages(data: bytes) -> Iterator[Message]:
    """The messages of one datagram (or of several, concatenated)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            raise Malformed(f"{len(data) - offset} bytes left where a header starts")
        length, kind, flags, seq, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            raise Malformed(f"message {kind} of length {length} at {offset} in {len(data)} bytes")
        yield Message(kind, flags, data[offset + HEADER.size : offset + length], seq)
        offset += align(length)


def error_code(message: Message) -> int:
    """The errno of an NLMSG_ERROR (0: an acknowledgement)."""
    if len(message.body) < 4:
        raise Malformed(f"an error message of {len(message.body)} bytes")
    return -int(struct.unpack_from("=i", message.body)[0])
