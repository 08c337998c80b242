"""firewall.py on captured rulesets: what would drop nswrap's forwarded flows, and who else uses
its mark bits. The inputs are real `nft -j list ruleset` and `iptables-legacy-save` outputs of
throwaway namespaces set up like Docker, ufw, firewalld... (tests/unit/fixtures/capture.py). No root.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from nswrap.datapath import Room
from nswrap.datatypes import replace
from nswrap.firewall import (
    Blocker,
    FirewallFacts,
    blockers,
    how_to_fix,
    mark_users,
    needs_xt,
    rooms,
    unreadable_marks,
)
from nswrap.netlink.codec import Message
from nswrap.netlink.nftrules import parse_rule

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MASK = 0xF0000000


def ruleset(name: str) -> FirewallFacts:
    return FirewallFacts(tuple(json.loads((FIXTURES / f"ruleset-{name}.json").read_text())["nftables"]))


def legacy(name: str) -> FirewallFacts:
    return FirewallFacts((), (FIXTURES / f"{name}.save").read_text())


FORWARD_DROP = "iptables-nft chain FORWARD (policy drop)"


# --- blockers --------------------------------------------------------------------------------------


def test_docker_makes_room_in_docker_user():
    """Docker's FORWARD policy is drop; its documented hook for other tools is DOCKER-USER. The
    capture also holds nswrap's own table, which is never a blocker."""
    facts = ruleset("docker")
    assert any(item.get("table", {}).get("name") == "nswrap" for item in facts.nft)
    assert blockers(facts) == [Blocker(FORWARD_DROP, "iptables-nft", "DOCKER-USER")]


def test_ufw_makes_room_at_the_top_of_forward():
    assert blockers(ruleset("ufw")) == [Blocker(FORWARD_DROP, "iptables-nft", "FORWARD")]


def test_ufw_with_ipv6_makes_room_in_both_families():
    """ufw's default (IPV6=yes) sets ip6tables' FORWARD policy too: nswrap makes room there with
    ip6tables-nft, as for IPv4 (found by a review: it was taken for another tool's native nft
    chain, and the start refused on every such host)."""
    assert blockers(ruleset("ufw6")) == [Blocker(FORWARD_DROP, "iptables-nft", "FORWARD"),
                                         Blocker("ip6tables-nft chain FORWARD (policy drop)", "ip6tables-nft", "FORWARD")]


def test_firewalld_lets_dnat_flows_pass():
    """firewalld's forward chain rejects the rest, but accepts `ct status dnat` first."""
    assert blockers(ruleset("firewalld")) == []


def test_a_native_drop_chain_is_refused_not_edited():
    [blocker] = blockers(ruleset("native-drop"))
    assert blocker == Blocker("nft chain inet filter forward (policy drop)", None)
    message = how_to_fix(blocker)
    assert "nft chain inet filter forward (policy drop)" in message and "does not edit other tools' nft tables" in message
    assert 'iifname "nsw-*" accept' in message


def test_an_accept_after_an_unconditional_drop_does_not_help():
    assert blockers(ruleset("drop-first")) == [Blocker("nft chain inet strict forward (a drop rule)", None)]


def test_legacy_docker():
    assert blockers(legacy("legacy-docker")) == [
        Blocker("iptables-legacy chain FORWARD (policy DROP)", "iptables-legacy", "DOCKER-USER")]


def test_legacy_reject_rule():
    assert blockers(legacy("legacy-reject")) == [
        Blocker("iptables-legacy chain FORWARD (a DROP/REJECT rule)", "iptables-legacy", "FORWARD")]


def test_only_the_forward_hook_matters():
    facts = FirewallFacts((
        {"chain": {"family": "inet", "table": "filter", "name": "input", "hook": "input", "policy": "drop"}},
        {"chain": {"family": "inet", "table": "nswrap", "name": "guard", "hook": "forward", "policy": "drop"}},
        {"chain": {"family": "inet", "table": "filter", "name": "forward", "hook": "forward", "policy": "accept"}},
        {"rule": {"family": "inet", "table": "filter", "chain": "forward", "expr": [{"counter": None}, {"accept": None}]}},
    ), "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j DROP\nCOMMIT\n")
    assert blockers(facts) == []


def test_nothing_at_all():
    assert blockers(FirewallFacts()) == [] and mark_users(FirewallFacts(), MASK) == []


def test_rooms_are_narrow_and_tagged():
    assert rooms(Blocker(FORWARD_DROP, "iptables-nft", "DOCKER-USER")) == [
        Room("iptables-nft", "DOCKER-USER", ("-i", "nsw-+", "-m", "comment", "--comment", "nswrap", "-j", "ACCEPT")),
        Room("iptables-nft", "DOCKER-USER", ("-o", "nsw-+", "-m", "conntrack", "--ctstate", "DNAT,RELATED,ESTABLISHED",
                                             "-m", "comment", "--comment", "nswrap", "-j", "ACCEPT")),
    ]
    with pytest.raises(AssertionError):
        rooms(Blocker("nft chain inet filter forward (policy drop)", None))


