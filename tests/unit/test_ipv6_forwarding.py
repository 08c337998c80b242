"""--ipv6-forwarding: which way a new instance's IPv6 is forwarded, and the global switch nswrap
holds on kernels before 6.17 (docs/design.md, "IPv6 forwarding before 6.17"). Pure: hand-built
facts, no root."""

from __future__ import annotations

import pytest

from nswrap import ruleset, sync
from nswrap.changes import Forwarding6, NftBatch, SetSysctl
from nswrap.datapath import Allocation, Element, Setting6, Switch6, SysctlChange, choose_forwarding6, describe_forwarding6
from nswrap.datatypes import replace
from nswrap.errors import UsageError
from nswrap.facts import Facts
from nswrap.objects import Link
from nswrap.state import InvalidState, Record, allocation_to_json, parse_allocation, parse_record
from tests.unit.hosts import MASK, host, instance, with_sysctls

ALL6 = "net/ipv6/conf/all/forwarding"
NAMES = ("lo", "eth0", "eth1", "eth2")


def old_kernel(all_forwarding: str = "0", accept_ra: str = "1") -> Facts:
    """The lab's host on a kernel without force_forwarding: every interface's IPv6 forwarding and
    accept_ra as facts.gather reads them (eth2's accept_ra is 0: it takes no advertisements)."""
    facts = host(ipv6_per_interface=False)
    sysctls = {k: v for k, v in facts.sysctls.items() if not k.endswith("force_forwarding")}
    sysctls[ALL6] = all_forwarding
    for name in (*NAMES, "default"):
        sysctls[f"net/ipv6/conf/{name}/forwarding"] = all_forwarding
        sysctls[f"net/ipv6/conf/{name}/accept_ra"] = "0" if name == "eth2" else accept_ra
    return replace(facts, sysctls=sysctls)


def global_instance(id: str = "aaaaaa", subnet: str = "198.18.0.4/30"):
    return replace(instance(id, subnet=subnet), forwarding6="global")


def applied(facts: Facts, plan: sync.Plan) -> Facts:
    """The host once the plan ran, as far as these sysctls go."""
    sysctls = dict(facts.sysctls)
    for change in plan.changes:
        if isinstance(change, SetSysctl):
            sysctls[change.key] = change.value
        elif isinstance(change, Forwarding6):
            value = "1" if change.on else "0"
            for name in ("all", "default", *NAMES):
                sysctls[f"net/ipv6/conf/{name}/forwarding"] = value
            if not change.on:
                for s in change.switch.interfaces:
                    sysctls[f"net/ipv6/conf/{s.ifname}/forwarding"] = s.forwarding
                sysctls["net/ipv6/conf/default/forwarding"] = change.switch.default_forwarding
    return replace(facts, sysctls=sysctls)


# --- which way -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, per_interface, on, held, expected", [
    ("auto", True, "0", False, "interface"),
    ("auto", True, "1", False, "interface"),  # a router on a new kernel: nothing to write anyway
    ("auto", False, "0", False, None),  # the warning's case: IPv4 only
    ("auto", False, "1", False, "host"),  # the admin's switch: used, never held
    ("auto", False, "1", True, "global"),  # nswrap's switch: this instance needs it too
    ("global", False, "0", False, "global"),
    ("global", True, "0", False, "global"),  # also on a new kernel (how the path is tested)
    ("interface", True, "0", False, "interface"),
    ("off", True, "0", False, None),
    ("off", False, "1", True, None),
])
def test_choose_forwarding6(mode, per_interface, on, held, expected):
    facts = with_sysctls(host(ipv6_per_interface=per_interface), **{ALL6: on})
    allocation = Allocation(MASK, 5000, switch6=Switch6(()) if held else None)
    assert choose_forwarding6(mode, facts, allocation) == expected


def test_interface_mode_on_an_old_kernel_is_refused():
    with pytest.raises(UsageError, match="no per-interface IPv6 forwarding.*--ipv6-forwarding global"):
        choose_forwarding6("interface", old_kernel(), None)


def test_doctor_says_which_case():
    assert "--ipv6-forwarding global" in describe_forwarding6("auto", old_kernel(), None)
    assert "nswrap turns net.ipv6.conf.all.forwarding on" in describe_forwarding6("global", old_kernel(), None)
    assert "holds now" in describe_forwarding6("global", old_kernel("1"), Allocation(MASK, 5000, switch6=Switch6(())))
    assert "host's own global switch" in describe_forwarding6("auto", old_kernel("1"), None)
    assert describe_forwarding6("off", old_kernel(), None).startswith("off")


# --- holding the switch ----------------------------------------------------------------------


