"""nft.parse_table on a real `nft -j list table inet nswrap`: the golden datapath's table, loaded
into a throwaway namespace and listed once (tests/unit/fixtures/capture.py). What nswrap writes
must read back as the same elements, or every sync would rewrite the table. No root here.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from nswrap import nft, ruleset
from nswrap.datapath import Element
from tests.unit.hosts import MASK, golden_datapath

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
RECAPTURE = "the table changed: recapture with `sudo .venv/bin/python -m tests.unit.fixtures.capture`"


@pytest.fixture(scope="module")
def table() -> nft.Table:
    items = json.loads((FIXTURES / "table-nswrap.json").read_text())["nftables"]
    return nft.parse_table(items)


def test_the_captured_table_is_the_golden_one(table):
    assert table.version == ruleset.version(MASK), RECAPTURE


def test_elements_read_back_as_written(table):
    dp = golden_datapath()
    for name in ruleset.SETS:
        assert table.elements.get(name, frozenset()) == dp.elements.get(name, frozenset()), f"{name}: {RECAPTURE}?"


def test_nothing_to_change_after_reading_back(table):
    dp = golden_datapath()
    assert ruleset.changes(table.elements, set(table.rules), dp.elements, [1, 2, 3], MASK) == ""


def test_rule_counts_tell_an_intact_table(table):
    assert table.rules == ruleset.expected_chains(golden_datapath())


def test_counters_of_published_elements(table):
    """The capture sent one UDP packet to 192.0.2.10:53 from the namespace itself (through lo)."""
    hit = Element(('"lo"', "udp", "53"), ("198.18.0.6",), "aaaaaa")  # every address: no address in the key
    packets, size = table.counters[("any4", hit)]
    assert packets == 1 and size > 0
    assert {key for key, (p, _) in table.counters.items() if p} == {("any4", hit)}
    assert all(name.startswith(("keep", "remap", "any")) for name, _ in table.counters)


def test_every_element_field_kind():
    s = {"name": "m", "type": ["ifname", "ipv4_addr", "inet_proto", "inet_service"], "map": "ipv4_addr . inet_service",
         "elem": [[{"elem": {"val": {"concat": ["eth0", {"prefix": {"addr": "192.0.2.0", "len": 24}}, "udp",
                                                 {"range": [50, 60]}]}, "comment": "abcdef",
                             "counter": {"packets": 3, "bytes": 90}}},
                   {"concat": ["198.18.0.6", 53]}]]}
    table = nft.Table()
    nft._read_set(table, s)
    element = Element(('"eth0"', "192.0.2.0/24", "udp", "50-60"), ("198.18.0.6", "53"), "abcdef")
    assert table.elements["m"] == {element} and table.counters[("m", element)] == (3, 90)
    verdicts = nft.Table()
    nft._read_set(verdicts, {"name": "v", "type": "mark", "map": "verdict",
                             "elem": [[268435456, {"goto": {"target": "flow_1"}}], [536870912, {"jump": {"target": "x"}}]]})
    assert verdicts.elements["v"] == {Element(("0x10000000",), ("goto flow_1",)), Element(("0x20000000",), ("jump x",))}


def test_an_empty_listing():
    table = nft.parse_table([{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "nswrap"}}])
    assert (table.elements, table.rules, table.version, table.counters) == ({}, {}, "", {})


def test_the_table_is_found_in_a_whole_ruleset(table):
    """The first instance lists the whole ruleset once, for the other firewalls and for its table."""
    items = json.loads((FIXTURES / "ruleset-docker.json").read_text())["nftables"]
    found = nft.table_in(items)
    assert found is not None and found.elements == table.elements and found.version == table.version
    assert found.rules == table.rules
    others = [i for i in items if not any(isinstance(b, dict) and b.get("family") == "inet" for b in i.values())]
    assert nft.table_in(others) is None
