"""fastpath.py: what the tc-BPF fast path must hold, from hand-built facts; and the byte layout
of its endpoints (nswrap/bpf/fast.py against the structs of nswrap/bpf/fastpath.bpf.c). Pure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nswrap import fastpath, precheck, sync
from nswrap.changes import FastPath
from nswrap.config import parse_ports
from nswrap.datapath import datapath, topic
from nswrap.datatypes import replace
from nswrap.errors import UsageError
from nswrap.fastpath import Endpoint, Fast, Source, endpoint_count, host_addresses, wanted
from nswrap.objects import Address, Link
from tests.unit.hosts import IF, LINKS, MASK, A, N, fresh, host, instance

ETHERNET = tuple(replace(link, mac=f"02:00:00:00:00:{link.index:02x}") if link.ifname.startswith("eth") else link
                 for link in LINKS)
SOURCE = Path(__file__).resolve().parents[2] / "nswrap" / "bpf" / "fastpath.bpf.c"


def bpf(**kwargs):
    return replace(instance(**kwargs), datapath="bpf")


def fast_of(facts, *instances) -> Fast:
    dp = datapath(facts, fresh(facts), instances)
    return wanted(facts, dp, instances)


def test_nft_instances_need_nothing():
    assert fast_of(host(links=ETHERNET), instance()) == Fast()
    assert not Fast()


def test_every_address_of_the_host_is_an_endpoint_on_every_uplink():
    facts = host(links=ETHERNET)
    fast = fast_of(facts, bpf(ports="53"))
    assert fast.uplinks == {"eth0", "eth1", "eth2"} and fast.veths == {"nsw-aaaaaa"}
    v4 = {(e.uplink, str(e.address)) for e in fast.endpoints if e.address.version == 4}
    # the weak host model: a client on eth1 may ask eth0's address (as `fib daddr type local` says)
    addresses = ("192.0.2.10", "192.0.2.11", "198.51.100.10", "203.0.113.65")
    assert v4 == {(u, a) for u in ("eth0", "eth1", "eth2") for a in addresses}
    v6 = {(e.uplink, str(e.address)) for e in fast.endpoints if e.address.version == 6}
    assert v6 == {("eth0", "2001:db8:1::10")}  # the only uplink with a global IPv6 address
    # never loopback, a link-local or a veth's address
    assert [str(a) for a in host_addresses(facts, 6)] == ["2001:db8:1::10"]
    assert "198.18.0.1" not in {str(a) for a in host_addresses(facts, 4)}


def test_an_endpoint_carries_the_server_the_uplinks_mark_and_the_remapped_port():
    facts = host(links=ETHERNET)
    fast = fast_of(facts, bpf(ports="5353:53", uplinks=("eth1",), addresses=("198.51.100.10",)))
    assert fast.endpoints == {Endpoint("eth1", A("198.51.100.10"), "udp", 5353, "nsw-aaaaaa", 0x10000000,
                                       A("198.18.0.6"), 53)}


def test_ranges_are_one_endpoint_per_port():
    fast = fast_of(host(links=ETHERNET), bpf(ports="6000-6009/tcp", uplinks=("eth2",), addresses=("203.0.113.65",),
                                                ipv6=False))
    assert sorted(e.port for e in fast.endpoints) == list(range(6000, 6010))
    assert {e.server_port for e in fast.endpoints} == set(range(6000, 6010))


def test_an_uplink_without_a_link_layer_address_stays_on_nft():
    links = tuple(replace(link, mac="") if link.ifname == "eth2" else link for link in ETHERNET)
    fast = fast_of(host(links=links), bpf(ports="53"))
    assert "eth2" not in fast.uplinks and not any(e.uplink == "eth2" for e in fast.endpoints)


def test_only_the_bpf_instance_is_on_the_fast_path():
    facts = host(links=ETHERNET)
    fast = fast_of(facts, instance("bbbbbb", "123", subnet="198.18.0.8/30"), bpf(ports="53"))
    assert fast.veths == {"nsw-aaaaaa"} and {e.port for e in fast.endpoints} == {53}


def test_the_plan_attaches_the_fast_path_after_the_routes_and_removes_it_first():
    facts = host(links=(*ETHERNET, Link(9, "nsw-aaaaaa")))
    start = sync.plan(facts, None, None, (bpf(ports="53"),), MASK, ())
    kinds = [type(c).__name__ for c in start.changes]
    assert kinds.count("FastPath") == 1 and kinds.index("FastPath") > max(
        i for i, k in enumerate(kinds) if k in ("AddRoute", "AddRule"))
    held = next(c for c in start.changes if isinstance(c, FastPath)).want
    again = sync.plan(replace(facts, fast=held), None, start.after, (bpf(ports="53"),), MASK, ())
    assert not any(isinstance(c, FastPath) for c in again.changes)  # nothing to do: nothing said
    stop = sync.plan(replace(facts, fast=held), None, start.after, (), MASK)
    assert isinstance(stop.changes[0], FastPath) and stop.changes[0].want == Fast()


def test_the_rendering_names_tc_and_counts_endpoints():
    fast = fast_of(host(links=ETHERNET), bpf(ports="53", uplinks=("eth1",), ipv6=False))
    text = FastPath(fast, Fast()).render()
    assert "tc filter replace dev eth1 ingress pref 65001 handle 1 bpf da object-file" in text
    assert "section tc/veth" in text and "# fast path endpoints: 4 added, 0 deleted" in text  # 4 addresses
    assert "tc filter del dev eth1 ingress pref 65001" in FastPath(fast, Fast()).render_undo()


def test_programs_to_replace_are_a_change_even_when_nothing_else_differs():
    facts = host(links=ETHERNET)
    start = sync.plan(facts, None, None, (bpf(ports="53"),), MASK)
    (change,) = [c for c in start.changes if isinstance(c, FastPath)]
    outdated = replace(change.want, outdated=True)  # an older nswrap's programs, holding just what is wanted
    again = sync.plan(replace(facts, fast=outdated), None, start.after, (bpf(ports="53"),), MASK, ())
    (change,) = [c for c in again.changes if isinstance(c, FastPath)]
    assert change.want == replace(outdated, outdated=False)
    assert change.render() == ("# fast path: the programs attached are an older nswrap's (or a replacement was cut "
                               "short): this one's loaded, on every filter")


def test_beside_a_newer_nswraps_maps_only_the_filters_are_planned():
    facts = host(links=ETHERNET)
    start = sync.plan(facts, None, None, (bpf(ports="53"),), MASK)
    (change,) = [c for c in start.changes if isinstance(c, FastPath)]
    foreign = Fast(change.want.uplinks, frozenset(), foreign=True)  # its veth's filter missing, maps unreadable
    again = sync.plan(replace(facts, fast=foreign), None, start.after, (bpf(ports="53"),), MASK, ())
    (change,) = [c for c in again.changes if isinstance(c, FastPath)]
    assert change.want == replace(foreign, veths=change.want.veths) and change.want.veths
    held = sync.plan(replace(facts, fast=change.want), None, start.after, (bpf(ports="53"),), MASK, ())
    assert not any(isinstance(c, FastPath) for c in held.changes)  # converged: nothing to write


def _struct_size(name: str) -> int:
    """The size of a struct of fastpath.bpf.c, from its members (all naturally aligned)."""
    body = re.search(r"struct %s \{(.*?)\};" % name, SOURCE.read_text(), re.S).group(1)
    sizes = {"__u32": 4, "__u16": 2, "__be16": 2, "__u8": 1}
    total = 0
    for kind, names in re.findall(r"(__\w+) ([^;]+);", body):
        for member in names.split(","):
            count = re.search(r"\[(\d+)\]", member)
            total += sizes[kind] * (int(count.group(1)) if count else 1)
    return total


def test_the_endpoint_layout_matches_the_c_structs():
    from nswrap.bpf.fast import _KEY, _SOURCE, _VALUE

    assert _KEY.size == _struct_size("endpoint_key") == 24
    assert _VALUE.size == _struct_size("endpoint") == 32
    assert _SOURCE.size == _struct_size("source_key") == 24


def test_endpoints_encode_and_decode():
    from nswrap.bpf.fast import decode, encode

    index = {"eth0": 2, "nsw-aaaaaa": 9}
    for e in (Endpoint("eth0", A("192.0.2.10"), "udp", 53, "nsw-aaaaaa", 0x10000000, A("198.18.0.6"), 53),
              Endpoint("eth0", A("2001:db8:1::10"), "tcp", 8443, "nsw-aaaaaa", 0x20000000, A("fd6e:7377:7261:1::2"), 443)):
        key, value = encode(e, index)
        assert key[4:8] == bytes([e.address.version, {"udp": 17, "tcp": 6}[e.proto]]) + e.port.to_bytes(2, "big")
        assert decode(key, value, {v: k for k, v in index.items()}) == e
    key, value = encode(Endpoint("eth0", A("192.0.2.10"), "udp", 53, "nsw-aaaaaa", 1, A("198.18.0.6"), 53), index)
    assert decode(key, value, {2: "eth0"}) is None  # a veth that is gone: not an endpoint of ours


def test_a_port_a_conntrack_helper_follows_stays_on_nft():
    fast = fast_of(host(links=ETHERNET), replace(bpf(ports="69,53", uplinks=("eth1",), ipv6=False), helpers=("tftp",)))
    assert {e.port for e in fast.endpoints} == {53}


def test_an_uplink_with_a_default_route_brings_any_source_but_martians_and_the_hosts_own():
    fast = fast_of(host(links=ETHERNET), bpf(ports="53"))
    eth0 = {(str(s.network), s.allowed) for s in fast.sources if s.uplink == "eth0"}
    assert ("0.0.0.0/0", True) in eth0 and ("::/0", True) in eth0  # a default route each
    for denied in ("192.0.2.10/32", "198.51.100.10/32", "2001:db8:1::10/128", "198.18.0.0/15",
                   "fd6e:7377:7261::/48", "127.0.0.0/8", "::1/128", "224.0.0.0/4", "fe80::/10"):
        assert (denied, False) in eth0, denied


def test_an_uplink_without_a_gateway_brings_only_what_its_table_reaches():
    fast = fast_of(host(links=ETHERNET), bpf(ports="53", ipv6=False))
    eth2 = {(str(s.network), s.allowed) for s in fast.sources if s.uplink == "eth2"}
    assert ("0.0.0.0/0", False) in eth2 and ("203.0.113.64/26", True) in eth2
    assert ("203.0.113.65/32", False) in eth2  # its own address, in its own subnet


def test_sources_encode_as_one_trie_for_both_families():
    from nswrap.bpf.fast import decode_source, encode_source

    index = {"eth0": 2}
    for s in (Source("eth0", N("0.0.0.0/0"), True), Source("eth0", N("192.0.2.10/32"), False),
              Source("eth0", N("::/0"), True), Source("eth0", N("2001:db8:1::/64"), True)):
        key, value = encode_source(s, index)
        assert decode_source(key, value, {2: "eth0"}) == s
    key, _ = encode_source(Source("eth0", N("192.0.2.0/24"), True), index)
    assert key[:4] == (32 + 96 + 24).to_bytes(4, "little") and key[8:24] == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 0])


def test_a_new_veths_addresses_change_no_source():
    """They come with every start; the internal ranges cover them (else each start would be
    followed by a host change of its own)."""
    facts = host(links=ETHERNET)
    more = replace(facts, addresses=(*facts.addresses, Address("nsw-aaaaaa", IF("198.18.0.5/30")),
                                     Address("nsw-aaaaaa", IF("fd6e:7377:7261:1::1/64"))))
    assert fast_of(facts, bpf(ports="53")).sources == fast_of(more, bpf(ports="53")).sources


def test_what_does_not_fit_the_map_is_left_out_keeping_what_it_holds(monkeypatch):
    """fit: the entries the map holds stay, by key, with their wanted values (no flow changes
    path); the others fill it IPv6 first (the nft datapath beneath serves IPv6 only where the host
    forwards it), then by uplink, address (as a number), protocol, port; the count left out is
    said in one warning, and the plan writes only what fits."""
    monkeypatch.setattr(fastpath, "MAX_ENDPOINTS", 6)
    facts = host(links=ETHERNET, addresses=(*host().addresses, Address("eth0", IF("192.0.2.9/24"))))
    spec = bpf(ports="7000,7000/tcp", uplinks=("eth0", "eth1"), addresses=("192.0.2.9", "192.0.2.10", "2001:db8:1::10"))
    want = fast_of(facts, spec)
    assert len(want.endpoints) == 10  # IPv6 only on eth0, the uplink with a global IPv6 address
    kept = {(e.uplink, str(e.address), e.proto) for e in fastpath.fit(want, None)[0].endpoints}
    assert kept == {("eth0", "2001:db8:1::10", "tcp"), ("eth0", "2001:db8:1::10", "udp"),
                    ("eth0", "192.0.2.9", "tcp"), ("eth0", "192.0.2.9", "udp"),  # .9 before .10: by number
                    ("eth0", "192.0.2.10", "tcp"), ("eth0", "192.0.2.10", "udp")}
    monkeypatch.setattr(fastpath, "MAX_ENDPOINTS", 3)  # tcp before udp, IPv6 before IPv4
    assert {(str(e.address), e.proto) for e in fastpath.fit(want, None)[0].endpoints} == {
        ("2001:db8:1::10", "tcp"), ("2001:db8:1::10", "udp"), ("192.0.2.9", "tcp")}
    monkeypatch.setattr(fastpath, "MAX_ENDPOINTS", 6)
    # held: eth1's IPv4 entries, one of them with an old value (another mark): rewritten, not dropped
    held = {e for e in want.endpoints if e.uplink == "eth1" and e.address.version == 4}
    stale = {replace(e, mark=0x70000000) if e.proto == "tcp" else e for e in held}
    cut, spill = fastpath.fit(want, Fast(endpoints=frozenset(stale)))
    assert spill == 4 and len(cut.endpoints) == 6 and held <= cut.endpoints
    assert {(e.address.version, e.uplink) for e in cut.endpoints - held} == {(6, "eth0")}
    assert fastpath.fit(cut, Fast(endpoints=cut.endpoints)) == (cut, 0)
    plan = sync.plan(facts, None, None, (spec,), MASK)
    assert fastpath.spilled(4) in plan.datapath.warnings and topic(fastpath.spilled(4)) == fastpath.SPILLED
    (change,) = [c for c in plan.changes if isinstance(c, FastPath)]
    assert len(change.want.endpoints) == 6


def test_a_start_beside_live_bpf_instances_must_fit_the_map_with_theirs(monkeypatch):
    """precheck.check_endpoints: this instance's endpoints and the live bpf instances' (not nft
    ones') against the map, the boundary included; a port the tftp helper follows takes none."""
    monkeypatch.setattr(precheck, "MAX_ENDPOINTS", 6)
    facts = host(links=ETHERNET)
    first = bpf(ports="7000-7002", uplinks=("eth0",), addresses=("192.0.2.10",), ipv6=False)
    second = replace(first, id="bbbbbb", ports=parse_ports(["7100-7102"]))
    precheck.check_endpoints(facts, first, (replace(second, datapath="nft"),))
    precheck.check_endpoints(facts, first, (second,))  # 3 + 3: exactly full
    with pytest.raises(UsageError, match=r"^--datapath bpf: 4 endpoints \(ports x addresses x uplinks\) beside the 3 "
                                         r"of the live bpf instances are more than the fast path holds \(6\)"):
        precheck.check_endpoints(facts, replace(first, ports=parse_ports(["7000-7003"])), (second,))
    tftp = replace(first, ports=parse_ports(["68-71"]), helpers=("tftp",))
    assert endpoint_count(facts, tftp) == 3 == len(fast_of(facts, tftp).endpoints)


def test_the_map_size_is_the_objects():
    """MAX_ENDPOINTS is the `published` map's max_entries in nswrap/bpf/fastpath.bpf.c."""
    source = SOURCE.read_text()
    published = source[source.index("struct map_def published"):]
    assert int(re.search(r"\.max_entries = (\d+)", published).group(1)) == fastpath.MAX_ENDPOINTS
