"""netlink/nftrules.py on rule messages a real kernel sent (tests/unit/fixtures/capture.py, two
scenarios of iptables-nft, ip6tables-nft, ebtables-nft and native rules), checked against the
same namespace's iptables-nft-save and ebtables-nft-save: iptables' own reading of those rules,
an oracle that shares no code with nswrap. No root.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct

import pytest

from nswrap.firewall import xt_values
from nswrap.netlink.codec import Malformed, Message
from nswrap.netlink.nftrules import Xt, parse_rule

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SAVES = {"ip": "xt", "ip6": "xt6", "bridge": "xtbridge"}


def captured(name: str) -> list[Xt]:
    bodies = json.loads((FIXTURES / f"ruleset-{name}.xt.json").read_text())["messages"]
    return [x for body in bodies for x in parse_rule(Message(0xA06, 0, bytes.fromhex(body)))]


def save_lines(name: str, family: str, table: str, chain: str) -> list[str]:
    lines, current = [], ""
    for line in (FIXTURES / f"ruleset-{name}.{SAVES[family]}").read_text().splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith(f"-A {chain} "):
            lines.append(line)
    return lines


def test_the_xt_extensions_of_a_capture():
    found = {(x.family, x.table, x.chain, x.type, x.name, x.rev) for x in captured("marks-review")}
    assert found == {("bridge", "filter", "FORWARD", "target", "mark", 0), ("bridge", "filter", "INPUT", "match", "mark_m", 0),
                     ("bridge", "nat", "PREROUTING", "target", "mark", 0), ("arp", "filter", "INPUT", "target", "MARK", 2)}
    assert all(x.handle > 0 for x in captured("marks-review"))


@pytest.mark.parametrize("name", ["marks-iptables-nft", "marks-review"])
def test_every_value_read_is_the_one_iptables_save_prints(name):
    """Each number xt_values reads (but 0 and the whole-mark 0xffffffff, which the save leaves
    unsaid) is one the save's line of that chain prints."""
    checked = 0
    for x in captured(name):
        if x.family not in SAVES:
            continue  # arptables: its save is not read
        values = xt_values(x)
        assert values is not None, x
        printed = {int(n, 16) for line in save_lines(name, x.family, x.table, x.chain)
                   for n in re.findall(r"0x[0-9a-f]+", line)}
        assert {v for v in values if v not in (0, 0xFFFFFFFF)} <= printed, (x, values, printed)
        checked += 1
    assert checked >= 3


def test_ebtables_operations():
    """--mark-set writes the whole mark; --mark-or its value; the match, mark and mask."""
    by_chain = {(x.table, x.chain): xt_values(x) for x in captured("marks-review") if x.family == "bridge"}
    assert by_chain == {("nat", "PREROUTING"): [0xFFFFFFFF, 0x1], ("filter", "FORWARD"): [0x10000000],
                        ("filter", "INPUT"): [0x20000000, 0x20000000]}


def test_a_whole_value_match_is_judged_by_its_value():
    """`-m mark --mark 0x1` (an xt match where iptables translates it no longer natively) is the
    other tool's own value, as iptables-save prints it: `--mark 0x1`, no mask."""
    whole = struct.pack("=IIB", 0x1, 0xFFFFFFFF, 0)
    assert xt_values(Xt("ip", "t", "c", 1, "match", "mark", 1, whole)) == [0x1]
    assert xt_values(Xt("ip", "t", "c", 1, "match", "connmark", 1, struct.pack("=IIB", 0, 0x10000000, 1))) == [
        0, 0x10000000]


def test_an_unknown_revision_or_a_short_struct_is_not_read():
    assert xt_values(Xt("ip", "t", "c", 1, "target", "MARK", 1, bytes(16))) is None
    assert xt_values(Xt("ip", "t", "c", 1, "target", "MARK", 2, bytes(4))) is None
    assert xt_values(Xt("ip", "t", "c", 1, "target", "HMARK", 0, b"")) == [0xFFFFFFFF]


def test_a_cut_message_is_malformed_never_a_short_list():
    body = bytes.fromhex(json.loads((FIXTURES / "ruleset-marks-review.xt.json").read_text())["messages"][0])
    with pytest.raises(Malformed):
        parse_rule(Message(0xA06, 0, body[:-3]))


@pytest.mark.parametrize("name", ["marks-iptables-nft", "marks-review"])
def test_pyroute2_decodes_the_same(name):
    """pyroute2 (a test dependency only) reads the same messages: the same rules, xt names,
    revisions and info bytes."""
    pyroute2 = pytest.importorskip("pyroute2")
    from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

    assert pyroute2
    bodies = json.loads((FIXTURES / f"ruleset-{name}.xt.json").read_text())["messages"]
    theirs = []
    for body in map(bytes.fromhex, bodies):
        m = nft_rule_msg(struct.pack("=IHHII", 16 + len(body), 10 << 8 | 6, 2, 0, 0) + body)
        m.decode()
        for e in m.get_attr("NFTA_RULE_EXPRESSIONS") or []:
            kind = e.get_attr("NFTA_EXPR_NAME")
            if kind in ("target", "match"):
                data = dict(e.get_attr("NFTA_EXPR_DATA")["attrs"])
                prefix = f"NFTA_{kind.upper()}_"
                theirs.append((m.get_attr("NFTA_RULE_TABLE"), m.get_attr("NFTA_RULE_CHAIN"), m.get_attr("NFTA_RULE_HANDLE"),
                               kind, data[prefix + "NAME"], data[prefix + "REV"],
                               bytes.fromhex(data[prefix + "INFO"].replace(":", ""))))
    ours = [(x.table, x.chain, x.handle, x.type, x.name, x.rev, x.info) for x in captured(name)]
    assert ours == theirs and len(ours) >= 4
