"""Migration: what an nswrap older than the shared datapath left behind, swept as it was.

That version gave each instance its own nft table `inet nswrap-<id>`, marks, rules (protocol 110)
and routing tables, iptables rules commented `nswrap-<id>`, and kept its records directly in
/run/nswrap/<id>.json, each naming the sysctls it changed. Its instances told they were alive by
holding the abstract socket `nswrap/instance/<id>`; a live one is never touched. Records are
validated like ours; objects are removed only when a record names them or their tag is one only
that version made (a 6-hex-digit id after `nswrap-`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import stat

from nswrap import iptables, nft
from nswrap.changes import Change, DeleteIptables, DeleteLink, DeleteRoute, DeleteRule, NftBatch, SetSysctl
from nswrap.facts import Facts, netns_id, read_sysctl
from nswrap.objects import PROTO
from nswrap.state import RUN_DIR, SYSCTL_VALUE, sysctl_key_ok

log = logging.getLogger("nswrap")

OLD_ID = re.compile(r"[0-9a-f]{6}")  # always fullmatch()ed
OLD_TAG = re.compile(r"nswrap-([0-9a-f]{6})")  # always fullmatch()ed
OLD_SETTINGS = {"ipv4": ("forwarding", "src_valid_mark", "route_localnet"), "ipv6": ("force_forwarding",)}


def _alive(instance: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"\0nswrap/instance/{instance}")
        return False
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    finally:
        sock.close()


def _records() -> list[dict]:
    """Valid old-format records of this network namespace."""
    ours = netns_id()
    found = []
    try:
        names = os.listdir(RUN_DIR)
    except OSError:
        return []
    for name in names:
        stem = name[:-5] if name.endswith(".json") else ""
        if not OLD_ID.fullmatch(stem):
            continue
        try:
            fd = os.open(f"{RUN_DIR}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                data = json.loads(os.read(fd, 1 << 16))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("id") != stem:
            continue
        netns = str(data.get("netns", ""))
        if netns.replace("cookie:", "c").replace("inode:", "i") != ours:
            continue
        changed = data.get("changed", {})
        if not isinstance(changed, dict) or not all(
                sysctl_key_ok(k, OLD_SETTINGS) and isinstance(v, str) and SYSCTL_VALUE.fullmatch(v)
                for k, v in changed.items()):
            log.warning("ignoring %s/%s: not a valid record of an older nswrap", RUN_DIR, name)
            continue
        found.append(data)
    return found


def sweep(facts: Facts) -> list[Change]:
    """What dead instances of an older nswrap left in this namespace, as changes (cleanup runs
    them); their record files go after them."""
    changes: list[Change] = []
    records = [r for r in _records() if not _alive(r["id"])]
    for record in records:
        for key, original in record["changed"].items():
            if read_sysctl(key) == "1" and original != "1":
                changes.append(SetSysctl(key, original, "1"))
        if facts.link(f"nsw-{record['id']}"):
            changes.append(DeleteLink(f"nsw-{record['id']}"))
    tables = nft.tables()
    dead_tables = []
    for family, name in tables:
        match = OLD_TAG.fullmatch(name)
        if match and not _alive(match.group(1)):
            changes.append(NftBatch(f"delete table {family} {name}\n", what="an older nswrap's table"))
            dead_tables.append(name)
    for binary in ("iptables-nft", "iptables-legacy"):
        if binary == "iptables-nft" and ("ip", "filter") not in tables:
            continue
        if binary == "iptables-legacy" and "filter" not in iptables.legacy_loaded():
            continue
        for words in iptables.rules(binary):
            if words[:1] != ["-A"] or "--comment" not in words:
                continue
            match = OLD_TAG.fullmatch(words[words.index("--comment") + 1])
            if match and not _alive(match.group(1)):
                changes.append(DeleteIptables(binary, words[1], tuple(words[2:])))
    if dead_tables or records:
        changes += _old_rules(facts)
    return changes


def forget(record_ids: list[str]) -> list[str]:
    said = []
    for instance in record_ids:
        for suffix in (".json", ".resolv.conf", ".tmp"):
            try:
                os.unlink(f"{RUN_DIR}/{instance}{suffix}")
                said.append(f"rm {RUN_DIR}/{instance}{suffix}")
            except FileNotFoundError:
                pass
    return said


def dead_records() -> list[str]:
    return [r["id"] for r in _records() if not _alive(r["id"])]


def _old_rules(facts: Facts) -> list[Change]:
    """The old per-instance fwmark rules and their tables' routes (protocol 110, outside the
    priorities and tables the shared datapath uses) once no old instance is alive."""
    from nswrap.state import existing

    state = existing(netns_id())
    allocation = state.allocation() if state else None
    ours = range(allocation.priority, allocation.priority + 3) if allocation else range(0)
    our_tables = {u.table for u in allocation.uplinks} if allocation else set()
    old = [r for r in facts.rules if r.proto == PROTO and r.fwmask and r.priority not in ours and r.table not in our_tables]
    tables = {r.table for r in old}
    changes: list[Change] = [DeleteRule(rule) for rule in old]
    changes += [DeleteRoute(route) for route in facts.routes if route.proto == PROTO and route.table in tables]
    return changes
