"""datapath.py: the shared datapath computed from hand-built facts. Pure: no root, no kernel."""

from __future__ import annotations

import ipaddress

import pytest

from nswrap.datapath import (
    POOL4,
    POOL6,
    Allocation,
    Element,
    SysctlChange,
    Uplink,
    absent_addresses,
    allocate_subnet,
    candidate_uplinks,
    check_marks,
    check_uplinks,
    conflicts,
    datapath,
    free_priority,
    gateway_conflict,
    guarded,
    instance_uplinks,
    internal_ranges,
    mark_capacity,
    shared_udp_timeout,
    taken_over,
    udp_timeout_conflict,
    ula_subnet,
    veth_forwarding6,
    veth_mtu,
)
from nswrap.datatypes import replace
from nswrap.errors import NswrapError, UsageError
from nswrap.objects import FR_ACT_UNREACHABLE, PROTO, RT_TABLE_MAIN, SCOPE_LINK, Address, Link, Listener, Route, Rule
from tests.unit.hosts import IF, KERNEL, MASK, STATIC, A, N, fresh, host, instance, with_sysctls


def uplinks_of(dp) -> list[tuple[str, int, int]]:
    return [(u.ifname, u.index, u.table) for u in dp.allocation.uplinks]


def keys(dp, name: str) -> set[tuple[str, ...]]:
    return {e.key for e in dp.elements[name]}


# --- uplinks -------------------------------------------------------------------------------------


def test_candidates_have_a_global_address_and_are_neither_lo_nor_our_veths():
    facts = host()
    assert candidate_uplinks(facts, 4) == ["eth0", "eth1", "eth2"]
    assert candidate_uplinks(facts, 6) == ["eth0"]  # fe80:: on eth0 and ::1 on lo are not global
    linklocal_only = host(addresses=(Address("eth0", IF("fe80::10/64"), SCOPE_LINK),))
    assert candidate_uplinks(linklocal_only, 6) == [] and candidate_uplinks(linklocal_only, 4) == []


def test_candidates_follow_interface_order_not_names():
    facts = host(links=(Link(9, "eth0"), Link(3, "eth2"), Link(5, "eth1"), Link(1, "lo")))
    assert candidate_uplinks(facts, 4) == ["eth2", "eth1", "eth0"]


def test_every_uplink_by_default():
    dp = datapath(host(), fresh(), (instance(),))
    assert uplinks_of(dp) == [("eth0", 1, 5000), ("eth1", 2, 5001), ("eth2", 3, 5002)]
    assert dp.marks == {"eth0": 0x10000000, "eth1": 0x20000000, "eth2": 0x30000000}


def test_uplink_option_limits_the_uplinks():
    one = instance(uplinks=("eth1",))
    assert instance_uplinks(host(), one, 4) == ["eth1"] and instance_uplinks(host(), one, 6) == []
    dp = datapath(host(), fresh(), (one,))
    assert uplinks_of(dp) == [("eth1", 1, 5000)]
    assert {r.version for r in dp.rules if r.fwmask} == {4}


def test_uplinks_of_all_instances_are_shared():
    both = (instance("aaaaaa", uplinks=("eth2",)), instance("bbbbbb", subnet="198.18.0.8/30", uplinks=("eth1",)))
    dp = datapath(host(), fresh(), both)
    assert uplinks_of(dp) == [("eth1", 1, 5000), ("eth2", 2, 5001)]  # host order, whoever asked first


def test_check_uplinks_at_start():
    facts = host()
    check_uplinks(facts, instance(uplinks=("eth1",)))
    with pytest.raises(NswrapError, match="no such uplink: wg0"):
        check_uplinks(facts, instance(uplinks=("wg0",)))
    with pytest.raises(NswrapError, match="uplink lo has no global address"):
        check_uplinks(facts, instance(uplinks=("lo",)))
    own = str(facts.global_addresses("eth1", 4)[0].ip)
    with pytest.raises(NswrapError, match=f"uplink eth1={own}: {own} is an address of this host"):
        check_uplinks(facts, instance(uplinks=(f"eth1={own}",)))
    with pytest.raises(NswrapError, match=r"no such uplink: wg0 \(interfaces with a global address here: eth0, eth1, eth2\)"):
        check_uplinks(facts, instance(uplinks=("wg0",)))
    bare = host(addresses=(Address("eth0", IF("fe80::10/64"), SCOPE_LINK),))
    with pytest.raises(NswrapError, match="no uplink found"):
        check_uplinks(bare, instance())


