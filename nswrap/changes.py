"""Host changes as small types: each knows how to do itself, undo itself and show itself as the
shell line(s) a person would type for the same effect (`-v` logs them, `--dry-run` prints them).

Only transaction.py calls `do` and `undo`, inside a transaction. Every undo treats "already gone" as
success: an object may have vanished with its namespace, or another instance removed it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shlex
import socket

from nswrap import iptables, nft
from nswrap.datapath import Instance, Room, Switch6
from nswrap.datatypes import datatype
from nswrap.errors import NswrapError
from nswrap.facts import HOST_PREFIX, PROC_SYS, read_sysctl, sysctl_key
from nswrap.fastpath import FAST_OBJECT, FAST_PRIORITY, Fast
from nswrap.objects import Route, Rule

GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})
EXISTS = frozenset({errno.EEXIST})


class Change:
    """One host change. `kernel` gives the adapters (see transaction.Kernel)."""

    def do(self, kernel) -> None:
        raise NotImplementedError

    def undo(self, kernel) -> None:
        raise NotImplementedError

    def render(self) -> str:
        raise NotImplementedError

    def render_undo(self) -> str:
        raise NotImplementedError


@datatype
class AddRule(Change):
    rule: Rule

    def do(self, kernel) -> None:
        kernel.routing.do(kernel.routing.rule("add", self.rule), ignore=EXISTS)

    def undo(self, kernel) -> None:
        kernel.routing.do(kernel.routing.rule("del", self.rule), ignore=GONE)

    def render(self) -> str:
        return self.rule.render("add")

    def render_undo(self) -> str:
        return self.rule.render("del")


@datatype
class DeleteRule(Change):
    rule: Rule

    def do(self, kernel) -> None:
        AddRule(self.rule).undo(kernel)

    def undo(self, kernel) -> None:
        AddRule(self.rule).do(kernel)

    def render(self) -> str:
        return self.rule.render("del")

    def render_undo(self) -> str:
        return self.rule.render("add")


@datatype
class AddRoute(Change):
    route: Route

    def do(self, kernel) -> None:
        kernel.routing.do(kernel.routing.route("add", self.route), ignore=EXISTS)

    def undo(self, kernel) -> None:
        try:
            kernel.routing.do(kernel.routing.route("del", self.route), ignore=GONE)
        except OSError as e:  # its interface is gone, and the route with it
            if e.errno not in GONE:
                raise

    def render(self) -> str:
        return self.route.render("add")

    def render_undo(self) -> str:
        return self.route.render("del")


@datatype
class DeleteRoute(Change):
    route: Route

    def do(self, kernel) -> None:
        AddRoute(self.route).undo(kernel)

    def undo(self, kernel) -> None:
        AddRoute(self.route).do(kernel)

    def render(self) -> str:
        return self.route.render("del")

    def render_undo(self) -> str:
        return self.route.render("add")


def sysctl_name(key: str) -> str:
    """sysctl(8)'s name for a /proc/sys path: dots separate, so an interface's own dots (a VLAN
    eth0.100) are written as slashes: net/ipv4/conf/eth0.100/forwarding -> net.ipv4.conf.eth0/100.forwarding."""
    parts = key.split("/")
    if len(parts) == 5 and parts[2] == "conf":
        parts[3] = parts[3].replace(".", "/")
    return ".".join(parts)


def write_sysctl(key: str, value: str) -> None:
    try:
        with open(f"{PROC_SYS}/{key}", "w") as f:
            f.write(value)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise NswrapError(read_only_message([key])) from None
        raise


def read_only_message(keys: list[str]) -> str:
    """What to give a container whose /proc/sys is read-only: the settings nswrap would need,
    written as container runtimes take them (--sysctl accepts the `all` forms)."""
    flags = []
    for key in keys:
        name = sysctl_name(key)
        if name.endswith(".forwarding") and name.startswith("net.ipv4."):
            flags.append("net.ipv4.ip_forward=1")
        elif name.endswith(".src_valid_mark"):
            flags.append("net.ipv4.conf.all.src_valid_mark=1")
        elif name.endswith(".force_forwarding"):
            flags.append("net.ipv6.conf.all.forwarding=1")
        else:
            flags.append(f"{name}=1")
    wanted = " ".join(f"--sysctl {f}" for f in dict.fromkeys(flags))
    return f"cannot write {sysctl_name(keys[0])}: /proc/sys is read-only here (a container?); start it with {wanted}"


@datatype
class SetSysctl(Change):
    """Set a sysctl; undo puts back `before`, but only if nobody changed it since."""

    key: str
    value: str
    before: str

    def do(self, kernel) -> None:
        write_sysctl(self.key, self.value)

    def undo(self, kernel) -> None:
        try:
            if read_sysctl(self.key) == self.value:
                write_sysctl(self.key, self.before)
        except FileNotFoundError:
            pass  # gone with its interface

    def render(self) -> str:
        return f"sysctl -w {sysctl_name(self.key)}={self.value}"

    def render_undo(self) -> str:
        return f"sysctl -w {sysctl_name(self.key)}={self.before}"


@datatype
class Forwarding6(Change):
    """net.ipv6.conf.all.forwarding, the one IPv6 forwarding switch before Linux 6.17, on
    (`on`) or back off. Writing it rewrites every interface's `forwarding` and `default`'s
    (addrconf_fixup_forwarding), so off means: the switch as it was, then each interface's
    own value as `switch` recorded it (one that came meanwhile: `default`'s). accept_ra is
    SetSysctl's business, before it is turned on and after it is off (docs/design.md)."""

    on: bool
    switch: Switch6

    def do(self, kernel) -> None:
        self._hold() if self.on else self._release()

    def undo(self, kernel) -> None:
        self._release() if self.on else self._hold()

    @staticmethod
    def _hold() -> None:
        write_sysctl(sysctl_key(6, "all", "forwarding"), "1")

    def _release(self) -> None:
        if read_sysctl(sysctl_key(6, "all", "forwarding")) == "1":
            write_sysctl(sysctl_key(6, "all", "forwarding"), "0")
        for ifname, value in self._values():
            try:
                if read_sysctl(sysctl_key(6, ifname, "forwarding")) not in (None, value):
                    write_sysctl(sysctl_key(6, ifname, "forwarding"), value)
            except FileNotFoundError:
                pass  # gone with its interface

    def _values(self) -> list[tuple[str, str]]:
        """(interface, forwarding it had) for every interface there is now, and default."""
        out = [("default", self.switch.default_forwarding)]
        for ifname in sorted(os.listdir(f"{PROC_SYS}/net/ipv6/conf")):
            if ifname in ("all", "default") or ifname.startswith(HOST_PREFIX):
                continue
            try:
                index = socket.if_nametoindex(ifname)
            except OSError:
                continue
            out.append((ifname, self.switch.before(ifname, index).forwarding))
        return out

    def render(self) -> str:
        return self._render(self.on)

    def render_undo(self) -> str:
        return self._render(not self.on)

    def _render(self, on: bool) -> str:
        if on:
            return "sysctl -w net.ipv6.conf.all.forwarding=1"
        lines = ["sysctl -w net.ipv6.conf.all.forwarding=0  # and every interface's forwarding with it: put back"]
        lines += [f"sysctl -w {sysctl_name(sysctl_key(6, s.ifname, 'forwarding'))}=1"
                  for s in self.switch.interfaces if s.forwarding != "0"]
        if self.switch.default_forwarding != "0":
            lines.append("sysctl -w net.ipv6.conf.default.forwarding=1")
        return "\n".join(lines)


@datatype
class NftBatch(Change):
    """One nft transaction; `undo_text` (may be empty) reverses it."""

    text: str
    undo_text: str = ""
    what: str = ""

    def do(self, kernel) -> None:
        nft.apply(self.text)

    def undo(self, kernel) -> None:
        if not self.undo_text:
            return
        try:
            nft.apply(self.undo_text)
        except NswrapError as e:
            if "No such file or directory" not in str(e):  # what it undoes never came to be
                raise

    def render(self) -> str:
        return f"nft -f - <<'EOF'{'  # ' + self.what if self.what else ''}\n{self.text}EOF"

    def render_undo(self) -> str:
        return f"nft -f - <<'EOF'\n{self.undo_text}EOF" if self.undo_text else "# (nothing to undo)"


@datatype
class FastPath(Change):
    """The tc-BPF fast path (docs/fastpath.md) brought from `have` to `want`: programs attached and
    detached, endpoints written and deleted. nswrap loads the programs itself (no pinning): the
    lines are what tc and bpftool would do, not a script that shares their maps."""

    want: Fast
    have: Fast

    def do(self, kernel) -> None:
        kernel.fast().apply(self.want)

    def undo(self, kernel) -> None:
        kernel.fast().apply(self.have)

    def render(self) -> str:
        return self._render(self.have, self.want, self._counts[0])

    def render_undo(self) -> str:
        return self._render(self.want, self.have, self._counts[1])

    @functools.cached_property
    def _counts(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """(endpoints added, deleted, sources added, deleted) of the change and of its undo: set
        differences of up to 262,144 endpoints, made once (the transaction renders both)."""
        endpoints = len(self.want.endpoints - self.have.endpoints), len(self.have.endpoints - self.want.endpoints)
        sources = len(self.want.sources - self.have.sources), len(self.have.sources - self.want.sources)
        return (endpoints[0], endpoints[1] + max(self.have.stale - self.want.stale, 0), *sources), \
            (endpoints[1], endpoints[0] + max(self.want.stale - self.have.stale, 0), sources[1], sources[0])

    @staticmethod
    def _render(have: Fast, want: Fast, counts: tuple[int, int, int, int]) -> str:
        lines = []
        if have.outdated and not want.outdated and (want.uplinks or want.veths):
            lines.append("# fast path: the programs attached are an older nswrap's (or a replacement was cut short): "
                         "this one's loaded, on every filter")
        for names, section in ((want.uplinks - have.uplinks, "uplink"), (want.veths - have.veths, "veth")):
            for name in sorted(names):
                lines += [f"tc qdisc add dev {name} clsact 2>/dev/null",
                          f"tc filter replace dev {name} ingress pref {FAST_PRIORITY} handle 1 bpf da "
                          f"object-file {FAST_OBJECT} section tc/{section}"]
        for name in sorted((have.uplinks | have.veths) - (want.uplinks | want.veths)):
            lines.append(f"tc filter del dev {name} ingress pref {FAST_PRIORITY} handle 1 bpf")
        added, deleted, sources_added, sources_deleted = counts  # deleted: with entries naming a gone interface
        if added or deleted:
            lines.append(f"# fast path endpoints: {added} added, {deleted} deleted (map `published`)")
        added, deleted = sources_added, sources_deleted
        if added or deleted:
            lines.append(f"# fast path sources: {added} added, {deleted} deleted (map `sources`)")
        return "\n".join(lines) or "# fast path: nothing to change"


def one_line(rendered: str) -> str:
    """A change as one meaningful line for a warning: its first line, or for an nft batch
    (whose first line is only `nft -f - <<'EOF'`) what the batch does."""
    first = rendered.splitlines()[0] if rendered else ""
    _, sep, what = first.partition("<<'EOF'  # ")
    return f"nft {what}" if sep and first.startswith("nft -f -") else first


@datatype
class InsertRoom(Change):
    room: Room

    def do(self, kernel) -> None:
        iptables.run(self.room.binary, "-I", self.room.chain, list(self.room.rule))

    def undo(self, kernel) -> None:
        iptables.run(self.room.binary, "-D", self.room.chain, list(self.room.rule))

    def render(self) -> str:
        return f"{self.room.binary} -I {self.room.chain} {shlex.join(self.room.rule)}"

    def render_undo(self) -> str:
        return f"{self.room.binary} -D {self.room.chain} {shlex.join(self.room.rule)}"


@datatype
class DeleteRoom(Change):
    room: Room

    def do(self, kernel) -> None:
        InsertRoom(self.room).undo(kernel)

    def undo(self, kernel) -> None:
        InsertRoom(self.room).do(kernel)

    def render(self) -> str:
        return InsertRoom(self.room).render_undo()

    def render_undo(self) -> str:
        return InsertRoom(self.room).render()


class Forgetting(Change):
    """Conntrack entries forgotten: they start over as new flows, nothing to put back."""

    def undo(self, kernel) -> None:
        pass

    def render_undo(self) -> str:
        return "# (forgotten flows start over)"


@datatype
class FlushMark(Forgetting):
    """Forget the flows of an uplink nswrap no longer serves: their routing table is gone."""

    mark: int
    mask: int

    def do(self, kernel) -> None:
        kernel.conntrack().flush_mark(self.mark, self.mask)

    def render(self) -> str:
        return f"conntrack -D --mark {self.mark:#x}/{self.mask:#x} || true  # none left is fine"


@datatype
class ForgetFlows(Forgetting):
    """Forget conntrack entries (already gone is fine): stale flows at a start, an instance's own
    at its stop. `what` says which, as a person would write it."""

    flows: tuple
    what: str

    def do(self, kernel) -> None:
        kernel.conntrack().delete(self.flows)

    def render(self) -> str:
        return f"{self.what} || true  # {len(self.flows)} flows"


SERVER_IF = "eth0"  # the server's end of the veth, inside its namespace


@datatype
class ServerNetwork(Change):
    """An instance's own network: the veth pair, its addresses and permanent neighbours (no ARP,
    no duplicate address detection: it forwards the moment it exists), the server's default
    routes, and inside the server's namespace what it needs there. Undone by deleting the host
    end; the rest lives in the server's namespace and goes with it."""

    instance: Instance
    netns_fd: int
    mtu: int
    resolver_stub: str | None = None  # the host's loopback resolver the server should reach
    unprivileged_ports: bool = False  # --user: ports below 1024 without any capability
    ipv6_forwarding: bool = True  # force_forwarding on our end is needed (all.forwarding is off)

    @property
    def _macs(self) -> tuple[str, str]:
        tail = ":".join(self.instance.id[i:i + 2] for i in (0, 2, 4))
        return f"02:6e:73:{tail}", f"02:6e:74:{tail}"

    def _sides(self) -> list[tuple[str, str, list]]:
        """(namespace, ifname, [(our address/prefix, far address), ...]) for both ends."""
        i = self.instance
        prefix = {v: i.subnet.prefixlen if v == 4 else 64 for v in i.families}  # a /30, and a /64 of POOL6
        host = [(f"{i.host_end(v)}/{prefix[v]}", i.server(v)) for v in i.families]
        server = [(f"{i.server(v)}/{prefix[v]}", i.host_end(v)) for v in i.families]
        return [("host", i.veth, host), ("server", SERVER_IF, server)]

    def do(self, kernel) -> None:
        try:
            self._make(kernel.routing)
        except OSError as e:  # name what was being made, not the first line of the sketch
            i = self.instance
            subnets = ", ".join(str(i.subnet_of(v)) for v in i.families)
            raise NswrapError(f"could not make the server's network (veth {i.veth}, {subnets}): "
                              f"{e.strerror or e}") from e

    def _make(self, routing) -> None:
        import ipaddress

        from nswrap import namespaces, netlink
        from nswrap.objects import Address, Neighbour

        i = self.instance
        host_mac, server_mac = self._macs
        routing.do(routing.veth(i.veth, SERVER_IF, self.netns_fd, self.mtu, (host_mac, server_mac)))
        routing.forget(i.veth)
        with namespaces.inside(self.netns_fd):
            server = netlink.Routing()
        try:
            for side, (_, ifname, ends), far_mac, r in (("host", self._sides()[0], server_mac, routing),
                                                        ("server", self._sides()[1], host_mac, server)):
                inet = {"forwarding": 1, "route_localnet": 1} if side == "host" else (
                    {"route_localnet": 1} if self.resolver_stub else {})
                requests = [r.configure(ifname, inet, up=False)]
                if side == "server":
                    requests.insert(0, r.configure("lo", {}))
                for mine, far in ends:
                    requests.append(r.address("add", Address(ifname, ipaddress.ip_interface(mine))))
                    requests.append(r.neighbour(Neighbour(ifname, far, far_mac)))
                requests.append(r.link_up(ifname))
                if side == "server":
                    for v in i.families:
                        requests.append(r.route("add", _default_via(i.host_end(v))))
                r.do(*requests)
            if self.ipv6_forwarding and 6 in i.families:
                write_sysctl(f"net/ipv6/conf/{i.veth}/force_forwarding", "1")
            # the host never learns a route or an address from a server's router advertisement
            # (nswrap's guard drops those too: docs/design.md, "What a server may send")
            with contextlib.suppress(NswrapError, OSError):  # a read-only /proc/sys: the guard alone
                write_sysctl(f"net/ipv6/conf/{i.veth}/accept_ra", "0")
            with namespaces.inside(self.netns_fd):
                if self.unprivileged_ports:
                    _server_sysctl("net/ipv4/ip_unprivileged_port_start", "0")
            if self.resolver_stub:
                nft.apply(self._resolver_ruleset(), namespace_fd=self.netns_fd)
        finally:
            server.close()

    def _resolver_ruleset(self) -> str:
        """Inside the server's namespace: its queries to the host's loopback resolver go to the
        host's end of the veth (the host's table sends them on to the resolver)."""
        host_end = self.instance.host_end(4)
        return (f"add table ip nswrap\ndelete table ip nswrap\ntable ip nswrap {{\n"
                f"\tchain resolver {{\n\t\ttype nat hook output priority -100; policy accept;\n"
                f"\t\tip daddr {self.resolver_stub} meta l4proto {{ udp, tcp }} th dport 53 dnat ip to {host_end}\n\t}}\n"
                f"\tchain source {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
                f'\t\toifname "{SERVER_IF}" ip saddr 127.0.0.0/8 masquerade\n\t}}\n}}\n')

    def undo(self, kernel) -> None:
        try:
            kernel.routing.do(kernel.routing.link_del(self.instance.veth), ignore=GONE)
        finally:
            kernel.routing.forget(self.instance.veth)

    def render(self) -> str:
        i, ns = self.instance, f"nswrap-{self.instance.id}"
        host_mac, server_mac = self._macs
        lines = [
            f"ip netns add {ns}  # nswrap's own is anonymous, held by the server's processes only",
            f"ip link add {i.veth} mtu {self.mtu} address {host_mac} type veth "
            f"peer name {SERVER_IF} mtu {self.mtu} address {server_mac} netns {ns}",
            f"ip link set {i.veth} addrgenmode none",
            f"sysctl -qw net.ipv4.conf.{i.veth}.forwarding=1 net.ipv4.conf.{i.veth}.route_localnet=1",
        ]
        for side, ifname, ends in self._sides():
            netns = ns if side == "server" else None
            prefix = f"ip -n {ns}" if netns else "ip"
            far_mac = server_mac if side == "host" else host_mac
            if side == "server":
                lines += [f"{prefix} link set lo up", f"{prefix} link set {ifname} addrgenmode none"]
                if self.resolver_stub:
                    lines.append(f"ip netns exec {ns} sysctl -qw net.ipv4.conf.{ifname}.route_localnet=1")
            for mine, far in ends:
                six = " -6" if ":" in mine else ""
                lines.append(f"{prefix}{six} addr add {mine} dev {ifname}" + (" nodad" if six else ""))
                lines.append(f"{prefix}{six} neigh add {far} dev {ifname} lladdr {far_mac} nud permanent")
            lines.append(f"{prefix} link set {ifname} up")
            if side == "host" and self.ipv6_forwarding and 6 in i.families:
                lines.append(f"sysctl -qw net.ipv6.conf.{i.veth}.force_forwarding=1")
            if side == "host":
                lines.append(f"sysctl -qw net.ipv6.conf.{i.veth}.accept_ra=0")
        for v in i.families:
            lines.append(_default_via(i.host_end(v)).render("add", ns))
        if self.unprivileged_ports:
            lines.append(f"ip netns exec {ns} sysctl -qw net.ipv4.ip_unprivileged_port_start=0")
        if self.resolver_stub:
            lines.append(f"ip netns exec {ns} nft -f - <<'EOF'\n{self._resolver_ruleset()}EOF")
        return "\n".join(lines)

    def render_undo(self) -> str:
        return f"ip link del {self.instance.veth}"


def _default_via(gateway) -> Route:
    from nswrap.objects import FAMILIES

    return Route(FAMILIES[gateway.version].anywhere, SERVER_IF, gateway, proto=0,
                 metric=1024 if gateway.version == 6 else 0)


def _server_sysctl(key: str, value: str) -> None:
    """A setting of the server's own namespace (the caller is inside it): nothing to restore."""
    write_sysctl(key, value)


@datatype
class DeleteLink(Change):
    """An instance's veth once its server is gone (a dead one's: its record names it); there is
    nothing to put back."""

    ifname: str

    def do(self, kernel) -> None:
        try:
            kernel.routing.do(kernel.routing.link_del(self.ifname), ignore=GONE)
        finally:
            kernel.routing.forget(self.ifname)

    def undo(self, kernel) -> None:
        pass

    def render(self) -> str:
        return f"ip link del {self.ifname}"

    def render_undo(self) -> str:
        return "# (a veth whose server is gone: nothing to put back)"


@datatype
class DeleteIptables(Change):
    """An iptables rule an older nswrap left (tagged with its instance id)."""

    binary: str
    chain: str
    rule: tuple[str, ...]

    def do(self, kernel) -> None:
        iptables.run(self.binary, "-D", self.chain, list(self.rule))

    def undo(self, kernel) -> None:
        iptables.run(self.binary, "-I", self.chain, list(self.rule))

    def render(self) -> str:
        return f"{self.binary} -D {self.chain} {shlex.join(self.rule)}"

    def render_undo(self) -> str:
        return f"{self.binary} -I {self.chain} {shlex.join(self.rule)}"
