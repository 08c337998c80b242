"""sync.plan: the changes from what the kernel holds to what the live instances need, in a safe
order. Pure: hand-built facts and nft.Table objects, no root.

`applied` and `table_after` model the kernel after a plan ran, so a plan can be checked to
converge: planning again on the result asks for nothing.
"""

from __future__ import annotations

import logging

import pytest

from nswrap import nft, ruleset, sync
from nswrap.changes import (
    AddRoute,
    AddRule,
    Change,
    DeleteRoom,
    DeleteRoute,
    DeleteRule,
    FlushMark,
    InsertRoom,
    NftBatch,
    SetSysctl,
)
from nswrap.datapath import Allocation, Element, SysctlChange
from nswrap.datatypes import replace
from nswrap.errors import NswrapError
from nswrap.facts import Facts
from nswrap.firewall import Blocker, FirewallFacts, rooms
from nswrap.objects import Address, Link
from tests.unit.hosts import IF, MASK, host, instance, with_sysctls

DOCKER_ROOMS = tuple(rooms(Blocker("iptables-nft chain FORWARD (policy drop)", "iptables-nft", "DOCKER-USER")))


def applied(facts: Facts, plan: sync.Plan) -> Facts:
    """The host once `plan` ran: what netlink and /proc/sys would report."""
    routes, rules, sysctls = list(facts.routes), list(facts.rules), dict(facts.sysctls)
    for change in plan.changes:
        match change:
            case AddRoute(route=r):
                routes.append(r)
            case DeleteRoute(route=r):
                routes.remove(r)
            case AddRule(rule=r):
                rules.append(r)
            case DeleteRule(rule=r):
                rules.remove(r)
            case SetSysctl(key=key, value=value):
                sysctls[key] = value
    return replace(facts, routes=tuple(routes), rules=tuple(rules), sysctls=sysctls)


def table_after(plan: sync.Plan) -> nft.Table | None:
    """nswrap's table once `plan` ran, as nft.read_table would parse it."""
    if not any(isinstance(c, NftBatch) for c in plan.changes) and not plan.datapath.elements:
        return None
    if any(isinstance(c, NftBatch) and c.text == ruleset.delete_text() for c in plan.changes):
        return None
    dp = plan.datapath
    return nft.Table(elements={name: items for name, items in dp.elements.items()}, rules=ruleset.expected_chains(dp),
                     version=ruleset.version(dp.allocation.mark_mask, dp.udp_timeout))


def kinds(changes: list[Change]) -> list[str]:
    """Change types in order, runs of one type collapsed: [NftBatch, AddRoute, AddRule, ...]."""
    out: list[str] = []
    for change in changes:
        if not out or out[-1] != type(change).__name__:
            out.append(type(change).__name__)
    return out


def of(kind: type, changes: list[Change]) -> list:
    return [c for c in changes if isinstance(c, kind)]


UPLINK_SYSCTLS = {
    "net/ipv4/conf/eth0/forwarding", "net/ipv4/conf/eth0/src_valid_mark", "net/ipv6/conf/eth0/force_forwarding",
    "net/ipv4/conf/eth1/forwarding", "net/ipv4/conf/eth1/src_valid_mark",
    "net/ipv4/conf/eth2/forwarding", "net/ipv4/conf/eth2/src_valid_mark",
}


@pytest.fixture
def first():
    """The first instance of a host without nswrap: (facts before, the plan)."""
    facts = host()
    return facts, sync.plan(facts, None, None, (instance(),), MASK, DOCKER_ROOMS)


# --- the first instance ------------------------------------------------------------------------


def test_the_first_instance_creates_everything_in_a_safe_order(first):
    """The table (with its guard) before any route, rule or iptables room; forwarding last."""
    facts, plan = first
    assert kinds(plan.changes) == ["NftBatch", "AddRoute", "AddRule", "InsertRoom", "SetSysctl"]
    [batch] = of(NftBatch, plan.changes)
    assert batch.text == ruleset.table_text(plan.datapath) and batch.undo_text == ruleset.delete_text()
    assert {c.route for c in of(AddRoute, plan.changes)} == plan.datapath.routes
    assert {c.rule for c in of(AddRule, plan.changes)} == plan.datapath.rules
    assert [c.room for c in of(InsertRoom, plan.changes)] == list(DOCKER_ROOMS)
    assert {(c.key, c.value, c.before) for c in of(SetSysctl, plan.changes)} == {(k, "1", "0") for k in UPLINK_SYSCTLS}