def test_a_gateway_not_on_the_uplinks_link_is_refused():
    """Issue 25: installed `onlink`, such a gateway answers no client of the uplink."""
    facts = host()
    for ok in ("eth1=198.51.100.254", "eth0=fe80::99", "eth0=2001:db8:1::1", "eth2=203.0.113.126"):
        check_uplinks(facts, instance(uplinks=(ok,)))
    with pytest.raises(UsageError) as e:
        check_uplinks(facts, instance(uplinks=("eth1=192.0.2.1",)))
    assert str(e.value) == "uplink eth1=192.0.2.1: 192.0.2.1 is on eth0's subnet, not eth1's: --uplink eth0=192.0.2.1?"
    assert e.value.code == 2
    with pytest.raises(UsageError, match=r"^uplink eth1=10.9.9.1: 10.9.9.1 is not on eth1's link \(no subnet"):
        check_uplinks(facts, instance(uplinks=("eth1=10.9.9.1",)))
    with pytest.raises(UsageError, match="2001:db8:1::1 is on eth0's subnet, not eth1's: --uplink eth0=2001:db8:1::1"):
        check_uplinks(facts, instance(uplinks=("eth1=2001:db8:1::1",)))
    # a route of the main table says otherwise: a /32 (VPS) with an onlink default, a point-to-point peer
    vps = host(addresses=(*(a for a in facts.addresses if a.ifname != "eth1"), Address("eth1", IF("198.51.100.10/32"))),
               routes=(*(r for r in facts.routes if r.dev != "eth1"),
                       Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), metric=200, proto=STATIC, onlink=True),
                       Route(N("10.0.0.1/32"), "eth1", scope=SCOPE_LINK, proto=KERNEL)))
    check_uplinks(vps, instance(uplinks=("eth1=198.51.100.1",)))
    check_uplinks(vps, instance(uplinks=("eth1=10.0.0.1",)))
    with pytest.raises(UsageError, match="198.51.100.254 is not on eth1's link"):
        check_uplinks(vps, instance(uplinks=("eth1=198.51.100.254",)))


def test_an_address_not_on_the_host_is_a_warning_not_an_error():
    """A floating address (keepalived's, say) may come later: served once it does."""
    facts = host()
    assert absent_addresses(facts, instance(addresses=("192.0.2.10", "127.0.0.1"))) == []
    assert absent_addresses(facts, instance(addresses=("192.0.2.99",))) == [
        "address 192.0.2.99 is not on this host (yet): it is served once it is"]


def test_many_absent_addresses_are_one_short_warning():
    many = tuple(f"192.0.2.{i}" for i in range(100, 200)) + tuple(f"2001:db8::{i:x}" for i in range(1, 10_000))
    [warning] = absent_addresses(host(), instance(addresses=many))
    assert warning == ("addresses 192.0.2.100, 192.0.2.101, 192.0.2.102, 192.0.2.103, 192.0.2.104 … and 10094 more "
                       "are not on this host (yet): each is served once it is")


# --- allocation ----------------------------------------------------------------------------------


def test_kept_uplinks_keep_their_mark_and_table():
    """A new instance or a new uplink must not renumber the others: their flows stay routed."""
    before = Allocation(MASK, 5000, (Uplink("eth1", 1, 5007), Uplink("wg9", 2, 5003)))
    dp = datapath(host(), before, (instance(),))
    assert uplinks_of(dp) == [("eth1", 1, 5007), ("eth0", 2, 5000), ("eth2", 3, 5001)]
    # wg9 is gone: its index (2) and table (5003) are free again, and taken by the next ones


def test_new_tables_skip_every_table_in_use():
    facts = host(routes=(*host().routes, Route(N("0.0.0.0/0"), "eth0", A("192.0.2.1"), table=5000, proto=STATIC)),
                 rules=(*host().rules, Rule(4, 100, 5001, proto=STATIC)))
    assert uplinks_of(datapath(facts, fresh(), (instance(),))) == [("eth0", 1, 5002), ("eth1", 2, 5003), ("eth2", 3, 5004)]


def test_the_mark_mask_bounds_the_number_of_uplinks():
    assert mark_capacity(MASK) == 15 and mark_capacity(0x30000000) == 3 and mark_capacity(0x00000100) == 1
    dp = datapath(host(), fresh(mask=0x30000000), (instance(),))
    assert dp.marks == {"eth0": 0x10000000, "eth1": 0x20000000, "eth2": 0x30000000}
    with pytest.raises(NswrapError, match="mark mask 0x10000000 has no room for uplink number 2; widen it with --mark-mask"):
        datapath(host(), fresh(mask=0x10000000), (instance(),))


def test_marks_under_a_low_mask():
    dp = datapath(host(), fresh(mask=0x00000F00), (instance(),))
    assert dp.marks == {"eth0": 0x100, "eth1": 0x200, "eth2": 0x300}
    assert {(r.fwmark, r.fwmask) for r in dp.rules if r.fwmask} == {(0x100, 0xF00), (0x200, 0xF00), (0x300, 0xF00)}