def test_taking_the_switch_saves_ras_first_and_turns_it_on_after_the_guard():
    facts = old_kernel()
    plan = sync.plan(facts, None, None, (global_instance(),), MASK)
    kinds = [type(c).__name__ for c in plan.changes]
    accept_ra = [c for c in plan.changes if isinstance(c, SetSysctl) and c.key.endswith("accept_ra")]
    assert {c.key for c in accept_ra} == {f"net/ipv6/conf/{n}/accept_ra" for n in ("default", "lo", "eth0", "eth1")}
    assert all((c.value, c.before) == ("2", "1") for c in accept_ra)
    switch = next(c for c in plan.changes if isinstance(c, Forwarding6))
    assert switch.on and kinds.index("Forwarding6") == len(kinds) - 1  # the very last: after the guard, after accept_ra
    assert kinds.index("NftBatch") < kinds.index("Forwarding6")
    assert not [c for c in plan.changes if isinstance(c, SetSysctl) and "force_forwarding" in c.key]
    assert plan.before is not None and plan.before.switch6 == plan.after.switch6 == switch.switch
    assert {s.ifname: (s.forwarding, s.accept_ra) for s in switch.switch.interfaces} == {
        "lo": ("0", "1"), "eth0": ("0", "1"), "eth1": ("0", "1"), "eth2": ("0", "0")}  # never a veth
    assert plan.datapath.elements["held"] == frozenset({Element(("ipv6",))})
    assert plan.datapath.elements["routed6"] == frozenset()
    assert "meta nfproto @held iifname != @routed6 drop" in ruleset.table_text(plan.datapath)


def test_holding_converges_and_is_reasserted_after_someone_turns_it_off():
    facts = old_kernel()
    plan = sync.plan(facts, None, None, (global_instance(),), MASK)
    now = applied(facts, plan)
    again = sync.plan(now, None, plan.after, (global_instance(),), MASK)
    assert not [c for c in again.changes if isinstance(c, (SetSysctl, Forwarding6))]
    # `sysctl --system` writes all.forwarding=0: every interface's forwarding with it
    reset = with_sysctls(now, **{f"net/ipv6/conf/{n}/forwarding": "0" for n in ("all", "default", *NAMES)})
    healed = sync.plan(reset, None, plan.after, (global_instance(),), MASK)
    assert [c for c in healed.changes if isinstance(c, Forwarding6)] == [Forwarding6(True, plan.after.switch6)]
    assert healed.after.switch6 == plan.after.switch6  # the first snapshot is what comes back


def test_the_last_instance_releases_the_switch_before_anything_else_and_restores_each_value():
    facts = old_kernel()
    facts = with_sysctls(facts, **{"net/ipv6/conf/eth1/forwarding": "1"})  # a router-ish eth1 (no effect before 6.17)
    plan = sync.plan(facts, None, None, (global_instance(),), MASK)
    assert next(s for s in plan.after.switch6.interfaces if s.ifname == "eth1").forwarding == "1"
    now = applied(facts, plan)
    # an interface that came while nswrap held the switch took default's accept_ra=2
    now = replace(now, links=(*now.links, Link(9, "wg0")))
    now = with_sysctls(now, **{"net/ipv6/conf/wg0/accept_ra": "2", "net/ipv6/conf/wg0/forwarding": "1"})
    stop = sync.plan(now, ruleset_table(plan), plan.after, (), MASK)
    first = stop.changes[0]
    assert first == Forwarding6(False, plan.after.switch6)
    restores = {c.key: (c.value, c.before) for c in stop.changes if isinstance(c, SetSysctl) and "ipv6" in c.key}
    assert restores == {f"net/ipv6/conf/{n}/accept_ra": ("1", "2") for n in ("default", "lo", "eth0", "eth1", "wg0")}
    assert stop.after is None
    after = applied(now, stop)
    assert after.sysctls["net/ipv6/conf/eth1/forwarding"] == "1" and after.sysctls[ALL6] == "0"
    assert first.render().startswith("sysctl -w net.ipv6.conf.all.forwarding=0")
    assert "sysctl -w net.ipv6.conf.eth1.forwarding=1" in first.render()


def ruleset_table(plan: sync.Plan):
    from nswrap import nft

    return nft.Table(elements=dict(plan.datapath.elements), version=ruleset.version(MASK),
                     rules={name: len(rules) for name, _, rules in ruleset.chains(MASK)})


def test_the_hosts_own_switch_is_used_not_held():
    facts = old_kernel("1")
    plan = sync.plan(facts, None, None, (replace(instance(), forwarding6="host"),), MASK)
    assert not [c for c in plan.changes if isinstance(c, Forwarding6) or
                (isinstance(c, SetSysctl) and c.key.startswith("net/ipv6/"))]
    assert plan.after.switch6 is None and plan.datapath.elements["held"] == frozenset()


def test_interface_and_global_instances_together_on_a_new_kernel():
    facts = with_sysctls(host(), **{f"net/ipv6/conf/{n}/accept_ra": "1" for n in (*NAMES, "default")})
    plan = sync.plan(facts, None, None, (instance(), global_instance("bbbbbb", "198.18.0.8/30")), MASK)
    keys = {c.key for c in plan.changes if isinstance(c, SetSysctl)}
    assert "net/ipv6/conf/eth0/force_forwarding" in keys  # the interface-mode instance's
    assert any(isinstance(c, Forwarding6) and c.on for c in plan.changes)  # and the global one's


