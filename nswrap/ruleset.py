"""Pure: the one nftables table of nswrap (`inet nswrap`), rendered as nft text, chain by chain.

The base (chains, rules, empty sets and maps) is the same for every host; what varies lives in
elements (published ports, servers, uplinks' marks) and in two tiny chains per uplink. A packet
that belongs to no published flow leaves each hook after one or two cheap tests; the per-packet
cost never depends on the number of instances (docs/design.md, "The packet path").

`table_text` creates everything; `changes` turns one state into another (elements added and
deleted, uplink chains added and deleted) as one nft batch, applied atomically by nft.py.
"""

from __future__ import annotations

import zlib

from nswrap.config import DEFAULT_UDP_TIMEOUT
from nswrap.datapath import ELEMENT_SETS, Datapath, Element, mark_value
from nswrap.datatypes import sort_key

TABLE = "nswrap"  # inet nswrap: one per network namespace
LOOPBACK = {4: "127.0.0.0/8", 6: "::1"}
VERSION_SET = "version"

# name -> declaration; the order is the order nft creates them in
SETS = {
    "ports": "type inet_proto . inet_service; flags interval;",  # every published proto . port
    "keep4": "type ifname . ipv4_addr . inet_proto . inet_service : ipv4_addr; flags interval; counter;",
    "remap4": "type ifname . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; counter;",
    "keep6": "type ifname . ipv6_addr . inet_proto . inet_service : ipv6_addr; flags interval; counter;",
    "remap6": "type ifname . ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; counter;",
    # every address of the host (the first packet's fib lookup says which are its own)
    "any4": "type ifname . inet_proto . inet_service : ipv4_addr; flags interval; counter;",
    "anyremap4": "type ifname . inet_proto . inet_service : ipv4_addr . inet_service; counter;",
    "any6": "type ifname . inet_proto . inet_service : ipv6_addr; flags interval; counter;",
    "anyremap6": "type ifname . inet_proto . inet_service : ipv6_addr . inet_service; counter;",
    "servers4": "type ipv4_addr; flags interval;",  # where servers live: nswrap's pools (and --subnet)
    "servers6": "type ipv6_addr; flags interval;",
    "tftp4": "type ipv4_addr . inet_service;",  # servers with the tftp helper (address . port)
    "tftp6": "type ipv6_addr . inet_service;",
    "closed": "type ifname;",  # veths of --no-outbound instances
    "stub4": "type inet_proto . inet_service : ipv4_addr . inet_service;",  # the host's loopback resolver
    "uplink_new": "type ifname : verdict;",  # uplink -> goto new_<k>: mark a new published flow
    "uplink_flow": "type mark : verdict;",  # ct mark -> goto flow_<k>: mark each packet of one
    "guarded4": "type ifname;",  # forwarding turned on by nswrap: route nothing else arriving here
    "guarded6": "type ifname;",
    "sources4": "type ifname . ipv4_addr;",  # veth . its server's address: the only source it may send from
    "sources6": "type ifname . ipv6_addr;",
    "egress": "type mark . ifname;",  # an uplink's mark . the uplink: where its flows' replies may leave
    "held": "type nf_proto;",  # families whose global forwarding switch nswrap holds (IPv6 before 6.17)
    "routed6": "type ifname;",  # interfaces that forwarded IPv6 before nswrap held the switch
}
# not elements nswrap computes: what the kernel counts (per veth, the packets of forged sources
# dropped), and one counter (replies that no route of their uplink could take)
DYNAMIC = {"forged": "type ifname; size 65536; flags dynamic; counter;"}
COUNTERS = ("misrouted",)
assert set(SETS) == set(ELEMENT_SETS)


def timeouts(udp_timeout: int = DEFAULT_UDP_TIMEOUT) -> dict[str, str]:
    """The conntrack timeouts of published flows: an unanswered (or answered within 2 s, as a DNS
    query is) UDP flow is forgotten after 10 s instead of 30, an answered one `udp_timeout` s after
    its last packet instead of 120 (a spoofed flood the server answers would otherwise pin the
    table: the kernel's UDP `stream` state uses `replied`), half-open TCP after 10 s instead of
    60-120; so a flood of new flows drains from the conntrack table quickly once it stops
    (docs/design.md, "Floods"). Established TCP keeps the kernel's: spoofed sources never get there."""
    return {"udp": f"unreplied : 10, replied : {udp_timeout}", "tcp": "syn_sent : 10, syn_recv : 10"}


