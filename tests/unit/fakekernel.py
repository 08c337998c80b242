"""The kernel as dicts, for unit tests that drive an instance's life without root.

kube-proxy's `knftables.Fake` is the model: nswrap's adapters are replaced at their few entry
points, and the fake keeps what the kernel would hold once they ran:

    links, addresses, routes, rules   netlink.Routing (requests are kept as tuples, not bytes)
    sysctls                           files under a tmp /proc/sys (facts.PROC_SYS, changes.PROC_SYS)
    the nft table                     nft.apply / read_table / has_table / tables / ruleset / check:
                                      the batches nswrap sends are parsed (`Batch`) into an nft.Table
                                      (elements, chains' rule counts, version); other tables by name
    conntrack flows                   netlink.Conntrack
    events                            netlink.Monitor: the fake's changes, as the kernel announces them
    the server's namespace            namespaces.new_netns / inside: a second FakeKernel, no /proc/sys

What the fake does not model: rtnetlink's byte format (netlink's own tests pin that), nft's
syntax beyond the lines nswrap writes, rules' match semantics, the kernel's address and route
side effects beyond connected routes, iptables (its commands are recorded, not run), processes.

`install(monkeypatch, tmp_path)` puts the fake in place; anything of nswrap that would still reach
a real kernel (an `nft` or iptables command, a namespace) raises instead, so a unit test run as
root changes nothing on the host. The names the refactoring on main moves (apply.py's Kernel,
instance.py's FailClosed/TryAgain) are imported here only, for the merge to be a small edit.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import ipaddress
import os
import pathlib
import shlex
from dataclasses import dataclass, field
from functools import partial

from nswrap import changes as changes_mod, facts as facts_mod, iptables, namespaces, netlink, nft, ruleset, state
from nswrap.datapath import Element
from nswrap.datatypes import replace
from nswrap.errors import FailClosed, NswrapError, TryAgain
from nswrap.facts import Facts
from nswrap.netlink import Event, Flow
from nswrap.objects import SCOPE_LINK, Address, Link, LinkInfo, Route, Rule
from nswrap.transaction import Kernel

__all__ = ["Batch", "FailClosed", "FakeKernel", "Kernel", "TryAgain", "install", "parse_element"]

KERNEL_PROTO = 2  # routes the kernel adds for an address (proto kernel)
GONE = "Error: Could not process rule: No such file or directory"
IPV4_LINK = {"forwarding": "0", "route_localnet": "0", "src_valid_mark": "0", "rp_filter": "0"}
IPV6_LINK = {"forwarding": "0", "force_forwarding": "0", "accept_ra": "1"}


# --- nft batches --------------------------------------------------------------------------------


def parse_element(text: str) -> Element:
    """`K1 . K2 comment "C" : V1 . V2` (ruleset.element_text) back into an Element."""
    key, _, value = text.partition(" : ")
    key, _, comment = key.partition(' comment "')
    return Element(tuple(key.strip().split(" . ")), tuple(value.split(" . ")) if value else (),
                   comment.rstrip('"'))


def _split_elements(body: str) -> list[str]:
    """The items of `{ a, b . c, ... }` (nswrap's elements hold no comma of their own)."""
    return [item.strip() for item in body.strip().removeprefix("{").removesuffix("}").split(",") if item.strip()]


@dataclass
class Batch:
    """One `nft -f` batch applied to a table (None: there is none) and the other tables' names,
    all or nothing: `apply` raises NswrapError as nft does, and changes nothing then."""

    table: nft.Table | None
    others: set[tuple[str, str]] = field(default_factory=set)

    def apply(self, text: str) -> tuple[nft.Table | None, set[tuple[str, str]]]:
        table, others = copy.deepcopy(self.table), set(self.others)
        lines = iter(text.splitlines())
        ours = f"inet {ruleset.TABLE}"
        for line in lines:
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "table" and " ".join(words[1:3]) == ours:  # the whole table, as table_text writes it
                table = table or nft.Table()
                self._block(table, lines)
            elif words[:2] == ["add", "table"]:
                if " ".join(words[2:4]) == ours:
                    table = table or nft.Table()
                else:
                    others.add((words[2], words[3]))
            elif words[:2] == ["delete", "table"]:
                if " ".join(words[2:4]) == ours:
                    if table is None:
                        raise NswrapError(f"nft refused the ruleset: {GONE}")
                    table = None
                elif (words[2], words[3]) in others:
                    others.discard((words[2], words[3]))
                else:
                    raise NswrapError(f"nft refused the ruleset: {GONE}")
            elif words[1:3] == ["element", "inet"] and words[0] in ("add", "delete"):
                name = words[4]
                if table is None or (name not in table.elements and name != ruleset.VERSION_SET):
                    raise NswrapError(f"nft refused the ruleset: {GONE}")
                items = [parse_element(i) for i in _split_elements(line.split(name, 1)[1])]
                if name == ruleset.VERSION_SET:
                    table.version = items[0].comment if words[0] == "add" else ""
                    continue
                have = set(table.elements[name])
                if words[0] == "add":
                    have |= set(items)
                else:
                    keys = {e.key for e in items}
                    if not keys <= {e.key for e in have}:
                        raise NswrapError(f"nft refused the ruleset: {GONE}")
                    have = {e for e in have if e.key not in keys}
                table.elements[name] = frozenset(have)
            elif words[:3] == ["add", "chain", "inet"]:
                if table is None:
                    raise NswrapError(f"nft refused the ruleset: {GONE}")
                table.rules.setdefault(words[4], 0)
            elif words[:3] == ["add", "rule", "inet"]:
                if table is None or words[4] not in table.rules:
                    raise NswrapError(f"nft refused the ruleset: {GONE}")
                table.rules[words[4]] += 1
            elif words[:3] == ["delete", "chain", "inet"]:
                if table is None or words[4] not in table.rules:
                    raise NswrapError(f"nft refused the ruleset: {GONE}")
                del table.rules[words[4]]
            else:
                raise NswrapError(f"nft refused the ruleset: the fake kernel does not know {line!r}")
        return table, others

    @staticmethod
    def _block(table: nft.Table, lines) -> None:
        """The body of `table inet nswrap { ... }`: sets, maps, counters, chains and their rules."""
        chain = None
        depth = 1
        for line in lines:
            words = line.split()
            if line.strip() == "}":
                depth -= 1
                if depth == 0:
                    return
                chain = None
                continue
            if words[0] in ("set", "map") and words[1] != ruleset.VERSION_SET:
                table.elements.setdefault(words[1], frozenset())
            elif words[0] == "counter":
                table.named_counters.setdefault(words[1], 0)
            elif words[0] == "chain":
                chain = words[1]
                table.rules.setdefault(chain, 0)
                depth += 1
            elif words[0] == "ct" and chain is None:  # a ct timeout or ct helper object: its body is no rule
                depth += 1
            elif chain is not None and words[0] != "type":
                table.rules[chain] += 1
        raise NswrapError("nft refused the ruleset: unterminated table")


# --- routing ------------------------------------------------------------------------------------


class _Adapter:
    """What the fake adapters share with the real ones: a kernel, `with`, close()."""

    def __init__(self, kernel: FakeKernel):
        self.kernel = kernel

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class FakeRouting(_Adapter):
    """netlink.Routing over a FakeKernel: each request is a tuple, `do` carries them out."""

    def close(self) -> None:
        self.kernel.closed += 1

    def links(self) -> list[LinkInfo]:
        return [LinkInfo(link, {}) for link in self.kernel.links.values()]

    def addresses(self, names: dict[int, str]) -> list[Address]:
        return list(self.kernel.addresses)

    def routes(self, names: dict[int, str]) -> list[Route]:
        return list(self.kernel.routes)

    def rules(self) -> list[Rule]:
        return list(self.kernel.rules)

    def index(self, ifname: str) -> int:
        link = self.kernel.links.get(ifname)
        if link is None:
            raise netlink.NetlinkError(errno.ENODEV, f"no such interface: {ifname}")
        return link.index

    def forget(self, ifname: str) -> None:
        pass

    def veth(self, ifname: str, peer: str, peer_netns_fd: int, mtu: int, macs: tuple[str, str]) -> tuple:
        return ("veth", ifname, peer, self.kernel.namespace(peer_netns_fd), mtu, macs)

    def configure(self, ifname: str, inet: dict[str, int], up: bool = True) -> tuple:
        self.index(ifname)
        return ("configure", ifname, inet, up)

    def link_up(self, ifname: str) -> tuple:
        self.index(ifname)
        return ("up", ifname)

    def link_del(self, ifname: str) -> tuple:
        return ("link_del", ifname)

    def address(self, verb: str, address: Address) -> tuple:
        self.index(address.ifname)
        return ("address", verb, address)

    def route(self, verb: str, route: Route) -> tuple:
        if route.dev:
            self.index(route.dev)
        return ("route", verb, route)

    def rule(self, verb: str, rule: Rule) -> tuple:
        return ("rule", verb, rule)

    def neighbour(self, neighbour) -> tuple:
        return ("neighbour", neighbour)

    def do(self, *requests: tuple, ignore: frozenset[int] = frozenset()) -> list[int]:
        out = []
        for request in requests:
            try:
                self.kernel.request(request)
                out.append(0)
            except OSError as e:
                if e.errno not in ignore:
                    raise
                out.append(e.errno)
        return out


class FakeConntrack(_Adapter):
    def flows(self, version, *, orig_proto=None, orig_dport=None, orig_dst=None, dnat_only=False, deadline=None):
        return [f for f in self.kernel.flows if version in (None, f.version) and orig_proto in (None, f.proto)
                and orig_dport in (None, f.dport) and orig_dst in (None, f.dst) and (not dnat_only or f.status & 0x20)]

    def tally_dnat(self, deadline=None):
        counts: dict = {}
        for f in self.flows(None, dnat_only=True):
            key = (f.mark, f.reply_src.packed)
            counts[key] = counts.get(key, 0) + 1
        return counts, True

    def delete(self, flows) -> int:
        gone = set(flows)
        before = len(self.kernel.flows)
        self.kernel.flows = [f for f in self.kernel.flows if f not in gone]
        return before - len(self.kernel.flows)

    def flush_mark(self, mark: int, mask: int) -> None:
        self.kernel.log.append(f"conntrack flush mark {mark:#x}/{mask:#x}")
        self.kernel.flows = [f for f in self.kernel.flows if f.mark & mask != mark]


class FakeMonitor:
    """netlink.Monitor: the events of the fake's changes since the last read."""

    def __init__(self, kernel: FakeKernel):
        self.kernel = kernel
        self.r, self.w = os.pipe2(os.O_CLOEXEC)

    def filenos(self) -> list[int]:
        return [self.r]

    def events(self) -> list[Event]:
        out, self.kernel.events = self.kernel.events, []
        return out

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


# --- the kernel ---------------------------------------------------------------------------------


def flow(server: str, dport: int = 53, mark: int = 0, proto: int = 17, dst: str = "192.0.2.10") -> Flow:
    """A DNATed flow whose replies come from `server` (a conntrack entry as nswrap reads it)."""
    reply = ipaddress.ip_address(server)
    return Flow(f"{server}:{dport}:{mark}".encode(), mark, reply.version, dport, ipaddress.ip_address(dst), reply, proto,
                0x20)


class FakeKernel:
    """A network namespace's links, addresses, routes, rules, sysctls, nft tables and flows."""

    def __init__(self, proc_sys: pathlib.Path | None = None):
        self.links: dict[str, Link] = {}
        self.addresses: list[Address] = []
        self.routes: list[Route] = []
        self.rules: list[Rule] = []
        self.proc_sys = proc_sys
        self.table: nft.Table | None = None
        self.tables: set[tuple[str, str]] = set()  # other tables: (family, name)
        self.flows: list[Flow] = []
        self.events: list[Event] = []
        self.log: list[str] = []  # every change, in order, as a short line
        self.iptables: list[str] = []  # iptables commands nswrap ran
        self.iptables_rules: dict[str, list[list[str]]] = {}  # binary -> `-S` lines
        self.neighbours: list = []
        self.listening: set[tuple] = set()  # a server's sockets: (proto, address, port), sock_diag's answer
        self.fail_nft: str | None = None  # a batch containing this text is refused
        self.closed = 0
        self.server: FakeKernel | None = None  # the last server namespace made
        self.servers: dict[int, FakeKernel] = {}  # inode of a namespace's fd -> the namespace
        self.inside: FakeKernel | None = None  # namespaces.inside(): netlink.Routing() is its then
        self.next_index = 100
        self.peers: dict[str, tuple[FakeKernel, str]] = {}  # a veth -> its peer's namespace and name
        if proc_sys is not None:
            (proc_sys / "net/ipv6/conf/lo").mkdir(parents=True, exist_ok=True)
            for key in ("net/ipv6/conf/lo/force_forwarding", "net/ipv6/conf/all/force_forwarding"):
                self.write(key, "0")

    @classmethod
    def of(cls, host: Facts, proc_sys: pathlib.Path) -> FakeKernel:
        """A kernel holding what `host` says (tests/unit/hosts.py), sysctls included."""
        kernel = cls(proc_sys)
        for link in host.links:
            kernel.add_link(link, announce=False)
        kernel.addresses = list(host.addresses)
        kernel.routes = list(host.routes)
        kernel.rules = list(host.rules)
        for key, value in host.sysctls.items():
            kernel.write(key, value)
        kernel.next_index = max(link.index for link in host.links) + 1
        return kernel

    # sysctls

    def write(self, key: str, value: str) -> None:
        assert self.proc_sys is not None
        path = self.proc_sys / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")

    def sysctl(self, key: str) -> str | None:
        assert self.proc_sys is not None
        try:
            return (self.proc_sys / key).read_text().strip()
        except FileNotFoundError:
            return None

    def sysctls(self) -> dict[str, str]:
        if self.proc_sys is None:
            return {}
        return {str(p.relative_to(self.proc_sys)): p.read_text().strip()
                for p in sorted(self.proc_sys.rglob("*")) if p.is_file()}

    # what someone else does to the host (each announced, as the kernel would)

    def new_netns(self, directory: pathlib.Path) -> int:
        """namespaces.new_netns: a server's namespace, known by its fd's inode (a file of ours)."""
        path = directory / f"netns{len(self.servers)}"
        path.touch()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.server = self.servers[os.fstat(fd).st_ino] = namespace()
        return fd

    def namespace(self, fd: int) -> FakeKernel:
        """The namespace an fd names (one not made by new_netns: a new one, as the kernel's
        /proc/PID/ns/net of a process the fake does not know)."""
        return self.servers.setdefault(os.fstat(fd).st_ino, namespace())

    def add_link(self, link: Link, announce: bool = True) -> Link:
        if link.index == 0:
            link = replace(link, index=self.next_index)
            self.next_index += 1
        self.links[link.ifname] = link
        if self.proc_sys is not None and link.ifname != "lo":
            for key, value in IPV4_LINK.items():
                self.write(f"net/ipv4/conf/{link.ifname}/{key}", value)
            for key, value in IPV6_LINK.items():
                self.write(f"net/ipv6/conf/{link.ifname}/{key}", value)
        if announce:
            self.events.append(Event("link", False, link.index, link.ifname))
        return link

    def delete_link(self, ifname: str) -> None:
        link = self.links.pop(ifname, None)
        if link is None:
            raise OSError(errno.ENODEV, "No such device")
        self.addresses = [a for a in self.addresses if a.ifname != ifname]
        self.routes = [r for r in self.routes if r.dev != ifname]
        if ifname in self.peers:  # a veth pair goes together
            where, peer = self.peers.pop(ifname)
            where.delete_link(peer)
        if self.proc_sys is not None:
            for family in ("ipv4", "ipv6"):
                directory = self.proc_sys / "net" / family / "conf" / ifname
                for path in directory.glob("*"):
                    path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    directory.rmdir()
        self.events.append(Event("link", True, link.index, ifname))

    def add_address(self, address: Address, connected: bool = True) -> None:
        """An address, with the connected route the kernel adds for it."""
        index = self.links[address.ifname].index
        self.addresses.append(address)
        self.events.append(Event("addr", False, index))
        if connected and address.address.network.prefixlen < address.address.max_prefixlen:
            metric = 256 if address.version == 6 else 0
            prefsrc = address.address.ip if address.version == 4 else None
            self.add_route(Route(address.address.network, address.ifname, scope=SCOPE_LINK if address.version == 4 else 0,
                                 prefsrc=prefsrc, metric=metric, proto=KERNEL_PROTO))

    def add_route(self, route: Route) -> None:
        if route.dev and route.dev not in self.links:
            raise OSError(errno.ENODEV, "No such device")
        if any(r.key() == route.key() for r in self.routes):
            raise OSError(errno.EEXIST, "File exists")
        self.routes.append(route)
        self.events.append(Event("route", False, self.links[route.dev].index if route.dev else 0, proto=route.proto))

    def delete_route(self, route: Route) -> None:
        found = next((r for r in self.routes if r.key() == route.key()), None)
        if found is None:
            raise OSError(errno.ESRCH, "No such process")
        self.routes.remove(found)
        self.events.append(Event("route", True, self.links[found.dev].index if found.dev in self.links else 0,
                                 proto=found.proto))

    def add_rule(self, rule: Rule) -> None:
        if rule in self.rules:
            raise OSError(errno.EEXIST, "File exists")
        self.rules.append(rule)
        self.events.append(Event("rule", False, proto=rule.proto))

    def delete_rule(self, rule: Rule) -> None:
        if rule not in self.rules:
            raise OSError(errno.ENOENT, "No such file or directory")
        self.rules.remove(rule)
        self.events.append(Event("rule", True, proto=rule.proto))

    def delete_table(self) -> None:
        """`nft delete table inet nswrap`, as a firewall reload does."""
        self.table = None
        self.events.append(Event("nft", True, table=ruleset.TABLE, nft="deltable"))

    def flush_set(self, name: str) -> None:
        assert self.table is not None
        self.table.elements[name] = frozenset()
        self.events.append(Event("nft", True, table=ruleset.TABLE, nft="delsetelem", set=name))

    # what nswrap asks (through the adapters)

    def request(self, request: tuple) -> None:
        kind, *args = request
        self.log.append(" ".join(str(a) for a in request))
        if kind == "veth":
            ifname, peer, where, mtu, macs = args
            if ifname in self.links or peer in where.links:
                raise OSError(errno.EEXIST, "File exists")
            self.add_link(Link(0, ifname, mtu, macs[0]))
            where.add_link(Link(0, peer, mtu, macs[1]), announce=False)
            self.peers[ifname] = (where, peer)
        elif kind == "configure":
            ifname, inet, _up = args
            for key, value in inet.items():
                if self.proc_sys is not None:
                    self.write(f"net/ipv4/conf/{ifname}/{key}", str(value))
        elif kind == "up":
            self.links[args[0]] = replace(self.links[args[0]], up=True)
        elif kind == "link_del":
            self.delete_link(args[0])
        elif kind == "address":
            verb, address = args
            if verb == "add":
                if address in self.addresses:
                    raise OSError(errno.EEXIST, "File exists")
                self.add_address(address)
            else:
                self.addresses.remove(address)
        elif kind == "route":
            verb, route = args
            self.add_route(route) if verb == "add" else self.delete_route(route)
        elif kind == "rule":
            verb, rule = args
            self.add_rule(rule) if verb == "add" else self.delete_rule(rule)
        elif kind == "neighbour":
            self.neighbours.append(args[0])
        else:
            raise AssertionError(f"the fake kernel does not know {request!r}")

    def nft_apply(self, text: str, namespace_fd: int | None = None) -> None:
        if namespace_fd is not None:  # the server's own table (the resolver stub)
            self.namespace(namespace_fd).log.append(text.splitlines()[0])
            return
        if self.fail_nft is not None and self.fail_nft in text:
            raise NswrapError("nft refused the ruleset: Error: Could not process rule: Operation not permitted")
        self.table, self.tables = Batch(self.table, self.tables).apply(text)
        self.log.append("nft " + text.splitlines()[0])

    def nft_check(self, text: str) -> None:
        Batch(self.table, self.tables).apply(text)

    def read_table(self) -> nft.Table | None:
        return copy.deepcopy(self.table)

    def all_tables(self) -> list[tuple[str, str]]:
        return sorted(self.tables | ({("inet", ruleset.TABLE)} if self.table is not None else set()))

    def ruleset(self) -> list[dict]:
        return [{"metainfo": {"json_schema_version": 1}},
                *({"table": {"family": family, "name": name}} for family, name in self.all_tables())]

    def table_in(self, items: list[dict]) -> nft.Table | None:
        return self.read_table() if {"table": {"family": "inet", "name": ruleset.TABLE}} in items else None

    def iptables_run(self, binary: str, action: str, chain: str, rule: list[str]) -> None:
        line = f"{binary} {action} {chain} {shlex.join(rule)}"
        self.iptables.append(line)
        self.log.append(line)

    # comparing

    def snapshot(self) -> dict:
        """Everything the kernel holds, comparable with ==."""
        table = None if self.table is None else (
            {k: v for k, v in self.table.elements.items() if v}, dict(self.table.rules), self.table.version)
        return {"links": dict(self.links), "addresses": sorted(map(repr, self.addresses)),
                "routes": sorted(map(repr, self.routes)), "rules": sorted(map(repr, self.rules)),
                "sysctls": self.sysctls(), "table": table, "tables": set(self.tables),
                "flows": list(self.flows)}


def namespace() -> FakeKernel:
    """A new network namespace (the server's): its loopback only, no /proc/sys of its own here."""
    kernel = FakeKernel()
    kernel.add_link(Link(1, "lo", 65536), announce=False)
    kernel.next_index = 2
    return kernel


def _no(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a unit test reached the real {what}: {args}")
    return refuse


def install(monkeypatch, tmp_path: pathlib.Path, host: Facts | None = None) -> FakeKernel:
    """The fake in place of every adapter nswrap drives; state under tmp_path/run."""
    from nswrap import commands, doctor, instance, legacy
    from tests.unit.hosts import host as default_host

    proc_sys = tmp_path / "proc_sys"
    run = tmp_path / "run"
    run.mkdir()
    kernel = FakeKernel.of(host or default_host(), proc_sys)

    def routing() -> FakeRouting:
        return FakeRouting(kernel.inside or kernel)

    @contextlib.contextmanager
    def inside(fd: int):
        kernel.inside = kernel.namespace(fd)
        try:
            yield
        finally:
            kernel.inside = None

    monkeypatch.setattr(facts_mod, "PROC_SYS", str(proc_sys))
    monkeypatch.setattr(changes_mod, "PROC_SYS", str(proc_sys))
    write_sysctl = changes_mod.write_sysctl

    def logged_write(key: str, value: str) -> None:
        kernel.log.append(f"sysctl {key}={value}")
        write_sysctl(key, value)

    monkeypatch.setattr(changes_mod, "write_sysctl", logged_write)
    monkeypatch.setattr(facts_mod, "_listeners", lambda: ())
    monkeypatch.setattr(facts_mod, "_resolver_stub", lambda: None)
    monkeypatch.setattr(netlink, "Routing", routing)
    monkeypatch.setattr(netlink, "Conntrack", lambda: FakeConntrack(kernel))
    monkeypatch.setattr(netlink, "Monitor", lambda: FakeMonitor(kernel))
    monkeypatch.setattr(netlink, "listeners", lambda: [])
    monkeypatch.setattr(netlink, "listening", lambda: set(kernel.listening))
    monkeypatch.setattr(nft, "_nft", _no("nft"))
    monkeypatch.setattr(nft, "apply", kernel.nft_apply)
    monkeypatch.setattr(nft, "check", kernel.nft_check)
    monkeypatch.setattr(nft, "read_table", kernel.read_table)
    monkeypatch.setattr(nft, "has_table", lambda: kernel.table is not None)
    monkeypatch.setattr(nft, "tables", kernel.all_tables)
    monkeypatch.setattr(nft, "ruleset", kernel.ruleset)
    monkeypatch.setattr(nft, "table_in", kernel.table_in)
    monkeypatch.setattr(iptables, "_run", _no("iptables"))
    monkeypatch.setattr(iptables, "run", kernel.iptables_run)
    monkeypatch.setattr(iptables, "legacy_save", lambda binary="iptables-legacy": "")
    monkeypatch.setattr(iptables, "legacy_loaded", lambda binary="iptables-legacy": [])
    monkeypatch.setattr(iptables, "rules", lambda binary: kernel.iptables_rules.get(binary, []))
    for name in ("enter_net", "unshare_pid", "enter_pid", "enter", "own"):
        monkeypatch.setattr(namespaces, name, _no(f"namespaces.{name}"))
    (tmp_path / "netns").mkdir()
    monkeypatch.setattr(namespaces, "new_netns", lambda: kernel.new_netns(tmp_path / "netns"))
    monkeypatch.setattr(namespaces, "inside", inside)
    # state under tmp_path: the defaults bound at import time are replaced where they are used
    monkeypatch.setattr(state, "RUN_DIR", str(run))
    monkeypatch.setattr(legacy, "RUN_DIR", str(run))
    monkeypatch.setattr(state, "existing", partial(state.existing, root=str(run)))
    for module in (instance, commands):
        monkeypatch.setattr(module, "StateDir", partial(state.StateDir, root=str(run)))
    monkeypatch.setattr(commands, "existing", partial(state.existing, root=str(run)))
    monkeypatch.setattr(doctor, "existing", partial(state.existing, root=str(run)))
    monkeypatch.setattr(commands, "vanished", partial(state.vanished, root=str(run)))
    monkeypatch.setattr(commands, "remove_dir", partial(state.remove_dir, root=str(run)))
    monkeypatch.setattr(commands, "RUN_DIR", str(run))
    monkeypatch.setattr(commands, "_conntrack_use", lambda: {"count": len(kernel.flows), "max": 262144})
    monkeypatch.setattr(instance, "conntrack_count", lambda: len(kernel.flows))
    monkeypatch.setattr(instance, "proc_sys_read_only", lambda: False)
    for module in (instance, commands, doctor):
        monkeypatch.setattr(module, "require_capabilities", lambda: None)
    kernel.run_dir = run  # type: ignore[attr-defined]
    return kernel
