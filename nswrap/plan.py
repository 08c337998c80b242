"""Pure: (Config, Facts, instance id) -> Plan. Every host change is decided here, before any is made.

The plan is data: a list of steps (each renders as the `ip`/`sysctl`/`nft` line a person would
type) and one nftables ruleset. `--dry-run` prints it; apply.py carries it out.

The datapath (see DESIGN.md):
  in:   uplink k --(mangle: ct mark := k, meta mark := k)--(dnat: -> server)--> veth --> server
  out:  server --> veth --(mangle: reply, meta mark := ct mark)--(ip rule fwmark k -> table k)-->
        uplink k, source rewritten back to the asked address by conntrack.
Source-based rules cannot work here: the reply's source is rewritten only in postrouting, after
the routing decision, so routing must key on the mark conntrack kept for the flow.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field

from nswrap import firewall
from nswrap.config import DEFAULT_POOL, Config, PortRange
from nswrap.errors import NswrapError
from nswrap.facts import RT_SCOPE_UNIVERSE, Facts

PROTO = 110  # rtnetlink protocol tag on every route and rule nswrap creates ("ip rule show proto 110")
FIRST_PRIORITY = 5000  # before Tailscale's 5210-5270, after Cilium's; see DESIGN.md
FIRST_TABLE = 5000
SCOPE_LINK = 253
HOST_PREFIX = "nsw-"  # host end of the veth: nsw-<id>
SERVER_IF = "eth0"  # server end, inside the server namespace
TABLE_PREFIX = "nswrap-"  # nftables table: nswrap-<id>


@dataclass(frozen=True)
class RouteSpec:
    table: int
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    dev: str
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    proto: int = PROTO


@dataclass(frozen=True)
class RuleSpec:
    priority: int
    fwmark: int
    fwmask: int
    table: int
    proto: int = PROTO
    family: int = 4


@dataclass(frozen=True)
class Sysctl:
    key: str  # relative to /proc/sys, e.g. "net/ipv4/conf/eth0/forwarding"
    value: str


@dataclass(frozen=True)
class UplinkPlan:
    ifname: str
    gateway: ipaddress.IPv4Address | None
    mark: int
    table: int
    routes: tuple[RouteSpec, ...]  # both families, in the same table number
    rules: tuple[RuleSpec, ...]  # one per family the uplink serves
    gateway6: ipaddress.IPv6Address | None = None

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(r.family for r in self.rules)

    @property
    def rule(self) -> RuleSpec:
        return self.rules[0]


@dataclass(frozen=True)
class Step:
    """One host change. `kind` selects how apply.py does and undoes it; `ns` where it happens."""

    kind: str  # netns | veth | addr | up | route | rule | sysctl | nft
    obj: object = None
    ns: str = "host"  # "host" or "server"
    why: str = ""  # a comment printed above the step in --dry-run


def host_end(subnet):
    """The host's end of the veth: the subnet's first address."""
    return ipaddress.ip_interface(f"{subnet[1]}/{subnet.prefixlen}")


def server_end(subnet):
    """The server's end of the veth: the subnet's second address."""
    return ipaddress.ip_interface(f"{subnet[2]}/{subnet.prefixlen}")


@dataclass(frozen=True)
class Plan:
    instance: str
    ports: tuple[PortRange, ...]
    uplinks: tuple[UplinkPlan, ...]
    subnet: ipaddress.IPv4Network
    mark_mask: int
    mtu: int
    warnings: tuple[str, ...] = ()
    sysctls: tuple[Sysctl, ...] = field(default=())
    unprivileged_ports: bool = False  # --user: the server may bind ports < 1024 without capabilities
    addresses: tuple[ipaddress.IPv4Address, ...] = ()  # publish only on these; () = every host address
    local_clients: bool = True  # the host itself reaches the server through its own addresses
    loopback_ports: tuple[PortRange, ...] = ()  # published on 127.0.0.1 too
    outbound: bool = True
    guarded: tuple[str, ...] = ()  # interfaces whose forwarding nswrap turns on: forward nothing else
    firewall: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (iptables binary, chain, rule)
    helpers: tuple[str, ...] = ()
    resolv_conf: str | None = None  # the server's own /etc/resolv.conf, when the host's is unusable there
    resolver_stub: ipaddress.IPv4Address | None = None  # the host's loopback resolver, reached via our veth
    subnet6: ipaddress.IPv6Network | None = None  # ULA /64 between host and server; None: IPv4 only
    guarded6: tuple[str, ...] = ()
    loopback_families: tuple[int, ...] = (4,)

    @property
    def host_if(self) -> str:
        return HOST_PREFIX + self.instance

    @property
    def netns_name(self) -> str:
        return TABLE_PREFIX + self.instance

    @property
    def nft_table(self) -> str:
        return TABLE_PREFIX + self.instance

    @property
    def host_addr(self) -> ipaddress.IPv4Interface:
        return host_end(self.subnet)

    @property
    def server_addr(self) -> ipaddress.IPv4Interface:
        return server_end(self.subnet)

    @property
    def host_addr6(self) -> ipaddress.IPv6Interface:
        return host_end(self.subnet6)

    @property
    def server_addr6(self) -> ipaddress.IPv6Interface:
        return server_end(self.subnet6)

    def steps(self) -> list[Step]:
        server_default = RouteSpec(0, ipaddress.IPv4Network("0.0.0.0/0"), SERVER_IF, self.host_addr.ip, proto=0)
        steps = [
            Step("netns", why="the server's namespace: only lo and one end of a veth pair"),
            Step("veth", (self.host_if, SERVER_IF, self.mtu)),
            Step("addr", (self.host_if, self.host_addr)),
            Step("up", self.host_if),
            Step("up", "lo", ns="server"),
            Step("addr", (SERVER_IF, self.server_addr), ns="server"),
            Step("up", SERVER_IF, ns="server"),
            Step("route", server_default, ns="server"),
        ]
        if self.subnet6:
            server_default6 = RouteSpec(0, ipaddress.IPv6Network("::/0"), SERVER_IF, self.host_addr6.ip, proto=0)
            steps += [
                Step("addr", (self.host_if, self.host_addr6), why="IPv6: a ULA /64 on the same veth"),
                Step("addr", (SERVER_IF, self.server_addr6), ns="server"),
                Step("route", server_default6, ns="server"),
            ]
        if self.unprivileged_ports:
            why = "--user: ports below 1024 are a per-namespace setting; no capability needed"
            steps.append(Step("sysctl", Sysctl("net/ipv4/ip_unprivileged_port_start", "0"), ns="server", why=why))
        for up in self.uplinks:
            why = f"uplink {up.ifname}: replies marked {up.mark:#x} leave through it, by table {up.table}"
            steps += [Step("route", r, why=why if i == 0 else "") for i, r in enumerate(up.routes)]
            steps += [Step("rule", rule) for rule in up.rules]
        for i, s in enumerate(self.sysctls):
            why = "per-interface forwarding; src_valid_mark lets strict rp_filter judge by the mark" if i == 0 else ""
            steps.append(Step("sysctl", s, why=why))
        for i, room in enumerate(self.firewall):
            why = "another firewall drops forwarded traffic: a narrow accept for this instance's veth" if i == 0 else ""
            steps.append(Step("iptables", room, why=why))
        steps.append(Step("nft", nft_ruleset(self), why="one table, applied atomically: marks, DNAT, exposure"))
        why = "forget flows that began before these rules: they would bypass the DNAT until they expire"
        steps.append(Step("flush", self.ports, why=why))
        return steps


def _ifname_for_sysctl(ifname: str) -> str:
    return ifname.replace(".", "/")  # sysctl(8) writes a VLAN's eth0.100 as eth0/100


def render(step: Step, plan: Plan) -> str:
    """The shell line(s) a person would type for `step`; `-v` logs these, `--dry-run` prints them."""
    prefix = f"ip -n {plan.netns_name} " if step.ns == "server" else "ip "
    obj = step.obj
    if step.kind == "netns":
        return f"ip netns add {plan.netns_name}  # nswrap keeps it anonymous, held by the server's processes"
    if step.kind == "veth":
        host, peer, mtu = obj
        return f"ip link add {host} mtu {mtu} type veth peer name {peer} mtu {mtu} netns {plan.netns_name}"
    if step.kind == "addr":
        ifname, address = obj
        return f"{prefix}addr add {address} dev {ifname}" + (" nodad" if address.version == 6 else "")
    if step.kind == "up":
        return f"{prefix}link set {obj} up"
    if step.kind == "route":
        return prefix + ("-6 " if obj.dst.version == 6 else "") + "route add " + route_args(obj)
    if step.kind == "rule":
        return f"ip {'-6 ' if obj.family == 6 else ''}rule add fwmark {obj.fwmark:#x}/{obj.fwmask:#x} lookup {obj.table} priority {obj.priority} protocol {obj.proto}"
    if step.kind == "sysctl":
        parts = obj.key.split("/")
        if len(parts) == 5 and parts[2] == "conf":
            parts[3] = _ifname_for_sysctl(parts[3])
        line = f"sysctl -w {'.'.join(parts)}={obj.value}"
        return f"ip netns exec {plan.netns_name} {line}" if step.ns == "server" else line
    if step.kind == "nft":
        return f"nft -f - <<'EOF'\n{obj}EOF"
    if step.kind == "iptables":
        binary, chain, rule = obj
        return f"{binary} -I {chain} {shlex.join(rule)}"
    if step.kind == "flush":
        return "\n".join(_conntrack_delete(p) for p in obj)
    raise ValueError(step.kind)


def _conntrack_delete(p: PortRange) -> str:
    if p.count == 1:
        return f"conntrack -D -p {p.proto} --orig-port-dst {p.outer_lo}"
    return f"for port in $(seq {p.outer_lo} {p.outer_hi}); do conntrack -D -p {p.proto} --orig-port-dst $port; done"


def route_args(r: RouteSpec) -> str:
    words = ["default" if r.dst.prefixlen == 0 else str(r.dst)]
    if r.gateway:
        words += ["via", str(r.gateway)]
    words += ["dev", r.dev]
    if r.scope == SCOPE_LINK:
        words += ["scope", "link"]
    if r.prefsrc:
        words += ["src", str(r.prefsrc)]
    if r.table:
        words += ["table", str(r.table)]
    if r.proto:
        words += ["proto", str(r.proto)]
    return " ".join(words)


def render_plan(plan: Plan) -> str:
    lines = [f"# nswrap instance {plan.instance}: ports {', '.join(map(str, plan.ports))}"]
    lines += [f"# warning: {w}" for w in plan.warnings]
    for step in plan.steps():
        if step.why:
            lines += ["", f"# {step.why}"]
        lines.append(render(step, plan))
    if plan.resolv_conf:
        lines += ["", "# the server's /etc/resolv.conf, bind-mounted in a private mount namespace:"]
        lines += [f"#   {line}" for line in plan.resolv_conf.splitlines()]
    return "\n".join(lines) + "\n"


# --- the nftables ruleset --------------------------------------------------------------------


def _elements(items) -> str:
    return "{ " + ", ".join(items) + " }"


def _port_elements(ports) -> list[str]:
    return [f"{p.proto} . {p.outer_lo}" + (f"-{p.outer_hi}" if p.count > 1 else "") for p in ports]


def _dnat(match: str, ports: tuple[PortRange, ...], to: str, set_name: str) -> list[str]:
    """DNAT rules for `ports` after `match`: remapped ports through the per-protocol maps, the
    others keeping their port. `set_name` is a set holding exactly `ports`; `to` is e.g.
    "ip to 198.18.0.2" or "ip6 to [fd6e:7377:7261::2]"."""
    rules = []
    for proto in ("udp", "tcp"):
        if any(p.proto == proto and p.remapped for p in ports):
            rules.append(f"{match} meta l4proto . th dport @{set_name} {proto} dport @{proto}_remap dnat {to} : {proto} dport map @{proto}_remap")
    if any(not p.remapped for p in ports):
        rules.append(f"{match} meta l4proto . th dport @{set_name} meta l4proto . th dport @unchanged dnat {to}")
    return rules


def _chain(name: str, hook: str, comment_and_rules: list[str]) -> list[str]:
    return ["", f"\tchain {name} {{", f"\t\t{hook}", *(f"\t\t{line}" for line in comment_and_rules), "\t}"]


IP = {4: "ip", 6: "ip6"}
NFPROTO = {4: "meta nfproto ipv4", 6: "meta nfproto ipv6"}
LOOPBACK = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}


def nft_ruleset(plan: Plan) -> str:
    mask, keep = plan.mark_mask, 0xFFFFFFFF & ~plan.mark_mask
    veth = f'"{plan.host_if}"'
    families = (4, 6) if plan.subnet6 else (4,)
    server = {4: f"{plan.server_addr.ip}"}
    if plan.subnet6:
        server[6] = f"[{plan.server_addr6.ip}]"
    uplinks = _elements(f'"{u.ifname}"' for u in plan.uplinks)

    def to_host(version: int) -> str | None:
        """Packets for the host's own addresses (or only --address ones) of this family."""
        if not plan.addresses:
            return f"{NFPROTO[version]} fib daddr type local"
        mine = [str(a) for a in plan.addresses if a.version == version and not a.is_loopback]
        return f"{NFPROTO[version]} {IP[version]} daddr {_elements(mine)}" if mine else None

    def set_mark(mark: int) -> str:
        return f"meta mark set meta mark & {keep:#010x} | {mark:#010x}"

    def has_mark(mark: int) -> str:
        return f"ct mark & {mask:#010x} == {mark:#010x}"

    out = [f"table inet {plan.nft_table} {{"]
    out.append(f"\tset published {{ type inet_proto . inet_service; flags interval; elements = {_elements(_port_elements(plan.ports))} }}")
    unchanged = [p for p in plan.ports if not p.remapped]
    if unchanged:
        out.append(f"\tset unchanged {{ type inet_proto . inet_service; flags interval; elements = {_elements(_port_elements(unchanged))} }}")
    for proto in ("udp", "tcp"):
        pairs = [f"{p.outer_lo + i} : {p.inner_lo + i}" for p in plan.ports if p.proto == proto and p.remapped for i in range(p.count)]
        if pairs:
            out.append(f"\tmap {proto}_remap {{ type inet_service : inet_service; elements = {_elements(pairs)} }}")
    if plan.loopback_ports:
        out.append(f"\tset loopback {{ type inet_proto . inet_service; flags interval; elements = {_elements(_port_elements(plan.loopback_ports))} }}")
    if "tftp" in plan.helpers:
        out.append('\tct helper tftp { type "tftp" protocol udp; l3proto ip; }')

    rules = []
    if "tftp" in plan.helpers and to_host(4):
        rules += ["# TFTP answers from a new port: conntrack's helper expects that flow and NATs it",
                  f'iifname {uplinks} {to_host(4)} udp dport 69 ct state new ct helper set "tftp"']
    rules += ["# a published flow remembers its uplink in the ct mark; the packet's mark lets strict",
              "# rp_filter (with src_valid_mark) check the client against that uplink's table"]
    for u in plan.uplinks:  # every packet: cheap matches first, the fib lookup last
        for version in u.families:
            if to_host(version):
                rules.append(f'iifname "{u.ifname}" meta l4proto . th dport @published {to_host(version)} counter {set_mark(u.mark)} '
                             f"ct mark set ct mark & {keep:#010x} | {u.mark:#010x}")
    rules.append("# replies from the server are routed by the uplink their flow came in on")
    rules += [f"iifname {veth} ct direction reply {has_mark(u.mark)} {set_mark(u.mark)}" for u in plan.uplinks]
    if "tftp" in plan.helpers:
        rules.append("# the helper's data flows inherit the ct mark: route them (and the client's acks) the same way")
        rules += [f"iifname {veth} ct status expected {has_mark(u.mark)} {set_mark(u.mark)}" for u in plan.uplinks]
        rules += [f'iifname "{u.ifname}" ct status expected {has_mark(u.mark)} {set_mark(u.mark)}' for u in plan.uplinks]
    out += _chain("remember_uplink", "type filter hook prerouting priority mangle; policy accept;", rules)

    publish = []
    for version in families:
        if to_host(version):
            publish += _dnat(f"iifname {uplinks} {to_host(version)}", plan.ports, f"{IP[version]} to {server[version]}", "published")
    if plan.resolver_stub:
        publish += ["# the server's resolv.conf names the host's end of the veth: on to the host's own resolver",
                    f"iifname {veth} ip daddr {plan.host_addr.ip} meta l4proto {{ udp, tcp }} th dport 53 dnat ip to {plan.resolver_stub}"]
    out += _chain("publish", "type nat hook prerouting priority dstnat; policy accept;", publish)

    local = []
    for version in families:
        if plan.local_clients and to_host(version):
            own = to_host(version) + ("" if plan.addresses else f" {IP[version]} daddr != {'127.0.0.0/8' if version == 4 else '::1'}")
            local += [f"# the host itself, through its own addresses ({IP[version]})",
                      *_dnat(own, plan.ports, f"{IP[version]} to {server[version]}", "published")]
        if plan.loopback_ports and version in plan.loopback_families:
            local += [f"# ... and through {LOOPBACK[version]} (ports no host process serves there already)",
                      *_dnat(f"{NFPROTO[version]} {IP[version]} daddr {LOOPBACK[version]}", plan.loopback_ports,
                             f"{IP[version]} to {server[version]}", "loopback")]
    if local:
        out += _chain("publish_local", "type nat hook output priority -100; policy accept;", local)

    snat = []
    for version in families:
        if plan.loopback_ports and version in plan.loopback_families:
            host_end = plan.host_addr.ip if version == 4 else plan.host_addr6.ip
            source = "127.0.0.0/8" if version == 4 else "::1"
            snat += [f"# a loopback source cannot leave through the veth: use the host's end instead ({IP[version]})",
                     f"oifname {veth} {IP[version]} saddr {source} snat {IP[version]} to {host_end}"]
        if plan.outbound:
            snat += [f"# the server's own connections leave through the host's routing, as the host ({IP[version]})",
                     f"{IP[version]} saddr {server[version].strip('[]')} oifname != {veth} masquerade"]
    if snat:
        out += _chain("outbound", "type nat hook postrouting priority srcnat; policy accept;", snat)

    guard = ["# routing is done: clear our mark bits so no other tool sees them",
             f"meta mark & {mask:#010x} != 0 meta mark set meta mark & {keep:#010x}",
             "# only this instance's flows cross the veth: published ones (and replies to the server's own)",
             f"oifname {veth} ct status dnat accept"]
    if "tftp" in plan.helpers:
        guard += [f"oifname {veth} ct status expected accept", f"iifname {veth} ct status expected accept"]
    if plan.outbound:
        guard.append(f"oifname {veth} ct state established,related accept")
    guard += [f"oifname {veth} drop", f"iifname {veth} ct status dnat accept", f"iifname {veth} {'accept' if plan.outbound else 'drop'}"]
    for version, names in ((4, plan.guarded), (6, plan.guarded6)):
        if names:
            guard += [f"# forwarding was off on these: the host routes nothing else that arrives on them ({IP[version]})",
                      f'iifname {_elements(f"{chr(34)}{n}{chr(34)}" for n in names)} {NFPROTO[version]} oifname != "{HOST_PREFIX}*" drop']
    out += _chain("guard", "type filter hook forward priority filter; policy accept;", guard)
    out.append("}")
    return "\n".join(out) + "\n"


