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
from dataclasses import dataclass, field

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
    dst: ipaddress.IPv4Network
    dev: str
    gateway: ipaddress.IPv4Address | None = None
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: ipaddress.IPv4Address | None = None
    proto: int = PROTO


@dataclass(frozen=True)
class RuleSpec:
    priority: int
    fwmark: int
    fwmask: int
    table: int
    proto: int = PROTO


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
    routes: tuple[RouteSpec, ...]
    rule: RuleSpec


@dataclass(frozen=True)
class Step:
    """One host change. `kind` selects how apply.py does and undoes it; `ns` where it happens."""

    kind: str  # netns | veth | addr | up | route | rule | sysctl | nft
    obj: object = None
    ns: str = "host"  # "host" or "server"
    why: str = ""  # a comment printed above the step in --dry-run


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
        return ipaddress.IPv4Interface(f"{self.subnet[1]}/{self.subnet.prefixlen}")

    @property
    def server_addr(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.subnet[2]}/{self.subnet.prefixlen}")

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
        if self.unprivileged_ports:
            why = "--user: ports below 1024 are a per-namespace setting; no capability needed"
            steps.append(Step("sysctl", Sysctl("net/ipv4/ip_unprivileged_port_start", "0"), ns="server", why=why))
        for up in self.uplinks:
            why = f"uplink {up.ifname}: replies marked {up.mark:#x} leave through it, by table {up.table}"
            steps += [Step("route", r, why=why if i == 0 else "") for i, r in enumerate(up.routes)]
            steps.append(Step("rule", up.rule))
        for i, s in enumerate(self.sysctls):
            why = "per-interface forwarding; src_valid_mark lets strict rp_filter judge by the mark" if i == 0 else ""
            steps.append(Step("sysctl", s, why=why))
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
        return f"{prefix}addr add {address} dev {ifname}"
    if step.kind == "up":
        return f"{prefix}link set {obj} up"
    if step.kind == "route":
        return prefix + "route add " + route_args(obj)
    if step.kind == "rule":
        return f"ip rule add fwmark {obj.fwmark:#x}/{obj.fwmask:#x} lookup {obj.table} priority {obj.priority} protocol {obj.proto}"
    if step.kind == "sysctl":
        parts = obj.key.split("/")
        if len(parts) == 5 and parts[2] == "conf":
            parts[3] = _ifname_for_sysctl(parts[3])
        line = f"sysctl -w {'.'.join(parts)}={obj.value}"
        return f"ip netns exec {plan.netns_name} {line}" if step.ns == "server" else line
    if step.kind == "nft":
        return f"nft -f - <<'EOF'\n{obj}EOF"
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
    return "\n".join(lines) + "\n"


# --- the nftables ruleset --------------------------------------------------------------------


