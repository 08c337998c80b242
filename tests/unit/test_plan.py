"""The plan from fabricated host facts: allocation, routes, rules, sysctls, nft text. No root."""

import ipaddress
import os
from pathlib import Path

import pytest

from nswrap.config import Config, parse_ports, parse_uplink
from nswrap.errors import NswrapError
from nswrap.facts import Address, Facts, Link, Route, Rule
from nswrap.plan import PROTO, SCOPE_LINK, make_plan, nft_ruleset, render_plan

GOLDEN = Path(__file__).parent / "golden"
N, I, A = ipaddress.IPv4Network, ipaddress.IPv4Interface, ipaddress.IPv4Address


def host(**overrides) -> Facts:
    """eth0 with a secondary address and the main default route, eth1 with its own gateway,
    eth2 with no gateway, plus a foreign fwmark rule and a used table 5000."""
    base = dict(
        links=(Link(1, "lo", 65536), Link(2, "eth0", 1500), Link(3, "eth1", 9000), Link(4, "eth2", 1500), Link(5, "nsw-old", 1500)),
        addresses=(
            Address("lo", I("127.0.0.1/8"), 254),
            Address("eth0", I("192.0.2.10/24")),
            Address("eth0", I("192.0.2.11/24")),
            Address("eth1", I("198.51.100.10/24")),
            Address("eth2", I("203.0.113.65/26")),
            Address("nsw-old", I("198.18.0.1/30")),
        ),
        routes=(
            Route(254, N("0.0.0.0/0"), "eth0", A("192.0.2.1"), metric=100),
            Route(254, N("0.0.0.0/0"), "eth1", A("198.51.100.1"), metric=200),
            Route(254, N("192.0.2.0/24"), "eth0", scope=SCOPE_LINK, prefsrc=A("192.0.2.10")),
            Route(254, N("198.51.100.0/24"), "eth1", scope=SCOPE_LINK, prefsrc=A("198.51.100.10")),
            Route(254, N("10.20.0.0/16"), "eth1", A("198.51.100.7")),
            Route(254, N("203.0.113.64/26"), "eth2", scope=SCOPE_LINK, prefsrc=A("203.0.113.65")),
            Route(254, N("198.18.0.0/30"), "nsw-old", scope=SCOPE_LINK),
            Route(5000, N("0.0.0.0/0"), "eth0", A("192.0.2.1")),
        ),
        rules=(
            Rule(0, 255),
            Rule(900, 77, 0x4000, 0x4000),
            Rule(5001, 77),
            Rule(32766, 254),
            Rule(32767, 253),
        ),
    )
    base.update(overrides)
    return Facts(**base)


def config(ports="53,53/tcp", uplinks=(), **kw) -> Config:
    return Config(command=("server",), ports=parse_ports([ports]), uplinks=tuple(map(parse_uplink, uplinks)), **kw)


def test_auto_uplinks_skip_lo_and_our_own_veths():
    plan = make_plan(config(), host(), "abc123")
    assert [u.ifname for u in plan.uplinks] == ["eth0", "eth1", "eth2"]


def test_allocation_avoids_what_the_host_uses():
    plan = make_plan(config(), host(), "abc123")
    assert plan.subnet == N("198.18.0.4/30")  # 198.18.0.0/30 is taken by another instance
    assert [u.mark for u in plan.uplinks] == [0x10000000, 0x20000000, 0x30000000]
    assert [u.table for u in plan.uplinks] == [5001, 5002, 5003]  # 5000 has routes; 77 is used by a rule
    assert [u.rule.priority for u in plan.uplinks] == [5000, 5002, 5003]  # 5001 is taken
    assert all(u.rule.proto == PROTO and u.rule.fwmask == 0xF0000000 for u in plan.uplinks)
    assert plan.mtu == 9000  # the largest uplink MTU


def test_marks_of_other_instances_are_skipped():
    facts = host(rules=host().rules + (Rule(5010, 6000, 0x10000000, 0xF0000000, PROTO),))
    plan = make_plan(config(), facts, "abc123")
    assert [u.mark for u in plan.uplinks] == [0x20000000, 0x30000000, 0x40000000]


