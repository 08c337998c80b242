"""The netlink codec pinned to the kernel: bytes a real kernel sent (tests/unit/fixtures/netlink/,
made by its capture.py) decoded by nswrap and compared with what was made there, with `ip -json`
where it was recorded, and with pyroute2 decoding the same bytes; requests nswrap encodes parsed
by pyroute2, and messages pyroute2 encodes parsed by nswrap. Malformed bytes raise, never loop.
pyroute2 is a test dependency only: nswrap never imports it.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import socket
import struct
import subprocess
import sys

import pytest

from nswrap.datatypes import replace
from nswrap.netlink import codec, conntrack, events, routing, transport
from nswrap.objects import Address, Neighbour, Route, Rule

pyroute2 = pytest.importorskip("pyroute2")
from pyroute2.netlink.diag import MarshalDiag  # noqa: E402
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg  # noqa: E402
from pyroute2.netlink.nlsocket import Marshal  # noqa: E402
from pyroute2.netlink.rtnl.fibmsg import fibmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netlink.rtnl.marshal import MarshalRtnl  # noqa: E402
from pyroute2.netlink.rtnl.ndmsg import ndmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "netlink"
A = ipaddress.ip_address


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def received(name: str, call: str | None = None) -> list[bytes]:
    return [bytes.fromhex(h) for c in fixture(name)["calls"] if call in (None, c["call"]) for h in c["datagrams"]]


def ours(datagrams: list[bytes], kinds: set[int]) -> list[codec.Message]:
    return [m for data in datagrams for m in codec.messages(data) if m.kind in kinds]


def theirs(datagrams: list[bytes], kinds: set[int], marshal: type = MarshalRtnl) -> list:
    return [m for data in datagrams for m in marshal().parse(data) if m["header"]["type"] in kinds]


def plain(obj: object) -> dict[str, object]:
    return {k: (v if v is None or isinstance(v, bool | int | str | dict) else str(v))
            for k, v in ((k, getattr(obj, k)) for k in obj.__datatype_fields__)}  # type: ignore[attr-defined]


# --- links -----------------------------------------------------------------------------------


def test_links_decode_as_made_as_ip_says_and_as_pyroute2_reads():
    data = received("links")
    infos = [routing.parse_link(m) for m in ours(data, {routing.RTM_NEWLINK})]
    by_name = {info.link.ifname: info for info in infos}
    for name, made in fixture("links")["made"].items():
        got = plain(by_name[name].link) | {"inet": by_name[name].inet}
        assert {k: got[k] for k in made if made[k] is not None} == {k: v for k, v in made.items() if v is not None}, name
    ip = {link["ifname"]: link for link in fixture("links")["ip"]["ip -j -d link show"]}
    for info in infos:
        assert (info.link.mtu, info.link.mac, info.link.up) == \
            (ip[info.link.ifname]["mtu"], ip[info.link.ifname]["address"], "UP" in ip[info.link.ifname]["flags"])
    pyr = theirs(data, {routing.RTM_NEWLINK})
    assert len(pyr) == len(infos) == 3
    for info, m in zip(infos, pyr, strict=True):
        assert (info.link.index, info.link.ifname, info.link.mtu, info.link.mac, info.link.up) == \
            (m["index"], m.get_attr("IFLA_IFNAME"), m.get_attr("IFLA_MTU"), m.get_attr("IFLA_ADDRESS"), bool(m["flags"] & 1))
        inet = m.get_attr("IFLA_AF_SPEC").get_attr("AF_INET")
        expected = {} if inet is None else {"forwarding": inet["forwarding"], "rp_filter": inet["rp_filter"],
                                            "src_valid_mark": inet["src_vmark"], "route_localnet": inet["route_localnet"]}
        assert info.inet == expected


def test_a_link_without_ipv4_settings():
    """Under 68 bytes of MTU a link has no IPv4 (in_device): IFLA_AF_SPEC has no AF_INET."""
    lo = next(i for i in map(routing.parse_link, ours(received("links"), {routing.RTM_NEWLINK})) if i.link.ifname == "lo")
    assert lo.inet == {} and lo.link.mtu == 60


# --- addresses -------------------------------------------------------------------------------


def test_addresses_decode_as_made_and_as_pyroute2_reads():
    data = received("addresses")
    names = {1: "lo", 2: "veth1", 3: "veth0"}
    found = [routing.parse_address(m, names) for m in ours(data, {routing.RTM_NEWADDR})]
    decoded = [plain(a) for a in found if a is not None]
    for made in fixture("addresses")["made"]:
        assert made in decoded
    for a, m in zip(found, theirs(data, {routing.RTM_NEWADDR}), strict=True):
        assert a is not None
        local = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
        assert (a.address, a.scope, a.tentative) == (ipaddress.ip_interface(f"{local}/{m['prefixlen']}"), m["scope"],
                                                     bool(m.get_attr("IFA_FLAGS") & 0x40))
    ip = {(i["local"], i["prefixlen"]) for link in fixture("addresses")["ip"]["ip -j addr show"] for i in link["addr_info"]}
    assert {(str(a.address.ip), a.address.network.prefixlen) for a in found if a} == ip


# --- routes ----------------------------------------------------------------------------------


def test_routes_decode_as_made_and_as_pyroute2_reads():
    data = received("routes")
    names = {1: "lo", 2: "veth1", 3: "veth0"}
    messages = ours(data, {routing.RTM_NEWROUTE})
    routes = [r for m in messages for r in routing.parse_route(m, names)]
    decoded = [plain(r) for r in routes]
    for made in fixture("routes")["made"]:
        assert made in decoded, made
    expected = []
    for m in theirs(data, {routing.RTM_NEWROUTE}):
        if m["type"] != 1:
            continue
        dst = m.get_attr("RTA_DST") or ("0.0.0.0" if m["family"] == socket.AF_INET else "::")
        hops = [(h["oif"], h.get_attr("RTA_GATEWAY")) for h in m.get_attr("RTA_MULTIPATH")] if m.get_attr("RTA_MULTIPATH") \
            else [(m.get_attr("RTA_OIF"), m.get_attr("RTA_GATEWAY"))]
        for oif, gateway in hops:
            expected.append(Route(ipaddress.ip_network(f"{dst}/{m['dst_len']}"), names.get(oif), A(gateway) if gateway else None,
                                  m.get_attr("RTA_TABLE"), m["scope"], A(m.get_attr("RTA_PREFSRC")) if m.get_attr("RTA_PREFSRC")
                                  else None, m.get_attr("RTA_PRIORITY") or 0, m["proto"], bool(m["flags"] & 4)))
    assert routes == expected
    ip = {(r["dst"], r.get("gateway")) for command in ("ip -j route show table all", "ip -j -6 route show table all")
          for r in fixture("routes")["ip"][command] if r.get("type", "unicast") == "unicast" and "nexthops" not in r}
    assert ip <= {(("default" if not r.dst.prefixlen else str(r.dst) if r.dst.prefixlen != r.dst.max_prefixlen
                    else str(r.dst.network_address)), str(r.gateway) if r.gateway else None) for r in routes}


def test_an_ra_route_with_expires_and_a_multipath_route():
    routes = [r for m in ours(received("routes"), {routing.RTM_NEWROUTE}) for r in routing.parse_route(m, {3: "veth0"})]
    assert [str(r.gateway) for r in routes if str(r.dst) == "203.0.113.128/25"] == ["192.0.2.252", "192.0.2.251"]
    ra = [r for r in routes if r.proto == 9]
    assert [(str(r.dst), str(r.gateway)) for r in ra] == [("2001:db8:4::/48", "fe80::1")]


# --- rules -----------------------------------------------------------------------------------


def test_rules_decode_as_made_and_as_pyroute2_reads():
    data = received("rules")
    rules = [routing.parse_rule(m) for m in ours(data, {routing.RTM_NEWRULE})]
    decoded = [plain(r) for r in rules]
    for made in fixture("rules")["made"]:
        assert made in decoded, made
    for rule, m in zip(rules, theirs(data, {routing.RTM_NEWRULE}), strict=True):
        dst = m.get_attr("FRA_DST")
        assert (rule.version, rule.priority, rule.table, rule.fwmark, rule.action, rule.proto, rule.dst) == (
            4 if m["family"] == socket.AF_INET else 6, m.get_attr("FRA_PRIORITY") or 0, m.get_attr("FRA_TABLE") or m["table"],
            m.get_attr("FRA_FWMARK") or 0, m["action"], m.get_attr("FRA_PROTOCOL") or 0,
            ipaddress.ip_network(f"{dst}/{m['dst_len']}") if dst else None)
        if m.get_attr("FRA_FWMASK") is not None:
            assert rule.fwmask == m.get_attr("FRA_FWMASK")
        suppress = m.get_attr("FRA_SUPPRESS_PREFIXLEN")
        assert rule.suppress_prefixlength == (-1 if suppress is None else struct.unpack("=i", struct.pack("=I", suppress))[0])
    ip = [r["priority"] for command in ("ip -j rule show", "ip -j -6 rule show") for r in fixture("rules")["ip"][command]]
    assert [r.priority for r in rules] == ip


# --- conntrack -------------------------------------------------------------------------------


class MarshalNFCT(Marshal):
    msg_map = {conntrack.ct(conntrack.IPCTNL_MSG_CT_NEW): nfct_msg}


def test_conntrack_flows_decode_as_made_and_as_pyroute2_reads():
    data = received("conntrack", "flows(None)")
    flows = [conntrack.parse_flow(m) for m in ours(data, {conntrack.ct(conntrack.IPCTNL_MSG_CT_NEW)})]
    got = sorted((f.proto, str(f.dst), f.dport, bool(f.status & conntrack.IPS_DST_NAT), f.mark, str(f.reply_src))
                 for f in flows)
    made = sorted((socket.getprotobyname(t["proto"]), t["dst"], t["dport"], t["dnat"], t["mark"], t["reply_src"])
                  for t in fixture("conntrack")["made"])
    assert got == made
    for flow, m in zip(flows, theirs(data, {conntrack.ct(0)}, MarshalNFCT), strict=True):
        orig = m.get_attr("CTA_TUPLE_ORIG")
        ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
        dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
        reply_ip = m.get_attr("CTA_TUPLE_REPLY").get_attr("CTA_TUPLE_IP")
        assert (flow.version, flow.proto, flow.dst, flow.dport, flow.status, flow.mark, flow.reply_src) == (
            6 if ":" in dst else 4, proto.get_attr("CTA_PROTO_NUM"), A(dst), proto.get_attr("CTA_PROTO_DST_PORT"),
            m.get_attr("CTA_STATUS"), m.get_attr("CTA_MARK") or 0,
            A(reply_ip.get_attr("CTA_IP_V4_SRC") or reply_ip.get_attr("CTA_IP_V6_SRC")))


def test_conntrack_dump_filters_as_the_kernel_applied_them():
    dnat = [conntrack.parse_flow(m) for m in ours(received("conntrack", "flows(None, dnat_only=True)"), {0x100})]
    assert sorted(str(f.reply_src) for f in dnat) == ["198.18.0.2", "198.18.0.2", "fd6e:7377:7261::2"]
    udp6 = [conntrack.parse_flow(m) for m in ours(received("conntrack", "flows(6, orig_proto=17)"), {0x100})]
    assert [(f.version, f.proto) for f in udp6] == [(6, 17)]


def test_conntrack_tally_reads_the_same_bytes_in_place():
    messages = ours(received("conntrack", "flows(None)"), {0x100})
    tally: dict[tuple[int, bytes], int] = {}
    for m in messages:
        key = conntrack.mark_and_reply_source(m.body)
        if key:
            tally[key] = tally.get(key, 0) + 1
    assert tally == {(0x10000000, A("198.18.0.2").packed): 2, (0x20000000, A("fd6e:7377:7261::2").packed): 1}


# --- sock_diag -------------------------------------------------------------------------------


def test_listeners_decode_as_made_and_as_pyroute2_reads():
    calls = fixture("sockets")["calls"]
    inodes = next(c["inodes"] for c in calls if c["call"] == "inodes")
    found = []
    for proto, _number, state in conntrack.LISTENING:
        for family in (socket.AF_INET, socket.AF_INET6):
            data = received("sockets", f"{proto} {family}")
            for m, theirs_ in zip(ours(data, {conntrack.SOCK_DIAG_BY_FAMILY}), theirs(data, {20}, MarshalDiag), strict=True):
                listener = conntrack.parse_listener(m, proto, state)
                assert theirs_["idiag_state"] == state and theirs_["idiag_inode"] == listener.inode
                src = A(theirs_["idiag_src"])
                assert listener.address == (src.ipv4_mapped or src if src.version == 6 else src)
                assert listener.port == theirs_["idiag_sport"]
                found.append(listener)
    made = {(proto, A(address), port, inode, v6only)
            for (proto, _f, address, port, v6only, peer), inode in zip(fixture("sockets")["made"], inodes, strict=True)
            if peer is None and not (proto == "tcp" and port == 5308)}
    assert {(s.proto, s.address, s.port, s.inode, s.v6only) for s in found} == made


# --- events ----------------------------------------------------------------------------------


def decoded_events(name: str) -> list[events.Event]:
    return [events.parse_event(m) for m in ours(received(name), set(range(1 << 16))) if m.kind not in (2, 3)]


def test_rtnetlink_events_as_made():
    got = decoded_events("events")
    veth0 = next(e.ifindex for e in got if e.what == "link" and e.ifname == "veth0")
    assert events.Event("link", False, veth0, "veth0") in got
    assert events.Event("link", True, veth0, "veth0") in got
    assert events.Event("addr", False, veth0) in got
    assert events.Event("route", False, veth0, proto=110) in got
    assert events.Event("rule", False, proto=110) in got and events.Event("rule", True, proto=110) in got
    netconf = {e.ifindex for e in got if e.what == "netconf"}
    assert {events.NETCONFA_IFINDEX_ALL, events.NETCONFA_IFINDEX_DEFAULT, veth0} <= netconf
    others = [m.kind for m in ours(received("events"), set(range(1 << 16)))
              if m.kind not in (2, 3) and events.parse_event(m).what == "other"]
    assert set(others) == {81}  # RTM_DELNETCONF, as a link goes: nothing to follow


def test_nftables_events_as_made():
    got = decoded_events("nft_events")
    nft = [(e.nft, e.deleted, e.table, e.set) for e in got]
    for expected in [("newtable", False, "", ""), ("newchain", False, "", ""), ("newrule", False, "", ""),
                     ("newset", False, "", ""), ("newsetelem", False, "", ""), ("delsetelem", True, "nswrap", "s"),
                     ("delrule", True, "nswrap", ""), ("delchain", True, "nswrap", ""), ("deltable", True, "nswrap", ""),
                     ("newgen", False, "", "")]:
        assert expected in nft, expected


def test_follow_tells_a_deleted_table_from_element_churn():
    from nswrap.follow import classify

    reasons = {e.nft: classify(e, set(), "nswh0") for e in decoded_events("nft_events")}
    assert reasons["delsetelem"] is None and reasons["newsetelem"] is None  # set s: not the guard's
    held = next(e for e in decoded_events("nft_events") if e.nft == "delsetelem")
    assert classify(replace(held, set="held"), set(), "nswh0") == "host"  # someone flushed the guard's set
    assert reasons["deltable"] == reasons["delchain"] == reasons["delrule"] == "table"


# --- both ways: our requests parsed by pyroute2, pyroute2's messages parsed by ours ------------


class FakeRouting(routing.Routing):
    def __init__(self) -> None:
        self._index = {"veth0": 3, "lo": 1}


def request(kind: int, flags: int, body: bytes) -> bytes:
    return codec.HEADER.pack(codec.HEADER.size + len(body), kind, flags | codec.NLM_F_REQUEST, 1, 0) + body


def test_our_requests_parse_in_pyroute2():
    r = FakeRouting()
    veth = MarshalRtnl().parse(request(*r.veth("nswh0", "nsws0", 7, 1420, ("02:00:00:00:00:01", "02:00:00:00:00:02"))))
    m = next(iter(veth))
    assert (m.get_attr("IFLA_IFNAME"), m.get_attr("IFLA_MTU"), m.get_attr("IFLA_ADDRESS")) == ("nswh0", 1420, "02:00:00:00:00:01")
    info = m.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert (peer.get_attr("IFLA_IFNAME"), peer.get_attr("IFLA_NET_NS_FD"), peer.get_attr("IFLA_ADDRESS")) == \
        ("nsws0", 7, "02:00:00:00:00:02")

    m = next(iter(MarshalRtnl().parse(request(*r.configure("veth0", {"forwarding": 1, "src_valid_mark": 1})))))
    spec = m.get_attr("IFLA_AF_SPEC")
    assert m["index"] == 3 and m["flags"] == m["change"] == 1
    assert spec.get_attr("AF_INET6").get_attr("IFLA_INET6_ADDR_GEN_MODE") == 1

    m = next(iter(MarshalRtnl().parse(request(*r.address("add", Address("veth0", ipaddress.ip_interface("2001:db8::1/64")))))))
    assert (m["family"], m["prefixlen"], m["index"], m.get_attr("IFA_LOCAL"), m.get_attr("IFA_FLAGS")) == \
        (socket.AF_INET6, 64, 3, "2001:db8::1", 2)

    route = Route(ipaddress.ip_network("198.51.100.0/24"), "veth0", A("192.0.2.254"), 1000, prefsrc=A("192.0.2.1"),
                  metric=7, onlink=True)
    m = next(iter(MarshalRtnl().parse(request(*r.route("add", route)))))
    assert (m["dst_len"], m["table"], m["proto"], m["type"], m["flags"], m.get_attr("RTA_TABLE"), m.get_attr("RTA_DST"),
            m.get_attr("RTA_OIF"), m.get_attr("RTA_GATEWAY"), m.get_attr("RTA_PREFSRC"), m.get_attr("RTA_PRIORITY")) == \
        (24, 252, 110, 1, 4, 1000, "198.51.100.0", 3, "192.0.2.254", "192.0.2.1", 7)

    rule = Rule(4, 1000, 100, 0x10000000, 0xF0000000, ipaddress.ip_network("203.0.113.0/24"), 0)
    m = next(iter(MarshalRtnl().parse(request(*r.rule("add", rule)))))
    assert (m["family"], m["dst_len"], m["table"], m["action"], m.get_attr("FRA_PRIORITY"), m.get_attr("FRA_TABLE"),
            m.get_attr("FRA_FWMARK"), m.get_attr("FRA_FWMASK"), m.get_attr("FRA_DST"), m.get_attr("FRA_PROTOCOL"),
            m.get_attr("FRA_SUPPRESS_PREFIXLEN")) == \
        (socket.AF_INET, 24, 100, 1, 1000, 100, 0x10000000, 0xF0000000, "203.0.113.0", 110, 0)

    m = next(iter(MarshalRtnl().parse(request(*r.neighbour(Neighbour("veth0", A("fd6e:7377:7261::2"), "02:00:00:00:00:02"))))))
    assert (m["family"], m["ifindex"], m["state"], m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")) == \
        (socket.AF_INET6, 3, 0x80, "fd6e:7377:7261::2", "02:00:00:00:00:02")


def test_our_conntrack_requests_parse_in_pyroute2():
    class Get(Marshal):
        msg_map = {conntrack.ct(conntrack.IPCTNL_MSG_CT_GET): nfct_msg, conntrack.ct(conntrack.IPCTNL_MSG_CT_DELETE): nfct_msg}

    body = conntrack.Conntrack.request(4, orig_proto=17, orig_dport=53, orig_dst=A("192.0.2.10"), dnat_only=True)
    m = next(iter(Get().parse(request(conntrack.ct(conntrack.IPCTNL_MSG_CT_GET), codec.NLM_F_DUMP, body))))
    orig = m.get_attr("CTA_TUPLE_ORIG")
    assert orig.get_attr("CTA_TUPLE_IP").get_attr("CTA_IP_V4_DST") == "192.0.2.10"
    assert (orig.get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_NUM"),
            orig.get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_DST_PORT")) == (17, 53)
    assert m.get_attr("CTA_STATUS") == conntrack.IPS_DST_NAT and m["nfgen_family"] == socket.AF_INET

    flow = conntrack.parse_flow(ours(received("conntrack", "flows(None)"), {0x100})[0])
    delete = codec.NFGEN.pack(socket.AF_INET if flow.version == 4 else socket.AF_INET6, 0, 0) + flow.orig
    m = next(iter(Get().parse(request(conntrack.ct(conntrack.IPCTNL_MSG_CT_DELETE), 0, delete))))
    ip = m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_IP")
    assert A(ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")) == flow.dst


def test_pyroute2_built_messages_parse_in_ours():
    link = ifinfmsg()
    link["index"], link["flags"] = 5, 1
    link["attrs"] = [("IFLA_IFNAME", "eth7"), ("IFLA_MTU", 9000), ("IFLA_ADDRESS", "02:00:00:00:00:07")]
    link.encode()
    got = routing.parse_link(next(codec.messages(bytes(link.data))))
    assert plain(got.link) == {"index": 5, "ifname": "eth7", "mtu": 9000, "mac": "02:00:00:00:00:07", "up": True}

    addr = ifaddrmsg()
    addr["family"], addr["prefixlen"], addr["index"], addr["scope"] = socket.AF_INET6, 64, 5, 0
    addr["attrs"] = [("IFA_ADDRESS", "2001:db8::7"), ("IFA_FLAGS", 0x40)]
    addr.encode()
    assert routing.parse_address(next(codec.messages(bytes(addr.data))), {5: "eth7"}) == \
        Address("eth7", ipaddress.ip_interface("2001:db8::7/64"), 0, True)

    route = rtmsg()
    route["family"], route["dst_len"], route["table"], route["proto"], route["type"] = socket.AF_INET, 24, 252, 110, 1
    route["attrs"] = [("RTA_TABLE", 1000), ("RTA_DST", "198.51.100.0"),
                      ("RTA_MULTIPATH", [{"oif": 5, "attrs": [("RTA_GATEWAY", "192.0.2.1")]},
                                         {"oif": 6, "attrs": [("RTA_GATEWAY", "192.0.2.2")]}])]
    route.encode()
    assert routing.parse_route(next(codec.messages(bytes(route.data))), {5: "eth7", 6: "eth8"}) == [
        Route(ipaddress.ip_network("198.51.100.0/24"), "eth7", A("192.0.2.1"), 1000, 0, None, 0, 110),
        Route(ipaddress.ip_network("198.51.100.0/24"), "eth8", A("192.0.2.2"), 1000, 0, None, 0, 110)]

    rule = fibmsg()
    rule["family"], rule["action"], rule["table"] = socket.AF_INET6, 1, 100
    rule["attrs"] = [("FRA_PRIORITY", 900), ("FRA_FWMARK", 0x20), ("FRA_FWMASK", 0xFF), ("FRA_PROTOCOL", 110)]
    rule.encode()
    assert routing.parse_rule(next(codec.messages(bytes(rule.data)))) == Rule(6, 900, 100, 0x20, 0xFF, None, -1, 1, 110)

    neigh = ndmsg()  # nswrap writes neighbours and never reads them: only the layout is shared
    neigh["family"], neigh["ifindex"], neigh["state"] = socket.AF_INET, 5, 0x80
    neigh.encode()
    assert routing.NDMSG.unpack_from(next(codec.messages(bytes(neigh.data))).body)[:3] == (socket.AF_INET, 5, 0x80)


# --- malformed bytes: an error, never a loop -------------------------------------------------

GOOD = codec.HEADER.pack(20, 3, 2, 1, 0) + b"\0\0\0\0"


@pytest.mark.parametrize("data", [
    codec.HEADER.pack(0, 3, 2, 1, 0),  # nlmsg_len 0: the old loop never advanced
    codec.HEADER.pack(15, 3, 2, 1, 0),  # shorter than the header itself
    codec.HEADER.pack(64, 3, 2, 1, 0) + b"\0" * 8,  # past the end of the datagram
    GOOD + codec.HEADER.pack(0, 3, 2, 1, 0),  # a good message, then a zero-length one
    GOOD + b"\0" * 7,  # a header cut short
], ids=["zero", "short", "oversized", "zero-after-good", "truncated-header"])
def test_malformed_headers_raise(data):
    with pytest.raises(codec.Malformed) as e:
        list(codec.messages(data))
    assert isinstance(e.value, OSError) and "malformed netlink message" in str(e.value)


@pytest.mark.parametrize("data", [
    struct.pack("=HH", 0, 1) + b"\0" * 8,  # nla_len 0
    struct.pack("=HH", 3, 1) + b"\0" * 4,  # shorter than its own header
    struct.pack("=HH", 40, 1) + b"\0" * 8,  # past the end
    codec.u32(1, 5) + b"\0\0",  # an attribute header cut short
], ids=["zero", "short", "oversized", "truncated"])
def test_malformed_attributes_raise(data):
    with pytest.raises(codec.Malformed):
        codec.parse_attrs(data)
    with pytest.raises(codec.Malformed):
        codec.spans(data)


def message(kind: int, body: bytes) -> codec.Message:
    return codec.Message(kind, 0, body)


BAD_ATTR = struct.pack("=HH", 0, 3)


@pytest.mark.parametrize("parse", [
    lambda: routing.parse_link(message(16, b"\0" * 8)),  # ifinfomsg cut short
    lambda: routing.parse_link(message(16, routing.IFINFO.pack(0, 0, 1, 0, 0) + BAD_ATTR)),
    lambda: routing.parse_link(message(16, routing.IFINFO.pack(0, 0, 1, 0, 0) + codec.attr(routing.IFLA_MTU, b"\1"))),
    lambda: routing.parse_address(message(20, routing.IFADDR.pack(2, 24, 0, 0, 1) + BAD_ATTR), {}),
    lambda: routing.parse_address(message(20, routing.IFADDR.pack(2, 24, 0, 0, 1) + codec.attr(2, b"\1\2\3")), {}),
    lambda: routing.parse_route(message(24, routing.RTMSG.pack(2, 0, 0, 0, 254, 3, 0, 1, 0) + BAD_ATTR), {}),
    lambda: routing.parse_route(message(24, routing.RTMSG.pack(2, 0, 0, 0, 254, 3, 0, 1, 0)
                                        + codec.attr(routing.RTA_MULTIPATH, struct.pack("=HBBi", 0, 0, 0, 1))), {}),
    lambda: routing.parse_route(message(24, routing.RTMSG.pack(2, 0, 0, 0, 254, 3, 0, 1, 0)
                                        + codec.attr(routing.RTA_MULTIPATH, struct.pack("=HBBi", 99, 0, 0, 1))), {}),
    lambda: routing.parse_rule(message(32, routing.RULE.pack(2, 0, 0, 0, 254, 0, 0, 1, 0) + BAD_ATTR)),
    lambda: conntrack.parse_flow(message(0x100, codec.NFGEN.pack(2, 0, 0) + BAD_ATTR)),
    lambda: conntrack.parse_flow(message(0x100, codec.NFGEN.pack(2, 0, 0) + codec.attr(1, BAD_ATTR))),
    lambda: conntrack.mark_and_reply_source(codec.NFGEN.pack(2, 0, 0) + BAD_ATTR),
    lambda: conntrack.parse_listener(message(20, b"\0" * 40), "tcp", conntrack.TCP_LISTEN),
    lambda: events.parse_event(message(routing.RTM_NEWLINK, b"\0" * 4)),
    lambda: events.parse_event(message(routing.RTM_NEWROUTE, routing.RTMSG.pack(2, 0, 0, 0, 254, 3, 0, 1, 0) + BAD_ATTR)),
    lambda: events.parse_event(message(events.RTM_NEWNETCONF, b"\2\0\0\0" + BAD_ATTR)),
    lambda: events.parse_event(message(events.NFNL_SUBSYS_NFTABLES << 8 | 2, codec.NFGEN.pack(1, 0, 0) + BAD_ATTR)),
], ids=["ifinfo", "link-attr", "mtu", "addr-attr", "addr-3-bytes", "route-attr", "nexthop-zero", "nexthop-oversized",
        "rule-attr", "ct-attr", "ct-nested", "ct-tally", "diag-short", "event-link", "event-route", "event-netconf",
        "event-nft"])
def test_malformed_messages_raise_in_every_parser(parse):
    with pytest.raises(codec.Malformed):
        parse()


class Datagrams:
    """A socket whose recv hands out the datagrams given, then would block."""

    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0)

    def send(self, data: bytes) -> int:
        return len(data)

    sendall = send


def fake_socket(*datagrams: bytes) -> transport.Socket:
    sock = object.__new__(transport.Socket)
    sock._sock, sock._seq, sock._abandoned, sock._protocol = Datagrams(*datagrams), 0, False, 0  # type: ignore[assignment]
    return sock


@pytest.mark.parametrize("bad", [codec.HEADER.pack(0, 16, 0, 1, 0), codec.HEADER.pack(400, 16, 0, 1, 0) + b"\0" * 16],
                         ids=["zero", "oversized"])
def test_every_receive_path_refuses_a_malformed_header(bad):
    with pytest.raises(codec.Malformed):
        fake_socket(bad).dump(16, b"")
    with pytest.raises(codec.Malformed):
        fake_socket(bad).batch([(16, 0, b"")])
    with pytest.raises(codec.Malformed):  # an error message too short for its errno
        fake_socket(codec.HEADER.pack(18, 2, 0, 1, 0) + b"\0\0").batch([(16, 0, b"")])
    # events: the datagram is dropped and the caller told to look again; what follows is read
    good = codec.HEADER.pack(24, routing.RTM_NEWADDR, 0, 0, 0) + routing.IFADDR.pack(2, 24, 0, 0, 4)
    assert [m.kind for m in fake_socket(bad, good).events()] == [0, routing.RTM_NEWADDR]


def test_a_monitor_turns_an_unparsable_event_into_a_look_again():
    monitor = object.__new__(events.Monitor)
    monitor.route = fake_socket(codec.HEADER.pack(20, routing.RTM_NEWLINK, 0, 0, 0) + b"\0" * 4)
    monitor.nft = fake_socket()
    assert monitor.events() == [events.Event("lost")]


def test_dumps_still_read_real_datagrams_to_their_end():
    data = received("links")
    sock = fake_socket(*data)
    seq = codec.HEADER.unpack_from(data[0])[3]
    sock._seq = seq - 1
    assert len(sock.dump(routing.RTM_GETLINK, b"")) == 3


# --- pyroute2 stays out of nswrap ------------------------------------------------------------


def test_nswrap_never_imports_pyroute2():
    code = ("import sys\nimport nswrap.netlink, nswrap.cli, nswrap.instance, nswrap.commands, nswrap.doctor, nswrap.follow, "
            "nswrap.facts, nswrap.transaction, nswrap.changes, nswrap.precheck, nswrap.readiness\n"
            "assert not [m for m in sys.modules if m.startswith('pyroute2')]")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    sources = pathlib.Path(__file__).parents[2] / "nswrap"
    assert not [p for p in sources.rglob("*.py") if "pyroute2" in p.read_text() and "import pyroute2" in p.read_text()]