# --- allocation ------------------------------------------------------------------------------


def _mark_values(mask: int) -> list[int]:
    shift = (mask & -mask).bit_length() - 1  # config.parse_mark_mask guarantees one contiguous run
    return [v << shift for v in range(1, (mask >> shift) + 1)]


def _free(start: int, taken: set[int], count: int, what: str) -> list[int]:
    found, n = [], start
    while len(found) < count:
        if n not in taken:
            found.append(n)
        n += 1
        if n > start + 10_000:
            raise NswrapError(f"no free {what} found above {start}")
    return found


def allocate_marks(facts: Facts, mask: int, count: int) -> list[int]:
    taken = set()
    for r in facts.rules:
        if not r.fwmark & r.fwmask & mask:
            continue  # their rule needs none of our bits set (wg-quick's fwmark 0xca6c, say)
        if r.proto == PROTO and r.fwmask == mask:
            taken.add(r.fwmark)  # another nswrap instance
        else:
            raise NswrapError(
                f"fwmark bits {mask:#x} are already used by ip rule {r.priority} "
                f"(fwmark {r.fwmark:#x}/{r.fwmask:#x} lookup {r.table}); choose others with --mark-mask"
            )
    free = [v for v in _mark_values(mask) if v not in taken]
    if len(free) < count:
        raise NswrapError(f"mark mask {mask:#x} has no room for {count} more uplinks; widen it with --mark-mask")
    return free[:count]