def test_the_guard_covers_every_interface_whose_forwarding_nswrap_turns_on(first):
    _, plan = first
    [batch] = of(NftBatch, plan.changes)
    assert 'add element inet nswrap guarded4 { "eth0", "eth1", "eth2" }' in batch.text.splitlines()
    assert 'add element inet nswrap guarded6 { "eth0" }' in batch.text.splitlines()


def test_an_interface_that_already_forwarded_is_not_guarded():
    facts = with_sysctls(host(), **{"net/ipv4/conf/eth1/forwarding": "1", "net/ipv6/conf/all/forwarding": "1"})
    plan = sync.plan(facts, None, None, (instance(),), MASK)
    assert plan.datapath.elements["guarded4"] == {Element(('"eth0"',)), Element(('"eth2"',))}
    assert plan.datapath.elements["guarded6"] == frozenset()


def test_the_allocation_is_saved_before_with_every_original(first):
    _, plan = first
    assert plan.before is not None and plan.after is not None
    assert {s.key: (s.original, s.ours) for s in plan.before.sysctls} == {k: ("0", "1") for k in UPLINK_SYSCTLS}
    assert plan.before.rooms == DOCKER_ROOMS and plan.after.rooms == DOCKER_ROOMS
    assert [(u.ifname, u.index, u.table) for u in plan.after.uplinks] == [("eth0", 1, 5000), ("eth1", 2, 5001), ("eth2", 3, 5002)]
    assert plan.after.priority == 5000 and plan.after.mark_mask == MASK


def test_a_plan_converges(first):
    """Planning again on the host the plan left asks for nothing (nothing re-added forever)."""
    facts, plan = first
    again = sync.plan(applied(facts, plan), table_after(plan), plan.after, (instance(),), MASK, DOCKER_ROOMS)
    assert again.changes == [] and again.after == plan.after


# --- more instances ------------------------------------------------------------------------------


def test_a_second_instance_only_adds_elements(first):
    facts, plan = first
    now, table = applied(facts, plan), table_after(plan)
    both = (instance(), instance("bbbbbb", "123", subnet="198.18.0.8/30"))
    second = sync.plan(now, table, plan.after, both, MASK)
    [batch] = second.changes
    assert isinstance(batch, NftBatch) and batch.what.startswith("elements (")
    assert all(line.startswith("add element") for line in batch.text.splitlines())
    assert all(line.startswith("delete element") for line in batch.undo_text.splitlines())
    assert second.after == plan.after  # firewall_rooms None: the rooms stay as they are


def test_a_flushed_or_outdated_table_is_rebuilt(first):
    facts, plan = first
    now, table = applied(facts, plan), table_after(plan)
    assert table is not None
    for broken in (replace(table, rules={**table.rules, "guard": 0}), replace(table, version="0ld"),
                   replace(table, rules={k: v for k, v in table.rules.items() if k != "new_2"})):
        [batch] = sync.plan(now, broken, plan.after, (instance(),), MASK).changes
        assert batch.text == ruleset.table_text(plan.datapath) and batch.undo_text == ""  # it existed: no undo by deletion
        assert sync.intact(table, plan.after) and not sync.intact(broken, plan.after)
    assert not sync.intact(table, None)


def test_a_table_made_for_another_udp_timeout_is_rebuilt(first):
    """Every instance with the old value died (kill -9: their table stayed); a start with another
    value rebuilds the table, objects included. Instances that agree change elements only."""
    facts, plan = first
    now, table = applied(facts, plan), table_after(plan)
    longer = (instance(udp_timeout=300),)
    [batch] = sync.plan(now, table, plan.after, longer, MASK).changes
    assert batch.what == "table inet nswrap (re)built" and "replied : 300 }" in batch.text
    assert sync.intact(table, plan.after, (instance(),)) and not sync.intact(table, plan.after, longer)
    both = (instance(), instance("bbbbbb", "123", subnet="198.18.0.8/30"))
    [batch] = sync.plan(now, table, plan.after, both, MASK).changes
    assert batch.what.startswith("elements (")


# --- the last instance ---------------------------------------------------------------------------