def test_no_instances_means_nothing_at_all():
    before = Allocation(MASK, 5000, (Uplink("eth0", 1, 5000),), (SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1"),))
    dp = datapath(host(), before, ())
    assert (dp.rules, dp.routes, dp.sysctls, dp.elements, dp.allocation.uplinks) == (frozenset(), frozenset(), {}, {}, ())
    assert dp.allocation.sysctls == before.sysctls  # kept: the caller restores them


# --- gateways and routes -------------------------------------------------------------------------


def test_routes_of_each_uplink_table():
    dp = datapath(host(), fresh(), (instance(),))
    assert dp.routes == {
        Route(N("0.0.0.0/0"), "eth0", A("192.0.2.1"), 5000),
        Route(N("192.0.2.0/24"), "eth0", None, 5000, SCOPE_LINK, A("192.0.2.10")),
        # IPv6: a link-local gateway (hence the device); metric 1024, as the kernel keeps IPv6 routes
        Route(N("::/0"), "eth0", A("fe80::1"), 5000, metric=1024),
        Route(N("2001:db8:1::/64"), "eth0", None, 5000, metric=1024),
        Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), 5001),
        Route(N("198.51.100.0/24"), "eth1", None, 5001, SCOPE_LINK, A("198.51.100.10")),
        Route(N("203.0.113.128/26"), "eth1", A("198.51.100.7"), 5001),
        Route(N("203.0.113.64/26"), "eth2", None, 5002, SCOPE_LINK, A("203.0.113.65")),
    }
    assert all(r.proto == PROTO and r.metric == (0 if r.version == 4 else 1024) for r in dp.routes)


def test_an_uplink_without_gateway_is_a_warning():
    dp = datapath(host(), fresh(), (instance(),))
    assert dp.warnings == ("uplink eth2 has no gateway: it serves only clients on its own subnets "
                           "(give one with --uplink eth2=GATEWAY to serve the others)",)


def test_an_explicit_gateway_wins_over_the_main_table():
    dp = datapath(host(), fresh(), (instance(uplinks=("eth2=203.0.113.126", "eth1=198.51.100.254")),))
    defaults = {(r.dev, r.gateway) for r in dp.routes if r.is_default}
    assert defaults == {("eth2", A("203.0.113.126")), ("eth1", A("198.51.100.254"))}
    assert dp.warnings == ()


def test_onlink_gateways():
    """A /32 uplink (VPS style): the main table's onlink default is copied onlink; a gateway given
    outside every subnet is onlink too (check_uplinks refuses it at start unless a route says it
    is on the link); one in another interface's subnet is not (refused at start, too)."""
    addresses = tuple(a for a in host().addresses if a.ifname != "eth1") + (Address("eth1", IF("198.51.100.10/32")),)
    routes = tuple(r for r in host().routes if r.dev != "eth1") + (
        Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), metric=200, proto=STATIC, onlink=True),)
    facts = host(addresses=addresses, routes=routes)

    def default(*uplinks: str) -> Route:
        return next(r for r in datapath(facts, fresh(), (instance(uplinks=uplinks),)).routes if r.is_default and r.dev == "eth1")

    assert default("eth1") == Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), 5000, onlink=True)
    assert default("eth1=198.51.100.254").onlink
    assert not default("eth1=192.0.2.77").onlink
    assert Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), 5000, onlink=True).render("add") == (
        "ip route add default via 198.51.100.1 dev eth1 onlink table 5000 proto 110")


def test_one_gateway_per_family():
    dp = datapath(host(), fresh(), (instance(uplinks=("eth0=192.0.2.254", "eth0=2001:db8:1::1")),))
    assert {(r.version, r.gateway) for r in dp.routes if r.is_default} == {(4, A("192.0.2.254")), (6, A("2001:db8:1::1"))}


def test_the_lowest_metric_default_of_the_main_table():
    facts = host(routes=(*host().routes, Route(N("0.0.0.0/0"), "eth0", A("192.0.2.254"), metric=50, proto=STATIC)))
    dp = datapath(facts, fresh(), (instance(uplinks=("eth0",)),))
    assert {r.gateway for r in dp.routes if r.is_default and r.version == 4} == {A("192.0.2.254")}


def test_a_point_to_point_default_route():
    facts = host(routes=(Route(N("0.0.0.0/0"), "eth2", scope=SCOPE_LINK, proto=STATIC),))
    dp = datapath(facts, fresh(), (instance(uplinks=("eth2",)),))
    assert dp.routes == {Route(N("0.0.0.0/0"), "eth2", None, 5000, SCOPE_LINK)} and dp.warnings == ()


