"""tc over rtnetlink: the clsact qdisc and direct-action BPF filters on it, in one namespace.

Requests are built by pure functions (`qdisc_request`, `filter_request`, `filter_delete`,
`filter_dump`) and filter dumps parsed by `parse_filter`, which the tests feed with bytes a real
kernel sent; `Tc` sends them. A filter holds its program, and the program its maps: nothing is
pinned, and another process finds the maps again from the filter's program id (nswrap.bpf.maps_of).

Filters are always `bpf` with direct action (the program's return value is the verdict), on
ETH_P_ALL, at an explicit priority and handle so that each is found and replaced or removed
exactly (`tc filter show dev X ingress` lists them as `pref P bpf ... handle 0xH NAME direct-action`).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Literal

from nswrap.datatypes import datatype
from nswrap.netlink import codec
from nswrap.netlink.codec import NETLINK_ROUTE, Message
from nswrap.netlink.transport import Client, Socket

RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_TAG, TCA_BPF_ID = 6, 7, 8, 10, 11
TCA_BPF_FLAG_ACT_DIRECT = 0x1
ETH_P_ALL = 0x0003

TC_H_CLSACT = 0xFFFFFFF1  # the clsact qdisc's parent (== TC_H_INGRESS: clsact replaced ingress)
CLSACT_HANDLE = 0xFFFF0000  # TC_H_MAKE(TC_H_CLSACT, 0)
TC_H_MIN_INGRESS, TC_H_MIN_EGRESS = 0xFFF2, 0xFFF3
PARENTS = {"ingress": (TC_H_CLSACT & 0xFFFF0000) | TC_H_MIN_INGRESS,
           "egress": (TC_H_CLSACT & 0xFFFF0000) | TC_H_MIN_EGRESS}

TCMSG = struct.Struct("=BxxxiIII")  # tcmsg: family, ifindex, handle, parent, info

Direction = Literal["ingress", "egress"]
DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")
Request = tuple[int, int, bytes]


@datatype(order=True)
class Filter:
    priority: int
    handle: int
    name: str  # the name given with the program's fd (TCA_BPF_NAME), e.g. "nswrap.bpf.o:[tc/uplink]"
    prog_id: int
    direct: bool = True  # direct action: anything else is not ours
    tag: str = ""  # the program's tag, hex (as bpftool and `tc filter show` print it)


def _parent(direction: str) -> int:
    if direction not in PARENTS:
        raise ValueError(f"tc direction {direction!r}: ingress or egress")
    return PARENTS[direction]


def _info(priority: int) -> int:
    """tcm_info of a filter: the priority in the upper half, the protocol (network order) below."""
    if not 0 < priority < 0x10000:
        raise ValueError(f"tc filter priority {priority}: 1 to 65535")
    return (priority << 16) | socket.htons(ETH_P_ALL)


def qdisc_request(verb: Literal["add", "del"], ifindex: int) -> Request:
    """The clsact qdisc of an interface, added (refused with EEXIST when there is one) or removed."""
    body = TCMSG.pack(socket.AF_UNSPEC, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0) + codec.text(TCA_KIND, "clsact")
    if verb == "add":
        return RTM_NEWQDISC, codec.NLM_F_CREATE | codec.NLM_F_EXCL, body
    return RTM_DELQDISC, 0, body


def filter_request(ifindex: int, direction: Direction, prog_fd: int, name: str, priority: int, handle: int = 1) -> Request:
    """A direct-action BPF filter at (priority, handle), made or atomically replaced: a packet sees
    the old program or the new one, never none."""
    options = codec.nested(TCA_OPTIONS, codec.u32(TCA_BPF_FD, prog_fd), codec.text(TCA_BPF_NAME, name),
                           codec.u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT))
    body = TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, _parent(direction), _info(priority))
    return RTM_NEWTFILTER, codec.NLM_F_CREATE | codec.NLM_F_REPLACE, body + codec.text(TCA_KIND, "bpf") + options


def filter_delete(ifindex: int, direction: Direction, priority: int, handle: int = 1) -> Request:
    body = TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, _parent(direction), _info(priority))
    return RTM_DELTFILTER, 0, body + codec.text(TCA_KIND, "bpf")


def filter_dump(ifindex: int, direction: Direction) -> tuple[int, bytes]:
    """The dump request of one direction's filters (`Socket.dump`'s kind and body)."""
    return RTM_GETTFILTER, TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, _parent(direction), 0)


def clsact_of(m: Message) -> int | None:
    """The interface index of a qdisc dump's entry if it is a clsact qdisc."""
    _family, ifindex, _handle, _parent_, _info_ = codec.unpack(TCMSG, m.body)
    return ifindex if codec.string(codec.parse_attrs(m.body, TCMSG.size).get(TCA_KIND)) == "clsact" else None


