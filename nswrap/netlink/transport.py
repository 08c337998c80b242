"""The transport: one netlink socket; dumps read to their end (or a deadline), requests batched
and acknowledged, subscribed events drained. What arrives is cut into messages by codec.py.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from nswrap.netlink.codec import (
    HEADER,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    Malformed,
    Message,
    NetlinkError,
    error_code,
    messages,
)

SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
C = TypeVar("C", bound="Client")


class DumpTruncated(Exception):
    """A dump stopped at its deadline; `messages` holds what arrived."""

    def __init__(self, messages: list[Message]):
        super().__init__(f"dump stopped after {len(messages)} messages")
        self.messages = messages


class Socket:
    """One netlink socket, bound to the network namespace the calling thread is in."""

    def __init__(self, protocol: int = NETLINK_ROUTE, groups: int = 0):
        self._protocol = protocol
        self._abandoned = False
        self._sock = self._open(groups)
        self._seq = 0

    def _open(self, groups: int) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, self._protocol)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock.bind((0, groups))
        return sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, group: int) -> None:
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def _pack(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self._seq += 1
        return self._seq, HEADER.pack(HEADER.size + len(body), kind, flags, self._seq, 0) + body

    def _recv(self, flags: int = 0) -> bytes:
        """One datagram (the fixture capture wraps this to record what the kernel sends)."""
        return self._sock.recv(1 << 20, flags)

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
            self._sock.close()
            self._sock = self._open(0)
            self._abandoned = False
        seq, packet = self._pack(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
        self._sock.send(packet)
        while True:
            if deadline is not None and time.monotonic() > deadline:
                self._abandoned = True
                raise DumpTruncated([])
            for message in messages(self._recv()):
                if message.seq != seq:
                    continue
                if message.kind == NLMSG_DONE:
                    return
                if message.kind == NLMSG_ERROR:
                    code = error_code(message)
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                yield message

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
                for message in messages(self._recv()):
                    if message.kind == NLMSG_ERROR and message.seq in waiting:
                        waiting.discard(message.seq)
                        results[index[message.seq]] = error_code(message)
        for code in results:
            if code and code not in ignore:
                raise NetlinkError(code, os.strerror(code))
        return results

    def events(self) -> Iterator[Message]:
        """Messages queued on a subscribed socket (non-blocking). Lost events (ENOBUFS) and a
        datagram that does not parse yield an empty message: the caller must look again."""
        while True:
            try:
                yield from messages(self._recv(socket.MSG_DONTWAIT))
            except BlockingIOError:
                return
            except Malformed:
                yield Message(0, 0, b"")
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                yield Message(0, 0, b"")


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


class Client:
    """A protocol's user of one socket (Routing, Conntrack), closed on leaving a `with`."""

    sock: Socket

    def close(self) -> None:
        self.sock.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