def _elements(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def nft_ruleset(plan: Plan) -> str:
    mask, keep = plan.mark_mask, 0xFFFFFFFF & ~plan.mark_mask
    uplinks = _elements(f'"{u.ifname}"' for u in plan.uplinks)
    published = [f"{p.proto} . {p.outer_lo}" + (f"-{p.outer_hi}" if p.count > 1 else "") for p in plan.ports]
    unchanged = [e for e, p in zip(published, plan.ports) if not p.remapped]
    remaps = {
        proto: [f"{p.outer_lo + i} : {p.inner_lo + i}" for p in plan.ports if p.proto == proto and p.remapped for i in range(p.count)]
        for proto in ("udp", "tcp")
    }
    server = plan.server_addr.ip
    to_published = f'iifname {uplinks} meta nfproto ipv4 fib daddr type local meta l4proto . th dport'

    out = [f"table inet {plan.nft_table} {{"]
    out += [f"\tset published {{ type inet_proto . inet_service; flags interval; elements = {_elements(published)} }}"]
    if unchanged:
        out += [f"\tset unchanged {{ type inet_proto . inet_service; flags interval; elements = {_elements(unchanged)} }}"]
    for proto, pairs in remaps.items():
        if pairs:
            out += [f"\tmap {proto}_remap {{ type inet_service : inet_service; elements = {_elements(pairs)} }}"]

    out += ["", "\tchain remember_uplink {", "\t\ttype filter hook prerouting priority mangle; policy accept;"]
    out += ["\t\t# a published flow remembers its uplink in the ct mark; the packet's mark lets strict"]
    out += ["\t\t# rp_filter (with src_valid_mark) check the client against that uplink's table"]
    for u in plan.uplinks:
        setmark = f"meta mark set meta mark & {keep:#010x} | {u.mark:#010x} ct mark set ct mark & {keep:#010x} | {u.mark:#010x}"
        out += [f'\t\tiifname "{u.ifname}" meta nfproto ipv4 fib daddr type local meta l4proto . th dport @published {setmark}']
    out += ["\t\t# replies from the server are routed by the uplink their flow came in on"]
    for u in plan.uplinks:
        out += [
            f'\t\tiifname "{plan.host_if}" ct direction reply ct mark & {mask:#010x} == {u.mark:#010x} '
            f"meta mark set meta mark & {keep:#010x} | {u.mark:#010x}"
        ]
    out += ["\t}"]

    out += ["", "\tchain publish {", "\t\ttype nat hook prerouting priority dstnat; policy accept;"]
    for proto, pairs in remaps.items():
        if pairs:
            out += [
                f"\t\tiifname {uplinks} meta nfproto ipv4 fib daddr type local {proto} dport @{proto}_remap "
                f"dnat ip to {server} : {proto} dport map @{proto}_remap"
            ]
    if unchanged:
        out += [f"\t\t{to_published} @unchanged dnat ip to {server}"]
    out += ["\t}"]

    out += ["", "\tchain guard {", "\t\ttype filter hook forward priority filter; policy accept;"]
    out += [f"\t\t# routing is done: clear our mark bits so no other tool sees them"]
    out += [f"\t\tmeta mark & {mask:#010x} != 0 meta mark set meta mark & {keep:#010x}"]
    out += ["\t\t# only this instance's published flows enter or leave the server namespace"]
    out += [f'\t\toifname "{plan.host_if}" ct status dnat accept', f'\t\toifname "{plan.host_if}" drop']
    out += [f'\t\tiifname "{plan.host_if}" ct status dnat accept', f'\t\tiifname "{plan.host_if}" drop']
    out += ["\t}", "}"]
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
        if not r.fwmask & mask:
            continue
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
    used = [a.address.network for a in facts.addresses] + [r.dst for r in facts.routes if r.dst.prefixlen > 0]
    if wanted is not None:
        clash = next((u for u in used if u.overlaps(wanted)), None)
        if clash:
            raise NswrapError(f"subnet {wanted} overlaps {clash}, already on this host; choose another --subnet")
        return wanted
    for candidate in DEFAULT_POOL.subnets(new_prefix=30):
        if not any(u.overlaps(candidate) for u in used):
            return candidate
    raise NswrapError(f"no free /30 left in {DEFAULT_POOL}; give one with --subnet")


def _select_uplinks(config: Config, facts: Facts) -> list[tuple[str, ipaddress.IPv4Address | None]]:
    if config.uplinks:
        chosen = []
        for spec in config.uplinks:
            if facts.link(spec.ifname) is None:
                raise NswrapError(f"no such uplink: {spec.ifname}")
            if not facts.global_addresses(spec.ifname):
                raise NswrapError(f"uplink {spec.ifname} has no global IPv4 address")
            chosen.append((spec.ifname, spec.gateway))
        return chosen
    names = [
        link.ifname
        for link in sorted(facts.links, key=lambda l: l.index)
        if link.ifname != "lo" and not link.ifname.startswith(HOST_PREFIX) and facts.global_addresses(link.ifname)
    ]
    if not names:
        raise NswrapError("no uplink found: no interface has a global IPv4 address (give one with --uplink)")
    return [(name, None) for name in names]


def _uplink_routes(facts: Facts, ifname: str, gateway, table: int, subnet, host_if: str) -> tuple[tuple[RouteSpec, ...], str | None]:
    """Table k: the uplink's default route, its other main-table routes, and the way to the server."""
    main = facts.main_routes(ifname)
    defaults = sorted((r for r in main if r.is_default), key=lambda r: r.metric)
    routes, warning = [], None
    anywhere = ipaddress.IPv4Network("0.0.0.0/0")
    if gateway is not None:
        routes.append(RouteSpec(table, anywhere, ifname, gateway))
    elif defaults and defaults[0].gateway:
        routes.append(RouteSpec(table, anywhere, ifname, defaults[0].gateway))
    elif defaults:
        routes.append(RouteSpec(table, anywhere, ifname, scope=SCOPE_LINK))  # point-to-point link
    else:
        warning = f"uplink {ifname} has no gateway: it serves only clients on its own subnets"
    for r in main:
        if not r.is_default:
            routes.append(RouteSpec(table, r.dst, ifname, r.gateway, r.scope, r.prefsrc))
    routes.append(RouteSpec(table, subnet, host_if, scope=SCOPE_LINK))
    return tuple(routes), warning


def make_plan(config: Config, facts: Facts, instance: str) -> Plan:
    chosen = _select_uplinks(config, facts)
    if facts.link(HOST_PREFIX + instance):
        raise NswrapError(f"interface {HOST_PREFIX + instance} already exists")
    subnet = allocate_subnet(facts, config.subnet)
    marks = allocate_marks(facts, config.mark_mask, len(chosen))
    priorities = _free(FIRST_PRIORITY, {r.priority for r in facts.rules}, len(chosen), "rule priority")
    tables = _free(FIRST_TABLE, {r.table for r in facts.routes} | {r.table for r in facts.rules}, len(chosen), "routing table")
    host_if = HOST_PREFIX + instance

    uplinks, warnings, sysctls = [], [], []
    for (ifname, gateway), mark, table, priority in zip(chosen, marks, tables, priorities):
        routes, warning = _uplink_routes(facts, ifname, gateway, table, subnet, host_if)
        if warning:
            warnings.append(warning)
        gw = next((r.gateway for r in routes if r.dst.prefixlen == 0), None)
        uplinks.append(UplinkPlan(ifname, gw, mark, table, routes, RuleSpec(priority, mark, config.mark_mask, table)))
        sysctls += [Sysctl(f"net/ipv4/conf/{ifname}/forwarding", "1"), Sysctl(f"net/ipv4/conf/{ifname}/src_valid_mark", "1")]
    sysctls.append(Sysctl(f"net/ipv4/conf/{host_if}/forwarding", "1"))
    mtu = max(facts.link(name).mtu for name, _ in chosen)
    return Plan(
        instance, config.ports, tuple(uplinks), subnet, config.mark_mask, mtu, tuple(warnings), tuple(sysctls), config.user is not None
    )
