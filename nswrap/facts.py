"""Read-only probes of the host namespace, as plain frozen data.

Nothing here changes the host. `Facts` is what the datapath is computed from, so unit tests build
one by hand and pin the datapath without root. Probes that cannot run raise (NswrapError or
OSError): "could not look" is never reported as "nothing found".
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from nswrap.datatypes import datatype, field
from nswrap.objects import (
    FAMILIES,
    RT_TABLE_MAIN,
    SCOPE_UNIVERSE,
    Address,
    IPAddress,
    IPInterface,
    Link,
    Listener,
    Route,
    Rule,
)

if TYPE_CHECKING:
    from nswrap.fastpath import Fast
    from nswrap.netlink import Routing

HOST_PREFIX = "nsw-"  # host end of an instance's veth: nsw-<id>
PROC_SYS = "/proc/sys"
# A test seam, not an option: the system tests make nswrap see a kernel older than 6.17 (no
# per-interface IPv6 forwarding) on the kernel they run on.
OLD_KERNEL_SEAM = "NSWRAP_TEST_NO_FORCE_FORWARDING"


@datatype
class Facts:
    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()
    sysctls: dict[str, str] = field(default_factory=dict)  # key under /proc/sys -> value, for the keys that matter
    ipv6_per_interface: bool = True  # Linux >= 6.17: per-interface IPv6 forwarding (force_forwarding)
    listeners: tuple[Listener, ...] = ()  # the host's sockets that clients reach (TCP listening, UDP bound)
    resolver_stub: IPAddress | None = None  # the host's only resolver, on its loopback (127.0.0.53, 127.0.0.11)
    fast: Fast | None = None  # what the tc-BPF fast path holds (None: nothing of it attached)

    def link(self, ifname: str) -> Link | None:
        return next((link for link in self.links if link.ifname == ifname), None)

    def global_addresses(self, ifname: str, version: int) -> list[IPInterface]:
        return [a.address for a in self.addresses
                if a.ifname == ifname and a.scope == SCOPE_UNIVERSE and a.version == version]

    def main_routes(self, ifname: str, version: int) -> list[Route]:
        return [r for r in self.routes if r.table == RT_TABLE_MAIN and r.dev == ifname and r.version == version]

    def sysctl(self, key: str) -> str | None:
        return self.sysctls.get(key)


def sysctl_keys(names: list[str]) -> list[str]:
    """The settings the datapath depends on, for these interfaces."""
    keys = ["net/ipv4/conf/all/src_valid_mark", "net/ipv4/conf/all/route_localnet", "net/ipv6/conf/all/forwarding",
            "net/ipv4/conf/all/forwarding", "net/ipv6/conf/default/forwarding", "net/ipv6/conf/default/accept_ra"]
    for name in names:
        keys += [sysctl_key(4, name, "forwarding"), sysctl_key(4, name, "src_valid_mark"),
                 sysctl_key(6, name, "force_forwarding")]
    return keys


def per_interface_forwarding6() -> bool:
    """Linux >= 6.17: IPv6 forwarding per interface (force_forwarding)."""
    return os.path.exists(f"{PROC_SYS}/net/ipv6/conf/lo/force_forwarding") and not os.environ.get(OLD_KERNEL_SEAM)


def sysctl_key(family: int, ifname: str, setting: str) -> str:
    """The setting's path under /proc/sys, which names a VLAN eth0.100 as it is (sysctl(8)
    writes it eth0/100 instead: changes.sysctl_name)."""
    return f"net/ipv{family}/conf/{ifname}/{setting}"


def read_sysctl(key: str) -> str | None:
    try:
        with open(f"{PROC_SYS}/{key}") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _listeners() -> tuple[Listener, ...]:
    """The host's sockets that clients reach, any user's (sock_diag: netlink.listeners)."""
    from nswrap import netlink

    return tuple(sorted(netlink.listeners(), key=lambda s: (s.proto, s.port, s.address.version, s.address, s.inode)))


def socket_owners(inodes: set[int], proc: str = "/proc") -> dict[int, tuple[int, str]]:
    """{inode: (pid, command name)} of the processes holding these sockets: the lowest pid of
    those that hold one (a forking server's parent). Walks every process's descriptors, so it is
    called only once there is something to name; what is not found is left out (a process of
    another PID namespace, a socket of the kernel's own)."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes if inode}
    found: dict[int, tuple[int, str]] = {}
    pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    for pid in pids:
        if len(found) == len(wanted):
            break
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:  # gone, or a kernel thread
            continue
        for fd in fds:
            try:
                inode = wanted.get(os.readlink(f"{proc}/{pid}/fd/{fd}"))
            except OSError:
                continue
            if inode is not None and inode not in found:
                try:
                    with open(f"{proc}/{pid}/comm") as f:
                        name = f.read().strip()
                except OSError:
                    name = "?"
                found[inode] = (pid, name)
    return found


def _resolver_stub() -> IPAddress | None:
    """The host's resolver, when every nameserver in /etc/resolv.conf is on IPv4 loopback: the
    server's namespace has a loopback of its own, so it needs a way to the host's."""
    import ipaddress

    try:
        with open("/etc/resolv.conf") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    servers = []
    for line in lines:
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1:
            try:
                servers.append(ipaddress.ip_address(words[1].split("%")[0]))
            except ValueError:
                continue
    if servers and all(s.is_loopback for s in servers):
        return next((s for s in servers if s.version == 4), None)
    return None


def gather(routing: Routing) -> Facts:
    """One dump each of links, addresses, routes (every table) and rules, and the sysctls."""
    infos = routing.links()
    links = tuple(info.link for info in infos)
    names = {link.index: link.ifname for link in links}
    sysctls = {}
    keys = sysctl_keys([link.ifname for link in links if link.ifname != "lo" and not link.ifname.startswith(HOST_PREFIX)])
    for link in links:
        if link.ifname.startswith(HOST_PREFIX):  # a write to net.ipv4.ip_forward resets their forwarding too
            keys += [sysctl_key(4, link.ifname, "forwarding"), sysctl_key(6, link.ifname, "force_forwarding")]
        else:  # what the global IPv6 switch rewrites, and what keeps router advertisements working
            keys += [sysctl_key(6, link.ifname, "forwarding"), sysctl_key(6, link.ifname, "accept_ra")]
    per_interface6 = per_interface_forwarding6()
    for key in keys:
        if not per_interface6 and key.endswith("/force_forwarding"):
            continue
        value = read_sysctl(key)
        if value is not None:
            sysctls[key] = value
    return Facts(
        links=links,
        addresses=tuple(routing.addresses(names)),
        routes=tuple(routing.routes(names)),
        rules=tuple(routing.rules()),
        sysctls=sysctls,
        ipv6_per_interface=per_interface6,
        listeners=_listeners(),
        resolver_stub=_resolver_stub(),
        fast=_fast(links),
    )


def _fast(links: tuple[Link, ...]) -> Fast | None:
    """The fast path's filters and endpoints (docs/fastpath.md); the bpf modules are imported only
    where some link has a clsact qdisc to look at."""
    from nswrap.netlink.tc import Tc

    with Tc() as tc:
        with_clsact = tc.clsact_links()
    if not with_clsact:
        return None
    from nswrap.bpf import fast

    return fast.read({link.ifname: link.index for link in links if link.index in with_clsact}) or None


def netns_id() -> str:
    """Identity of the network namespace we run in, for the state directory: the namespace
    cookie (never reused, Linux >= 5.14), else the inode of its nsfs file."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            cookie = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, 71, 8), "little")  # SO_NETNS_COOKIE
            return f"c{cookie}"
        except OSError:
            return f"i{os.stat('/proc/thread-self/ns/net').st_ino}"


def proc_sys_read_only() -> bool:
    """Is /proc/sys mounted read-only here (a container): no sysctl can be written?"""
    return bool(os.statvfs("/proc/sys").f_flag & os.ST_RDONLY)


def conntrack_count() -> int:
    """Entries in this namespace's conntrack table (-1: cannot tell)."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return -1


__all__ = ["FAMILIES", "Facts", "gather", "netns_id", "read_sysctl", "sysctl_key"]