def allocate_subnet(facts: Facts, wanted: ipaddress.IPv4Network | None) -> ipaddress.IPv4Network:
    used = [a.address.network for a in facts.addresses if a.address.version == 4]
    used += [r.dst for r in facts.routes if r.dst.prefixlen > 0 and r.dst.version == 4]
    if wanted is not None:
        clash = next((u for u in used if u.overlaps(wanted)), None)
        if clash:
            raise NswrapError(f"subnet {wanted} overlaps {clash}, already on this host; choose another --subnet")
        return wanted
    for candidate in DEFAULT_POOL.subnets(new_prefix=30):
        if not any(u.overlaps(candidate) for u in used):
            return candidate
    raise NswrapError(f"no free /30 left in {DEFAULT_POOL}; give one with --subnet")


@dataclass(frozen=True)
class _Chosen:
    ifname: str
    families: tuple[int, ...]
    gateways: dict  # version -> gateway given with --uplink


def _families(facts: Facts, ifname: str, ipv6: bool) -> tuple[int, ...]:
    return tuple(v for v in (4, 6) if (v == 4 or ipv6) and facts.global_addresses(ifname, v))


def _select_uplinks(config: Config, facts: Facts, ipv6: bool, following: bool = False) -> list[_Chosen]:
    """The uplinks and their families. While `following` a running instance, an explicit uplink
    that vanished or lost its addresses is left out (it comes back when they do)."""
    if config.uplinks:
        chosen: dict[str, _Chosen] = {}
        for spec in config.uplinks:
            families = _families(facts, spec.ifname, ipv6) if facts.link(spec.ifname) else ()
            if following and not families:
                continue
            if facts.link(spec.ifname) is None:
                raise NswrapError(f"no such uplink: {spec.ifname}")
            if not families:
                raise NswrapError(f"uplink {spec.ifname} has no global IPv4{' or IPv6' if ipv6 else ''} address")
            gateways = dict(chosen[spec.ifname].gateways) if spec.ifname in chosen else {}
            if spec.gateway:
                gateways[spec.gateway.version] = spec.gateway
            chosen[spec.ifname] = _Chosen(spec.ifname, families, gateways)
        if not chosen:
            raise NswrapError("none of the given uplinks has an address now")
        return list(chosen.values())
    found = [
        _Chosen(link.ifname, _families(facts, link.ifname, ipv6), {})
        for link in sorted(facts.links, key=lambda l: l.index)
        if link.ifname != "lo" and not link.ifname.startswith(HOST_PREFIX)
    ]
    found = [c for c in found if c.families]
    if not found:
        raise NswrapError("no uplink found: no interface has a global address (give one with --uplink)")
    return found


