"""Before a start changes anything: what refuses it, and what the server is given.

Checks that refuse a start (or a dry run) with one line naming the culprit: nswrap's
capabilities (`require_capabilities`), --ready-fd (`check_ready_fd`), --user (`resolve_user`),
a record that could not be read back after a crash (`check_recordable`), and the host and the
live instances (`check_start`: uplinks, ports and gateways taken, host sockets whose clients the
server would take, `check_host_sockets`). And what the start makes: the instance (`new_instance`:
its subnet and how its IPv6 is forwarded; `loopback_ports`: the published ports the host's own
clients reach on 127.0.0.1) and the server's environment (`server_env`, with the host's public
side as NSWRAP_HOST_*: `host_env`).

Reads the host (/proc, the user database); changes nothing.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

from nswrap.changes import read_only_message
from nswrap.config import Config, PortRange
from nswrap.datapath import (
    NO_IPV6_OLD_KERNEL,
    Allocation,
    Instance,
    absent_addresses,
    allocate_subnet,
    check_uplinks,
    choose_forwarding6,
    conflicts,
    gateway_conflict,
    instance_uplinks,
    taken_over,
    udp_timeout_conflict,
    ula_subnet,
)
from nswrap.errors import NswrapError, UsageError, cut, quoted
from nswrap.facts import Facts, proc_sys_read_only, socket_owners
from nswrap.fastpath import MAX_ENDPOINTS, endpoint_count
from nswrap.objects import Listener
from nswrap.state import MAX_FILE, InvalidState, Record, parse_record
from nswrap.supervise import Credentials

log = logging.getLogger("nswrap")

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
ALL6 = "net/ipv6/conf/all/forwarding"


def require_capabilities() -> None:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    missing = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")) if not caps >> bit & 1]
    if missing and os.geteuid() == 0:  # root already, without them: a container started without --cap-add
        raise NswrapError(f"not permitted: root without {' and '.join(missing)}: a container? run it with "
                          "--cap-add NET_ADMIN --cap-add SYS_ADMIN")
    if missing:
        raise NswrapError(f"not permitted: nswrap needs {' and '.join(missing)} (run it as root)")



def resolve_user(spec: str) -> Credentials:
    """USER[:GROUP] (names or numbers) -> uid, gid and the user's supplementary groups. Ports
    below 1024: by the server namespace's ip_unprivileged_port_start, or, where /proc/sys is
    read-only, by CAP_NET_BIND_SERVICE alone."""
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise UsageError(f"invalid --user {quoted(spec)}: no such user {quoted(user)}") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"invalid --user {quoted(spec)}: no such group {quoted(group)}") from None
    return Credentials(entry.pw_uid, gid, tuple(os.getgrouplist(entry.pw_name, gid)), proc_sys_read_only())


def check_ready_fd(fd: int | None) -> None:
    """--ready-fd must name a descriptor the caller opened for us to write to."""
    if fd is None:
        return
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise UsageError(f"invalid --ready-fd {fd}: no such open file descriptor") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise UsageError(f"invalid --ready-fd {fd}: open for reading only")


def new_instance(config: Config, facts: Facts, live: list[Record], allocation: Allocation | None, instance_id: str) -> Instance:
    """The instance a start makes: a free subnet, and how its IPv6 is forwarded, or not (said
    once; refused where /proc/sys is read-only and --ipv6-forwarding asked for a mode)."""
    subnet = allocate_subnet(facts, tuple(r.instance for r in live), config.subnet)
    forwarding6 = choose_forwarding6(config.ipv6_forwarding, facts, allocation)
    serves6 = any(a.version == 6 and a.scope == 0 for a in facts.addresses)
    if forwarding6 is None and config.ipv6_forwarding == "auto" and serves6 and config.datapath != "bpf":
        log.warning("%s", NO_IPV6_OLD_KERNEL)
    if forwarding6 in ("interface", "global") and proc_sys_read_only() and facts.sysctl(ALL6) != "1":
        if config.ipv6_forwarding != "auto":
            raise NswrapError(read_only_message([ALL6]))
        forwarding6 = None  # IPv6 forwarding cannot be turned on here
        if serves6 and config.datapath != "bpf":
            log.warning("IPv6 clients are not served: /proc/sys is read-only and IPv6 forwarding is off "
                        "(a container? start it with --sysctl net.ipv6.conf.all.forwarding=1)")
    if forwarding6 is None and config.datapath == "bpf" and config.ipv6_forwarding != "off":
        forwarding6 = "fast"  # published IPv6 flows need no forwarding on the fast path
    return Instance(
        id=instance_id, ports=config.ports, subnet=subnet,
        subnet6=ula_subnet(subnet) if forwarding6 else None,
        uplinks=config.uplinks, addresses=config.addresses, loopback_ports=loopback_ports(config),
        outbound=config.outbound, helpers=config.helpers, forwarding6=forwarding6 or "interface",
        udp_timeout=config.udp_timeout, datapath=config.datapath,
    )


def loopback_ports(config: Config) -> tuple[PortRange, ...]:
    """Published ports the host's own clients reach on 127.0.0.1: all of them, unless --address
    leaves 127.0.0.1 out. A host socket already there is refused at start, or taken over with
    --take-over (check_start)."""
    if config.addresses and not any(a.is_loopback and a.version == 4 for a in config.addresses):
        return ()
    return config.ports


def check_recordable(record: Record) -> None:
    """The record must read back as it was written (the reader's limits: state.parse_record)."""
    raw = record.to_json()
    try:
        if len(raw) > MAX_FILE:
            raise InvalidState(f"{len(raw)} bytes, more than {MAX_FILE}")
        if parse_record(raw, f"{record.id}.json") == record:
            return
    except InvalidState as e:
        raise UsageError(f"too much to record for cleanup after a crash ({e}): a shorter command line or fewer ports") from None
    raise UsageError("this instance cannot be recorded for cleanup after a crash (a bug: please report it)")


def server_env(public: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: nswrap's own, without what is nswrap's (its settings, and the
    notify socket, which is nswrap's to write to), plus the host's public side (`public`,
    NSWRAP_HOST_*: host_env)."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET" and not k.startswith("NSWRAP_")}
    return {**env, **(public or {})}


HOST_ENV = "NSWRAP_HOST_"  # no option of nswrap's is named HOST_…: these never read as settings


def env_name(ifname: str) -> str:
    """An interface name as part of a shell variable's name: eth0.100 -> eth0_100."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in ifname)


def host_env(facts: Facts, instance: Instance) -> dict[str, str]:
    """What the server may need to know of the host's public side, as it was at start (issue
    25: protocols that put addresses in their payload, SIP, FTP, STUN/TURN): the uplinks served
    and the addresses published on each (--address ones, or each uplink's global addresses)."""
    uplinks = list(dict.fromkeys(name for v in instance.families for name in instance_uplinks(facts, instance, v)))
    chosen = {a for a in instance.addresses if not a.is_loopback}
    env = {f"{HOST_ENV}UPLINKS": " ".join(uplinks)}
    every: list[str] = []
    for name in uplinks:
        here = [str(a.ip) for v in instance.families for a in facts.global_addresses(name, v)
                if not chosen or a.ip in chosen]
        env[f"{HOST_ENV}ADDRESSES_{env_name(name)}"] = " ".join(here)
        every += here
    every += [str(a) for a in instance.addresses if not a.is_loopback and str(a) not in every]
    env[f"{HOST_ENV}ADDRESSES"] = " ".join(dict.fromkeys(every))
    return env


def check_start(facts: Facts, instance: Instance, live: list[Record], take_over: bool = False) -> None:
    """What refuses a start (or a dry run) before anything changes: its uplinks, a port or a
    gateway that a live instance, named with its pid and command, already has otherwise, and a
    host socket whose clients it would take (unless --take-over)."""
    check_uplinks(facts, instance)
    for warning in absent_addresses(facts, instance):
        log.warning("%s", warning)
    others = tuple(r.instance for r in live)
    clash = conflicts(instance, others) or gateway_conflict(facts, instance, others) or udp_timeout_conflict(instance, others)
    if clash:
        owner = next(r for r in live if r.id in clash)
        raise NswrapError(f"{clash} (pid {owner.pid}: {cut(' '.join(owner.command), 200)})")
    check_host_sockets(facts, instance, take_over)
    if instance.datapath == "bpf":
        check_endpoints(facts, instance, others)


def check_endpoints(facts: Facts, instance: Instance, others: tuple[Instance, ...]) -> None:
    """The fast path's map of published endpoints is shared: this instance's and the live `bpf`
    instances' must fit it together."""
    count = endpoint_count(facts, instance)
    taken = sum(endpoint_count(facts, other) for other in others if other.datapath == "bpf")
    if count + taken <= MAX_ENDPOINTS:
        return
    beside = f" beside the {taken} of the live bpf instances" if taken else ""
    raise UsageError(f"--datapath bpf: {count} endpoints (ports x addresses x uplinks){beside} are more than the fast "
                     f"path holds ({MAX_ENDPOINTS}): publish fewer with --uplink or --address, or use --datapath nft")


MORE_SOCKETS = 3  # named besides the first, in the one line that says which host sockets are taken


def check_host_sockets(facts: Facts, instance: Instance, take_over: bool, proc: str = "/proc") -> None:
    """A host process serving a published port where the instance publishes it would lose its
    clients to the server, silently (issue 23: an sshd on 0.0.0.0:22 and --ports 1-65535/tcp; a
    local user who binds 127.0.0.1:PORT first to capture the host's own clients): refused, naming
    the socket and its owner, unless --take-over says it is intended (then one warning)."""
    taken = taken_over(facts, instance)
    if not taken:
        return
    owners = socket_owners({s.inode for s in taken}, proc)
    sockets = list({(s.proto, s.address, s.port): s for s in taken}.values())  # SO_REUSEPORT: one of each

    def owner(s: Listener, listed: bool = False) -> str:
        if s.inode in owners:
            pid, name = owners[s.inode]
            return f"{name}, pid {pid}" if listed else f"{name} (pid {pid})"
        if not s.inode:
            return "the kernel"
        return f"not found, socket inode {s.inode}" if listed else f"a process nswrap cannot find (socket inode {s.inode})"

    def more(rest: list[Listener], with_owner: bool) -> str:
        named = [f"{s} ({owner(s, listed=True)})" if with_owner else str(s) for s in rest[:MORE_SOCKETS]]
        if len(rest) > MORE_SOCKETS:
            named.append(f"{len(rest) - MORE_SOCKETS} more")
        return ", ".join(named)

    if take_over:
        log.warning("--take-over: clients of %s reach the server from now on", more(sockets, True))
        return
    first, rest = sockets[0], sockets[1:]
    also = f" (also {more(rest, False)})" if rest else ""
    raise UsageError(f"port {first.port}/{first.proto} is served on this host by {owner(first)} on {first.address}{also}: "
                     "publishing it would take its clients; leave it out of --ports, narrow with --address, "
                     "or give --take-over")

def check_fast() -> None:
    """--datapath bpf, before any host change: the kernel loads the fast path here (exit 2
    otherwise, in one line; that its map holds every endpoint, check_start said)."""
    from nswrap.bpf import fast

    fast.probe()
