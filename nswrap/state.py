"""nswrap's state on disk: records, the shared allocation, locks and liveness. Only root can touch it.

    /run/nswrap/                 0700, root's; refused if it is a symlink or someone else's
      <netns>/                   one per network namespace (its cookie): records are scoped to it
        lock                     the setup lock (flock): allocation, start, stop, following
        follow                   held by the one instance that follows the host for all
        datapath.json            the shared part: uplinks' marks and tables, changed sysctls, rooms
        <id>.json                an instance's record (0600, written atomically)
        <id>.live                flock'ed by the instance for its whole life: the kernel releases
                                 it when the process dies, and no other user can open it

An instance is live while a process holds its <id>.live lock; when that cannot be told (the
kernel refuses to open or lock: EMFILE, say) `is_live` raises CannotTell rather than answer
"dead", so nothing sweeps a live instance's leftovers.

Files are opened without following links and without blocking (a FIFO planted there cannot hang
nswrap), and are never trusted: every record is validated against a strict schema before
anything acts on it; an invalid one is reported and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import get_args

from nswrap.config import (
    DATAPATHS,
    DEFAULT_UDP_TIMEOUT,
    HELPERS,
    PortRange,
    check_udp_timeout,
    parse_port_item,
    parse_uplink,
    valid_ifname,
)
from nswrap.datapath import (
    POOL6,
    Allocation,
    Forwarding6Mode,
    Instance,
    Room,
    Setting6,
    Switch6,
    SysctlChange,
    Uplink,
    mark_capacity,
)
from nswrap.datatypes import datatype, field
from nswrap.errors import NswrapError, UsageError

log = logging.getLogger("nswrap")

RUN_DIR = "/run/nswrap"
PID_MAX = 1 << 22  # the kernel's largest pid_max
IPTABLES = ("iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
MAX_ARG_STRLEN = 32 * 4096  # the kernel's limit on one argument of exec
MAX_FILE = 1 << 20  # a record holds the command line: the kernel allows up to 128 KiB per argument
ID = re.compile(r"[0-9a-f]{6}")  # always fullmatch()ed
SYSCTL_VALUE = re.compile(r"[0-2]")
FORWARDING6: tuple[Forwarding6Mode, ...] = get_args(Forwarding6Mode)


def sysctl_key_ok(key: object, settings: dict[str, tuple[str, ...]] | None = None) -> bool:
    """Is this one of the few sysctls nswrap writes: net/ipv4/conf/<uplink>/{forwarding,
    src_valid_mark} or net/ipv6/conf/<uplink>/force_forwarding, for a real interface name (not
    all, default, '.' or '..')?"""
    settings = settings or {"ipv4": ("forwarding", "src_valid_mark"), "ipv6": ("force_forwarding",)}
    if not isinstance(key, str):
        return False
    parts = key.split("/")
    return (len(parts) == 5 and parts[0] == "net" and parts[2] == "conf" and parts[1] in settings
            and parts[4] in settings[parts[1]] and valid_ifname(parts[3]) and parts[3] not in ("all", "default"))


class InvalidState(ValueError):
    pass


class CannotTell(NswrapError):
    """Whether an instance lives is unknown (the kernel refused to look: EMFILE, ENOMEM, ...):
    never taken for dead, so no sweep removes a live instance's record or datapath."""


# open(2) of <id>.live: what proves no process holds the instance's lock. ENOENT: no file; ELOOP:
# a symlink (O_NOFOLLOW); ENXIO: a socket or device, no lock file of ours. Any other error is
# "cannot tell".
NOT_A_LOCK = (errno.ENOENT, errno.ELOOP, errno.ENXIO)


# --- the directories -------------------------------------------------------------------------


def _check_dir(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise NswrapError(f"{path} is not a directory of this user (root): refusing to use it")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o700)  # ours, but too open (an older nswrap made it 0755): close it


