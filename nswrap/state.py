"""Instance records under /run/nswrap, liveness, and recovery from instances that died.

Touches: files under RUN_DIR; sysctls (restoring recorded values); and, in `sweep`, host objects
tagged as nswrap's (nft tables `nswrap-<id>`, links `nsw-<id>`, rules and routes of `protocol
110`) whose instance is dead. Everything here runs under the setup lock.

Liveness: each running instance binds the abstract unix socket `nswrap/instance/<id>`. Abstract
names belong to the network namespace and are released by the kernel when the holder dies, so
"can I bind it?" answers "is that instance dead?" without trusting pids or files.

Sysctls shared by instances (two instances on one uplink both need its forwarding on): an
instance restores a value it changed only if no live instance still needs that key; otherwise it
hands the original value over to that instance's record, and the last one restores it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nswrap import firewall, netlink, nft
from nswrap.errors import NswrapError
from nswrap.plan import HOST_PREFIX, PROTO, TABLE_PREFIX

log = logging.getLogger("nswrap")

RUN_DIR = Path("/run/nswrap")
LOCK_TIMEOUT = 30.0


SO_NETNS_COOKIE = 71


def netns_key() -> str:
    """Identity of the network namespace we run in: records of other namespaces are not ours.

    The namespace cookie (Linux >= 5.14) is never reused; an inode is, once its namespace is gone.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            return "cookie:" + str(int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little"))
        except OSError:
            return "inode:" + str(os.stat("/proc/thread-self/ns/net").st_ino)


def _abstract(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0nswrap/" + name)
    except OSError:
        sock.close()
        raise
    return sock


def hold_instance(instance: str) -> socket.socket:
    return _abstract(f"instance/{instance}")


def is_live(instance: str) -> bool:
    try:
        _abstract(f"instance/{instance}").close()
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    return False


@contextlib.contextmanager
def setup_lock() -> Iterator[None]:
    """Serialise allocation and teardown between instances in this network namespace.

    An abstract socket: scoped to the namespace and released when its holder dies, so a crashed
    instance can never leave the lock behind.
    """
    deadline, pause = time.monotonic() + LOCK_TIMEOUT, 0.002
    while True:
        try:
            sock = _abstract("setup-lock")
            break
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise NswrapError(f"cannot take the setup lock: {e.strerror}") from None
            time.sleep(pause)  # another instance holds it for milliseconds
            pause = min(pause * 2, 0.05)
    try:
        yield
    finally:
        sock.close()


@dataclass
class Record:
    id: str
    pid: int
    started: float
    command: list[str]
    ports: list[list]  # [proto, outer_lo, outer_hi, inner_lo]
    uplinks: list[str]
    needs: list[str] = field(default_factory=list)  # sysctl keys this instance relies on
    changed: dict[str, str] = field(default_factory=dict)  # sysctl key -> value to restore
    netns: str = ""
    marks: list[int] = field(default_factory=list)  # one per uplink, under mark_mask
    init_pid: int = 0  # PID 1 of the server's namespaces (in ours): `nswrap exec` enters them
    mark_mask: int = 0

    @property
    def path(self) -> Path:
        return RUN_DIR / f"{self.id}.json"

    def describe(self, plan) -> Record:
        """Take what the record says about uplinks, marks and needed sysctls from `plan`."""
        self.uplinks = [u.ifname for u in plan.uplinks]
        self.marks = [u.mark for u in plan.uplinks]
        self.mark_mask = plan.mark_mask
        self.needs = [s.key for s in plan.sysctls]
        return self

    def save(self) -> None:
        RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)  # atomic: a reader never sees half a record

    def reload(self) -> Record:
        """The record as on disk: other instances may have handed sysctls over to us."""
        return load(self.path) or self

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def load(path: Path) -> Record | None:
    try:
        return Record(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def records() -> list[Record]:
    """Records of instances in this network namespace, live or dead."""
    here = netns_key()
    found = [load(p) for p in sorted(RUN_DIR.glob("*.json"))] if RUN_DIR.is_dir() else []
    return [r for r in found if r is not None and r.netns == here]


def live_records() -> list[Record]:
    return [r for r in records() if is_live(r.id)]


def write_sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


def read_sysctl(key: str) -> str:
    with open(f"/proc/sys/{key}") as f:
        return f.read().strip()


def release_sysctl(owner: Record, key: str, original: str) -> str:
    """Restore `key` unless a live instance still needs it; then hand the original over."""
    for other in live_records():
        if other.id != owner.id and key in other.needs:
            other = other.reload()
            other.changed.setdefault(key, original)
            other.save()
            return f"# {key}={original}: handed over to instance {other.id}, which still needs it"
    with contextlib.suppress(FileNotFoundError):  # gone with its interface
        write_sysctl(key, original)
    return f"sysctl -w {key.replace('/', '.')}={original}"


class Journal:
    """The live instance's record, kept on disk before each change it describes."""

    def __init__(self, record: Record):
        self.record = record

    def start(self) -> None:
        self.record.netns = netns_key()
        self.record.save()

    def changing(self, key: str, original: str) -> None:
        self.record.changed.setdefault(key, original)
        self.record.save()

    def started(self, init_pid: int) -> None:
        self.record = self.record.reload()
        self.record.init_pid = init_pid
        self.record.save()

    def follow(self, plan) -> None:
        """The running instance moved to `plan` (uplinks came or went): keep the record true."""
        self.record = self.record.reload()
        self.record.describe(plan)
        self.record.save()

    def release(self, key: str) -> str:
        self.record = self.record.reload()
        original = self.record.changed.pop(key, None)
        if original is None:
            return f"# {key}: nothing to restore"
        said = release_sysctl(self.record, key, original)
        self.record.save()
        return said

    def finish(self) -> None:
        """Hand over or restore whatever other instances handed to us, then drop the record."""
        self.record = self.record.reload()
        for key, original in list(self.record.changed.items()):
            log.info("%s", release_sysctl(self.record, key, original))
        with contextlib.suppress(FileNotFoundError):
            resolv_path(self.record.id).unlink()
        self.record.remove()


def resolv_path(instance: str) -> Path:
    """The server's own resolv.conf, when it needs one (see plan.server_resolv_conf)."""
    return RUN_DIR / f"{instance}.resolv.conf"


def write_resolv(instance: str, text: str) -> str:
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = resolv_path(instance)
    path.write_text(text)
    path.chmod(0o644)  # a server running as --user must read it
    return str(path)


def _instance_of(name: str, prefix: str) -> str | None:
    return name[len(prefix):] if name.startswith(prefix) else None


def sweep(nl, facts) -> list[str]:
    """Remove what dead instances left in this namespace; return one line per removal.

    Found by record (which also knows the sysctls to restore) and by tag, so it works when a
    record is lost. A routing table is live iff it routes to the veth of a live instance.
    """
    removed: list[str] = []
    for record in records():
        if is_live(record.id):
            continue
        for key, original in record.changed.items():
            removed.append(release_sysctl(record, key, original))
        # no flow may go on to a dead server
        netlink.flush_conntrack([tuple(p) for p in record.ports], record.marks, record.mark_mask)
        record.remove()
        removed.append(f"rm {record.path}  # instance {record.id} (pid {record.pid}) is gone")

    for path in sorted([*RUN_DIR.glob("*.resolv.conf"), *RUN_DIR.glob("*.tmp")]) if RUN_DIR.is_dir() else []:
        if not is_live(path.name.split(".")[0]):
            path.unlink(missing_ok=True)
            removed.append(f"rm {path}")
    tables = nft.tables()
    for binary in ("iptables-nft", "iptables-legacy"):
        for chain, rule, tag in firewall.tagged_rules(binary, TABLE_PREFIX, tables):
            if not is_live(tag[len(TABLE_PREFIX):]):
                firewall.iptables(binary, "-D", chain, rule)
                removed.append(f"{binary} -D {chain} {' '.join(rule)}")
    for family, name in tables:
        instance = _instance_of(name, TABLE_PREFIX)
        if instance and not is_live(instance):
            nft.delete_table(family, name)
            removed.append(f"nft delete table {family} {name}")
    live_links = set()
    for link in facts.links:
        instance = _instance_of(link.ifname, HOST_PREFIX)
        if instance is None:
            continue
        if is_live(instance):
            live_links.add(link.ifname)
        else:
            nl.link_del(link.ifname)
            removed.append(f"ip link del {link.ifname}")
    live_tables = {r.table for r in facts.routes if r.dev in live_links}
    for rule in facts.rules:
        if rule.proto == PROTO and rule.table not in live_tables:
            nl.rule_del(rule)
            removed.append(f"ip rule del priority {rule.priority} fwmark {rule.fwmark:#x}/{rule.fwmask:#x} lookup {rule.table}")
    for route in facts.routes:
        # routes through a dead instance's veth went with it
        if route.proto == PROTO and route.table not in live_tables and not (route.dev or "").startswith(HOST_PREFIX):
            nl.route_del(route)
            removed.append(f"ip route del {route.dst} table {route.table}")
    return removed
