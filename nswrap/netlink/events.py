"""Events: what rtnetlink's groups and nftables announce, reduced to what follow.py needs.

`parse_event` is pure, fed in the tests with bytes captured from a real kernel.
"""

from __future__ import annotations

import struct
from typing import Literal

from nswrap.datatypes import datatype
from nswrap.netlink.codec import NETLINK_NETFILTER, NETLINK_ROUTE, NFGEN, Malformed, Message, number, parse_attrs, string, unpack
from nswrap.netlink.routing import (
    FRA_PROTOCOL,
    IFADDR,
    IFINFO,
    IFLA_IFNAME,
    RTA_OIF,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTMSG,
    RULE,
)
from nswrap.netlink.transport import Socket

RTM_NEWNETCONF = 80
NETCONFA_IFINDEX = 1
NETCONFMSG = struct.Struct("=Bxxx")  # netconfmsg: family, and the padding to the attributes
NETCONFA_IFINDEX_ALL, NETCONFA_IFINDEX_DEFAULT = -1, -2

RTMGRP = (0x1  # links
          | 0x8  # tc: qdiscs and filters (the fast path's, docs/fastpath.md)
          | 0x10 | 0x40 | 0x80  # IPv4 addresses, routes, rules
          | 0x100 | 0x400  # IPv6 addresses, routes
          | 1 << (19 - 1)  # IPv6 rules
          | 1 << (24 - 1) | 1 << (25 - 1))  # IPv4 / IPv6 netconf (forwarding)

# What an event is about: an interface, an address, a route, a rule, a forwarding setting
# (netconf), nftables, events lost (the socket's buffer overflowed: look again) or anything else
EventKind = Literal["link", "addr", "route", "rule", "netconf", "nft", "tc", "lost", "other"]
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER = 36, 37, 44, 45
TCMSG = struct.Struct("=Bxxxi")  # tcmsg: family, ifindex (handle, parent, info follow)

NFNL_SUBSYS_NFTABLES = 10
NFNLGRP_NFTABLES = 7
NFT_MSG = {0: "newtable", 2: "deltable", 3: "newchain", 5: "delchain", 6: "newrule", 8: "delrule", 9: "newset",
           11: "delset", 12: "newsetelem", 14: "delsetelem", 15: "newgen", 18: "newobj", 20: "delobj"}
NFTA_TABLE = 1  # NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...: always 1
NFTA_SET_ELEM_LIST_SET = 2


@datatype
class Event:
    """What changed, as much as is needed to tell nswrap's own objects from the host's."""

    what: EventKind
    deleted: bool = False
    ifindex: int = 0  # links, addresses, routes (the output interface), netconf (-1 all, -2 default)
    ifname: str = ""  # links
    proto: int = 0  # routes and rules: the rtnetlink protocol tag
    table: str = ""  # nft deletions: the table's name
    nft: str = ""  # nft events: the message (newtable, delchain, delsetelem, newgen, ...)
    set: str = ""  # delsetelem: the set


def parse_event(m: Message) -> Event:
    kind = m.kind
    if kind == 0:
        return Event("lost")
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        index = unpack(IFINFO, m.body)[2]
        return Event("link", kind == RTM_DELLINK, index, string(parse_attrs(m.body, IFINFO.size).get(IFLA_IFNAME)))
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        return Event("addr", kind == RTM_DELADDR, unpack(IFADDR, m.body)[4])
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        proto = unpack(RTMSG, m.body)[5]
        oif = number(parse_attrs(m.body, RTMSG.size).get(RTA_OIF))
        return Event("route", kind == RTM_DELROUTE, oif, proto=proto)
    if kind in (RTM_NEWRULE, RTM_DELRULE):
        unpack(RULE, m.body)
        a = parse_attrs(m.body, RULE.size)
        return Event("rule", kind == RTM_DELRULE, proto=a[FRA_PROTOCOL][0] if a.get(FRA_PROTOCOL) else 0)
    if kind in (RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER):
        return Event("tc", kind in (RTM_DELQDISC, RTM_DELTFILTER), unpack(TCMSG, m.body)[1])
    if kind == RTM_NEWNETCONF:
        unpack(NETCONFMSG, m.body)
        index = parse_attrs(m.body, NETCONFMSG.size).get(NETCONFA_IFINDEX)
        return Event("netconf", ifindex=struct.unpack("=i", struct.pack("=I", number(index)))[0])
    if kind >> 8 == NFNL_SUBSYS_NFTABLES:
        name = NFT_MSG.get(kind & 0xFF, "")
        deleted = name.startswith("del")
        if not deleted:
            return Event("nft", deleted, nft=name)
        unpack(NFGEN, m.body)
        a = parse_attrs(m.body, NFGEN.size)  # the table (and, for elements, the set) is attribute 1 (2)
        return Event("nft", True, table=string(a.get(NFTA_TABLE)), nft=name,
                     set=string(a.get(NFTA_SET_ELEM_LIST_SET)) if name == "delsetelem" else "")
    return Event("other")


class Monitor:
    """Readable whenever links, addresses, routes, rules, forwarding settings, tc filters or
    nftables change."""

    def __init__(self) -> None:
        self.route = Socket(NETLINK_ROUTE, RTMGRP)
        self.nft = Socket(NETLINK_NETFILTER)
        self.nft.subscribe(NFNLGRP_NFTABLES)

    def filenos(self) -> list[int]:
        return [self.route.fileno(), self.nft.fileno()]

    def events(self) -> list[Event]:
        """What is queued; a message that does not parse is a "lost" event: look again."""
        out = []
        for sock in (self.route, self.nft):
            for m in sock.events():
                try:
                    out.append(parse_event(m))
                except Malformed:
                    out.append(Event("lost"))
        return out

    def close(self) -> None:
        self.route.close()
        self.nft.close()