def parse_filter(m: Message) -> Filter | None:
    """A BPF filter of a dump; None for the entry that only says a priority holds filters of a
    kind (handle 0, no options) and for filters of other kinds (u32, flower, ...)."""
    _family, _ifindex, handle, _parent_, info = codec.unpack(TCMSG, m.body)
    a = codec.parse_attrs(m.body, TCMSG.size)
    if codec.string(a.get(TCA_KIND)) != "bpf" or TCA_OPTIONS not in a or not handle:
        return None
    options = codec.parse_attrs(a[TCA_OPTIONS])
    flags = codec.number(options.get(TCA_BPF_FLAGS))
    return Filter(info >> 16, handle, codec.string(options.get(TCA_BPF_NAME)), codec.number(options.get(TCA_BPF_ID)),
                  bool(flags & TCA_BPF_FLAG_ACT_DIRECT), options.get(TCA_BPF_TAG, b"").hex())


class Tc(Client):
    """tc in the namespace this is made in: clsact and direct-action BPF filters on it."""

    def __init__(self) -> None:
        self.sock = Socket(NETLINK_ROUTE)

    def ensure_clsact(self, ifindex: int) -> bool:
        """Whether a clsact qdisc was added (False: there was one)."""
        code = self.sock.batch([qdisc_request("add", ifindex)], ignore=frozenset({errno.EEXIST}))[0]
        return code == 0

    def attach(self, ifindex: int, direction: Direction, prog_fd: int, name: str, priority: int, handle: int = 1) -> None:
        """The program attached at (direction, priority, handle), replacing what was there. The
        filter holds the program from then on: its fd may be closed."""
        self.sock.batch([filter_request(ifindex, direction, prog_fd, name, priority, handle)])

    def clsact_links(self) -> set[int]:
        """The interfaces that have a clsact qdisc (one dump of every qdisc of the namespace)."""
        found = (clsact_of(m) for m in self.sock.dump(RTM_GETQDISC, TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)))
        return {ifindex for ifindex in found if ifindex is not None}

    def filters(self, ifindex: int, direction: Direction) -> list[Filter]:
        """The BPF filters of one direction, in priority and handle order (the kernel dumps none
        without a clsact qdisc, no error)."""
        found = (parse_filter(m) for m in self.sock.dump(*filter_dump(ifindex, direction)))
        return sorted(f for f in found if f is not None)

    def detach(self, ifindex: int, direction: Direction, priority: int, handle: int = 1) -> bool:
        """Whether there was such a filter to remove (gone already: ENOENT, or no clsact: EINVAL,
        both False)."""
        code = self.sock.batch([filter_delete(ifindex, direction, priority, handle)],
                               ignore=frozenset({errno.ENOENT, errno.EINVAL}))[0]
        return code == 0

    def remove_clsact(self, ifindex: int) -> bool:
        """Whether the clsact qdisc was removed: only when no filter of any kind is left on it,
        ours or another tool's, in either direction (False otherwise, or when there was none:
        ENOENT; EINVAL is taken as gone too, for kernels that say so)."""
        if any(self.sock.dump(*filter_dump(ifindex, direction)) for direction in DIRECTIONS):
            return False
        code = self.sock.batch([qdisc_request("del", ifindex)], ignore=frozenset({errno.ENOENT, errno.EINVAL}))[0]
        return code == 0
