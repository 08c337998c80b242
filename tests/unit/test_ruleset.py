"""ruleset.py: the nft text of the shared table, pinned by a golden file, and the batches between
two contents of it. Pure: no root, no nft.

The golden file changes only on purpose: after a change to ruleset.py (or the golden datapath),
look at the diff of

    NSWRAP_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_ruleset.py

and commit it with the change (then also recapture tests/unit/fixtures/table-nswrap.json, see
tests/unit/fixtures/capture.py).
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest

from nswrap import ruleset
from nswrap.datapath import Element, datapath
from nswrap.datatypes import replace
from tests.unit.hosts import MASK, fresh, golden_datapath, host, instance

GOLDEN = pathlib.Path(__file__).parent / "golden"
REGENERATE = os.environ.get("NSWRAP_REGENERATE_GOLDEN") == "1"


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.write_text(text)
    assert path.exists(), f"{path} is missing: NSWRAP_REGENERATE_GOLDEN=1 writes it"
    assert text == path.read_text(), f"{name} changed: if on purpose, NSWRAP_REGENERATE_GOLDEN=1 and review the diff"


def test_table_text_is_golden():
    golden("table-2-instances.nft", ruleset.table_text(golden_datapath()))


def test_changes_are_golden():
    """One instance leaves and another comes: the batch that does it."""
    dp = golden_datapath()
    after = datapath(host(), dp.allocation, (instance("cccccc", "123", subnet="198.18.0.12/30", uplinks=("eth0",)),))
    text = ruleset.changes(dp.elements, set(ruleset.expected_chains(dp)), after.elements, [1], MASK)
    golden("changes-2-instances-to-1.nft", text)


def test_table_text_replaces_a_leftover_whole():
    lines = ruleset.table_text(golden_datapath()).splitlines()
    assert lines[:3] == ["add table inet nswrap", "delete table inet nswrap", "table inet nswrap {"]
    assert ruleset.delete_text() == "delete table inet nswrap\n"


def test_every_set_is_declared_and_filled_only_with_its_elements():
    text = ruleset.table_text(golden_datapath())
    for name in ruleset.SETS:
        assert re.search(rf"^\t(set|map) {name} {{ ", text, re.M), name
    assert re.search(r'^add element inet nswrap version \{ 1 comment "[0-9a-f]+" \}$', text, re.M)
    filled = set(re.findall(r"^add element inet nswrap (\w+) ", text, re.M))
    assert filled == {name for name, items in golden_datapath().elements.items() if items} | {"version"}


def test_one_pair_of_chains_per_uplink():
    text = ruleset.table_text(golden_datapath())
    assert re.findall(r"^\tchain (new_\d+|flow_\d+) \{", text, re.M) == ["new_1", "flow_1", "new_2", "flow_2", "new_3", "flow_3"]
    assert ruleset.uplink_chains(MASK, 2) == {
        "new_2": ["ct mark set ct mark & 0x0fffffff | 0x20000000", "meta mark set meta mark & 0x0fffffff | 0x20000000"],
        "flow_2": ["meta mark set meta mark & 0x0fffffff | 0x20000000"],
    }
    low = ruleset.uplink_chains(0x00000F00, 1)
    assert low["flow_1"] == ["meta mark set meta mark & 0xfffff0ff | 0x00000100"]


def test_our_mark_bits_are_cleared_after_routing():
    """Both ways (tests/system/test_coexistence.py watches the packets)."""
    rules = {name: rules for name, _, rules in ruleset.chains(0xF0000000)}
    clear = "meta mark set meta mark & 0x0fffffff"
    for chain in ("into_server", "from_server"):
        first_accept = next(i for i, rule in enumerate(rules[chain]) if rule.endswith("accept"))
        assert clear in rules[chain][:first_accept], chain


def test_element_text():
    assert ruleset.element_text(Element(('"eth0"', "192.0.2.10", "udp", "53"), ("198.18.0.6",), "aaaaaa")) == \
        '"eth0" . 192.0.2.10 . udp . 53 comment "aaaaaa" : 198.18.0.6'
    assert ruleset.element_text(Element(("udp", "50-60"))) == "udp . 50-60"


def test_version_names_the_base_and_the_mask():
    assert ruleset.version(MASK) == ruleset.version(MASK)
    assert ruleset.version(MASK) != ruleset.version(0x0F000000)
    assert re.fullmatch(r"[0-9a-f]{8,64}", ruleset.version(MASK))


def test_published_udp_flows_get_the_udp_timeout_when_replied():
    """Issue 23: a flood the server answers becomes UDP `stream`s, which the kernel keeps for
    `replied` (120 s of its own): the ct timeout objects say how long instead."""
    dp = golden_datapath()
    assert dp.udp_timeout == 20
    text = ruleset.table_text(dp)
    for version, l3 in ((4, "ip"), (6, "ip6")):
        assert (f"\tct timeout udp{version} {{\n\t\tprotocol udp\n\t\tl3proto {l3}\n"
                "\t\tpolicy = { unreplied : 10, replied : 20 }\n\t}") in text
        assert (f"\tct timeout tcp{version} {{\n\t\tprotocol tcp\n\t\tl3proto {l3}\n"
                "\t\tpolicy = { syn_sent : 10, syn_recv : 10 }\n\t}") in text  # established TCP: the kernel's
    longer = ruleset.table_text(replace(dp, udp_timeout=300))
    assert longer.count("policy = { unreplied : 10, replied : 300 }") == 2 and "replied : 20 " not in longer
    assert f'comment "{ruleset.version(MASK, 300)}"' in longer


def test_the_version_names_the_udp_timeout():
    """The objects are the base's: a table made for another value is rebuilt (only ever when no
    instance of that value lives: they agree on it)."""
    assert ruleset.version(MASK) == ruleset.version(MASK, 20)
    assert ruleset.version(MASK, 20) != ruleset.version(MASK, 21)


def test_expected_chains_count_every_rule():
    dp = golden_datapath()
    expected = ruleset.expected_chains(dp)
    text = ruleset.table_text(dp)
    for chain, count in expected.items():
        body = re.search(rf"^\tchain {chain} {{\n(.*?)^\t}}", text, re.M | re.S)
        assert body, chain
        rules = [line for line in body.group(1).splitlines() if not line.strip().startswith("type ")]
        assert len(rules) == count, chain
    assert {"new_1", "flow_3", "guard", "publish", "remember"} <= set(expected)
    no_uplinks = replace(dp, allocation=replace(dp.allocation, uplinks=()))
    assert not any(name.startswith(("new_", "flow_")) for name in ruleset.expected_chains(no_uplinks))


# --- changes between two contents ------------------------------------------------------------------


def test_no_change_is_an_empty_batch():
    dp = golden_datapath()
    assert ruleset.changes(dp.elements, set(ruleset.expected_chains(dp)), dp.elements, [1, 2, 3], MASK) == ""


def test_batch_order_chains_deletes_adds_then_old_chains():
    """New chains exist before the verdict elements that jump to them; deletions go first (an
    interval set refuses an overlapping element); old chains go once nothing jumps to them."""
    before = datapath(host(), fresh(), (instance("aaaaaa", "53", uplinks=("eth0", "eth1")),))
    after = datapath(host(), before.allocation, (instance("aaaaaa", "50-60", uplinks=("eth0", "eth2")),))
    assert [(u.ifname, u.index) for u in after.allocation.uplinks] == [("eth0", 1), ("eth2", 2)]
    # eth1 left (its index 2 is free again), eth2 took it: the chains stay, the elements change
    text = ruleset.changes(before.elements, set(ruleset.expected_chains(before)), after.elements, [1, 2], MASK)
    assert not any(line.startswith(("add chain", "delete chain")) for line in text.splitlines())

    third = datapath(host(), fresh(), (instance("aaaaaa", "53", uplinks=("eth0", "eth1", "eth2")),))
    fourth = datapath(host(), third.allocation, (instance("aaaaaa", "50-60", uplinks=("eth0", "eth2")),))
    assert [(u.ifname, u.index) for u in fourth.allocation.uplinks] == [("eth0", 1), ("eth2", 3)]
    lines = ruleset.changes(third.elements, set(ruleset.expected_chains(third)), fourth.elements, [1, 3], MASK).splitlines()
    kinds = [_kind(line) for line in lines]
    assert kinds == sorted(kinds, key=["add chain", "add rule", "delete element", "add element", "delete chain"].index)
    assert "delete element inet nswrap ports { udp . 53 }" in lines
    assert "add element inet nswrap ports { udp . 50-60 }" in lines
    assert lines[-2:] == ["delete chain inet nswrap flow_2", "delete chain inet nswrap new_2"]
    assert 'delete element inet nswrap uplink_new { "eth1" }' in lines
    assert "delete element inet nswrap uplink_flow { 0x20000000 }" in lines


def test_a_new_uplink_gets_its_chains_before_its_verdicts():
    before = datapath(host(), fresh(), (instance("aaaaaa", "53", uplinks=("eth0",)),))
    after = datapath(host(), before.allocation, (instance("aaaaaa", "53", uplinks=("eth0", "eth1")),))
    lines = ruleset.changes(before.elements, set(ruleset.expected_chains(before)), after.elements, [1, 2], MASK).splitlines()
    assert lines[:5] == [
        "add chain inet nswrap new_2",
        "add rule inet nswrap new_2 ct mark set ct mark & 0x0fffffff | 0x20000000",
        "add rule inet nswrap new_2 meta mark set meta mark & 0x0fffffff | 0x20000000",
        "add chain inet nswrap flow_2",
        "add rule inet nswrap flow_2 meta mark set meta mark & 0x0fffffff | 0x20000000",
    ]
    verdict = lines.index('add element inet nswrap uplink_new { "eth1" : goto new_2 }')
    assert verdict > 4


def test_deleting_elements_names_only_their_keys():
    before = datapath(host(), fresh(), (instance("aaaaaa", "53", uplinks=("eth0",), addresses=("192.0.2.10",), ipv6=False),))
    lines = ruleset.changes(before.elements, set(ruleset.expected_chains(before)), {}, [], MASK).splitlines()
    assert 'delete element inet nswrap keep4 { "eth0" . 192.0.2.10 . udp . 53, "lo" . 192.0.2.10 . udp . 53 }' in lines
    assert lines[-2:] == ["delete chain inet nswrap flow_1", "delete chain inet nswrap new_1"]


def test_uplink_indexes():
    assert ruleset.uplink_indexes({"new_1", "flow_1", "new_12", "guard", "new_x", "flow_3"}) == [1, 12]


def _kind(line: str) -> str:
    return " ".join(line.split()[:2])


@pytest.mark.parametrize("name", sorted(ruleset.SETS))
def test_set_names_are_plain_words(name):
    assert re.fullmatch(r"[a-z0-9_]+", name)


def test_a_server_cannot_advertise_a_route_nor_answer_for_others():
    """Found by a hostile review: a server's router advertisement became the host's default route;
    a LAN peer forging the host's address slipped 'answers' into a server's own connections."""
    rules = {name: rules for name, _, rules in ruleset.chains(0xF0000000)}
    link_local = next(r for r in rules["from_veth"] if "fe80::/10" in r)
    assert "icmpv6 type {" in link_local and "nd-router-advert" not in link_local and "redirect" not in link_local
    into = rules["into_server"]
    assert "ct direction reply accept" not in into
    assert "ct direction reply ct status snat accept" in into
    assert 'ct direction reply ct status dnat iifname "nsw-*" accept' in into