def test_foreign_rule_on_our_mark_bits_is_refused_by_name():
    facts = host(rules=host().rules + (Rule(100, 52, 0x80000000, 0x80000000),))
    with pytest.raises(NswrapError, match="ip rule 100") as err:
        make_plan(config(), facts, "abc123")
    assert err.value.code == 125
    make_plan(config(mark_mask=0x0F000000), facts, "abc123")  # other bits are fine


def test_uplink_tables_hold_default_connected_static_and_server_routes():
    plan = make_plan(config(), host(), "abc123")
    eth0, eth1, eth2 = plan.uplinks
    assert [(str(r.dst), r.gateway and str(r.gateway), r.dev) for r in eth1.routes] == [
        ("0.0.0.0/0", "198.51.100.1", "eth1"),
        ("198.51.100.0/24", None, "eth1"),
        ("10.20.0.0/16", "198.51.100.7", "eth1"),
        ("198.18.0.4/30", None, "nsw-abc123"),
    ]
    assert all(r.table == eth1.table for r in eth1.routes)
    assert eth0.gateway == A("192.0.2.1")
    assert eth2.gateway is None and not any(r.dst.prefixlen == 0 for r in eth2.routes)
    assert plan.warnings == ("uplink eth2 has no gateway: it serves only clients on its own subnets",)


def test_explicit_uplinks_and_gateways():
    plan = make_plan(config(uplinks=["eth1", "eth2=203.0.113.126"]), host(), "abc123")
    assert [(u.ifname, str(u.gateway)) for u in plan.uplinks] == [("eth1", "198.51.100.1"), ("eth2", "203.0.113.126")]
    assert plan.warnings == ()


@pytest.mark.parametrize("uplink, message", [("eth9", "no such uplink: eth9"), ("lo", "uplink lo has no global IPv4")])
def test_bad_uplinks_are_refused(uplink, message):
    with pytest.raises(NswrapError, match=message):
        make_plan(config(uplinks=[uplink]), host(), "abc123")


def test_no_uplink_at_all():
    with pytest.raises(NswrapError, match="no uplink found"):
        make_plan(config(), host(addresses=()), "abc123")


def test_subnet_given_must_be_free():
    assert make_plan(config(subnet=N("198.19.0.0/29")), host(), "abc123").subnet == N("198.19.0.0/29")
    with pytest.raises(NswrapError, match="overlaps 198.51.100.0/24"):
        make_plan(config(subnet=N("198.51.100.0/30")), host(), "abc123")


def test_sysctls_are_per_interface_only():
    plan = make_plan(config(), host(), "abc123")
    keys = [s.key for s in plan.sysctls]
    assert "net/ipv4/ip_forward" not in keys and not any("/all/" in k or "/default/" in k for k in keys)
    assert keys[-2:] == ["net/ipv4/conf/nsw-abc123/forwarding", "net/ipv4/conf/nsw-abc123/route_localnet"]
    assert {k.split("/")[3] for k in keys} == {"eth0", "eth1", "eth2", "nsw-abc123"}


def test_nft_remaps_ports_per_protocol():
    text = nft_ruleset(make_plan(config("53:5300,53:5300/tcp,5000-5002:6000-6002,123"), host(), "abc123"))
    assert "map udp_remap { type inet_service : inet_service; elements = { 53 : 5300, 5000 : 6000, 5001 : 6001, 5002 : 6002 } }" in text
    assert "map tcp_remap { type inet_service : inet_service; elements = { 53 : 5300 } }" in text
    assert "set unchanged { type inet_proto . inet_service; flags interval; elements = { udp . 123 } }" in text
    assert "dnat ip to 198.18.0.6 : udp dport map @udp_remap" in text


def test_nft_without_unchanged_ports_has_no_empty_set():
    text = nft_ruleset(make_plan(config("53:5300"), host(), "abc123"))
    assert "unchanged" not in text and "tcp_remap" not in text