def _open_dir(path: str, parent: int | None = None, name: str | None = None, create: bool = True) -> int:
    where = name if parent is not None and name is not None else path
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(where, 0o700, dir_fd=parent)
    elif not os.path.lexists(path):
        raise FileNotFoundError(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as e:
        raise NswrapError(f"{path}: {e.strerror} (a symlink?): refusing to use it") from None
    _check_dir(fd, path)
    return fd


class StateDir:
    """The state directory of this network namespace, opened safely."""

    def __init__(self, netns: str, root: str = RUN_DIR, ours: bool = True, create: bool = True):
        """`create=False`: FileNotFoundError if there is none (commands that only look)."""
        self.root = root
        self.netns = netns
        self.path = f"{root}/{netns}"
        self._root_fd = _open_dir(root, create=create)
        try:
            self.fd = _open_dir(self.path, self._root_fd, netns, create=create)
        except BaseException:
            os.close(self._root_fd)
            raise
        if ours and self.read(NETNS) is None:  # which namespace this is, for the sweep of vanished ones
            st = os.stat("/proc/thread-self/ns/net")
            self.write(NETNS, f"{st.st_dev} {st.st_ino}\n".encode())

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._root_fd)

    # files

    def read(self, name: str) -> bytes | None:
        """A regular file's content, or None if absent; a link, FIFO or huge file is refused."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InvalidState(f"cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidState("not a regular file")
            if st.st_size > MAX_FILE:
                raise InvalidState(f"larger than {MAX_FILE} bytes")
            return os.read(fd, MAX_FILE + 1)
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Atomically: a reader sees the old file or the new one, never half of one."""
        tmp = f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    # locks

    def _lock_fd(self, name: str) -> int:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NswrapError(f"{self.path}/{name} is not a regular file: refusing to use it")
        return fd

    def acquire(self, name: str, waiting: Callable[[], None] = lambda: None) -> int:
        """A lock, held until the returned fd is closed. Waiting for it is normal (`waiting`
        says so once); a signal handler that raises interrupts the wait. The last instance
        removes the directory, lock files included: a lock taken on a file that was removed
        meanwhile is no lock, so it is taken again on the new one."""
        said = False
        while True:
            try:
                fd = self._lock_fd(name)
            except FileNotFoundError:
                self._reopen()
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not said:
                        waiting()
                        said = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)
            self._reopen()

    def _reopen(self) -> None:
        """Our directory was removed (the last instance left): make it again."""
        os.close(self.fd)
        self.fd = _open_dir(self.path, self._root_fd, self.netns)
        st = os.stat("/proc/thread-self/ns/net")
        if self.read(NETNS) is None:
            self.write(NETNS, f"{st.st_dev} {st.st_ino}\n".encode())

    def retire(self) -> None:
        """The last instance is gone and nothing is left: remove the directory (under the lock)."""
        for entry in self.names():
            if entry != "lock":
                self.remove(entry)
        self.remove("lock")
        with contextlib.suppress(OSError):
            os.rmdir(self.netns, dir_fd=self._root_fd)

    @contextlib.contextmanager
    def lock(self, waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
        """The setup lock: allocation, starts, stops and syncs of this namespace, one at a time."""
        fd = self.acquire("lock", waiting)
        try:
            yield
        finally:
            os.close(fd)

    def try_lock(self, name: str) -> int | None:
        """A lock held for as long as the returned fd is open, or None if someone holds it."""
        fd = self._lock_fd(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def is_live(self, instance: str) -> bool:
        """Does a process hold the instance's liveness lock? (The kernel drops it at its death.)
        False only when that is known: no lock file, one that is not a regular file, or a lock
        nobody holds. CannotTell when the kernel would not say (too many open files, say): a
        caller that would sweep a dead instance's leftovers must not take a live one for dead."""
        path = f"{self.path}/{instance}.live"
        try:
            fd = os.open(f"{instance}.live", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as e:
            if e.errno in NOT_A_LOCK:
                return False
            raise CannotTell(f"cannot tell whether instance {instance} is live: {path}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        except OSError as e:
            raise CannotTell(f"cannot tell whether instance {instance} is live: {path}: {e.strerror}") from None
        finally:
            os.close(fd)


# --- namespaces that are gone -----------------------------------------------------------------

NETNS = "netns"  # "<dev> <inode>" of the network namespace a state directory belongs to


def _namespaces_in_use() -> set[int]:
    """Inodes of every network namespace a process is in or a mount holds (ip netns, container
    runtimes; our mount namespace's view and PID 1's): a namespace not among them is gone."""
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                found.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
    for view in ("self", "1"):
        with contextlib.suppress(OSError), open(f"/proc/{view}/mountinfo") as f:
            for line in f:
                root = line.split()[3]  # an nsfs bind mount's root reads "net:[<inode>]"
                if root.startswith("net:[") and root.endswith("]"):
                    found.add(int(root[5:-1]))
    return found


def vanished(root: str = RUN_DIR, current: str | None = None) -> list[str]:
    """State directories of network namespaces that no longer exist and hold no live instance.
    Their kernel objects went with the namespace; only the files are left."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    in_use: set[int] | None = None
    gone = []
    for name in names:
        if name == current or not re.fullmatch(r"[ci][0-9]+", name):
            continue
        try:
            d = StateDir(name, root, ours=False)
        except NswrapError:
            continue
        try:
            if any(n.endswith(".live") and d.is_live(n[:-5]) for n in d.names()):
                continue  # (CannotTell: the directory stays too)
            raw = d.read(NETNS)
            if raw is None:
                continue
            _dev, ino = (int(x) for x in raw.split())
            in_use = in_use if in_use is not None else _namespaces_in_use()
            if ino not in in_use:
                gone.append(name)
        except (InvalidState, ValueError, CannotTell):
            continue
        finally:
            d.close()
    return gone


def remove_dir(name: str, root: str = RUN_DIR) -> None:
    d = StateDir(name, root, ours=False)
    try:
        for entry in d.names():
            d.remove(entry)
    finally:
        d.close()
    with contextlib.suppress(OSError):
        os.rmdir(f"{root}/{name}")


# --- records ---------------------------------------------------------------------------------


@datatype(frozen=False)
class Record:
    """What an instance publishes and where its server lives; the input of the datapath."""

    id: str
    pid: int
    started: float
    command: list[str]
    instance: Instance
    mark_mask: int
    init_pid: int = 0  # PID 1 of the server's namespaces (in ours): `nswrap exec` enters them

    def to_json(self) -> bytes:
        i = self.instance
        return json.dumps({
            "version": 1, "id": self.id, "pid": self.pid, "started": self.started, "command": self.command,
            "ports": [str(p) for p in i.ports], "uplinks": [str(u) for u in i.uplinks],
            "addresses": [str(a) for a in i.addresses], "loopback_ports": [str(p) for p in i.loopback_ports],
            "outbound": i.outbound, "helpers": list(i.helpers), "subnet": str(i.subnet),
            "subnet6": str(i.subnet6) if i.subnet6 else None, "forwarding6": i.forwarding6,
            "init_pid": self.init_pid, "mark_mask": self.mark_mask, "udp_timeout": i.udp_timeout,
            "datapath": i.datapath,
        }, indent=1).encode()


def _need(data: dict, key: str, kind: type | tuple[type, ...]):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidState(f"{key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _list_of(data: dict, key: str, limit: int = 65536) -> list[str]:
    value = _need(data, key, list)
    if len(value) > limit or not all(isinstance(v, str) and len(v) <= MAX_ARG_STRLEN for v in value):
        raise InvalidState(f"{key!r} must be a list of strings")
    return value


def _ports(items: list[str]) -> tuple[PortRange, ...]:
    try:
        return tuple(parse_port_item(p) for p in items)
    except UsageError as e:
        raise InvalidState(str(e)) from None


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidState(f"not JSON: {e}") from None
    except RecursionError:
        raise InvalidState("not JSON nswrap writes: nested too deep") from None


def parse_record(raw: bytes, name: str) -> Record:
    data = _json(raw)
    if not isinstance(data, dict) or data.get("version") != 1:
        raise InvalidState("not a version 1 record")
    rid = _need(data, "id", str)
    if not ID.fullmatch(rid) or f"{rid}.json" != name:
        raise InvalidState(f"id {rid!r} is not 6 hex digits matching the file name")
    try:
        uplinks = tuple(parse_uplink(u) for u in _list_of(data, "uplinks", 64))
        addresses = tuple(ipaddress.ip_address(a) for a in _list_of(data, "addresses", 256))
        subnet = ipaddress.IPv4Network(_need(data, "subnet", str))
        subnet6_text = data.get("subnet6")
        subnet6 = ipaddress.IPv6Network(subnet6_text) if subnet6_text is not None else None
    except (ValueError, TypeError, UsageError) as e:
        raise InvalidState(str(e)) from None
    if subnet.prefixlen != 30:
        raise InvalidState("subnet is not a /30")
    if subnet6 is not None and (subnet6.prefixlen != 64 or not subnet6.subnet_of(POOL6)):
        raise InvalidState(f"subnet6 is not a /64 of {POOL6}")
    forwarding6 = data.get("forwarding6", "interface")  # records of nswrap before 0.? have none
    if forwarding6 not in FORWARDING6:
        raise InvalidState("bad forwarding6")
    helpers = tuple(_list_of(data, "helpers", 4))
    if any(h not in HELPERS for h in helpers):
        raise InvalidState("unknown helper")
    mask = _need(data, "mark_mask", int)
    if not 0 < mask <= 0xFFFFFFFF or (mask + (mask & -mask)) & mask:
        raise InvalidState("mark_mask is not one contiguous run of bits")
    pid, init_pid = _need(data, "pid", int), _need(data, "init_pid", int)
    if not 0 < pid <= PID_MAX or not 0 <= init_pid <= PID_MAX:
        raise InvalidState("bad pid")
    started = _need(data, "started", (int, float))
    if not 0 < started < 1e11:  # a time, not 1e300, NaN or 400 digits
        raise InvalidState("bad start time")
    udp_timeout = data.get("udp_timeout", DEFAULT_UDP_TIMEOUT)  # an older nswrap's record has none
    try:
        check_udp_timeout(udp_timeout)
    except UsageError:
        raise InvalidState("udp_timeout is not a number of seconds nswrap takes") from None
    datapath = data.get("datapath", "nft")  # an older nswrap's record has none
    if datapath not in DATAPATHS:
        raise InvalidState("bad datapath")
    instance = Instance(
        id=rid, ports=_ports(_list_of(data, "ports", 65536)), subnet=subnet, subnet6=subnet6, uplinks=uplinks,
        addresses=addresses, loopback_ports=_ports(_list_of(data, "loopback_ports", 65536)),
        outbound=_need(data, "outbound", bool), helpers=helpers, forwarding6=forwarding6, udp_timeout=udp_timeout,
        datapath=datapath,
    )
    if not instance.ports:
        raise InvalidState("no ports")
    return Record(rid, pid, float(started), _list_of(data, "command"), instance, mask, init_pid)


# --- the shared allocation ---------------------------------------------------------------------

ALLOCATION = "datapath.json"


def allocation_to_json(a: Allocation) -> bytes:
    return json.dumps({
        "version": 1, "mark_mask": a.mark_mask, "priority": a.priority,
        "uplinks": [{"ifname": u.ifname, "index": u.index, "table": u.table} for u in a.uplinks],
        "sysctls": [{"key": s.key, "original": s.original, "ours": s.ours, "ifindex": s.ifindex} for s in a.sysctls],
        "rooms": [{"binary": r.binary, "chain": r.chain, "rule": list(r.rule)} for r in a.rooms],
        "switch6": None if a.switch6 is None else {
            "default_forwarding": a.switch6.default_forwarding, "default_accept_ra": a.switch6.default_accept_ra,
            "interfaces": [{"ifname": i.ifname, "ifindex": i.ifindex, "forwarding": i.forwarding, "accept_ra": i.accept_ra}
                           for i in a.switch6.interfaces]},
    }, indent=1).encode()


def _setting_value(value: object) -> str:
    if not isinstance(value, str) or not SYSCTL_VALUE.fullmatch(value):
        raise InvalidState("bad sysctl value")
    return value


def _index(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 31:
        raise InvalidState("bad interface index")
    return value


def _switch6(data: object) -> Switch6 | None:
    """What every interface had before nswrap held the global IPv6 switch (at most one entry a
    possible interface: 1 << 20 of them would not fit in MAX_FILE anyway)."""
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("interfaces"), list):
        raise InvalidState("bad switch6")
    interfaces = []
    for i in data["interfaces"]:
        if not isinstance(i, dict) or not isinstance(i.get("ifname"), str) or not valid_ifname(i["ifname"]):
            raise InvalidState("bad switch6 interface")
        interfaces.append(Setting6(i["ifname"], _index(i.get("ifindex")), _setting_value(i.get("forwarding")),
                                   _setting_value(i.get("accept_ra"))))
    return Switch6(tuple(interfaces), _setting_value(data.get("default_forwarding")),
                   _setting_value(data.get("default_accept_ra")))


def _known_rooms() -> set[tuple[str, ...]]:
    from nswrap.firewall import Blocker, rooms

    return {r.rule for r in rooms(Blocker("", "iptables-nft"))}


def parse_allocation(raw: bytes) -> Allocation:
    data = _json(raw)
    if not isinstance(data, dict) or data.get("version") != 1:
        raise InvalidState("not a version 1 allocation")
    mask, priority = _need(data, "mark_mask", int), _need(data, "priority", int)
    if not 0 < mask <= 0xFFFFFFFF or (mask + (mask & -mask)) & mask:
        raise InvalidState("mark_mask is not one contiguous run of bits")
    if not 1 <= priority <= 32000:
        raise InvalidState("priority out of range")
    uplinks, sysctls, rooms = [], [], []
    for u in _need(data, "uplinks", list):
        if not isinstance(u, dict) or not isinstance(u.get("ifname"), str) or not valid_ifname(u["ifname"]):
            raise InvalidState("bad uplink")
        index, table = u.get("index"), u.get("table")
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= mark_capacity(mask):
            raise InvalidState("uplink index outside the mark mask")
        if not isinstance(table, int) or isinstance(table, bool) or not 1 <= table < 1 << 31 or table in (253, 254, 255):
            raise InvalidState("bad routing table")
        uplinks.append(Uplink(u["ifname"], index, table))
    for s in _need(data, "sysctls", list):
        if not isinstance(s, dict) or not sysctl_key_ok(s.get("key")):
            raise InvalidState(f"sysctl key {s.get('key') if isinstance(s, dict) else s!r} is not one nswrap sets")
        if not isinstance(s.get("original"), str) or not SYSCTL_VALUE.fullmatch(s["original"]) or s.get("ours") != "1":
            raise InvalidState("bad sysctl value")
        ifindex = s.get("ifindex", 0)
        if not isinstance(ifindex, int) or isinstance(ifindex, bool) or not 0 <= ifindex < 1 << 31:
            raise InvalidState("bad interface index")
        sysctls.append(SysctlChange(s["key"], s["original"], s["ours"], ifindex))
    known = _known_rooms()
    for r in _need(data, "rooms", list):
        if (not isinstance(r, dict) or r.get("binary") not in IPTABLES
                or r.get("chain") not in ("FORWARD", "DOCKER-USER") or tuple(r.get("rule", ())) not in known):
            raise InvalidState("an iptables rule that is not nswrap's")
        rooms.append(Room(r["binary"], r["chain"], tuple(r["rule"])))
    return Allocation(mask, priority, tuple(uplinks), tuple(sysctls), tuple(rooms), _switch6(data.get("switch6")))


# --- this namespace's state, as one object ----------------------------------------------------


@datatype(frozen=False)
class State:
    dir: StateDir
    problems: list[str] = field(default_factory=list)  # invalid files found (reported, skipped)

    def records(self) -> list[Record]:
        """Valid records of this namespace, live or dead."""
        found = []
        for name in self.dir.names():
            if not name.endswith(".json") or name == ALLOCATION or name.startswith("."):
                continue
            try:
                raw = self.dir.read(name)
                if raw is not None:
                    found.append(parse_record(raw, name))
            except InvalidState as e:
                self._problem(f"{self.dir.path}/{name}: {e}")
        return found

    def live(self) -> list[Record]:
        return [r for r in self.records() if self.dir.is_live(r.id)]

    def allocation(self) -> Allocation | None:
        try:
            raw = self.dir.read(ALLOCATION)
            return parse_allocation(raw) if raw is not None else None
        except InvalidState as e:
            self._problem(f"{self.dir.path}/{ALLOCATION}: {e}")
            return None

    def save_allocation(self, allocation: Allocation | None) -> None:
        if allocation is None:
            self.dir.remove(ALLOCATION)
        else:
            self.dir.write(ALLOCATION, allocation_to_json(allocation))

    def save(self, record: Record) -> None:
        self.dir.write(f"{record.id}.json", record.to_json())

    def forget(self, instance: str) -> None:
        self.dir.remove(f"{instance}.json")
        self.dir.remove(f"{instance}.live")

    def forget_dead(self, dead: list[Record]) -> None:
        """Dead instances' records, once the sync that removed their leftovers is done."""
        for record in dead:
            self.forget(record.id)
            log.warning("removed a dead instance's leftovers: instance %s (pid %d)", record.id, record.pid)

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)
            log.warning("ignoring %s", text)


def existing(netns: str, root: str = RUN_DIR) -> State | None:
    """This namespace's state if there is any, for commands that only look (they create nothing)."""
    try:
        return State(StateDir(netns, root, create=False))
    except FileNotFoundError:
        return None


def hold(state: State, instance: str) -> int:
    """Take the instance's liveness lock for the life of this process; the fd is close-on-exec."""
    fd = state.dir.try_lock(f"{instance}.live")
    if fd is None:
        raise NswrapError(f"instance id {instance} is taken")
    return fd


def new_id(state: State, taken: set[str]) -> str:
    while True:
        candidate = os.urandom(3).hex()
        if candidate not in taken and state.dir.read(f"{candidate}.json") is None:
            return candidate


def readable() -> bool:
    """Can this process see nswrap's state at all (root's 0700 directory)?"""
    try:
        os.listdir(RUN_DIR)
    except FileNotFoundError:
        pass
    except PermissionError:
        return False
    return True