def _uplink_routes(facts: Facts, ifname: str, gateway, table: int, subnet, host_if: str) -> tuple[tuple[RouteSpec, ...], str | None]:
    """Table k, for the family of `subnet`: the uplink's default route, its other main-table
    routes, and the way to the server."""
    version = subnet.version
    main = [r for r in facts.main_routes(ifname) if r.dst.version == version]
    defaults = sorted((r for r in main if r.is_default), key=lambda r: r.metric)
    routes, warning = [], None
    anywhere = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
    if gateway is not None:
        routes.append(RouteSpec(table, anywhere, ifname, gateway))
    elif defaults and defaults[0].gateway:  # IPv6: often link-local (fe80::1), hence the device
        routes.append(RouteSpec(table, anywhere, ifname, defaults[0].gateway))
    elif defaults:
        routes.append(RouteSpec(table, anywhere, ifname, scope=SCOPE_LINK))  # point-to-point link
    else:
        family = "" if version == 4 else "IPv6 "
        warning = f"uplink {ifname} has no {family}gateway: it serves only {family}clients on its own subnets"
    for r in main:
        if not r.is_default:
            routes.append(RouteSpec(table, r.dst, ifname, r.gateway, r.scope, r.prefsrc))
    routes.append(RouteSpec(table, subnet, host_if, scope=SCOPE_LINK if version == 4 else RT_SCOPE_UNIVERSE))
    return tuple(routes), warning


