"""Bring the kernel in line with the datapath the live instances need: the one procedure behind
an instance's start and stop, following the host, repairing after a firewall reload, and the
sweep of dead instances.

`plan` is pure: (facts, what the kernel holds, allocation, instances) -> the changes, in an order
that keeps the host safe at every moment: nswrap's guard exists before forwarding is turned on,
and forwarding is restored before the guard goes. `sync` runs them in a transaction under the
setup lock and keeps the allocation on disk, the original value of a sysctl saved before it
changes (so a crash at any point leaves the host restorable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nswrap import nft, ruleset
from nswrap.apply import Transaction
from nswrap.changes import (
    AddRoute,
    AddRule,
    Change,
    DeleteRoom,
    DeleteRoute,
    DeleteRule,
    FlushMark,
    InsertRoom,
    NftBatch,
    SetSysctl,
)
from nswrap.datapath import (
    PRIORITIES,
    Allocation,
    Datapath,
    Element,
    Instance,
    Room,
    SysctlChange,
    datapath,
    free_priority,
    guarded,
    router,
    shared_udp_timeout,
)
from nswrap.datatypes import datatype, replace
from nswrap.errors import NswrapError
from nswrap.facts import Facts
from nswrap.firewall import FirewallFacts, blockers, how_to_fix, mark_users, rooms
from nswrap.objects import PROTO, Route, Rule

log = logging.getLogger("nswrap")


@datatype
class Plan:
    changes: list[Change]
    datapath: Datapath
    before: Allocation | None  # saved before any change: everything that may be nswrap's
    after: Allocation | None  # saved once every change is done (None: nothing left)


def _union(a: Allocation, b: Allocation) -> Allocation:
    uplinks = {u.ifname: u for u in (*a.uplinks, *b.uplinks)}
    sysctls = {s.key: s for s in (*b.sysctls, *a.sysctls)}  # the first original recorded wins
    return replace(b, uplinks=tuple(uplinks.values()), sysctls=tuple(sysctls.values()),
                   rooms=tuple(dict.fromkeys((*a.rooms, *b.rooms))))


def wanted_rooms(firewall: FirewallFacts, mode: str, mask: int) -> tuple[Room, ...]:
    """Where other firewalls would drop nswrap's flows: the narrow accepts that make room (or a
    refusal, naming the chain, where nswrap will not edit); and nobody else on our mark bits."""
    users = mark_users(firewall, mask)
    if users:
        raise NswrapError(f"fwmark bits {mask:#x} are already used by {users[0]}; choose others with --mark-mask")
    out: list[Room] = []
    for blocker in blockers(firewall):
        if blocker.backend is None:
            raise NswrapError(how_to_fix(blocker))
        if mode == "off":
            raise NswrapError(f"forwarded flows of nswrap would be dropped by {blocker.where}, and --firewall off "
                              "forbids making room: use --firewall auto, or accept 'nsw-*' interfaces there yourself")
        out += rooms(blocker)
    return tuple(dict.fromkeys(out))


def _sysctl_changes(facts: Facts, current: Allocation, wanted: dict[str, str]
                    ) -> tuple[list[Change], list[Change], dict[str, SysctlChange]]:
    """(restores, sets, what nswrap will have changed): set what is wanted and not in effect,
    recording the original first; put back what is no longer wanted, if nobody changed it since."""
    restores: list[Change] = []
    sets: list[Change] = []
    changed = {s.key: s for s in current.sysctls}
    for key, value in sorted(wanted.items()):
        now = facts.sysctl(key)
        if now is None:
            continue  # the interface is going away
        if now != value:
            sets.append(SetSysctl(key, value, now))
            link = facts.link(key.split("/")[3])
            changed.setdefault(key, SysctlChange(key, now, value, link.index if link else 0))
    for change in current.sysctls:
        if change.key in wanted:
            continue
        del changed[change.key]
        if _admins(change, router(facts, 4)):
            continue
        if facts.sysctl(change.key) == change.ours:
            restores.append(SetSysctl(change.key, change.original, change.ours))
    return restores, sets, changed


def _admins(change: SysctlChange, ip_forward: bool) -> bool:
    """An interface's forwarding that the admin's `ip_forward=1` (which sets every interface's)
    made theirs since nswrap turned it on: it stays on."""
    return ip_forward and change.family == "ipv4" and change.setting == "forwarding"


def _nft_changes(table: nft.Table | None, dp: Datapath, instances: tuple[Instance, ...]) -> list[Change]:
    """Nothing, the whole table (new, rebuilt after an upgrade or someone's `flush chain`, or
    deleted with the last instance), or the elements and uplink chains that differ."""
    mask, name = dp.allocation.mark_mask, f"table inet {ruleset.TABLE}"
    if not instances:
        return [NftBatch(ruleset.delete_text(), what=f"{name} deleted")] if table is not None else []
    if table is None or table.version != ruleset.version(mask, dp.udp_timeout) or not _intact(table, dp):
        return [NftBatch(ruleset.table_text(dp), ruleset.delete_text() if table is None else "", what=f"{name} (re)built")]
    chains, indexes = set(table.rules), [u.index for u in dp.allocation.uplinks]
    text = ruleset.changes(table.elements, chains, dp.elements, indexes, mask)
    if not text:
        return []
    wanted = {name for i in indexes for name in ruleset.uplink_chains(mask, i)}
    undo = ruleset.changes(dp.elements, wanted, table.elements, ruleset.uplink_indexes(chains), mask)
    return [NftBatch(text, undo, what="elements")]


def _renamed(allocation: Allocation, facts: Facts) -> Allocation:
    """A sysctl nswrap changed follows its interface through a rename (`ip link set eth1 name
    wan1`): its original is restored under the new name, and the guard keeps covering it."""
    moved = []
    for change in allocation.sysctls:
        link = next((link for link in facts.links if link.index == change.ifindex), None) if change.ifindex else None
        if link is not None and link.ifname != change.ifname and not facts.link(change.ifname):
            change = change.renamed(link.ifname)
        moved.append(change)
    return replace(allocation, sysctls=tuple(moved))


def plan(facts: Facts, table: nft.Table | None, allocation: Allocation | None, instances: tuple[Instance, ...],
         mark_mask: int, firewall_rooms: tuple[Room, ...] | None = None) -> Plan:
    """Pure: the changes from what the kernel holds to what `instances` need."""
    current = _renamed(allocation, facts) if allocation else Allocation(mark_mask, free_priority(facts))
    dp = datapath(facts, current, instances)
    target = dp.allocation
    restores, sets, changed = _sysctl_changes(facts, current, dp.sysctls)
    sysctls = tuple(changed.values())

    # the guard covers every interface whose forwarding nswrap turns on, from this very change
    if instances:
        guarding = replace(target, sysctls=sysctls)
        dp = replace(dp, elements={**dp.elements, **{
            f"guarded{v}": frozenset(Element((f'"{name}"',)) for name in guarded(guarding, facts, v)) for v in (4, 6)}})

    rooms = () if not instances else (firewall_rooms if firewall_rooms is not None else current.rooms)
    room_changes: list[Change] = [DeleteRoom(r) for r in current.rooms if r not in rooms]
    room_changes += [InsertRoom(r) for r in rooms if r not in current.rooms]

    ours = range(current.priority, current.priority + PRIORITIES)
    tables = {u.table for u in (*current.uplinks, *target.uplinks)}
    have_rules = {r for r in facts.rules if r.proto == PROTO and r.priority in ours}
    have_routes = {r for r in facts.routes if r.proto == PROTO and r.table in tables}
    route_adds = [AddRoute(r) for r in sorted(dp.routes - have_routes, key=_order)]
    route_dels = [DeleteRoute(r) for r in sorted(have_routes - dp.routes, key=_order)]
    rule_adds = [AddRule(r) for r in sorted(dp.rules - have_rules, key=_order)]
    rule_dels = [DeleteRule(r) for r in sorted(have_rules - dp.rules, key=_order)]
    nft_changes = _nft_changes(table, dp, instances)
    flushes: list[Change] = [FlushMark(current.mark(u.index), current.mark_mask) for u in current.uplinks
                             if not any(t.ifname == u.ifname for t in target.uplinks)]

    # the guard exists before forwarding is turned on; forwarding is restored before the guard goes
    after: Allocation | None
    if instances:
        changes = [*restores, *nft_changes, *route_adds, *rule_adds, *rule_dels, *route_dels, *room_changes, *sets, *flushes]
        after = replace(target, sysctls=sysctls, rooms=rooms)
    else:
        changes = [*restores, *rule_dels, *route_dels, *room_changes, *nft_changes, *flushes]
        after = None
    before = None if allocation is None and not instances else _union(current, replace(target, sysctls=sysctls, rooms=rooms))
    return Plan(changes, dp, before, after)


def _order(obj: Route | Rule) -> tuple[int, str]:
    return (obj.version, repr(obj))


def _intact(table: nft.Table, dp: Datapath) -> bool:
    """Does the table hold every chain with every rule? (`nft flush chain` empties one.)"""
    expected = ruleset.expected_chains(dp)
    return all(table.rules.get(name) == count for name, count in expected.items())


def intact(table: nft.Table, allocation: Allocation | None, instances: tuple[Instance, ...] = ()) -> bool:
    if allocation is None:
        return False
    empty = Datapath(allocation, frozenset(), frozenset(), {}, {})
    return table.version == ruleset.version(allocation.mark_mask, shared_udp_timeout(instances)) and _intact(table, empty)


def run(plan_: Plan, tx: Transaction, save: Callable[[Allocation | None], None]) -> None:
    """Carry out a plan: the allocation is saved first (everything that may become nswrap's,
    with the original of every sysctl about to change), then the changes, then the final
    allocation. On failure the transaction rolls back and the first allocation stays on disk,
    which is the safe side: it names more than is there."""
    if plan_.before is not None:
        save(plan_.before)
    tx.run_all(plan_.changes)
    save(plan_.after)


def probe_firewall(ruleset: list[dict[str, Any]] | None = None) -> FirewallFacts:
    """Other tools' firewalls: the whole nft ruleset (*ruleset* if already listed) and
    iptables-legacy's loaded tables."""
    from nswrap import iptables

    listed = nft.ruleset() if ruleset is None else ruleset
    return FirewallFacts(tuple(listed), iptables.legacy_save(), iptables.legacy_save("ip6tables-legacy"))


def fail_closed(allocation: Allocation | None) -> list[str]:
    """nswrap's guard is gone and cannot be put back: stop forwarding for others before anything
    else (restore the forwarding nswrap turned on). Returns what was restored."""
    from nswrap.changes import write_sysctl
    from nswrap.facts import read_sysctl

    done = []
    for change in allocation.sysctls if allocation else ():
        if _admins(change, read_sysctl("net/ipv4/conf/all/forwarding") == "1"):
            continue
        try:
            if read_sysctl(change.key) == change.ours:
                write_sysctl(change.key, change.original)
                done.append(f"{change.key}={change.original}")
        except (OSError, NswrapError) as e:
            log.warning("could not restore %s: %s", change.key, e)
    return done