def test_instances_must_agree_on_gateways():
    first = instance("aaaaaa", uplinks=("eth1=198.51.100.1",))
    second = instance("bbbbbb", subnet="198.18.0.8/30", uplinks=("eth1=198.51.100.254",))
    with pytest.raises(NswrapError, match="gateway 198.51.100.254 differs from 198.51.100.1, which nswrap instance aaaaaa"):
        datapath(host(), fresh(), (first, second))
    same = instance("bbbbbb", subnet="198.18.0.8/30", uplinks=("eth1=198.51.100.1",))
    assert datapath(host(), fresh(), (first, same)).routes


def test_a_given_gateway_must_agree_with_the_host_default_a_live_instance_uses():
    """eth1's table is shared: a --uplink gateway may not replace the host's default that a
    running instance relies on, nor may a new instance silently route through another's."""
    auto = instance("aaaaaa")
    given = instance("bbbbbb", "54", subnet="198.18.0.8/30", uplinks=("eth1=198.51.100.254",))
    assert gateway_conflict(host(), given, (auto,)) == (
        "uplink eth1: gateway 198.51.100.254 differs from the host's 198.51.100.1, which nswrap instance aaaaaa routes through")
    assert gateway_conflict(host(), instance("bbbbbb", "54", subnet="198.18.0.8/30"), (given,)) == (
        "uplink eth1: nswrap instance bbbbbb routes through gateway 198.51.100.254, not 198.51.100.1: "
        "give --uplink eth1=198.51.100.254, or other uplinks")
    assert gateway_conflict(host(), instance("bbbbbb", uplinks=("eth1=198.51.100.1",)), (auto,)) is None  # the same
    assert gateway_conflict(host(), instance("bbbbbb", uplinks=("eth0",)), (given,)) is None  # not shared
    assert gateway_conflict(host(), instance("bbbbbb", uplinks=("eth2=203.0.113.126",)), (auto,)) is None  # no host default
    assert "routes through gateway 198.51.100.77, not 198.51.100.254" in (
        gateway_conflict(host(), given, (instance("aaaaaa", uplinks=("eth1=198.51.100.77",)),)) or "")


def test_live_instances_agree_on_the_udp_timeout():
    """nft 1.0.6 has no map of ct timeout objects: one value per host, the one live instances use."""
    default, longer = instance("aaaaaa"), instance("bbbbbb", "54", subnet="198.18.0.8/30", udp_timeout=300)
    assert udp_timeout_conflict(longer, (default,)) == (
        "--udp-timeout 300 differs from 20, which nswrap instance aaaaaa uses "
        "(conntrack timeouts are shared by every instance on this host): give --udp-timeout 20")
    assert udp_timeout_conflict(default, (longer,)) is not None
    assert udp_timeout_conflict(longer, ()) is None
    assert udp_timeout_conflict(instance("cccccc", udp_timeout=300), (longer,)) is None
    assert datapath(host(), fresh(), (longer,)).udp_timeout == 300
    assert shared_udp_timeout(()) == 20 and shared_udp_timeout((default, longer)) == 300  # records that disagree: the longest


# --- rules and marks -----------------------------------------------------------------------------


def test_pool_rules_and_one_fwmark_rule_per_uplink_and_family():
    dp = datapath(host(), fresh(), (instance(),))
    assert dp.rules == {
        Rule(4, 5000, RT_TABLE_MAIN, dst=POOL4, suppress_prefixlength=0),
        Rule(4, 5001, dst=POOL4, action=FR_ACT_UNREACHABLE),
        Rule(6, 5000, RT_TABLE_MAIN, dst=POOL6, suppress_prefixlength=0),
        Rule(6, 5001, dst=POOL6, action=FR_ACT_UNREACHABLE),
        Rule(4, 5002, 5000, 0x10000000, MASK),
        Rule(6, 5002, 5000, 0x10000000, MASK),
        Rule(4, 5002, 5001, 0x20000000, MASK),
        Rule(4, 5002, 5002, 0x30000000, MASK),
    }


def test_no_ipv6_rules_without_an_ipv6_instance():
    dp = datapath(host(), fresh(), (instance(ipv6=False),))
    assert {r.version for r in dp.rules} == {4}
    assert not dp.elements["keep6"] and "net/ipv6/conf/eth0/force_forwarding" not in dp.sysctls


def test_a_subnet_outside_the_pool_is_internal_too():
    outside = instance(subnet="203.0.113.248/30")
    assert internal_ranges((outside,))[4] == [POOL4, N("203.0.113.248/30")]
    dp = datapath(host(), fresh(), (outside,))
    assert Rule(4, 5001, dst=N("203.0.113.248/30"), action=FR_ACT_UNREACHABLE) in dp.rules
    assert keys(dp, "servers4") == {("198.18.0.0/15",), ("203.0.113.248/30",)}


