"""The fake kernel's own tests: its nft batch parser reads what ruleset.py writes back into the
table nft.read_table would report (the same model as test_sync.table_after), all or nothing."""

from __future__ import annotations

import errno

import pytest

from nswrap import nft, ruleset
from nswrap.datapath import Element
from nswrap.errors import NswrapError
from nswrap.objects import Address, Link, Route, Rule
from tests.unit.fakekernel import Batch, FakeKernel, FakeRouting, parse_element
from tests.unit.hosts import IF, N, golden_datapath


@pytest.mark.parametrize("text, element", [
    ('"eth0"', Element(('"eth0"',))),
    ('udp . 53-53', Element(("udp", "53-53"))),
    ('"eth1" . 198.51.100.10 . udp . 69 comment "bbbbbb" : 198.18.0.10',
     Element(('"eth1"', "198.51.100.10", "udp", "69"), ("198.18.0.10",), "bbbbbb")),
    ('"eth0" : goto new_1', Element(('"eth0"',), ("goto new_1",))),
    ('tcp . 8080 comment "bbbbbb" : 198.18.0.10 . 80', Element(("tcp", "8080"), ("198.18.0.10", "80"), "bbbbbb")),
])
def test_an_element_reads_back_as_ruleset_writes_it(text, element):
    assert parse_element(text) == element
    assert ruleset.element_text(element) == text


def test_the_whole_table_reads_back_as_the_datapath_holds_it():
    dp = golden_datapath()
    table, others = Batch(None).apply(ruleset.table_text(dp))
    assert table is not None and others == set()
    assert {k: v for k, v in table.elements.items() if v} == {k: v for k, v in dp.elements.items() if v}
    assert table.rules == ruleset.expected_chains(dp)
    assert table.version == ruleset.version(dp.allocation.mark_mask, dp.udp_timeout)
    assert table.named_counters == {"misrouted": 0}
    assert "forged" in table.elements


def test_element_changes_and_uplink_chains_apply_and_undo():
    dp = golden_datapath()
    table, _ = Batch(None).apply(ruleset.table_text(dp))
    assert table is not None
    mask = dp.allocation.mark_mask
    want = {**dp.elements, "ports": frozenset({Element(("udp", "5353"))})}
    indexes = [u.index for u in dp.allocation.uplinks]
    text = ruleset.changes(table.elements, set(table.rules), want, [*indexes, 7], mask)
    after, _ = Batch(table).apply(text)
    assert after is not None and after.elements["ports"] == want["ports"]
    assert after.rules["new_7"] == 2 and after.rules["flow_7"] == 1
    undo = ruleset.changes(want, set(after.rules), dp.elements, indexes, mask)
    back, _ = Batch(after).apply(undo)
    assert back == table


def test_a_batch_is_all_or_nothing():
    table, _ = Batch(None).apply(ruleset.table_text(golden_datapath()))
    batch = Batch(table)
    with pytest.raises(NswrapError, match="No such file or directory"):
        batch.apply('add element inet nswrap closed { "nsw-x" }\ndelete element inet nswrap closed { "nsw-y" }\n')
    assert batch.table == table  # untouched: the first line did not stay


@pytest.mark.parametrize("text", [
    "delete table inet nswrap\n",  # none there
    "add element inet nswrap ports { udp . 53 }\n",
    "add rule inet nswrap guard drop\n",
    "delete chain inet nswrap new_1\n",
    "flush ruleset\n",  # nswrap never sends it: the fake does not pretend to know it
])
def test_what_nft_refuses_on_no_table(text):
    with pytest.raises(NswrapError, match="nft refused the ruleset"):
        Batch(None).apply(text)


def test_other_tables_are_kept_by_name():
    _, others = Batch(None, {("inet", "nswrap-abcdef")}).apply("add table ip nat\ndelete table inet nswrap-abcdef\n")
    assert others == {("ip", "nat")}
    with pytest.raises(NswrapError):
        Batch(None).apply("delete table inet nswrap-abcdef\n")
    assert Batch(nft.Table()).apply("delete table inet nswrap\n")[0] is None


def test_routing_requests_change_the_dicts_and_say_errnos(tmp_path):
    kernel = FakeKernel(tmp_path)
    kernel.add_link(Link(0, "eth0"))
    routing = FakeRouting(kernel)
    address = Address("eth0", IF("192.0.2.10/24"))
    route = Route(N("0.0.0.0/0"), "eth0", table=5000)
    rule = Rule(4, 5000, 5000, fwmark=0x10000000, fwmask=0xF0000000)
    routing.do(routing.address("add", address), routing.route("add", route), routing.rule("add", rule))
    assert address in kernel.addresses and route in kernel.routes and rule in kernel.rules
    assert any(r.dst == N("192.0.2.0/24") for r in kernel.routes)  # the connected route
    with pytest.raises(OSError) as e:
        routing.do(routing.rule("add", rule))
    assert e.value.errno == errno.EEXIST
    assert routing.do(routing.route("add", route), ignore=frozenset({errno.EEXIST})) == [errno.EEXIST]
    routing.do(routing.link_del("eth0"))
    assert kernel.addresses == [] and kernel.routes == [] and not (tmp_path / "net/ipv4/conf/eth0").exists()
    with pytest.raises(OSError) as e:
        routing.index("eth0")
    assert e.value.errno == errno.ENODEV
    assert [(ev.what, ev.deleted) for ev in kernel.events][-1] == ("link", True)