def _objects(udp_timeout: int = DEFAULT_UDP_TIMEOUT) -> list[str]:
    out = []
    for version, l3 in ((4, "ip"), (6, "ip6")):
        for proto, policy in timeouts(udp_timeout).items():
            out += [f"\tct timeout {proto}{version} {{", f"\t\tprotocol {proto}", f"\t\tl3proto {l3}",
                    f"\t\tpolicy = {{ {policy} }}", "\t}"]
        out += [f"\tct helper tftp{version} {{", '\t\ttype "tftp" protocol udp', f"\t\tl3proto {l3}", "\t}"]
    return out


Chain = tuple[str, "str | None", list[str]]  # name, "type ... hook ... priority ..." (base chains), rules


def _chain(name: str, hook: str | None, rules: list[str]) -> list[Chain]:
    return [(name, hook, rules)]


def _render(chain: Chain) -> list[str]:
    name, hook, rules = chain
    head = [f"\t\ttype {hook}; policy accept;"] if hook else []
    return [f"\tchain {name} {{", *head, *(f"\t\t{r}" for r in rules), "\t}"]


def _sources() -> list[Chain]:
    """prerouting, before conntrack: a server sends from its own address only, whatever
    rp_filter says (IPv6 has none), so that a forged packet never reaches conntrack, where it
    would pass as another flow's reply (another instance's, say), nor leaves the host. From a
    link-local (or unspecified) source only neighbour solicitations and advertisements and MLD
    reports pass, to the link: never a router advertisement or a redirect, which would make the
    host route through the server (a hostile review did it: docs/design.md)."""
    return [
        *_chain("sources", "filter hook prerouting priority raw", ['iifname "nsw-*" goto from_veth']),
        *_chain("from_veth", None, [
            "iifname . ip saddr @sources4 accept",
            "iifname . ip6 saddr @sources6 accept",
            "ip6 saddr { ::, fe80::/10 } ip6 daddr { fe80::/10, ff02::/16 } icmpv6 type { nd-neighbor-solicit, "
            "nd-neighbor-advert, mld-listener-report, mld2-listener-report, mld-listener-done } accept",
            "update @forged { iifname } drop",
        ]),
    ]


def _remember(mask: int) -> list[Chain]:
    """prerouting, after DNAT: every packet of a published flow gets its uplink's mark (one map
    lookup); the first packet of one records the uplink in the ct mark."""
    return [
        *_chain("remember", "filter hook prerouting priority dstnat + 1", [
            f"ct mark & {mask:#010x} vmap @uplink_flow",
            # --no-outbound: nothing reaches the host from such a server but the resolver stub's
            # DNAT, whatever conntrack makes of a packet (an INVALID one, a SYN|ACK to nobody);
            # DNATed flows to other servers end in from_server
            'iifname "nsw-*" iifname @closed ct status dnat accept',
            'iifname "nsw-*" iifname @closed drop',
            "ct state != new accept",
            "ct status dnat goto first",
            # route_localnet on our veths lets a server reach the host's loopback resolver (DNATed):
            # nothing else on the host's loopback
            'iifname "nsw-*" ip daddr 127.0.0.0/8 drop',
        ]),
        *_chain("first", None, ["ip daddr @servers4 goto first4", "ip6 daddr @servers6 goto first6"]),
    ]


def _first(version: int) -> list[Chain]:
    ip = "ip" if version == 4 else "ip6"
    return _chain(f"first{version}", None, [
        f'ct timeout set meta l4proto map {{ udp : "udp{version}", tcp : "tcp{version}" }}',
        f'{ip} daddr . udp dport @tftp{version} ct helper set "tftp{version}"',
        "iifname vmap @uplink_new",
    ])


def _publish() -> list[Chain]:
    """nat prerouting: the first packet of each flow. A published (uplink, [address,] proto, port)
    is DNATed to its server, keeping the port (keep) or remapping it (remap). Ordered for the
    usual case, a port published on every address: two fib lookups, then one map lookup."""
    out = _chain("publish", "nat hook prerouting priority dstnat", [
        'iifname "nsw-*" fib daddr type local meta l4proto { udp, tcp } dnat ip to meta l4proto . th dport map @stub4',
        "meta l4proto . th dport != @ports accept",
        # from outside, one of the host's own addresses as the source is a forgery: IPv4's routing
        # drops it as a martian after DNAT, IPv6 has no such check (nor rp_filter)
        'iifname != "lo" fib saddr type local accept',
        "meta nfproto vmap { ipv4 : goto publish4, ipv6 : goto publish6 }",
    ])
    for version, ip in ((4, "ip"), (6, "ip6")):
        specific = [f"dnat {ip} to iifname . {ip} daddr . meta l4proto . th dport map @{kind}{version}"
                    for kind in ("keep", "remap")]
        # a loopback or a veth's address is none of the host's to publish on every address
        out += _chain(f"publish{version}", None, [
            f"{ip} daddr != {LOOPBACK[version]} {ip} daddr != @servers{version} fib daddr type local "
            f"goto host{version}",
            *specific,  # an --address the host does not have (yet): routed through it
        ])
        out += _chain(f"host{version}", None, [
            *(f"dnat {ip} to iifname . meta l4proto . th dport map @{kind}{version}" for kind in ("any", "anyremap")),
            *specific,
        ])
    return out