def test_free_priority_skips_every_block_with_a_taken_priority():
    assert free_priority(host()) == 5000
    assert free_priority(host(rules=(Rule(4, 5001, 77, proto=STATIC),))) == 5002
    assert free_priority(host(rules=(Rule(6, 5000, 77), Rule(4, 5003, 77)))) == 5004  # either family
    with pytest.raises(NswrapError, match="no 3 free rule priorities"):
        free_priority(host(rules=tuple(Rule(4, p, 77) for p in range(5000, 32002, 2))))


def test_foreign_rules_on_our_mark_bits_are_refused():
    allocation = fresh()
    check_marks(host(rules=(Rule(4, 900, 77, 0x4000, 0x4000, proto=STATIC),)), allocation)  # kube-proxy's bit: fine
    check_marks(host(rules=(Rule(4, 5002, 5000, 0x10000000, MASK),)), allocation)  # ours
    with pytest.raises(NswrapError, match="fwmark bits 0xf0000000 are already used by ip rule 900"):
        check_marks(host(rules=(Rule(4, 900, 77, 0x20000000, 0x20000000, proto=STATIC),)), allocation)
    with pytest.raises(NswrapError, match="ip rule 5002"):  # our priority, another protocol: not ours
        check_marks(host(rules=(Rule(4, 5002, 77, 0x10000000, MASK, proto=STATIC),)), allocation)
    check_marks(host(rules=(Rule(4, 900, 77, 0x1, 0xFFFFFFFF, proto=STATIC),)), allocation)  # a whole value: theirs
    for fwmark, fwmask in ((0, 0x10000000), (0, MASK)):  # a partial mask that looks at our bits (found by a review)
        with pytest.raises(NswrapError, match=f"ip -6 rule 900 \\(fwmark 0x0/{fwmask:#x} lookup 77\\)"):
            check_marks(host(rules=(Rule(6, 900, 77, fwmark, fwmask, proto=STATIC),)), allocation)


# --- sysctls -------------------------------------------------------------------------------------

EVERY = {
    "net/ipv4/conf/eth0/forwarding": "1", "net/ipv4/conf/eth0/src_valid_mark": "1", "net/ipv6/conf/eth0/force_forwarding": "1",
    "net/ipv4/conf/eth1/forwarding": "1", "net/ipv4/conf/eth1/src_valid_mark": "1",
    "net/ipv4/conf/eth2/forwarding": "1", "net/ipv4/conf/eth2/src_valid_mark": "1",
}


def test_sysctls_where_the_host_differs():
    assert datapath(host(), fresh(), (instance(),)).sysctls == EVERY


def test_no_sysctl_where_the_effective_value_is_already_right():
    facts = with_sysctls(host(), **{"net/ipv4/conf/all/src_valid_mark": "1", "net/ipv4/conf/eth1/forwarding": "1"})
    wanted = datapath(facts, fresh(), (instance(),)).sysctls
    assert not any(key.endswith("src_valid_mark") for key in wanted)  # all.src_valid_mark=1 covers every uplink
    assert "net/ipv4/conf/eth1/forwarding" not in wanted
    assert set(wanted) == {"net/ipv4/conf/eth0/forwarding", "net/ipv6/conf/eth0/force_forwarding",
                           "net/ipv4/conf/eth2/forwarding"}
    every_v6 = with_sysctls(host(), **{"net/ipv6/conf/all/forwarding": "1"})
    assert "net/ipv6/conf/eth0/force_forwarding" not in datapath(every_v6, fresh(), (instance(),)).sysctls
    already = host(sysctls={key: "1" for key in host().sysctls})
    assert datapath(already, fresh(), (instance(),)).sysctls == {}  # a container started with the right --sysctl