# --- mark users ----------------------------------------------------------------------------------


def test_a_foreign_mark_under_our_mask():
    assert mark_users(ruleset("marks-foreign"), MASK) == ["nft table inet marker chain pre"]
    assert mark_users(ruleset("marks-foreign"), 0x0F000000) == []


def test_nswrap_and_docker_use_no_foreign_marks():
    assert mark_users(ruleset("docker"), MASK) == []  # nswrap's own table is in this capture


def test_kube_proxy_marks_are_not_ours():
    facts = ruleset("marks-compatible")
    users = mark_users(FirewallFacts(tuple(i for i in facts.nft if "tailscale" not in json.dumps(i))), MASK)
    assert users == []
    # tailscale-like keeps bit 0x4000 (its AND mask has it) and sets 0x40000: no conflict there
    assert mark_users(facts, 0x00004000) == ["nft table ip kube-proxy-like chain mark-for-masquerade",
                                             "nft table ip kube-proxy-like chain postrouting"]


def test_a_rule_that_keeps_our_bits_is_not_a_user():
    assert mark_users(ruleset("marks-compatible"), MASK) == []


def test_an_iptables_nft_mark_match():
    assert "nft table ip mangle chain OUTPUT" in mark_users(ruleset("marks-iptables-nft"), MASK)


def with_xt(name: str) -> FirewallFacts:
    """A captured ruleset and the xt extensions the kernel sent for the same namespace
    (tests/unit/test_netlink_nftrules.py checks those against iptables-nft-save)."""
    bodies = json.loads((FIXTURES / f"ruleset-{name}.xt.json").read_text())["messages"]
    xt = tuple(x for body in bodies for x in parse_rule(Message(0xA06, 0, bytes.fromhex(body))))
    return FirewallFacts(ruleset(name).nft, xt=xt)


XT_USERS = ["nft table ip mangle chain OUTPUT",  # a mark match: nft -j shows its value
            "nft table ip mangle chain PREROUTING",  # -j MARK --set-xmark 0x20000000/0xffffffff
            "nft table ip6 mangle chain POSTROUTING"]  # -j CONNMARK --set-xmark 0x10000000/0x10000000


def test_an_iptables_nft_mark_target():
    """nft -j lists `-j MARK --set-xmark 0x20000000/0xffffffff` as {'xt': {'type': 'target',
    'name': 'MARK'}}, without its value: the kernel's rule has it. kube-proxy's `--or-mark
    0x4000` and a CONNMARK restore through 0xffff leave our bits alone."""
    assert mark_users(with_xt("marks-iptables-nft"), MASK) == XT_USERS
    assert unreadable_marks(with_xt("marks-iptables-nft")) == []


def test_the_values_of_xt_targets_are_read_not_guessed():
    """Under another mask the other rules are the users: the values are read, not guessed."""
    assert mark_users(with_xt("marks-iptables-nft"), 0x0000F000) == [
        "nft table ip mangle chain PREROUTING",  # its mask 0xffffffff clears every bit
        "nft table ip nat chain KUBE-MARK-MASQ",  # 0x4000
        "nft table ip6 mangle chain PREROUTING"]  # --restore-mark --nfmask 0xffff --ctmask 0xffff


def test_xt_targets_not_read_are_unreadable_not_free():
    """Without their values (the dump failed, or the rule came after it), the xt rules are
    neither users nor free: unreadable, whatever the mask."""
    facts = ruleset("marks-iptables-nft")
    assert needs_xt(facts.nft)
    assert mark_users(facts, MASK) == ["nft table ip mangle chain OUTPUT"]
    unknown = "its values could not be read (a revision nswrap does not know, or the rule changed meanwhile)"
    assert unreadable_marks(facts) == [
        ("nft table ip mangle chain PREROUTING (xt MARK)", unknown),
        ("nft table ip nat chain KUBE-MARK-MASQ (xt MARK)", unknown),
        ("nft table ip6 mangle chain POSTROUTING (xt CONNMARK)", unknown),
        ("nft table ip6 mangle chain PREROUTING (xt CONNMARK)", unknown)]
    failed = FirewallFacts(facts.nft, xt_error="its rules could not be read over netlink (Operation not permitted)")
    assert {why for _, why in unreadable_marks(failed)} == {failed.xt_error}
    older = with_xt("marks-iptables-nft")  # a MARK of a revision nswrap does not know
    older = FirewallFacts(older.nft, xt=tuple(replace(x, rev=1) if x.name == "MARK" else x for x in older.xt))
    assert [where for where, _ in unreadable_marks(older)] == [
        "nft table ip mangle chain PREROUTING (xt MARK)", "nft table ip nat chain KUBE-MARK-MASQ (xt MARK)"]