ULA = ipaddress.IPv6Network("fd6e:7377:7261::/48")  # nswrap's: one /64 per instance, same slot as its /30


def ula_subnet(subnet: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    slot = (int(subnet.network_address) >> 2) & 0xFFFF
    return ipaddress.IPv6Network((int(ULA.network_address) | slot << 64, 64))


def make_plan(config: Config, facts: Facts, instance: str, previous: Plan | None = None) -> Plan:
    """The plan for `config` on this host. With `previous` (the running instance's plan), the
    same instance follows the host: uplinks it keeps keep their mark, table and priority (their
    flows stay routed), new ones get free ones, and the subnets never change."""
    warnings: list[str] = []
    ipv6 = facts.ipv6_per_interface and (previous is None or previous.subnet6 is not None)
    if not ipv6 and any(a.address.version == 6 and a.scope == RT_SCOPE_UNIVERSE for a in facts.addresses):
        warnings.append("IPv6 clients are not served: this kernel has no per-interface IPv6 forwarding "
                        "(force_forwarding, Linux >= 6.17), and nswrap never turns on the global switch")
    chosen = _select_uplinks(config, facts, ipv6, following=previous is not None)
    users = firewall.mark_users(facts.firewall, config.mark_mask, TABLE_PREFIX)
    if users:
        raise NswrapError(f"fwmark bits {config.mark_mask:#x} are already used by {users[0]}; choose others with --mark-mask")
    if facts.link(HOST_PREFIX + instance) and previous is None:
        raise NswrapError(f"interface {HOST_PREFIX + instance} already exists")
    subnet = previous.subnet if previous else allocate_subnet(facts, config.subnet)
    kept = {u.ifname: u for u in previous.uplinks} if previous else {}
    fresh = len([c for c in chosen if c.ifname not in kept])  # our own rules and tables count as taken
    new_marks = iter(allocate_marks(facts, config.mark_mask, fresh))
    new_priorities = iter(_free(FIRST_PRIORITY, {r.priority for r in facts.rules}, fresh, "rule priority"))
    new_tables = iter(_free(FIRST_TABLE, {r.table for r in facts.routes} | {r.table for r in facts.rules}, fresh, "routing table"))
    marks, tables, priorities = [], [], []
    for c in chosen:
        old = kept.get(c.ifname)
        marks.append(old.mark if old else next(new_marks))
        tables.append(old.table if old else next(new_tables))
        priorities.append(old.rule.priority if old else next(new_priorities))
    host_if = HOST_PREFIX + instance

    # fixed for the instance's life: the server namespace got (or did not get) its IPv6 address at start
    subnet6 = previous.subnet6 if previous else (ula_subnet(subnet) if any(6 in c.families for c in chosen) else None)
    uplinks, sysctls = [], []
    for c, mark, table, priority in zip(chosen, marks, tables, priorities):
        routes, rules = [], []
        for version in c.families:
            r, warning = _uplink_routes(facts, c.ifname, c.gateways.get(version), table, subnet if version == 4 else subnet6, host_if)
            routes += r
            rules.append(RuleSpec(priority, mark, config.mark_mask, table, family=version))
            if warning:
                warnings.append(warning)
        gateway = {v: next((r.gateway for r in routes if r.dst.prefixlen == 0 and r.dst.version == v), None) for v in (4, 6)}
        uplinks.append(UplinkPlan(c.ifname, gateway[4], mark, table, tuple(routes), tuple(rules), gateway[6]))
        if 4 in c.families:
            sysctls += [Sysctl(f"net/ipv4/conf/{c.ifname}/forwarding", "1"), Sysctl(f"net/ipv4/conf/{c.ifname}/src_valid_mark", "1")]
        if 6 in c.families:  # IPv6 has no rp_filter to satisfy; forwarding for this interface only
            sysctls.append(Sysctl(f"net/ipv6/conf/{c.ifname}/force_forwarding", "1"))
    # Forwarding is decided by the ingress interface: replies to the server's own connections come
    # back on the interfaces of the host's default routes.
    forwarding = [c.ifname for c in chosen if 4 in c.families]
    forwarding6 = [c.ifname for c in chosen if 6 in c.families]
    if config.outbound:
        for version, names, key in ((4, forwarding, "net/ipv4/conf/{}/forwarding"), (6, forwarding6, "net/ipv6/conf/{}/force_forwarding")):
            if version == 6 and not subnet6:
                continue
            extra = sorted({r.dev for r in facts.routes if r.table == 254 and r.is_default and r.dst.version == version
                            and r.dev and r.dev not in names})
            names += extra
            sysctls += [Sysctl(key.format(name), "1") for name in extra]
    sysctls.append(Sysctl(f"net/ipv4/conf/{host_if}/forwarding", "1"))
    if subnet6:
        sysctls.append(Sysctl(f"net/ipv6/conf/{host_if}/force_forwarding", "1"))

    addresses = _check_addresses(config, facts)
    # IPv4 only: IPv6 never routes ::1 off lo (RFC 4291; no route_localnet), so the kernel drops a
    # reply un-NATed to ::1 on our veth. Host-local IPv6 clients use the host's own addresses.
    loopback_families = (4,) if not addresses or LOOPBACK[4] in addresses else ()
    loopback = _loopback_ports(config, facts, warnings) if loopback_families else ()
    resolv_conf, resolver_stub = server_resolv_conf(facts.resolv_conf, facts.resolved_upstreams, host_end(subnet).ip)
    if loopback or resolver_stub:
        sysctls.append(Sysctl(f"net/ipv4/conf/{host_if}/route_localnet", "1"))  # this interface only
    if "tftp" in config.helpers and not any(p.proto == "udp" and p.outer_lo <= 69 <= p.outer_hi for p in config.ports):
        raise NswrapError("--helper tftp needs udp port 69 published (e.g. --ports 69)", code=2)
    mtu = max(facts.link(c.ifname).mtu for c in chosen)
    return Plan(
        instance, config.ports, tuple(uplinks), subnet, config.mark_mask, mtu, tuple(warnings), tuple(sysctls),
        unprivileged_ports=config.user is not None,
        addresses=addresses,
        local_clients=not addresses or any(not a.is_loopback for a in addresses),
        loopback_ports=loopback,
        loopback_families=loopback_families,
        outbound=config.outbound,
        guarded=tuple(name for name in forwarding if facts.forwarding.get(name) == "0"),
        guarded6=tuple(name for name in forwarding6 if facts.forwarding6.get(name) == "0" and facts.forwarding6.get("all") == "0"),
        subnet6=subnet6,
        firewall=_make_room(config, facts, host_if, instance),
        helpers=config.helpers,
        resolv_conf=resolv_conf,
        resolver_stub=resolver_stub,
    )


def _nameservers(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.split()[:1] == ["nameserver"] and len(line.split()) > 1]


def server_resolv_conf(host: str, resolved: str, host_end) -> tuple[str | None, ipaddress.IPv4Address | None]:
    """The server's /etc/resolv.conf: None keeps the host's (usable from the server's namespace).

    A loopback resolver (systemd-resolved's 127.0.0.53, a local dnsmasq) is not reachable from
    the server's namespace: use systemd-resolved's upstream list if there is one, else point the
    server at the host's end of the veth, which nswrap DNATs to the host's resolver.
    """
    servers = _nameservers(host)
    loopback = [s for s in servers if s.startswith("127.") or s == "::1"]
    if not servers or len(loopback) < len(servers):
        return None, None  # no resolver at all, or one the server can reach (outbound) itself
    if any(not (s.startswith("127.") or s == "::1") for s in _nameservers(resolved)):
        return resolved, None
    options = [line for line in host.splitlines() if line.split()[:1] in (["search"], ["domain"], ["options"])]
    stub = next((s for s in loopback if s.startswith("127.")), None)
    if stub is None:
        return None, None
    text = f"# written by nswrap: the host's resolver {stub} is reached through the veth\nnameserver {host_end}\n"
    return text + "".join(line + "\n" for line in options), ipaddress.IPv4Address(stub)


def _check_addresses(config: Config, facts: Facts) -> tuple[ipaddress.IPv4Address, ...]:
    local = {a.address.ip for a in facts.addresses}
    for address in config.addresses:
        if address not in local and not address.is_loopback:
            raise NswrapError(f"address {address} is not on this host")
    return tuple(config.addresses)


def _loopback_ports(config: Config, facts: Facts, warnings: list[str]) -> tuple[PortRange, ...]:
    """Published ports the host may reach on 127.0.0.1: never one a host process serves there."""
    kept = []
    for p in config.ports:
        taken = sorted(port for proto, port in facts.loopback_listeners if proto == p.proto and p.outer_lo <= port <= p.outer_hi)
        if taken:
            warnings.append(f"127.0.0.1:{taken[0]}/{p.proto} is already served on this host: not redirecting {p} on loopback")
        else:
            kept.append(p)
    return tuple(kept)


def _make_room(config: Config, facts: Facts, host_if: str, instance: str) -> tuple:
    """Who else would drop our forwarded flows, and the narrow accepts that make room there."""
    rules = []
    for blocker in firewall.blockers(facts.firewall, TABLE_PREFIX):
        if blocker.backend is None:
            raise NswrapError(firewall.how_to_fix(blocker))
        if config.firewall == "off":
            raise NswrapError(
                f"forwarded flows of nswrap would be dropped by {blocker.where}, and --firewall off "
                "forbids making room: use --firewall auto, or accept 'nsw-*' interfaces there yourself"
            )
        for rule in firewall.accept_rules(host_if, TABLE_PREFIX + instance):
            rules.append((blocker.backend, blocker.chain, tuple(rule)))
    return tuple(rules)