def _publish_local() -> list[Chain]:
    """nat output: the host's own clients, whose packets to its addresses are routed through lo."""
    rules = ["meta l4proto . th dport != @ports accept"]
    for version, ip in ((4, "ip"), (6, "ip6")):
        for kind in ("keep", "remap"):
            rules.append(f"dnat {ip} to oifname . {ip} daddr . meta l4proto . th dport map @{kind}{version}")
        for kind in ("any", "anyremap"):  # routed through lo: one of the host's own addresses
            rules.append(f"{ip} daddr != {LOOPBACK[version]} {ip} daddr != @servers{version} "
                         f"dnat {ip} to oifname . meta l4proto . th dport map @{kind}{version}")
    return _chain("publish_local", "nat hook output priority -100", rules)


def _outbound() -> list[Chain]:
    """nat postrouting: a loopback client cannot leave through a veth as 127.0.0.1; the servers'
    own connections leave as the host."""
    return _chain("outbound", "nat hook postrouting priority srcnat", [
        'ip saddr 127.0.0.0/8 oifname "nsw-*" masquerade',
        'ip saddr @servers4 oifname != "nsw-*" masquerade',
        'ip6 saddr @servers6 oifname != "nsw-*" masquerade',
    ])


def _guard(mask: int) -> list[Chain]:
    """forward: only published flows (and answers to the servers' own) cross a veth; our mark
    bits are cleared once routing is done, both ways (the kernel would zero them as a packet
    enters the server's namespace, but a later chain, postrouting or `tc` on the veth of the
    host would see them: docs/design.md); interfaces whose forwarding nswrap turned on forward
    nothing else. A packet of a published flow is judged by the interface it crosses, never by
    its conntrack entry alone: conntrack matches a reply by addresses and ports, so a LAN peer
    that forges a server's address would otherwise pass as its reply (docs/design.md)."""
    keep = 0xFFFFFFFF & ~mask
    clear = f"meta mark set meta mark & {keep:#010x}"
    return [
        *_chain("guard", "filter hook forward priority filter", [
            'oifname "nsw-*" goto into_server',
            'iifname "nsw-*" goto from_server',
            # a flow published through an uplink always crosses a veth: one that does not is a
            # forgery of its reply (a LAN peer posing as the server), on any host, router or not
            f"ct mark & {mask:#010x} != 0 drop",
            "iifname @guarded4 meta nfproto ipv4 drop",
            "iifname @guarded6 meta nfproto ipv6 drop",
            # the global IPv6 switch nswrap holds forwards nothing the host did not forward before
            "meta nfproto @held iifname != @routed6 drop",
        ]),
        *_chain("into_server", None, [
            clear,
            "ct direction original ct status dnat accept",  # a published flow (its answers leave the server)
            # answers: to the server's own connections out of the host (masqueraded), or from another
            # server (through the host's address, DNATed): never an unNATed flow's "answer" arriving
            # from outside, which conntrack would take from anyone with the right addresses (a LAN peer
            # forging the host's address as the source of a server's connection to it)
            "ct direction reply ct status snat accept",
            'ct direction reply ct status dnat iifname "nsw-*" accept',
            "ct state related accept",
            "drop",
        ]),
        *_chain("from_server", None, [
            # a reply leaves through its flow's uplink or not at all (an uplink without a gateway
            # has no route for an off-subnet client: main's default would take it elsewhere)
            f"ct direction reply meta mark & {mask:#010x} != 0 meta mark & {mask:#010x} . oifname != @egress "
            'counter name "misrouted" drop',
            clear,
            "ct direction reply accept",
            "ct status expected accept",
            "ct state related accept",
            "iifname @closed drop",
        ]),
    ]


def _local_out() -> list[Chain]:
    """output: the host's own processes reach a server only through published ports."""
    return [
        *_chain("local_out", "filter hook output priority filter", ['oifname "nsw-*" goto local_into_server']),
        *_chain("local_into_server", None, [
            "ct status dnat accept",
            "ct direction reply accept",
            "ct state related accept",
            "drop",
        ]),
    ]


def uplink_chains(mask: int, index: int) -> dict[str, list[str]]:
    """The two chains of uplink `index`: nft 1.0.6 cannot OR a map's value into the mark, so
    each uplink has constant rules (at most 15 with the default mask)."""
    mark, keep = mark_value(mask, index), 0xFFFFFFFF & ~mask
    set_mark = f"meta mark set meta mark & {keep:#010x} | {mark:#010x}"
    return {
        f"new_{index}": [f"ct mark set ct mark & {keep:#010x} | {mark:#010x}", set_mark],
        f"flow_{index}": [set_mark],
    }