def test_the_last_instance_removes_everything_and_restores_forwarding_first(first):
    facts, plan = first
    now, table = applied(facts, plan), table_after(plan)
    last = sync.plan(now, table, plan.after, (), MASK)
    assert kinds(last.changes) == ["SetSysctl", "DeleteRule", "DeleteRoute", "DeleteRoom", "NftBatch", "FlushMark"]
    assert {(c.key, c.value, c.before) for c in of(SetSysctl, last.changes)} == {(k, "0", "1") for k in UPLINK_SYSCTLS}
    assert {c.rule for c in of(DeleteRule, last.changes)} == plan.datapath.rules
    assert {c.route for c in of(DeleteRoute, last.changes)} == plan.datapath.routes
    assert [c.room for c in of(DeleteRoom, last.changes)] == list(DOCKER_ROOMS)
    assert [c.text for c in of(NftBatch, last.changes)] == [ruleset.delete_text()]
    assert [(c.mark, c.mask) for c in of(FlushMark, last.changes)] == [(0x10000000, MASK), (0x20000000, MASK), (0x30000000, MASK)]
    assert last.after is None and last.before is not None and last.before.sysctls  # the originals stay on disk until done
    gone = applied(now, last)
    assert gone.sysctls == facts.sysctls and set(gone.rules) == set(facts.rules) and set(gone.routes) == set(facts.routes)


def test_a_sysctl_someone_changed_since_is_not_restored(first):
    facts, plan = first
    now = with_sysctls(applied(facts, plan), **{"net/ipv4/conf/eth1/forwarding": "0", "net/ipv4/conf/eth2/src_valid_mark": "2"})
    last = sync.plan(now, table_after(plan), plan.after, (), MASK)
    restored = {c.key for c in of(SetSysctl, last.changes)}
    assert restored == UPLINK_SYSCTLS - {"net/ipv4/conf/eth1/forwarding", "net/ipv4/conf/eth2/src_valid_mark"}


def test_nothing_to_do_without_nswrap():
    plan = sync.plan(host(), None, None, (), MASK)
    assert plan.changes == [] and plan.before is None and plan.after is None


def test_a_leftover_table_without_allocation_is_deleted():
    stale = nft.Table(version="0ld")
    plan = sync.plan(host(), stale, None, (), MASK)
    assert [c.render() for c in plan.changes] == ["nft -f - <<'EOF'  # table inet nswrap deleted\ndelete table inet nswrap\nEOF"]


# --- an uplink goes --------------------------------------------------------------------------------


def test_a_dropped_uplink_is_removed_and_its_flows_forgotten(first):
    facts, plan = first
    now, table = applied(facts, plan), table_after(plan)
    # eth2 loses its address (and its subnet route): it serves nobody any more
    without_eth2 = replace(now, addresses=tuple(a for a in now.addresses if a.ifname != "eth2"),
                           routes=tuple(r for r in now.routes if not (r.dev == "eth2" and r.table == 254)))
    dropped = sync.plan(without_eth2, table, plan.after, (instance(),), MASK)
    assert kinds(dropped.changes) == ["SetSysctl", "NftBatch", "DeleteRule", "DeleteRoute", "FlushMark"]
    restored = {c.key for c in of(SetSysctl, dropped.changes)}
    assert restored == {"net/ipv4/conf/eth2/forwarding", "net/ipv4/conf/eth2/src_valid_mark"}
    assert [(c.mark, c.mask) for c in of(FlushMark, dropped.changes)] == [(0x30000000, MASK)]
    assert {c.rule.table for c in of(DeleteRule, dropped.changes)} == {5002}
    assert {c.route.table for c in of(DeleteRoute, dropped.changes)} == {5002}
    [batch] = of(NftBatch, dropped.changes)
    lines = batch.text.splitlines()
    assert 'delete element inet nswrap guarded4 { "eth2" }' in lines
    assert lines[-2:] == ["delete chain inet nswrap flow_3", "delete chain inet nswrap new_3"]
    assert [u.ifname for u in dropped.after.uplinks] == ["eth0", "eth1"]
    assert "net/ipv4/conf/eth2/forwarding" not in {s.key for s in dropped.after.sysctls}
    assert "eth2" in {u.ifname for u in dropped.before.uplinks}, "saved first: what may still be nswrap's"


