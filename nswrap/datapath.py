"""Pure: the datapath every nswrap instance of a network namespace shares, as data.

    datapath(facts, allocation, instances) -> Datapath

computes, from the host (facts), what the shared part already uses (allocation: the uplinks'
marks and routing tables, the rule priorities, the sysctls nswrap changed and their original
values) and the live instances, everything the kernel must hold: routing rules, the uplinks'
routing tables, the sysctls, and the contents of the one nftables table (ruleset.py renders it).

The packet path (docs/design.md):
  in:   uplink k --(dnat: published (uplink, [address,] proto, port) -> server)--> first packet:
        ct mark := k; every packet: meta mark := k (strict rp_filter judges it by table k)
        --> "to <internal range> lookup main" --> the instance's veth --> the server
  out:  server --> veth --(meta mark := ct mark)--(fwmark k -> table k)--> uplink k, the source
        rewritten back to the address asked by conntrack.
Marks name uplinks, not instances: uplink k has one mark, one routing table and one rule per
family whatever the number of instances; an instance is a set of map elements. So the per-packet
cost does not grow with the number of instances.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from nswrap.config import DEFAULT_UDP_TIMEOUT, DatapathKind, Ipv6Forwarding, PortRange, UplinkSpec, valid_ifname
from nswrap.datatypes import datatype, field, replace
from nswrap.errors import NswrapError, UsageError, listed
from nswrap.facts import HOST_PREFIX, Facts, sysctl_key
from nswrap.objects import (
    FAMILIES,
    FR_ACT_UNREACHABLE,
    PROTO,
    RT_TABLE_MAIN,
    SCOPE_LINK,
    IPAddress,
    IPNetwork,
    Listener,
    Route,
    Rule,
)

POOL4 = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking range: rarely routed
POOL6 = ipaddress.IPv6Network("fd6e:7377:7261::/48")  # nswrap's ULA: one /64 per instance
FIRST_PRIORITY = 5000  # before Tailscale's 5210-5270, after Cilium's (docs/design.md)
FIRST_TABLE = 5000
PRIORITIES = 3  # "to internal lookup main", "to internal unreachable", the uplinks' fwmark rules
LOOPBACK4 = ipaddress.IPv4Address("127.0.0.1")

# How an instance's IPv6 is forwarded (chosen at start from --ipv6-forwarding, kept in its record):
# "interface" (force_forwarding, Linux >= 6.17), "global" (the switch nswrap holds while an
# instance needs it), "host" (the switch the host had on already), "fast" (none: the instance's
# published IPv6 flows take the tc-BPF fast path, which needs no forwarding; docs/fastpath.md)
Forwarding6Mode = Literal["interface", "global", "host", "fast"]


# --- inputs ----------------------------------------------------------------------------------


@datatype
class Instance:
    """A live instance, as its record says (state.py validates records before they get here)."""

    id: str
    ports: tuple[PortRange, ...]
    subnet: ipaddress.IPv4Network  # a /30: the host's end .1, the server .2
    subnet6: ipaddress.IPv6Network | None = None  # a /64 of POOL6, or None (no per-interface IPv6 forwarding)
    uplinks: tuple[UplinkSpec, ...] = ()  # () = every uplink
    addresses: tuple[IPAddress, ...] = ()  # () = every address of the host, and 127.0.0.1
    loopback_ports: tuple[PortRange, ...] = ()  # also published on 127.0.0.1 (decided at start)
    outbound: bool = True
    helpers: tuple[str, ...] = ()
    forwarding6: Forwarding6Mode = "interface"
    udp_timeout: int = DEFAULT_UDP_TIMEOUT  # --udp-timeout: the same for every live instance
    datapath: DatapathKind = "nft"  # --datapath bpf: published flows through the fast path too

    @property
    def veth(self) -> str:
        return HOST_PREFIX + self.id

    def subnet_of(self, version: int) -> IPNetwork | None:
        return self.subnet if version == 4 else self.subnet6

    def host_end(self, version: int) -> IPAddress:
        net = self.subnet_of(version)
        assert net is not None
        return net[1]

    def server(self, version: int) -> IPAddress | None:
        net = self.subnet_of(version)
        return net[2] if net is not None else None

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.subnet6 is not None else (4,)


@datatype
class Uplink:
    """An uplink of the shared datapath: its mark index (mark = index << the mask's shift) and table."""

    ifname: str
    index: int
    table: int


@datatype
class SysctlChange:
    key: str
    original: str  # what the host had before nswrap changed it: what is restored
    ours: str  # what nswrap set
    ifindex: int = 0  # the interface's index: a renamed interface keeps it (0: not known)

    # the key is always net/<family>/conf/<ifname>/<setting> (state.py refuses any other)
    @property
    def family(self) -> str:
        return self.key.split("/")[1]

    @property
    def ifname(self) -> str:
        return self.key.split("/")[3]

    @property
    def setting(self) -> str:
        return self.key.split("/")[4]

    def renamed(self, ifname: str) -> SysctlChange:
        parts = self.key.split("/")
        parts[3] = ifname
        return replace(self, key="/".join(parts))


@datatype
class Setting6:
    """An interface's IPv6 settings before nswrap held the global forwarding switch."""

    ifname: str
    ifindex: int
    forwarding: str
    accept_ra: str


@datatype
class Switch6:
    """nswrap holds net.ipv6.conf.all.forwarding (docs/design.md, "IPv6 forwarding before 6.17"):
    what every interface, and `default`, had before, so that all of it comes back. Writing
    `all.forwarding` rewrites every interface's `forwarding` and `default.forwarding`."""

    interfaces: tuple[Setting6, ...]
    default_forwarding: str = "0"
    default_accept_ra: str = "1"

    def before(self, ifname: str, ifindex: int) -> Setting6:
        """What an interface had, or would have had: one that came while nswrap held the switch
        took `default`'s values, which nswrap changed. Known by its index, so that one renamed
        meanwhile (`ip link set eth1 name wan1`) gets its own values back under its new name."""
        return next((s for s in self.interfaces if s.ifindex == ifindex),
                    Setting6(ifname, ifindex, self.default_forwarding, self.default_accept_ra))


@datatype
class Room:
    """An iptables ACCEPT nswrap inserted where another firewall would drop its flows."""

    binary: str  # iptables-nft / iptables-legacy
    chain: str
    rule: tuple[str, ...]


@datatype
class Allocation:
    """What the shared part uses; kept in the state directory (state.py) while an instance lives."""

    mark_mask: int
    priority: int
    uplinks: tuple[Uplink, ...] = ()
    sysctls: tuple[SysctlChange, ...] = ()
    rooms: tuple[Room, ...] = ()
    switch6: Switch6 | None = None  # nswrap holds the global IPv6 forwarding switch

    def mark(self, index: int) -> int:
        return mark_value(self.mark_mask, index)

    def uplink(self, ifname: str) -> Uplink | None:
        return next((u for u in self.uplinks if u.ifname == ifname), None)

    def changed(self, key: str) -> SysctlChange | None:
        return next((s for s in self.sysctls if s.key == key), None)


def mark_value(mask: int, index: int) -> int:
    """The index-th mark under a contiguous mask, computed (a 32-bit mask has 4e9 of them)."""
    shift = (mask & -mask).bit_length() - 1
    if not 1 <= index <= mask >> shift:
        raise NswrapError(f"mark mask {mask:#x} has no room for uplink number {index}; widen it with --mark-mask")
    return index << shift


def mark_capacity(mask: int) -> int:
    return mask >> ((mask & -mask).bit_length() - 1)


# --- outputs ---------------------------------------------------------------------------------


@datatype(order=True)
class Element:
    """One element of an nftables set or map, as the words nft reads (`key` . joined)."""

    key: tuple[str, ...]
    value: tuple[str, ...] = ()
    comment: str = ""


@datatype
class Datapath:
    allocation: Allocation
    rules: frozenset[Rule]
    routes: frozenset[Route]
    sysctls: dict[str, str]  # key -> the value nswrap needs
    elements: dict[str, frozenset[Element]]  # nft set or map name -> its elements
    warnings: tuple[str, ...] = ()
    hold6: bool = False  # an instance needs the global IPv6 forwarding switch that nswrap turns on
    udp_timeout: int = DEFAULT_UDP_TIMEOUT  # of the table's ct timeout objects (shared_udp_timeout)

    @property
    def marks(self) -> dict[str, int]:
        return {u.ifname: self.allocation.mark(u.index) for u in self.allocation.uplinks}


def topic(warning: str) -> str:
    """A datapath warning's words before its first colon: what it is about (its details, a count,
    may change while it lasts; follow.py says each topic once)."""
    return warning.partition(":")[0]


@datatype(frozen=False)
class _Builder:
    facts: Facts
    allocation: Allocation
    instances: tuple[Instance, ...]
    warnings: list[str] = field(default_factory=list)


# --- uplinks ---------------------------------------------------------------------------------


def candidate_uplinks(facts: Facts, version: int) -> list[str]:
    """Interfaces that serve clients of this family by default: those with a global address."""
    return [link.ifname for link in sorted(facts.links, key=lambda link: link.index)
            if link.ifname != "lo" and not link.ifname.startswith(HOST_PREFIX) and valid_ifname(link.ifname)
            and facts.global_addresses(link.ifname, version)]


def instance_uplinks(facts: Facts, instance: Instance, version: int) -> list[str]:
    """The uplinks an instance serves for a family: its --uplink list, or every candidate."""
    candidates = candidate_uplinks(facts, version)
    if not instance.uplinks:
        return candidates
    wanted = []
    for spec in instance.uplinks:
        if spec.ifname in candidates and spec.ifname not in wanted:
            wanted.append(spec.ifname)
    return wanted


def check_uplinks(facts: Facts, instance: Instance) -> None:
    """At start (not while following): every --uplink exists, has an address, and a gateway
    given for it is on its link."""
    for spec in instance.uplinks:
        if facts.link(spec.ifname) is None:
            candidates = list(dict.fromkeys(candidate_uplinks(facts, 4) + candidate_uplinks(facts, 6)))
            raise NswrapError(f"no such uplink: {spec.ifname} (interfaces with a global address here: "
                              f"{listed(candidates, 10) or 'none'})")
        if not any(facts.global_addresses(spec.ifname, v) for v in instance.families):
            raise NswrapError(f"uplink {spec.ifname} has no global address")
        if spec.gateway is not None and any(a.address.ip == spec.gateway for a in facts.addresses):
            raise NswrapError(f"uplink {spec}: {spec.gateway} is an address of this host, not a gateway: "
                              f"give the address of the router on {spec.ifname}'s link")
        if spec.gateway is not None:
            check_on_link(facts, spec.ifname, spec.gateway)
    if not any(instance_uplinks(facts, instance, v) for v in instance.families):
        raise NswrapError("no uplink found: no interface has a global address (give one with --uplink)")


LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")


def on_link(facts: Facts, ifname: str, gateway: IPAddress) -> bool:
    """Can a route `via GATEWAY dev IFNAME` reach it? IPv6 link-local gateways always can (the
    link is their zone); others if a subnet of the interface's addresses holds them, or a route
    of the main table says the link reaches them: a connected one (a /32's peer, a point-to-point
    default route) or one whose gateway it is, marked `onlink` (a VPS's /32 address)."""
    if gateway.version == 6 and gateway in LINK_LOCAL6:
        return True
    if any(gateway in a.address.network for a in facts.addresses if a.ifname == ifname and a.version == gateway.version):
        return True
    return any((r.gateway is None and gateway in r.dst) or (r.gateway == gateway and r.onlink)
               for r in facts.main_routes(ifname, gateway.version))


def check_on_link(facts: Facts, ifname: str, gateway: IPAddress) -> None:
    """A gateway that is not on the uplink's link would be installed `onlink` and answer no one
    (issue 25): refused, naming the interface whose subnet holds it (a container runtime that
    named its networks in another order), if any."""
    if on_link(facts, ifname, gateway):
        return
    owner = next((a.ifname for a in facts.addresses if a.version == gateway.version and a.ifname != ifname
                  and a.ifname != "lo" and gateway in a.address.network), None)
    if owner is not None:
        raise UsageError(f"uplink {ifname}={gateway}: {gateway} is on {owner}'s subnet, not {ifname}'s: "
                         f"--uplink {owner}={gateway}?")
    raise UsageError(f"uplink {ifname}={gateway}: {gateway} is not on {ifname}'s link (no subnet of its addresses "
                     f"holds it and no route in the main table says it is on-link): give a gateway on {ifname}'s subnet")


def absent_addresses(facts: Facts, instance: Instance) -> list[str]:
    """At start: the --address ones not on the host now (a floating address, say: served once it
    comes), as warnings."""
    here = {a.address.ip for a in facts.addresses}
    absent = [a for a in instance.addresses if not a.is_loopback and a not in here]
    if len(absent) > 1:  # one line, however many
        return [f"addresses {listed(absent)} are not on this host (yet): each is served once it is"]
    return [f"address {a} is not on this host (yet): it is served once it is" for a in absent]


def _gateways(instances: tuple[Instance, ...]) -> dict[tuple[str, int], IPAddress]:
    """Gateways given with --uplink IFACE=GATEWAY; two instances must not disagree."""
    given: dict[tuple[str, int], tuple[IPAddress, str]] = {}
    for instance in instances:
        for spec in instance.uplinks:
            if spec.gateway is None:
                continue
            key = (spec.ifname, spec.gateway.version)
            if key in given and given[key][0] != spec.gateway:
                raise NswrapError(f"uplink {spec.ifname}: gateway {spec.gateway} differs from {given[key][0]}, "
                                  f"which nswrap instance {given[key][1]} routes through")
            given[key] = (spec.gateway, instance.id)
    return {key: value[0] for key, value in given.items()}


def _given_gateway(instance: Instance, ifname: str, version: int) -> IPAddress | None:
    return next((spec.gateway for spec in instance.uplinks
                 if spec.ifname == ifname and spec.gateway is not None and spec.gateway.version == version), None)


def _host_default(facts: Facts, ifname: str, version: int) -> Route | None:
    """The uplink's default route in the main table (the lowest metric), if it has one."""
    return min((r for r in facts.main_routes(ifname, version) if r.is_default), key=lambda r: r.metric, default=None)


def _host_gateway(facts: Facts, ifname: str, version: int) -> IPAddress | None:
    default = _host_default(facts, ifname, version)
    return default.gateway if default else None


def gateway_conflict(facts: Facts, new: Instance, live: tuple[Instance, ...]) -> str | None:
    """At start: an uplink's routing table is shared, so every instance that serves through it
    must agree on its gateway, whether given with --uplink IFACE=GATEWAY or the host's default.
    (An uplink without a default route of the host's takes the one given, with no conflict.)"""
    for other in live:
        for version in set(new.families) & set(other.families):
            shared = set(instance_uplinks(facts, new, version)) & set(instance_uplinks(facts, other, version))
            for ifname in sorted(shared):
                host = _host_gateway(facts, ifname, version)
                mine = _given_gateway(new, ifname, version) or host
                theirs = _given_gateway(other, ifname, version) or host
                if mine is None or theirs is None or mine == theirs:
                    continue
                if theirs == host:
                    return (f"uplink {ifname}: gateway {mine} differs from the host's {theirs}, "
                            f"which nswrap instance {other.id} routes through")
                return (f"uplink {ifname}: nswrap instance {other.id} routes through gateway {theirs}, not {mine}: "
                        f"give --uplink {ifname}={theirs}, or other uplinks")
    return None


def shared_udp_timeout(instances: tuple[Instance, ...]) -> int:
    """The `replied` timeout of the table's UDP ct timeout objects. nft 1.0.6 has no map of ct
    timeout objects (`type ipv4_addr : ct timeout` is a syntax error, its JSON an "invalid map
    type"), so the value is one per host, which udp_timeout_conflict makes every live instance
    agree on; the longest, should records ever disagree."""
    return max((i.udp_timeout for i in instances), default=DEFAULT_UDP_TIMEOUT)


def udp_timeout_conflict(new: Instance, live: tuple[Instance, ...]) -> str | None:
    """At start: the conntrack timeouts are shared by every instance of the host (above)."""
    other = next((i for i in live if i.udp_timeout != new.udp_timeout), None)
    if other is None:
        return None
    return (f"--udp-timeout {new.udp_timeout} differs from {other.udp_timeout}, which nswrap instance {other.id} uses "
            f"(conntrack timeouts are shared by every instance on this host): give --udp-timeout {other.udp_timeout}")


def _allocate_uplinks(b: _Builder, wanted: list[str]) -> tuple[Uplink, ...]:
    """Uplinks kept keep their index and table (their flows stay routed); new ones get free ones."""
    kept = [u for u in b.allocation.uplinks if u.ifname in wanted]
    used_indexes = {u.index for u in kept}
    ours = {u.table for u in b.allocation.uplinks}
    taken_tables = {r.table for r in b.facts.routes} | {r.table for r in b.facts.rules}
    taken_tables = (taken_tables - ours) | {u.table for u in kept}
    out = list(kept)
    for name in wanted:
        if any(u.ifname == name for u in out):
            continue
        index = next(i for i in range(1, len(out) + 2) if i not in used_indexes)
        mark_value(b.allocation.mark_mask, index)  # refuses when the mask is full
        table = next(t for t in range(FIRST_TABLE, FIRST_TABLE + 1_000_000) if t not in taken_tables)
        used_indexes.add(index)
        taken_tables.add(table)
        out.append(Uplink(name, index, table))
    return tuple(sorted(out, key=lambda u: u.index))


def _uplink_routes(b: _Builder, uplink: Uplink, version: int, gateway: IPAddress | None) -> list[Route]:
    """Table k, for one family: the uplink's default route and its other main-table routes.
    IPv6 routes are written as the kernel keeps them (metric 1024, scope universe), so that
    what nswrap wants and what it reads back compare equal."""
    main = b.facts.main_routes(uplink.ifname, version)
    default = _host_default(b.facts, uplink.ifname, version)
    anywhere = FAMILIES[version].anywhere
    metric = 1024 if version == 6 else 0
    routes = []
    if gateway is not None:  # given with --uplink: on the link even outside its subnets where a route of
        # the main table says so (a /32); check_on_link refused every other one at start
        onlink = version == 4 and not any(gateway in a.address.network for a in b.facts.addresses if a.version == 4)
        routes.append(Route(anywhere, uplink.ifname, gateway, uplink.table, metric=metric, onlink=onlink))
    elif default and default.gateway:  # IPv6: often link-local (fe80::1), hence the device
        routes.append(Route(anywhere, uplink.ifname, default.gateway, uplink.table, metric=metric, onlink=default.onlink))
    elif default:  # a point-to-point link
        routes.append(Route(anywhere, uplink.ifname, table=uplink.table, scope=SCOPE_LINK if version == 4 else 0, metric=metric))
    else:
        family = "" if version == 4 else "IPv6 "
        b.warnings.append(f"uplink {uplink.ifname} has no {family}gateway: it serves only {family}clients on its own "
                          f"subnets (give one with --uplink {uplink.ifname}=GATEWAY to serve the others)")
    seen = set()
    for r in main:
        if not r.is_default and r.dst not in seen:
            seen.add(r.dst)
            routes.append(Route(r.dst, uplink.ifname, r.gateway, uplink.table, r.scope if version == 4 else 0,
                                r.prefsrc, metric, onlink=r.onlink))
    return routes


# --- rules -----------------------------------------------------------------------------------


def internal_ranges(instances: tuple[Instance, ...]) -> dict[int, list[IPNetwork]]:
    """Where the servers are: nswrap's pools, and any --subnet outside them."""
    ranges: dict[int, list[IPNetwork]] = {4: [POOL4], 6: [POOL6]}
    for instance in instances:
        if not instance.subnet.subnet_of(POOL4) and instance.subnet not in ranges[4]:
            ranges[4].append(instance.subnet)
    return ranges


def _rules(b: _Builder, uplinks: tuple[Uplink, ...], families: dict[str, tuple[int, ...]]) -> set[Rule]:
    """A DNATed packet carries its uplink's mark for rp_filter's sake, yet must reach the server:
    the internal ranges are looked up in main first (without its default route), and are
    unreachable otherwise (a dead server's flows never leak to a gateway). Then one fwmark rule
    per uplink and family."""
    p, mask = b.allocation.priority, b.allocation.mark_mask
    rules = set()
    for version, ranges in internal_ranges(b.instances).items():
        if version == 6 and not any(i.subnet6 for i in b.instances):
            continue
        for net in ranges:
            rules.add(Rule(version, p, RT_TABLE_MAIN, dst=net, suppress_prefixlength=0))
            rules.add(Rule(version, p + 1, dst=net, action=FR_ACT_UNREACHABLE))
    for u in uplinks:
        for version in families[u.ifname]:
            rules.add(Rule(version, p + 2, u.table, b.allocation.mark(u.index), mask))
    return rules


def check_marks(facts: Facts, allocation: Allocation) -> None:
    """Marks are shared property: refuse if another tool's rule needs a value under our mask."""
    ours = range(allocation.priority, allocation.priority + PRIORITIES)
    for r in facts.rules:
        if r.proto == PROTO and r.priority in ours:
            continue
        # a value with our bits, or a partial mask that looks at them (`fwmark 0x0/0x10000000`
        # picks the packets without one); a whole-value match (`fwmark 0x1`) is another tool's
        # own value, as iptables' `--mark 0x1` is (firewall.py)
        if r.fwmark & allocation.mark_mask or (r.fwmask != 0xFFFFFFFF and r.fwmask & allocation.mark_mask):
            command = "ip rule" if r.version == 4 else "ip -6 rule"
            raise NswrapError(f"fwmark bits {allocation.mark_mask:#010x} are already used by {command} {r.priority} "
                              f"(fwmark {r.fwmark:#x}/{r.fwmask:#x} lookup {r.table}); choose others with --mark-mask")


def free_priority(facts: Facts) -> int:
    taken = {r.priority for r in facts.rules}
    for p in range(FIRST_PRIORITY, 32000):
        if not any(p + i in taken for i in range(PRIORITIES)):
            return p
    raise NswrapError(f"no {PRIORITIES} free rule priorities above {FIRST_PRIORITY}")


# --- sysctls ---------------------------------------------------------------------------------


def interface_forwarding6(instances: tuple[Instance, ...]) -> bool:
    return any(6 in i.families and i.forwarding6 == "interface" for i in instances)


def wants_switch6(instances: tuple[Instance, ...]) -> bool:
    return any(6 in i.families and i.forwarding6 == "global" for i in instances)


def _effective(facts: Facts, version: int, ifname: str, setting: str) -> str | None:
    """The value that decides for this interface: some settings are the OR of all and the device."""
    own = facts.sysctl(sysctl_key(version, ifname, setting))
    if version == 4 and setting == "src_valid_mark" and facts.sysctl("net/ipv4/conf/all/src_valid_mark") == "1":
        return "1"
    if version == 6 and setting == "force_forwarding" and facts.sysctl("net/ipv6/conf/all/forwarding") == "1":
        return "1"
    return own


def _sysctls(b: _Builder, uplinks: tuple[Uplink, ...], families: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Forwarding and src_valid_mark on the uplinks, forwarding on the interfaces of the default
    routes (replies to the servers' own connections come in there); only where the effective
    value is not already what is needed (a container started with those sysctls needs no write).
    IPv6: the per-interface force_forwarding (Linux >= 6.17), never the global switch."""
    wanted: dict[str, str] = {}

    def want(version: int, ifname: str, setting: str) -> None:
        key = sysctl_key(version, ifname, setting)
        ours = b.allocation.changed(key)
        if ours is not None or _effective(b.facts, version, ifname, setting) != "1":
            wanted[key] = "1"

    per_interface6 = interface_forwarding6(b.instances)  # else the global switch forwards IPv6
    for u in uplinks:
        for version in families[u.ifname]:
            if version == 4:
                want(4, u.ifname, "forwarding")
                want(4, u.ifname, "src_valid_mark")
            elif per_interface6:
                want(6, u.ifname, "force_forwarding")
    for instance in b.instances:  # set when the veth is made; put back if someone resets it
        if b.facts.sysctl(sysctl_key(4, instance.veth, "forwarding")) is not None:
            want(4, instance.veth, "forwarding")
        if (6 in instance.families and instance.forwarding6 == "interface"
                and b.facts.sysctl(sysctl_key(6, instance.veth, "force_forwarding")) is not None):
            want(6, instance.veth, "force_forwarding")
    if any(i.outbound for i in b.instances):
        for version in (4, 6):
            if version == 6 and not per_interface6:
                continue
            setting = "forwarding" if version == 4 else "force_forwarding"
            for r in b.facts.routes:
                if r.table == RT_TABLE_MAIN and r.is_default and r.version == version and r.dev and b.facts.link(r.dev):
                    want(version, r.dev, setting)
    return wanted


def router(facts: Facts, version: int, allocation: Allocation | None = None) -> bool:
    """Has the admin made the host a router (`ip_forward=1`, IPv6 `forwarding=1`)? Then it
    forwards whatever arrives: nswrap neither guards its uplinks nor turns their forwarding off.
    (The global IPv6 switch that nswrap holds is not the admin's.)"""
    if version == 6 and allocation is not None and allocation.switch6 is not None:
        return False
    return facts.sysctl(f"net/ipv{version}/conf/all/forwarding") == "1"


def guarded(allocation: Allocation, facts: Facts, version: int) -> list[str]:
    """Interfaces whose forwarding nswrap turned on: the host forwards nothing else arriving there."""
    setting = "forwarding" if version == 4 else "force_forwarding"
    names = []
    for change in allocation.sysctls:
        if change.family == f"ipv{version}" and change.setting == setting and change.original == "0":
            if router(facts, version, allocation):
                continue
            if not change.ifname.startswith(HOST_PREFIX):  # a veth's own forwarding is not the host's routing
                names.append(change.ifname)
    return sorted(set(names))


# --- nftables elements -----------------------------------------------------------------------


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _addresses(instance: Instance, version: int) -> list[IPAddress | None]:
    """The addresses an instance publishes on: its --address ones, or None for every one."""
    if instance.addresses:
        return [a for a in instance.addresses if a.version == version and not a.is_loopback]
    return [None]


def _publish(sets: dict[str, set[Element]], instance: Instance, version: int, ifname: str, address: IPAddress | None,
             ports: tuple[PortRange, ...]) -> None:
    """Elements for (ifname, address, port): in the `keep`/`remap` maps for one address, in the
    `any`/`anyremap` maps (no address in the key) for every address of the host, which the
    first packet's `fib daddr type local` decides: no element to change as addresses come and go."""
    server = str(instance.server(version))
    where = (f'"{ifname}"',) if address is None else (f'"{ifname}"', str(address))
    keep, remap = (f"any{version}", f"anyremap{version}") if address is None else (f"keep{version}", f"remap{version}")
    for p in ports:
        if not p.remapped:
            sets[keep].add(Element((*where, p.proto, _span(p.outer_lo, p.outer_hi)), (server,), instance.id))
        else:
            for i in range(p.count):
                sets[remap].add(Element((*where, p.proto, str(p.outer_lo + i)), (server, str(p.inner_lo + i)), instance.id))


def _merged(ports: list[PortRange]) -> list[tuple[str, int, int]]:
    """(proto, lo, hi) covering every port once: an interval set refuses overlapping elements."""
    spans: list[tuple[str, int, int]] = []
    for proto, lo, hi in sorted((p.proto, p.outer_lo, p.outer_hi) for p in ports):
        if spans and spans[-1][0] == proto and lo <= spans[-1][2] + 1:
            spans[-1] = (proto, spans[-1][1], max(hi, spans[-1][2]))
        else:
            spans.append((proto, lo, hi))
    return spans


ELEMENT_SETS = ("ports", "keep4", "remap4", "keep6", "remap6", "any4", "anyremap4", "any6", "anyremap6", "servers4",
                "servers6", "tftp4", "tftp6", "closed", "stub4", "uplink_new", "uplink_flow", "guarded4", "guarded6",
                "sources4", "sources6", "egress", "held", "routed6")


def _elements(b: _Builder, uplinks: tuple[Uplink, ...], families: dict[str, tuple[int, ...]]) -> dict[str, frozenset[Element]]:
    sets: dict[str, set[Element]] = {name: set() for name in ELEMENT_SETS}
    for instance in b.instances:
        for version in instance.families:
            addresses = _addresses(instance, version)
            for ifname in instance_uplinks(b.facts, instance, version):
                if version in families.get(ifname, ()):
                    for address in addresses:
                        _publish(sets, instance, version, ifname, address, instance.ports)
            # the host itself: its own addresses (and 127.0.0.1) are routed through lo
            for address in addresses:
                _publish(sets, instance, version, "lo", address, instance.ports)
            if version == 4 and instance.loopback_ports:
                _publish(sets, instance, 4, "lo", LOOPBACK4, instance.loopback_ports)
            if "tftp" in instance.helpers:
                for p in instance.ports:
                    if p.proto == "udp" and p.outer_lo <= 69 <= p.outer_hi:
                        inner = str(p.inner_lo + 69 - p.outer_lo)
                        sets[f"tftp{version}"].add(Element((str(instance.server(version)), inner), (), instance.id))
        if not instance.outbound:
            sets["closed"].add(Element((f'"{instance.veth}"',), (), instance.id))
        for version in instance.families:
            sets[f"sources{version}"].add(Element((f'"{instance.veth}"', str(instance.server(version))), (), instance.id))
    published = [p for i in b.instances for p in (*i.ports, *i.loopback_ports)]
    sets["ports"] = {Element((proto, _span(lo, hi))) for proto, lo, hi in _merged(published)}
    for version, ranges in internal_ranges(b.instances).items():
        sets[f"servers{version}"] = {Element((str(net),)) for net in ranges}
    if b.facts.resolver_stub is not None:
        stub = str(b.facts.resolver_stub)
        sets["stub4"] = {Element((proto, "53"), (stub, "53")) for proto in ("udp", "tcp")}
    for u in uplinks:
        sets["uplink_new"].add(Element((f'"{u.ifname}"',), (f"goto new_{u.index}",)))
        sets["uplink_flow"].add(Element((f"{b.allocation.mark(u.index):#010x}",), (f"goto flow_{u.index}",)))
        sets["egress"].add(Element((f"{b.allocation.mark(u.index):#010x}", f'"{u.ifname}"')))
    for version in (4, 6):
        sets[f"guarded{version}"] = {Element((f'"{name}"',)) for name in guarded(b.allocation, b.facts, version)}
    return {name: frozenset(items) for name, items in sets.items()}


def switch6_elements(facts: Facts, switch: Switch6 | None) -> dict[str, frozenset[Element]]:
    """While nswrap holds the global IPv6 switch, the guard drops IPv6 forwarded from any
    interface but those that forwarded before (force_forwarding=1 that is not nswrap's)."""
    if switch is None:
        return {"held": frozenset(), "routed6": frozenset()}
    routed = [link.ifname for link in facts.links if not link.ifname.startswith(HOST_PREFIX)
              and facts.sysctl(sysctl_key(6, link.ifname, "force_forwarding")) == "1"]
    return {"held": frozenset({Element(("ipv6",))}), "routed6": frozenset(Element((f'"{n}"',)) for n in routed)}


# --- the whole -------------------------------------------------------------------------------


def datapath(facts: Facts, allocation: Allocation, instances: tuple[Instance, ...]) -> Datapath:
    """Everything the kernel must hold for these instances. With no instances: nothing at all
    (the caller then removes the shared part and restores the sysctls)."""
    b = _Builder(facts, allocation, instances)
    if not instances:
        return Datapath(replace(allocation, uplinks=()), frozenset(), frozenset(), {}, {}, ())
    gateways = _gateways(instances)
    families: dict[str, tuple[int, ...]] = {}
    for instance in instances:
        for version in instance.families:
            for name in instance_uplinks(facts, instance, version):
                families[name] = tuple(sorted({*families.get(name, ()), version}))
    wanted = [name for name in candidate_uplinks(facts, 4) + candidate_uplinks(facts, 6) if name in families]
    wanted = list(dict.fromkeys(wanted))
    uplinks = _allocate_uplinks(b, wanted)
    b.allocation = replace(allocation, uplinks=uplinks)
    check_marks(facts, b.allocation)
    routes: set[Route] = set()
    for u in uplinks:
        for version in families[u.ifname]:
            routes.update(_uplink_routes(b, u, version, gateways.get((u.ifname, version))))
    return Datapath(
        allocation=b.allocation,
        rules=frozenset(_rules(b, uplinks, families)),
        routes=frozenset(routes),
        sysctls=_sysctls(b, uplinks, families),
        elements=_elements(b, uplinks, families),
        warnings=tuple(dict.fromkeys(b.warnings)),
        hold6=wants_switch6(instances),
        udp_timeout=shared_udp_timeout(instances),
    )


# --- allocation of an instance ----------------------------------------------------------------


NO_IPV6_OLD_KERNEL = ("IPv6 clients are not served: this kernel has no per-interface IPv6 forwarding (Linux >= 6.17) "
                      "and net.ipv6.conf.all.forwarding is off; --ipv6-forwarding global turns that switch on while "
                      "nswrap runs (router advertisements are kept, nothing else is forwarded)")


def describe_forwarding6(mode: Ipv6Forwarding, facts: Facts, allocation: Allocation | None,
                         datapath: DatapathKind = "nft") -> str:
    """`nswrap doctor`: which case this host is in, and what nswrap would change for IPv6."""
    chosen = choose_forwarding6(mode, facts, allocation)
    if chosen is None and mode != "off" and datapath == "bpf":
        return ("through the fast path (--datapath bpf), which needs no IPv6 forwarding: nswrap changes nothing "
                "for it (the server's own IPv6 connections out are not forwarded)")
    if chosen is None:
        return "off (--ipv6-forwarding off): IPv4 only" if mode == "off" else NO_IPV6_OLD_KERNEL
    if chosen == "interface":
        return "per interface (force_forwarding on the uplinks and nswrap's veths, Linux >= 6.17)"
    if chosen == "host":
        return "the host's own global switch (net.ipv6.conf.all.forwarding is on already): nswrap changes nothing for it"
    if allocation is not None and allocation.switch6 is not None:
        return ("the global switch, which nswrap holds now for its instances (net.ipv6.conf.all.forwarding=1, "
                "accept_ra=2 where it was 1; nothing else is forwarded)")
    if facts.sysctl("net/ipv6/conf/all/forwarding") == "1":
        return "the host's own global switch (net.ipv6.conf.all.forwarding is on already): nswrap changes nothing for it"
    return ("the global switch: nswrap turns net.ipv6.conf.all.forwarding on while it runs and restores it after "
            "(accept_ra=2 first where it is 1, so routes learned from router advertisements stay; nothing else is forwarded)")


def veth_forwarding6(facts: Facts, instance: Instance) -> bool:
    """Does the veth need its own force_forwarding (the instance forwards IPv6 per interface, and
    the global switch is off)?"""
    return 6 in instance.families and instance.forwarding6 == "interface" and facts.sysctl("net/ipv6/conf/all/forwarding") != "1"


def veth_mtu(facts: Facts) -> int:
    """The veth's MTU: the largest of the uplinks', so no answer is fragmented on the way out."""
    return max((link.mtu for link in facts.links if link.ifname != "lo" and not link.ifname.startswith(HOST_PREFIX)),
               default=1500)


def choose_forwarding6(mode: Ipv6Forwarding, facts: Facts, allocation: Allocation | None) -> Forwarding6Mode | None:
    """How a new instance's IPv6 is forwarded (Instance.forwarding6), or None: IPv4 only.
    `auto`: per interface where the kernel can; else the global switch if it is on already (if
    nswrap holds it, this instance holds it too, so that it stays on while it runs)."""
    if mode == "off":
        return None
    if mode == "global":
        return "global"
    if mode == "interface":
        if not facts.ipv6_per_interface:
            raise UsageError("--ipv6-forwarding interface: this kernel has no per-interface IPv6 forwarding "
                             "(force_forwarding, Linux >= 6.17); use --ipv6-forwarding global or auto")
        return "interface"
    if facts.ipv6_per_interface:
        return "interface"
    if facts.sysctl("net/ipv6/conf/all/forwarding") == "1":
        return "global" if allocation is not None and allocation.switch6 is not None else "host"
    return None


def ula_subnet(subnet: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    """The instance's IPv6 /64, in the same slot as its IPv4 /30."""
    slot = (int(subnet.network_address) >> 2) & 0xFFFF
    return ipaddress.IPv6Network((int(POOL6.network_address) | slot << 64, 64))


def allocate_subnet(facts: Facts, live: tuple[Instance, ...], wanted: ipaddress.IPv4Network | None) -> ipaddress.IPv4Network:
    used: list[ipaddress.IPv4Network] = [a.address.network for a in facts.addresses if a.version == 4]  # type: ignore[misc]
    used += [r.dst for r in facts.routes if r.dst.prefixlen > 0 and r.version == 4]  # type: ignore[misc]
    used += [i.subnet for i in live]
    slots = {ula_subnet(i.subnet) for i in live}
    if wanted is not None:
        clash = next((u for u in used if u.overlaps(wanted)), None)
        if clash:
            raise NswrapError(f"subnet {wanted} overlaps {clash}, already in use on this host; choose another --subnet")
        if ula_subnet(wanted) in slots:
            raise NswrapError(f"subnet {wanted} shares its IPv6 slot with a live instance; choose another --subnet")
        return wanted
    for candidate in POOL4.subnets(new_prefix=30):
        if not any(u.overlaps(candidate) for u in used) and ula_subnet(candidate) not in slots:
            return candidate
    raise NswrapError(f"no free /30 left in {POOL4}; give one with --subnet")


def conflicts(new: Instance, live: tuple[Instance, ...]) -> str | None:
    """A port another live instance already publishes on an address this one would use."""
    for other in live:
        shared = not new.addresses or not other.addresses or set(new.addresses) & set(other.addresses)
        if not shared:
            continue
        for p in (*new.ports, *new.loopback_ports):
            for q in (*other.ports, *other.loopback_ports):
                if p.overlaps(q):
                    return f"port {p} is already published by nswrap instance {other.id}"
    return None


def _publishes(ports: tuple[PortRange, ...], listener: Listener) -> bool:
    return any(p.proto == listener.proto and p.outer_lo <= listener.port <= p.outer_hi for p in ports)


def taken_over(facts: Facts, instance: Instance) -> list[Listener]:
    """The host's sockets whose clients this instance would take (issue 23): bound to a published
    protocol and port on an address it publishes on. A wildcard (0.0.0.0, or :: which takes IPv4
    too unless IPV6_V6ONLY) covers every address of its family, 127.0.0.1 included; without
    --address every address of the host is published (but a veth's of nswrap's); 127.0.0.1 only
    for `loopback_ports`, never another loopback address (systemd-resolved's 127.0.0.53). The
    sockets are few and a range may be 64k ports: each socket is tested against the ranges."""
    veths = {a.address.ip for a in facts.addresses if a.ifname.startswith(HOST_PREFIX)}

    def published(version: int) -> bool:  # does it publish on some address of this family?
        if version not in instance.families:
            return False
        return not instance.addresses or any(a.version == version and not a.is_loopback for a in instance.addresses)

    found = []
    for listener in facts.listeners:
        address = listener.address
        if address.is_unspecified:
            versions = (6,) if listener.v6only else (4, 6) if address.version == 6 else (4,)
            hit = (any(published(v) for v in versions) and _publishes(instance.ports, listener)
                   or 4 in versions and _publishes(instance.loopback_ports, listener))
        elif address == LOOPBACK4:
            hit = _publishes(instance.loopback_ports, listener)
        elif address.is_loopback or address in veths or not published(address.version):
            hit = False
        else:
            hit = (not instance.addresses or address in instance.addresses) and _publishes(instance.ports, listener)
        if hit:
            found.append(listener)
    return found