def chains(mask: int) -> list[Chain]:
    return (_sources() + _remember(mask) + _first(4) + _first(6) + _publish() + _publish_local() + _outbound()
            + _guard(mask) + _local_out())


def base(mask: int, udp_timeout: int = DEFAULT_UDP_TIMEOUT) -> list[str]:
    out = [f"\t{'map' if ':' in decl else 'set'} {name} {{ {decl} }}" for name, decl in SETS.items()]
    out += [f"\tset {name} {{ {decl} }}" for name, decl in DYNAMIC.items()]
    out += [f"\tcounter {name} {{ }}" for name in COUNTERS]
    out.append(f"\tset {VERSION_SET} {{ type inet_service; }}")
    out += _objects(udp_timeout)
    for chain in chains(mask):
        out += _render(chain)
    return out


def version(mask: int, udp_timeout: int = DEFAULT_UDP_TIMEOUT) -> str:
    """Identifies the base: when nswrap's rules change (an upgrade), the table is rebuilt; so it
    is when the UDP timeout changes, which live instances never make it do (they agree on it:
    datapath.udp_timeout_conflict), only a start after every instance with another value died."""
    return f"{zlib.crc32(chr(10).join(base(mask, udp_timeout)).encode()):08x}"  # not a secret: a change detector


def element_text(e: Element) -> str:
    text = " . ".join(e.key)
    if e.comment:
        text += f' comment "{e.comment}"'
    if e.value:
        text += " : " + " . ".join(e.value)
    return text


def _elements(verb: str, name: str, elements: list[Element]) -> list[str]:
    if not elements:
        return []
    items = [element_text(e) if verb == "add" else " . ".join(e.key) for e in sorted(elements, key=sort_key(Element))]
    return [f"{verb} element inet {TABLE} {name} {{ {', '.join(items)} }}"]


def table_text(dp: Datapath) -> str:
    """The whole table, from nothing: `add table` first, so that a leftover is replaced whole."""
    mask = dp.allocation.mark_mask
    lines = [f"add table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{",
             '\tcomment "nswrap: the datapath its instances share in this network namespace (docs/design.md)"']
    lines += base(mask, dp.udp_timeout)
    for u in dp.allocation.uplinks:
        for name, rules in uplink_chains(mask, u.index).items():
            lines += _render((name, None, rules))
    lines.append("}")
    lines.append(f"add element inet {TABLE} {VERSION_SET} {{ 1 comment \"{version(mask, dp.udp_timeout)}\" }}")
    for name in SETS:
        lines += _elements("add", name, list(dp.elements.get(name, ())))
    return "\n".join(lines) + "\n"


def changes(have: dict[str, frozenset[Element]], have_chains: set[str], want: dict[str, frozenset[Element]],
            want_uplinks: list[int], mask: int) -> str:
    """One batch from one table content to another (elements, and the uplinks' chains); "" if
    they are the same. Chains come before the verdict elements that jump to them, and
    elements go before those that come (an interval set refuses overlapping ones)."""
    wanted_chains: dict[str, list[str]] = {}
    for index in want_uplinks:
        wanted_chains.update(uplink_chains(mask, index))
    lines: list[str] = []
    for name, rules in wanted_chains.items():
        if name not in have_chains:
            lines.append(f"add chain inet {TABLE} {name}")
            lines += [f"add rule inet {TABLE} {name} {rule}" for rule in rules]
    for name in SETS:
        lines += _elements("delete", name, list(have.get(name, frozenset()) - want.get(name, frozenset())))
    for name in SETS:
        lines += _elements("add", name, list(want.get(name, frozenset()) - have.get(name, frozenset())))
    for name in sorted(have_chains):
        if name.startswith(("new_", "flow_")) and name not in wanted_chains:
            lines.append(f"delete chain inet {TABLE} {name}")
    return "\n".join(lines) + "\n" if lines else ""


def uplink_indexes(chains: set[str]) -> list[int]:
    """The uplinks a table has chains for (new_<k>)."""
    return sorted(int(name[4:]) for name in chains if name.startswith("new_") and name[4:].isdigit())


def delete_text() -> str:
    return f"delete table inet {TABLE}\n"


def expected_chains(dp: Datapath) -> dict[str, int]:
    """chain -> number of rules, to tell an intact table from one someone flushed."""
    counts = {name: len(rules) for name, _, rules in chains(dp.allocation.mark_mask)}
    for u in dp.allocation.uplinks:
        for chain, rules in uplink_chains(dp.allocation.mark_mask, u.index).items():
            counts[chain] = len(rules)
    return counts
