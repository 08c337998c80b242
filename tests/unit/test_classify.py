"""follow.classify, table-driven: every kind of event x nswrap's own or the host's x new or
deleted, and nft deletions (delsetelem of the guard's sets against other sets)."""

from __future__ import annotations

import pytest

from nswrap.follow import GUARD_SETS, classify
from nswrap.netlink import Event
from nswrap.objects import PROTO

OWN, MINE, HOST = 7, 9, 2  # another instance's veth, this instance's veth, an uplink
MY_VETH = "nsw-aaaaaa"

CASES = [
    # what, deleted, ifindex, ifname, proto, table, nft, set  -> reason
    (Event("lost"), "host"),
    (Event("other"), None),
    # links: ours (by prefix or known index) vs the host's
    (Event("link", False, 11, "nsw-bbbbbb"), None),  # a new veth: ours, remembered
    (Event("link", True, OWN, "nsw-cccccc"), "instance"),  # another instance's veth vanished
    (Event("link", True, MINE, MY_VETH), "repair"),  # ours vanished
    (Event("link", True, OWN, "renamed0"), "instance"),  # known by index whatever its name now
    (Event("link", False, HOST, "eth0"), "host"),
    (Event("link", True, HOST, "eth0"), "host"),
    # addresses and netconf: on our veths nothing; -1 (all) and -2 (default) nothing; else the host
    (Event("addr", False, OWN), None),
    (Event("addr", True, MINE), None),
    (Event("addr", False, HOST), "host"),
    (Event("addr", True, HOST), "host"),
    (Event("netconf", False, OWN), None),
    (Event("netconf", False, -1), None),
    (Event("netconf", False, -2), None),
    (Event("netconf", False, HOST), "host"),
    # routes: on our veths, or new ones of ours, nothing; a deleted one of ours is the host's doing
    (Event("route", False, OWN, proto=2), None),
    (Event("route", True, OWN, proto=2), None),
    (Event("route", False, HOST, proto=PROTO), None),
    (Event("route", True, HOST, proto=PROTO), "host"),
    (Event("route", False, HOST, proto=3), "host"),
    (Event("route", True, HOST, proto=3), "host"),
    # rules: new ones of ours nothing; any deletion and others' rules: the host
    (Event("rule", False, proto=PROTO), None),
    (Event("rule", True, proto=PROTO), "host"),
    (Event("rule", False, proto=2), "host"),
    (Event("rule", True, proto=2), "host"),
    # nft: additions are nobody's business; deletions in our table are someone's, but elements
    (Event("nft", False, nft="newtable"), None),
    (Event("nft", False, nft="newsetelem"), None),
    (Event("nft", False, nft="newgen"), None),
    (Event("nft", True, table="nswrap", nft="deltable"), "table"),
    (Event("nft", True, table="nswrap", nft="delchain"), "table"),
    (Event("nft", True, table="nswrap", nft="delrule"), "table"),
    (Event("nft", True, table="nswrap", nft="delset"), "table"),
    (Event("nft", True, table="nswrap", nft="delobj"), "table"),
    (Event("nft", True, table="nswrap", nft="delsetelem", set="any4"), None),  # another instance's stop
    (Event("nft", True, table="nswrap", nft="delsetelem", set="ports"), None),
    *((Event("nft", True, table="nswrap", nft="delsetelem", set=name), "host") for name in GUARD_SETS),
    (Event("nft", True, table="filter", nft="deltable"), None),  # another tool's table
    (Event("nft", True, table="nswrap-abcdef", nft="delsetelem", set="held"), None),
]


@pytest.mark.parametrize("event, reason", CASES, ids=[f"{e.what}-{'del' if e.deleted else 'new'}-{e.ifindex}-{e.ifname}"
                                                      f"{e.proto}-{e.table}-{e.nft}-{e.set}" for e, _ in CASES])
def test_classify(event, reason):
    assert classify(event, {OWN, MINE}, MY_VETH) == reason


def test_own_indexes_follow_the_veths():
    own = {OWN}
    assert classify(Event("link", False, 11, "nsw-bbbbbb"), own, MY_VETH) is None
    assert own == {OWN, 11}
    assert classify(Event("addr", False, 11), own, MY_VETH) is None  # its address: ours from now on
    assert classify(Event("link", True, 11, "nsw-bbbbbb"), own, MY_VETH) == "instance"
    assert own == {OWN}
    assert classify(Event("addr", False, 11), own, MY_VETH) == "host"  # the index, reused by the host