def test_sysctls_nswrap_changed_stay_wanted():
    """Still ours: listed, so that they are not restored while an instance needs them."""
    facts = with_sysctls(host(), **{"net/ipv4/conf/eth0/forwarding": "1"})
    allocation = replace(fresh(), sysctls=(SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1"),))
    assert datapath(facts, allocation, (instance(),)).sysctls["net/ipv4/conf/eth0/forwarding"] == "1"


def test_outbound_replies_need_forwarding_on_the_default_route_interfaces():
    only_eth2 = datapath(host(), fresh(), (instance(uplinks=("eth2",)),)).sysctls
    assert only_eth2 == {"net/ipv4/conf/eth2/forwarding": "1", "net/ipv4/conf/eth2/src_valid_mark": "1",
                         "net/ipv4/conf/eth0/forwarding": "1", "net/ipv4/conf/eth1/forwarding": "1",
                         "net/ipv6/conf/eth0/force_forwarding": "1"}
    closed = datapath(host(), fresh(), (instance(uplinks=("eth2",), outbound=False),)).sysctls
    assert closed == {"net/ipv4/conf/eth2/forwarding": "1", "net/ipv4/conf/eth2/src_valid_mark": "1"}


def test_vlan_sysctl_keys():
    facts = host(links=(*host().links, Link(7, "eth0.100")),
                 addresses=(*host().addresses, Address("eth0.100", IF("203.0.113.193/26"))),
                 sysctls={**host().sysctls, "net/ipv4/conf/eth0.100/forwarding": "0",
                          "net/ipv4/conf/eth0.100/src_valid_mark": "0"})
    dp = datapath(facts, fresh(), (instance(uplinks=("eth0.100",), outbound=False),))
    assert dp.sysctls == {"net/ipv4/conf/eth0.100/forwarding": "1", "net/ipv4/conf/eth0.100/src_valid_mark": "1"}


def test_guarded_interfaces_are_those_nswrap_turned_forwarding_on():
    allocation = replace(fresh(), sysctls=(
        SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1"),
        SysctlChange("net/ipv4/conf/eth1/forwarding", "1", "1"),  # was on before: not ours to guard
        SysctlChange("net/ipv4/conf/eth0/src_valid_mark", "0", "1"),
        SysctlChange("net/ipv4/conf/eth0.100/forwarding", "0", "1"),  # a VLAN, as /proc/sys names it
        SysctlChange("net/ipv6/conf/eth0/force_forwarding", "0", "1"),
    ))
    assert guarded(allocation, host(), 4) == ["eth0", "eth0.100"]
    assert guarded(allocation, host(), 6) == ["eth0"]
    assert guarded(allocation, with_sysctls(host(), **{"net/ipv6/conf/all/forwarding": "1"}), 6) == []  # a router already


# --- elements ------------------------------------------------------------------------------------


def test_every_address_is_one_element_per_uplink_and_lo():
    """Without --address the key has no address (the first packet's fib lookup decides): the
    elements do not grow with the host's addresses, nor change as they come and go."""
    dp = datapath(host(), fresh(), (instance(ports="53"),))
    assert keys(dp, "any4") == {(f'"{ifname}"', "udp", "53") for ifname in ("eth0", "eth1", "eth2", "lo")}
    assert {(e.value, e.comment) for e in dp.elements["any4"]} == {(("198.18.0.6",), "aaaaaa")}
    assert keys(dp, "any6") == {('"eth0"', "udp", "53"), ('"lo"', "udp", "53")}
    assert {e.value for e in dp.elements["any6"]} == {("fd6e:7377:7261:8001::2",)}
    assert not dp.elements["keep4"] and not dp.elements["remap4"] and not dp.elements["anyremap4"]


def test_a_kept_range_is_one_element_a_remapped_range_one_per_port():
    dp = datapath(host(), fresh(), (instance(ports="5000-5009,8080-8082:80-82/tcp", addresses=("192.0.2.10",), ipv6=False),))
    assert {k for k in keys(dp, "keep4") if k[0] == '"eth0"'} == {('"eth0"', "192.0.2.10", "udp", "5000-5009")}
    remapped = {(e.key, e.value) for e in dp.elements["remap4"] if e.key[0] == '"eth0"'}
    assert remapped == {(('"eth0"', "192.0.2.10", "tcp", str(8080 + i)), ("198.18.0.6", str(80 + i))) for i in range(3)}
    assert keys(dp, "ports") == {("udp", "5000-5009"), ("tcp", "8080-8082")}


def test_address_option_restricts_the_addresses():
    dp = datapath(host(), fresh(), (instance(addresses=("198.51.100.10", "2001:db8:1::10", "127.0.0.1")),))
    assert {k[1] for k in keys(dp, "keep4")} == {"198.51.100.10"}  # 127.0.0.1 only through loopback_ports
    assert {k[1] for k in keys(dp, "keep6")} == {"2001:db8:1::10"}


def test_loopback_ports_publish_on_127_0_0_1_through_lo():
    dp = datapath(host(), fresh(), (instance(ports="53,53/tcp", loopback="53/tcp"),))
    assert {k for k in keys(dp, "keep4") if k[1] == "127.0.0.1"} == {('"lo"', "127.0.0.1", "tcp", "53")}
    assert not any(k[1] == "127.0.0.1" for k in keys(datapath(host(), fresh(), (instance(),)), "keep4"))


def test_ports_set_merges_every_instance():
    both = (instance("aaaaaa", "53,100-110/tcp"), instance("bbbbbb", "50-60,111/tcp", subnet="198.18.0.8/30"))
    dp = datapath(host(), fresh(), both)
    assert keys(dp, "ports") == {("udp", "50-60"), ("tcp", "100-111")}  # an interval set refuses overlaps


def test_helpers_closed_stub_and_uplink_maps():
    facts = host(resolver_stub=A("127.0.0.53"))
    dp = datapath(facts, fresh(), (instance(ports="60-70", helpers=("tftp",), outbound=False),))
    assert keys(dp, "tftp4") == {("198.18.0.6", "69")} and keys(dp, "tftp6") == {("fd6e:7377:7261:8001::2", "69")}
    assert dp.elements["closed"] == {Element(('"nsw-aaaaaa"',), (), "aaaaaa")}
    assert dp.elements["stub4"] == {Element(("udp", "53"), ("127.0.0.53", "53")), Element(("tcp", "53"), ("127.0.0.53", "53"))}
    assert dp.elements["uplink_new"] == {Element(('"eth0"',), ("goto new_1",)), Element(('"eth1"',), ("goto new_2",)),
                                         Element(('"eth2"',), ("goto new_3",))}
    assert dp.elements["uplink_flow"] == {Element(("0x10000000",), ("goto flow_1",)), Element(("0x20000000",), ("goto flow_2",)),
                                          Element(("0x30000000",), ("goto flow_3",))}
    remapped_tftp = datapath(host(), fresh(), (instance(ports="1069:69", helpers=()),))
    assert not remapped_tftp.elements["tftp4"]


def test_a_remapped_tftp_port_points_at_the_inner_port():
    dp = datapath(host(), fresh(), (instance(ports="60-70:1060-1070", helpers=("tftp",), ipv6=False),))
    assert keys(dp, "tftp4") == {("198.18.0.6", "1069")}


# --- conflicts -----------------------------------------------------------------------------------


def test_conflicts_between_instances():
    live = (instance("aaaaaa", "50-60,53/tcp"),)
    assert conflicts(instance("bbbbbb", "55"), live) == "port 55/udp is already published by nswrap instance aaaaaa"
    assert conflicts(instance("bbbbbb", "54/tcp"), live) is None
    assert conflicts(instance("bbbbbb", "61-70"), live) is None
    assert conflicts(instance("bbbbbb", "53/tcp", addresses=("192.0.2.10",)), live) is not None  # aaaaaa has every address


def test_disjoint_addresses_do_not_conflict():
    live = (instance("aaaaaa", "53", addresses=("192.0.2.10",)),)
    assert conflicts(instance("bbbbbb", "53", addresses=("192.0.2.11",)), live) is None
    assert conflicts(instance("bbbbbb", "53", addresses=("192.0.2.11", "192.0.2.10")), live) is not None
    assert conflicts(instance("bbbbbb", "53"), live) is not None


def test_loopback_ports_conflict_too():
    live = (instance("aaaaaa", "53", addresses=("192.0.2.10",), loopback="5353"),)
    assert conflicts(instance("bbbbbb", "5353", addresses=("192.0.2.11",)), live) is None
    assert "5353/udp" in (conflicts(instance("bbbbbb", "5353"), live) or "")


# --- host sockets an instance would take over (issue 23) --------------------------------------------

SOCKETS = {
    "sshd": Listener("tcp", A("0.0.0.0"), 22, 1),
    "resolved": Listener("udp", A("127.0.0.53"), 53, 2),
    "squatter": Listener("udp", A("127.0.0.1"), 5353, 3),
    "web": Listener("tcp", A("192.0.2.11"), 80, 4),
    "v6only": Listener("tcp", A("::"), 443, 5, v6only=True),
    "dual": Listener("tcp", A("::"), 8080, 6),
    "on a veth": Listener("udp", A("198.18.0.1"), 53, 7),  # nsw-0ld0ld's: no client of the host's
    "ipv6 loopback": Listener("udp", A("::1"), 53, 8),
    "ntp6": Listener("udp", A("2001:db8:1::10"), 123, 9),
    "local tcp": Listener("tcp", A("127.0.0.1"), 631, 10),
}


def taken(ports: str, addresses: tuple[str, ...] = (), ipv6: bool = True) -> set[str]:
    """The names of SOCKETS a start with these options would take (loopback as loopback_ports says)."""
    loopback = ports if not addresses or "127.0.0.1" in addresses else None
    new = instance(ports=ports, addresses=addresses, ipv6=ipv6, loopback=loopback)
    found = taken_over(host(listeners=tuple(SOCKETS.values())), new)
    return {name for name, s in SOCKETS.items() if s in found}


def test_every_address_takes_wildcards_host_addresses_and_127_0_0_1():
    assert taken("1-65535/tcp") == {"sshd", "web", "v6only", "dual", "local tcp"}
    assert taken("1-65535") == {"squatter", "ntp6"}  # not 127.0.0.53, a veth's address or ::1
    assert taken("1-21,23-65535/tcp") == {"web", "v6only", "dual", "local tcp"}  # sshd's port left out
    assert taken("53,53/tcp") == set()  # systemd-resolved's stub on 127.0.0.53 is not taken over
    assert taken("5353:53") == {"squatter"}  # the host's port, not the server's


def test_address_narrows_what_is_taken():
    assert taken("1-65535/tcp", ("192.0.2.10",)) == {"sshd", "dual"}  # wildcards take 192.0.2.10's clients
    assert taken("1-65535/tcp", ("192.0.2.11",)) == {"sshd", "web", "dual"}
    assert taken("1-65535", ("192.0.2.10",)) == set()  # no 127.0.0.1 then: the squatter keeps its clients
    assert taken("1-65535", ("127.0.0.1",)) == {"squatter"}
    assert taken("1-65535/tcp", ("2001:db8:1::11",)) == {"v6only", "dual"}  # no IPv4 published: 0.0.0.0 keeps them
    assert taken("1-65535", ("2001:db8:1::11",)) == set()  # another IPv6 address than ntp6's


def test_a_host_without_ipv6_serving_leaves_ipv6_only_sockets_alone():
    assert taken("1-65535/tcp", ipv6=False) == {"sshd", "web", "dual", "local tcp"}
    assert taken("123", ipv6=False) == set()


def test_many_sockets_and_the_whole_range_are_quick():
    """Each socket is tested against the ranges: never a loop over 65535 ports."""
    import time

    many = tuple(Listener("udp", A("0.0.0.0"), port, port) for port in range(1, 65536, 3))
    new = instance(ports="1-65535,1-65535/tcp", loopback="1-65535,1-65535/tcp")
    began = time.process_time()  # CPU time: a loaded machine's waits for a CPU do not count
    assert len(taken_over(host(listeners=many), new)) == len(many)
    assert time.process_time() - began < 0.5


# --- the subnet of an instance ------------------------------------------------------------------


def test_allocate_subnet_skips_what_the_host_uses():
    facts = host()  # 198.18.0.0/30 is on nsw-0ld0ld
    assert allocate_subnet(facts, (), None) == N("198.18.0.4/30")
    assert allocate_subnet(facts, (instance(subnet="198.18.0.4/30"),), None) == N("198.18.0.8/30")
    routed = host(routes=(Route(N("198.18.0.0/29"), "eth1", A("198.51.100.7"), proto=STATIC),))
    assert allocate_subnet(routed, (), None) == N("198.18.0.8/30")


def test_a_wanted_subnet_must_be_free():
    facts = host()
    assert allocate_subnet(facts, (), N("203.0.113.248/30")) == N("203.0.113.248/30")
    with pytest.raises(NswrapError, match="subnet 192.0.2.4/30 overlaps 192.0.2.0/24, already in use"):
        allocate_subnet(facts, (), N("192.0.2.4/30"))
    with pytest.raises(NswrapError, match="overlaps 198.18.0.4/30"):
        allocate_subnet(facts, (instance(subnet="198.18.0.4/30"),), N("198.18.0.4/30"))


def test_ipv6_slots_are_unique():
    assert ula_subnet(N("198.18.0.4/30")) == N("fd6e:7377:7261:8001::/64")
    assert ula_subnet(N("198.18.0.8/30")) == N("fd6e:7377:7261:8002::/64")
    assert all(ula_subnet(n).subnet_of(POOL6) for n in (N("198.18.0.0/30"), N("198.19.255.252/30"), N("203.0.113.4/30")))
    twin = N("198.22.0.4/30")  # 2**18 above 198.18.0.4/30: the same 16-bit slot
    assert ula_subnet(twin) == ula_subnet(N("198.18.0.4/30"))
    live = (instance(subnet="198.22.0.4/30"),)
    assert allocate_subnet(host(), live, None) == N("198.18.0.8/30")  # .0 is taken, .4 shares the slot
    with pytest.raises(NswrapError, match="shares its IPv6 slot with a live instance"):
        allocate_subnet(host(), live, N("198.18.0.4/30"))


def test_the_pool_can_run_out():
    full = host(routes=(Route(N("198.18.0.0/15"), "eth1", A("198.51.100.7"), proto=STATIC),))
    with pytest.raises(NswrapError, match=r"no free /30 left in 198.18.0.0/15; give one with --subnet"):
        allocate_subnet(full, (), None)
    assert ipaddress.IPv4Network("198.18.0.0/15") == POOL4


def test_the_veth_takes_the_largest_uplink_mtu_and_forwards_ipv6_itself_only_per_interface():
    """Not lo's 65536, nor another instance's veth: eth1's jumbo frames (hosts.LINKS)."""
    assert veth_mtu(host()) == 9000
    assert veth_mtu(host(links=(Link(1, "lo", 65536), Link(5, "nsw-0ld0ld", 9000)))) == 1500
    per_interface = instance()
    assert veth_forwarding6(host(), per_interface)
    assert not veth_forwarding6(with_sysctls(host(), **{"net/ipv6/conf/all/forwarding": "1"}), per_interface)
    assert not veth_forwarding6(host(), replace(per_interface, forwarding6="global"))
    assert not veth_forwarding6(host(), instance(ipv6=False))