def test_dry_run_text_is_pinned():
    """The whole --dry-run output for the fabricated host; regenerate with NSWRAP_UPDATE_GOLDEN=1."""
    text = render_plan(make_plan(config("53,53/tcp,5000-5010:6000-6010"), host(), "abc123"))
    golden = GOLDEN / "plan-3-uplinks.txt"
    if os.environ.get("NSWRAP_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize(
    "host, resolved, expected",
    [
        ("nameserver 192.0.2.53\n", "", (None, None)),  # reachable from the server: keep the host's
        ("nameserver 127.0.0.53\nnameserver 192.0.2.53\n", "", (None, None)),
        ("", "", (None, None)),
        ("nameserver 127.0.0.53\noptions edns0\n", "nameserver 198.51.100.53\n", ("nameserver 198.51.100.53\n", None)),
        (
            "nameserver 127.0.0.53\nsearch example\noptions edns0\n",
            "",
            ("# written by nswrap: the host's resolver 127.0.0.53 is reached through the veth\n"
             "nameserver 198.18.0.1\nsearch example\noptions edns0\n", A("127.0.0.53")),
        ),
    ],
)
def test_the_server_gets_a_usable_resolv_conf(host, resolved, expected):
    from nswrap.plan import server_resolv_conf

    assert server_resolv_conf(host, resolved, A("198.18.0.1")) == expected


def test_a_loopback_resolver_is_reached_through_the_veth():
    plan = make_plan(config(), host(resolv_conf="nameserver 127.0.0.53\n"), "abc123")
    assert plan.resolver_stub == A("127.0.0.53")
    text = nft_ruleset(plan)
    assert 'iifname "nsw-abc123" ip daddr 198.18.0.5 meta l4proto { udp, tcp } th dport 53 dnat ip to 127.0.0.53' in text
    assert "net/ipv4/conf/nsw-abc123/route_localnet" in [s.key for s in plan.sysctls]


def dual_stack_host(**overrides) -> Facts:
    base = host()
    return host(
        addresses=base.addresses + (Address("eth0", ipaddress.IPv6Interface("2001:db8:1::10/64")), Address("eth1", ipaddress.IPv6Interface("2001:db8:2::10/64"))),
        routes=base.routes + (
            Route(254, ipaddress.IPv6Network("::/0"), "eth0", ipaddress.IPv6Address("fe80::1"), metric=100),
            Route(254, ipaddress.IPv6Network("2001:db8:1::/64"), "eth0"),
            Route(254, ipaddress.IPv6Network("2001:db8:2::/64"), "eth1"),
        ),
        **overrides,
    )


def test_ipv6_uplinks_get_rules_routes_and_forwarding_per_interface():
    plan = make_plan(config(), dual_stack_host(), "abc123")
    eth0, eth1, eth2 = plan.uplinks
    assert eth0.families == (4, 6) and eth1.families == (4, 6) and eth2.families == (4,)
    assert [(r.family, r.priority, r.table) for r in eth0.rules] == [(4, 5000, 5001), (6, 5000, 5001)]
    assert eth0.gateway6 == ipaddress.IPv6Address("fe80::1")  # link-local, with its device
    assert ("::/0", "fe80::1", "eth0") in [(str(r.dst), str(r.gateway), r.dev) for r in eth0.routes]
    assert plan.subnet6.prefixlen == 64 and plan.subnet6.subnet_of(ipaddress.IPv6Network("fd6e:7377:7261::/48"))
    keys = [s.key for s in plan.sysctls]
    assert "net/ipv6/conf/eth0/force_forwarding" in keys and "net/ipv6/conf/nsw-abc123/force_forwarding" in keys
    assert not any(k.startswith("net/ipv6/conf/all") or k.endswith("ipv6/conf/eth0/forwarding") for k in keys)
    assert "uplink eth1 has no IPv6 gateway" in " ".join(plan.warnings)
    text = nft_ruleset(plan)
    assert f"dnat ip6 to [{plan.server_addr6.ip}]" in text
    assert "ip6 daddr ::1" not in text  # IPv6 never routes ::1 off lo


def test_ipv6_needs_per_interface_forwarding():
    plan = make_plan(config(), dual_stack_host(ipv6_per_interface=False), "abc123")
    assert plan.subnet6 is None and all(u.families == (4,) for u in plan.uplinks)
    assert any("IPv6 clients are not served" in w for w in plan.warnings)