def test_switch6_before_gives_a_new_interface_defaults_values():
    switch = Switch6((Setting6("eth0", 2, "1", "1"),), default_forwarding="0", default_accept_ra="1")
    assert switch.before("eth0", 2) == Setting6("eth0", 2, "1", "1")
    assert switch.before("eth0", 7) == Setting6("eth0", 7, "0", "1")  # same name, another interface
    assert switch.before("wg0", 9) == Setting6("wg0", 9, "0", "1")


def test_fail_closed_releases_the_switch_first():
    switch = Switch6((Setting6("eth0", 2, "0", "1"),))
    allocation = Allocation(MASK, 5000, sysctls=(SysctlChange("net/ipv6/conf/eth1/force_forwarding", "0", "1"),),
                            switch6=switch)
    values = {ALL6: "1", "net/ipv6/conf/eth1/force_forwarding": "1"}
    assert sync.fail_closed(allocation, values.get) == [
        Forwarding6(False, switch), SetSysctl("net/ipv6/conf/eth1/force_forwarding", "0", "1")]
    assert sync.fail_closed(allocation, {ALL6: "0"}.get) == []  # off already


# --- on disk ---------------------------------------------------------------------------------


def test_the_switch_survives_a_crash_on_disk():
    switch = Switch6((Setting6("eth0", 2, "1", "1"), Setting6("lo", 1, "0", "2")), "0", "1")
    allocation = Allocation(MASK, 5000, switch6=switch)
    assert parse_allocation(allocation_to_json(allocation)) == allocation
    assert parse_allocation(allocation_to_json(Allocation(MASK, 5000))).switch6 is None


@pytest.mark.parametrize("bad", [
    {"interfaces": [{"ifname": "../x", "ifindex": 1, "forwarding": "0", "accept_ra": "1"}], "default_forwarding": "0",
     "default_accept_ra": "1"},
    {"interfaces": [{"ifname": "eth0", "ifindex": -1, "forwarding": "0", "accept_ra": "1"}], "default_forwarding": "0",
     "default_accept_ra": "1"},
    {"interfaces": [{"ifname": "eth0", "ifindex": 2, "forwarding": "7", "accept_ra": "1"}], "default_forwarding": "0",
     "default_accept_ra": "1"},
    {"interfaces": [], "default_forwarding": "0; rm -rf /", "default_accept_ra": "1"},
    {"interfaces": "eth0"},
    "on",
])
def test_a_forged_switch_is_refused(bad):
    import json

    data = json.loads(allocation_to_json(Allocation(MASK, 5000)))
    data["switch6"] = bad
    with pytest.raises(InvalidState):
        parse_allocation(json.dumps(data).encode())


def test_records_keep_how_ipv6_is_forwarded():
    import json

    record = Record("aaaaaa", 42, 1.7e9, ["true"], global_instance(), MASK)
    assert parse_record(record.to_json(), "aaaaaa.json").instance.forwarding6 == "global"
    data = json.loads(record.to_json())
    del data["forwarding6"]  # a record of an nswrap before this option
    assert parse_record(json.dumps(data).encode(), "aaaaaa.json").instance.forwarding6 == "interface"
    data["forwarding6"] = "sometimes"
    with pytest.raises(InvalidState):
        parse_record(json.dumps(data).encode(), "aaaaaa.json")


def test_plan_does_not_change_nftbatch_order_for_ipv4_only():
    plan = sync.plan(host(), None, None, (instance(ipv6=False),), MASK)
    assert not any(isinstance(c, Forwarding6) for c in plan.changes)
    assert isinstance(plan.changes[0], NftBatch)


def test_a_renamed_interface_gets_its_own_values_back():
    """Found by a hostile review: eth1 renamed wan1 while nswrap held the switch came back with
    default's values. An interface is known by its index."""
    switch = Switch6((Setting6("eth1", 3, "1", "2"),), default_forwarding="0", default_accept_ra="1")
    assert switch.before("wan1", 3) == Setting6("eth1", 3, "1", "2")


def test_a_flushed_guard_set_is_noticed():
    from nswrap import nft

    facts = old_kernel()
    plan = sync.plan(facts, None, None, (global_instance(),), MASK)
    now = applied(facts, plan)
    table = nft.Table(elements=dict(plan.datapath.elements), version="x")
    assert sync.guard_missing(table, plan.after, now) == []
    flushed = nft.Table(elements={**plan.datapath.elements, "held": frozenset(), "guarded4": frozenset()})
    assert sync.guard_missing(flushed, plan.after, now) == ["guarded4", "held"]
    # a new uplink is not a flushed guard: nswrap has not turned its forwarding on yet
    assert sync.guard_missing(table, plan.after, replace(now, links=(*now.links, Link(9, "eth9")))) == []