def test_a_vanished_interface_needs_no_restore(first):
    facts, plan = first
    now = applied(facts, plan)
    gone = replace(now, links=tuple(link for link in now.links if link.ifname != "eth2"),
                   addresses=tuple(a for a in now.addresses if a.ifname != "eth2"),
                   routes=tuple(r for r in now.routes if r.dev != "eth2"),
                   sysctls={k: v for k, v in now.sysctls.items() if "/eth2/" not in k})
    dropped = sync.plan(gone, table_after(plan), plan.after, (instance(),), MASK)
    assert not any("eth2" in c.key for c in of(SetSysctl, dropped.changes))
    assert [(c.mark, c.mask) for c in of(FlushMark, dropped.changes)] == [(0x30000000, MASK)]


def test_a_new_address_needs_no_change(first):
    """Every address of the host is published through one element per uplink: an address that
    appears is served by the same elements (the first packet's fib lookup finds it local)."""
    facts, plan = first
    now = applied(facts, plan)
    back = replace(now, addresses=(*now.addresses, Address("eth2", IF("203.0.113.70/26"))))
    assert sync.plan(back, table_after(plan), plan.after, (instance(),), MASK).changes == []


# --- rooms in other firewalls and the allocation on disk ------------------------------------------


def test_rooms_go_when_no_longer_needed(first):
    facts, plan = first
    again = sync.plan(applied(facts, plan), table_after(plan), plan.after, (instance(),), MASK, ())
    assert [type(c) for c in again.changes] == [DeleteRoom, DeleteRoom] and again.after.rooms == ()