REVIEW_USERS = [
    "nft table bridge filter chain FORWARD",  # ebtables-nft: -j mark --mark-or 0x10000000
    "nft table bridge filter chain INPUT",  # ebtables-nft: --mark 0x20000000/0x20000000
    "nft table bridge nat chain PREROUTING",  # ebtables-nft: --mark-set 0x1, the whole mark
    "nft table inet named chain pre",  # meta mark set ip saddr map @marks (0x10000000), @ours, @verdicts
    "nft table inet prefixes chain fw",  # meta mark and 0xf0000000 == 0: listed as 0/4
    "nft table ip nswrap chain pre",  # not nswrap's: its table is inet nswrap
]


def test_what_a_hostile_review_found_unnoticed_is_a_user():
    """Found by a hostile review of the xt work: mark matches nft lists as prefixes, named sets
    and maps, ebtables-nft's mark target and match, a table named nswrap in another family.
    arptables' MARK (ARP packets) and a named map of other bits (@theirs, 0x4000) are not users."""
    facts = with_xt("marks-review")
    assert needs_xt(facts.nft)  # bridge (arp: never judged)
    assert mark_users(facts, MASK) == REVIEW_USERS and unreadable_marks(facts) == []
    assert mark_users(facts, 0x0000FF00) == [
        "nft table bridge nat chain PREROUTING",  # the whole mark, whatever the mask
        "nft table inet named chain other",  # @theirs: 0x4000
        "nft table inet prefixes chain fw"]  # ct mark and 0xff00 == 0x100


def test_counters_and_seeds_in_a_mark_statement_are_not_marks():
    """A named map's element counter (bytes 400,000,000 = 0x17d78400) and jhash's seed are
    numbers inside the statement, not values it reads or writes (found by a review)."""
    mangle = {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"map": {"key": "x", "data": "@m"}}}}
    element = [[{"elem": {"val": "192.0.2.50", "counter": {"packets": 300000, "bytes": 400000000}}}, 1]]
    facts = FirewallFacts(({"map": {"family": "ip", "table": "acct", "name": "m", "elem": element}},
                           {"rule": {"family": "ip", "table": "acct", "chain": "pre", "expr": [mangle]}}))
    assert mark_users(facts, MASK) == []
    jhash = {"mangle": {"key": {"meta": {"key": "mark"}},
                        "value": {"jhash": {"expr": "x", "mod": 2, "seed": 0xDEADBEEF, "offset": 0x100}}}}
    facts = FirewallFacts(({"rule": {"family": "ip", "table": "t", "chain": "c", "expr": [jhash]}},))
    assert mark_users(facts, MASK) == [] and mark_users(facts, 0xF00) == ["nft table ip t chain c"]


@pytest.mark.parametrize(("line", "users"), [
    ("-A PREROUTING -j HMARK --hmark-tuple src,dst --hmark-mod 2 --hmark-offset 0x1 --hmark-rnd 0x1", True),
    ("-A PREROUTING -j MARK --and-mark 0x0fffffff", True),  # clears our bits
    ("-A PREROUTING -j MARK --and-mark 0xffffffff", False),
    ("-A PREROUTING -j MARK --set-xmark 0x1/0x1", False),
])
def test_legacy_whole_and_and_writes(line, users):
    """HMARK writes the whole mark (hash % mod + offset); an AND clears what it does not keep."""
    facts = FirewallFacts((), f"*mangle\n{line}\nCOMMIT\n")
    assert mark_users(facts, MASK) == (["iptables-legacy table mangle chain PREROUTING"] if users else [])


def test_only_xt_extensions_on_marks_are_read():
    assert not needs_xt(ruleset("docker").nft)  # xt, but no marks (Docker's filter table)
    assert not needs_xt(ruleset("marks-foreign").nft)  # native nft marks


def test_legacy_mark_users_read_mark_options_only():
    """A comment or an interface name that reads like a mark is not one: a Kubernetes tenant can
    name a Service port `0xf0000000`, and kube-proxy writes it into a rule with KUBE-MARK-MASQ."""
    save = "\n".join([
        "*nat",
        "-A KUBE-SVC-X -m comment --comment \"default/web:0xf0000000\" -j KUBE-MARK-MASQ",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A PREROUTING -i vx0xf0000000 -j MARK --set-xmark 0x4000/0x4000",
        "*mangle",
        "-A PREROUTING -p tcp -j TPROXY --on-port 1 --on-ip 0.0.0.0 --tproxy-mark 0x10000000/0x10000000",
        "-A OUTPUT -m mark --mark 268435456 -j ACCEPT",  # 0x10000000, written in decimal
        "-A INPUT -m recent --set --name x --mask 255.255.255.255 --rsource",
        "COMMIT", ""])
    assert mark_users(FirewallFacts((), save), MASK) == [
        "iptables-legacy table mangle chain OUTPUT", "iptables-legacy table mangle chain PREROUTING"]


def test_legacy_mark_users():
    assert mark_users(legacy("legacy-docker"), MASK) == ["iptables-legacy table mangle chain PREROUTING"]
    assert mark_users(legacy("legacy-docker"), 0x0F000000) == ["iptables-legacy table mangle chain PREROUTING"]  # /0xffffffff
    assert mark_users(legacy("legacy-reject"), MASK) == []
