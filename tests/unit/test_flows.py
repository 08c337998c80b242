"""flows.py: which conntrack flows a start and a stop forget, and which dumps find them. Pure."""

from __future__ import annotations

import ipaddress

from nswrap import flows
from nswrap.datatypes import datatype, replace
from nswrap.objects import SCOPE_HOST
from tests.unit.hosts import host, instance


@datatype
class F:  # what netlink.Flow offers flows.py
    dport: int
    reply_src: object = None


def test_one_dump_per_family_address_and_protocol_with_ports():
    dumps = flows.stale_dumps(instance(ports="53,53/tcp,5000-5002"), host())
    assert [(d.version, d.proto, sorted(d.ports), d.address) for d in dumps] == [
        (4, "udp", [53, 5000, 5001, 5002], None), (4, "tcp", [53], None),
        (6, "udp", [53, 5000, 5001, 5002], None), (6, "tcp", [53], None)]
    assert [d.single_port for d in dumps] == [None, 53, None, 53]  # the kernel filters one port; a range here


def test_no_ipv6_walk_on_a_host_without_a_global_ipv6_address():
    v4_only = replace(host(), addresses=tuple(a for a in host().addresses if a.version == 4 or a.scope == SCOPE_HOST))
    assert {d.version for d in flows.stale_dumps(instance(), v4_only)} == {4}


def test_addresses_narrow_the_dumps_and_loopback_is_none_of_them():
    one = instance(addresses=("192.0.2.10", "127.0.0.1"), ports="53")
    dumps = flows.stale_dumps(one, host())
    assert [(d.version, d.address) for d in dumps] == [(4, ipaddress.ip_address("192.0.2.10"))]
    assert dumps[0].render() == "conntrack -D -f ipv4 -p udp --orig-port-dst 53 --orig-dst 192.0.2.10"


def test_stale_keeps_what_a_range_covers():
    dump = flows.Dump(4, "udp", frozenset({53, 5000}))
    assert flows.stale(dump, [F(53), F(54), F(5000)]) == [F(53), F(5000)]


def test_mine_are_the_flows_answered_by_this_instances_server():
    me = instance()
    other = instance("bbbbbb", subnet="198.18.0.8/30")
    found = [F(53, me.server(4)), F(53, me.server(6)), F(53, other.server(4)), F(53, None)]
    assert flows.mine(me, found) == found[:2]