def test_wanted_rooms_from_captured_firewalls(caplog):
    assert sync.wanted_rooms(FirewallFacts(), "auto", MASK) == ()
    forward = {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward", "policy": "drop"}
    docker = FirewallFacts(({"chain": forward}, {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER"}}))
    assert sync.wanted_rooms(docker, "auto", MASK) == DOCKER_ROOMS
    with pytest.raises(NswrapError, match="--firewall off forbids making room"):
        sync.wanted_rooms(docker, "off", MASK)
    native = FirewallFacts(({"chain": {**forward, "family": "inet", "name": "forward"}},))
    with pytest.raises(NswrapError, match="nswrap does not edit other tools' nft tables"):
        sync.wanted_rooms(native, "auto", MASK)
    marker = FirewallFacts(({"rule": {"family": "ip", "table": "mangle", "chain": "PREROUTING",
                                      "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x20000000}}]}},))
    with pytest.raises(NswrapError, match="fwmark bits 0xf0000000 are already used by nft table ip mangle chain PREROUTING"):
        sync.wanted_rooms(marker, "auto", MASK)
    assert sync.wanted_rooms(marker, "auto", 0x0F000000) == ()
    unreadable = FirewallFacts(({"rule": {"family": "ip", "table": "mangle", "chain": "PREROUTING",
                                          "expr": [{"xt": {"type": "target", "name": "MARK"}}]}},))
    with caplog.at_level(logging.WARNING, logger="nswrap"):
        assert sync.wanted_rooms(unreadable, "auto", 0x0F000000) == ()
    assert caplog.messages == ["cannot tell which fwmark bits nft table ip mangle chain PREROUTING (xt MARK) uses: "
                               "its values could not be read (a revision nswrap does not know, or the rule changed "
                               "meanwhile); if they meet 0x0f000000, choose other bits with --mark-mask"]


def test_probe_firewall_reads_xt_extensions_only_for_xt_marks(monkeypatch):
    from nswrap import iptables
    from nswrap.netlink import nftrules

    dumps: list[int] = []
    made = nftrules.Xt("bridge", "t", "c", 3, "target", "mark", 0, bytes(16))
    monkeypatch.setattr(iptables, "legacy_save", lambda binary="iptables-legacy": "")
    monkeypatch.setattr(nftrules, "xt_extensions", lambda: dumps.append(1) or [made])
    assert sync.probe_firewall([]) == FirewallFacts() and dumps == []
    rejecting = {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": [{"xt": {"type": "target", "name": "REJECT"}}]}}
    assert sync.probe_firewall([rejecting]).xt == () and dumps == []  # xt, not on marks
    marking = {"rule": {"family": "bridge", "table": "t", "chain": "c", "expr": [{"xt": {"type": "target", "name": "mark"}}]}}
    assert sync.probe_firewall([rejecting, marking]).xt == (made,) and dumps == [1]

    def failing():
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(nftrules, "xt_extensions", failing)
    facts = sync.probe_firewall([marking])
    assert facts.xt == () and facts.xt_error == "its rules could not be read over netlink (Operation not permitted)"


def test_run_saves_the_allocation_around_the_changes(first):
    _, plan = first
    events: list[object] = []

    class FakeTransaction:
        def run_all(self, changes):
            events.append(("run", len(changes)))

    sync.run(plan, FakeTransaction(), lambda allocation: events.append(("save", allocation)))  # type: ignore[arg-type]
    assert events == [("save", plan.before), ("run", len(plan.changes)), ("save", plan.after)]

    class Failing:
        def run_all(self, changes):
            raise NswrapError("nft refused the ruleset")

    events.clear()
    with pytest.raises(NswrapError):
        sync.run(plan, Failing(), lambda allocation: events.append(("save", allocation)))  # type: ignore[arg-type]
    assert events == [("save", plan.before)], "on failure the first (larger) allocation stays on disk"


def test_the_first_recorded_original_wins():
    """A sysctl changed by nswrap stays recorded with the value the host had before nswrap."""
    facts = with_sysctls(host(), **{"net/ipv4/conf/eth0/forwarding": "1"})
    allocation = Allocation(MASK, 5000, (), (SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1"),))
    plan = sync.plan(facts, None, allocation, (instance(),), MASK)
    assert SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1") in plan.after.sysctls
    assert not any(c.key == "net/ipv4/conf/eth0/forwarding" for c in of(SetSysctl, plan.changes))


# --- failing closed --------------------------------------------------------------------------------


def test_fail_closed_restores_the_forwarding_nswrap_turned_on():
    """The guard is gone for good: forwarding goes back off (only where it is still nswrap's)."""
    values = {"net/ipv4/conf/eth0/forwarding": "1", "net/ipv4/conf/eth1/forwarding": "0"}
    allocation = Allocation(MASK, 5000, (), (
        SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1"),
        SysctlChange("net/ipv4/conf/eth1/forwarding", "0", "1"),  # someone turned it off already
        SysctlChange("net/ipv4/conf/gone0/forwarding", "0", "1"),  # its interface is gone
    ))
    assert sync.fail_closed(allocation, values.get) == [SetSysctl("net/ipv4/conf/eth0/forwarding", "0", "1")]
    assert sync.fail_closed(None, values.get) == []


def test_fail_closed_leaves_the_admins_ip_forward_alone():
    values = {"net/ipv4/conf/all/forwarding": "1", "net/ipv4/conf/eth0/forwarding": "1"}
    allocation = Allocation(MASK, 5000, (), (SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1"),))
    assert sync.fail_closed(allocation, values.get) == []


def test_a_vlan_uplink_gets_forwarding():
    vlan = replace(host(), links=(*host().links, Link(7, "eth0.100")),
                   addresses=(*host().addresses, Address("eth0.100", IF("203.0.113.193/26"))),
                   sysctls={**host().sysctls, "net/ipv4/conf/eth0.100/forwarding": "0",  # as /proc/sys names it
                            "net/ipv4/conf/eth0.100/src_valid_mark": "0"})
    plan = sync.plan(vlan, None, None, (instance(uplinks=("eth0.100",), outbound=False),), MASK)
    assert {c.key for c in of(SetSysctl, plan.changes)} == {"net/ipv4/conf/eth0.100/forwarding",
                                                            "net/ipv4/conf/eth0.100/src_valid_mark"}


def test_an_element_batch_says_what_it_changes_in_one_line():
    from nswrap.changes import NftBatch, one_line
    from nswrap.ruleset import Element
    from nswrap.sync import _counted

    have = {"ports": frozenset({Element(("udp", "53"))}), "closed": frozenset()}
    want = {"ports": frozenset({Element(("udp", "54")), Element(("tcp", "53"))}), "closed": frozenset()}
    what = _counted(have, {"new_1", "flow_1"}, want, {"new_1", "flow_1"})
    assert what == "elements (2 added, 1 deleted)"
    assert one_line(NftBatch("add element inet nswrap ports { udp . 54 }\n", what=what).render()) == \
        "nft elements (2 added, 1 deleted)"
    rule = "ip rule add fwmark 0x10000000/0xf0000000 lookup 5000"
    assert one_line(rule) == rule
    assert _counted(have, {"new_1"}, have, {"new_1", "new_2"}) == "elements (none; chains of 1 uplink added or deleted)"
