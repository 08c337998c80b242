"""Bring the kernel in line with the datapath the live instances need: the one procedure behind
an instance's start and stop, following the host, repairing after a firewall reload, and the
sweep of dead instances.

`plan` is pure: (facts, what the kernel holds, allocation, instances) -> the changes, in an order
that keeps the host safe at every moment: nswrap's guard exists before forwarding is turned on,
and forwarding is restored before the guard goes. `run` carries a plan out through the caller's
transaction (the caller holds the setup lock) and keeps the allocation on disk, the original
value of a sysctl saved before it changes (so a crash at any point leaves the host restorable).
`fail_closed` is the changes that turn nswrap's forwarding off when its guard is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nswrap import fastpath, nft, ruleset
from nswrap.changes import (
    AddRoute,
    AddRule,
    Change,
    DeleteRoom,
    DeleteRoute,
    DeleteRule,
    FastPath,
    FlushMark,
    Forwarding6,
    InsertRoom,
    NftBatch,
    SetSysctl,
)
from nswrap.config import Firewall
from nswrap.datapath import (
    PRIORITIES,
    Allocation,
    Datapath,
    Element,
    Instance,
    Room,
    Setting6,
    Switch6,
    SysctlChange,
    datapath,
    free_priority,
    guarded,
    router,
    shared_udp_timeout,
    switch6_elements,
)
from nswrap.datatypes import datatype, replace
from nswrap.errors import NswrapError
from nswrap.facts import HOST_PREFIX, Facts, read_sysctl, sysctl_key
from nswrap.fastpath import Fast
from nswrap.firewall import (
    FirewallFacts,
    blockers,
    how_to_fix,
    mark_users,
    needs_xt,
    rooms,
    unreadable_marks,
)
from nswrap.objects import PROTO, Route, Rule
from nswrap.transaction import Transaction

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


def wanted_rooms(firewall: FirewallFacts, mode: Firewall, mask: int) -> tuple[Room, ...]:
    """Where other firewalls would drop nswrap's flows: the narrow accepts that make room (or a
    refusal, naming the chain, where nswrap will not edit); and nobody else on our mark bits (a
    rule whose marks nswrap cannot read is named in a warning)."""
    users = mark_users(firewall, mask)
    if users:
        raise NswrapError(f"fwmark bits {mask:#010x} are already used by {users[0]}; choose others with --mark-mask")
    for where, why in unreadable_marks(firewall):  # said, not refused (docs/security.md, Limits)
        log.warning("cannot tell which fwmark bits %s uses: %s; if they meet %#010x, choose other bits with "
                    "--mark-mask", where, why, mask)
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


ALL6 = "net/ipv6/conf/all/forwarding"


def snapshot6(facts: Facts) -> Switch6:
    """Every interface's IPv6 forwarding and accept_ra, and `default`'s, before nswrap turns the
    global switch on."""
    def value(ifname: str, setting: str, fallback: str) -> str:
        return facts.sysctl(sysctl_key(6, ifname, setting)) or fallback

    interfaces = tuple(Setting6(link.ifname, link.index, value(link.ifname, "forwarding", "0"),
                                value(link.ifname, "accept_ra", "1"))
                       for link in facts.links if not link.ifname.startswith(HOST_PREFIX)
                       and facts.sysctl(sysctl_key(6, link.ifname, "forwarding")) is not None)
    return Switch6(interfaces, value("default", "forwarding", "0"), value("default", "accept_ra", "1"))


def _switch6_changes(facts: Facts, current: Switch6 | None, hold: bool) -> tuple[list[Change], list[Change], Switch6 | None]:
    """(release, take, the switch nswrap holds after): the global IPv6 forwarding switch, for
    instances on kernels without per-interface forwarding (docs/design.md). Router
    advertisements keep working while it is on: every interface with accept_ra=1, and
    `default` for those to come, gets accept_ra=2 first (forwarding on purges the routes RAs
    gave where accept_ra is not 2). Released, every interface gets its forwarding back (writing
    `all` rewrote them all), then its accept_ra, if nobody changed it since."""
    on = facts.sysctl(ALL6) == "1"
    if hold:
        switch = current if current is not None or on else snapshot6(facts)
        if switch is None:
            return [], [], None  # the host's own switch, on already: not nswrap's to hold
        take: list[Change] = []
        for ifname in ["default", *(link.ifname for link in facts.links)]:
            key = sysctl_key(6, ifname, "accept_ra")
            if not ifname.startswith(HOST_PREFIX) and facts.sysctl(key) == "1":
                take.append(SetSysctl(key, "2", "1"))
        if not on:
            take.append(Forwarding6(True, switch))
        return [], take, switch
    if current is None:
        return [], [], None
    release: list[Change] = [Forwarding6(False, current)]
    for link in facts.links:
        key = sysctl_key(6, link.ifname, "accept_ra")
        if facts.sysctl(key) == "2" and current.before(link.ifname, link.index).accept_ra == "1":
            release.append(SetSysctl(key, "1", "2"))
    if facts.sysctl(sysctl_key(6, "default", "accept_ra")) == "2" and current.default_accept_ra == "1":
        release.append(SetSysctl(sysctl_key(6, "default", "accept_ra"), "1", "2"))
    return release, [], None


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
    return [NftBatch(text, undo, what=_counted(table.elements, chains, dp.elements, wanted))]


def _counted(have: dict[str, frozenset[Element]], have_chains: set[str], want: dict[str, frozenset[Element]],
             want_chains: set[str]) -> str:
    """What an element batch changes, in a few words: `elements (2 added, 1 deleted)`."""
    added = sum(len(want.get(n, frozenset()) - have.get(n, frozenset())) for n in ruleset.SETS)
    deleted = sum(len(have.get(n, frozenset()) - want.get(n, frozenset())) for n in ruleset.SETS)
    uplinks = {n for n in want_chains ^ {c for c in have_chains if c.startswith(("new_", "flow_"))}
               if n.startswith("new_")}
    said = [f"{added} added"] * bool(added) + [f"{deleted} deleted"] * bool(deleted)
    chains = f"; chains of {len(uplinks)} uplink{'s' * (len(uplinks) != 1)} added or deleted" if uplinks else ""
    return f"elements ({', '.join(said) or 'none'}{chains})"


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
    release6, take6, switch6 = _switch6_changes(facts, current.switch6, dp.hold6)

    # the guard covers every interface whose forwarding nswrap turns on, from this very change
    if instances:
        guarding = replace(target, sysctls=sysctls, switch6=switch6)
        dp = replace(dp, elements={**dp.elements, **switch6_elements(facts, switch6), **{
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
    # the fast path redirects through the uplinks' tables: it comes after them and goes before them
    fast_have = facts.fast or Fast()
    fast_want, spill = fastpath.fit(fastpath.wanted(facts, dp, instances) if instances else Fast(), fast_have)
    if spill:
        dp = replace(dp, warnings=(*dp.warnings, fastpath.spilled(spill)))
    fast_changes: list[Change] = [FastPath(fast_want, fast_have)] if fast_want != fast_have else []
    flushes: list[Change] = [FlushMark(current.mark(u.index), current.mark_mask) for u in current.uplinks
                             if not any(t.ifname == u.ifname for t in target.uplinks)]

    # the guard exists before forwarding is turned on; forwarding is restored before the guard goes
    after: Allocation | None
    if instances:
        changes = [*release6, *restores, *nft_changes, *route_adds, *rule_adds, *rule_dels, *route_dels, *room_changes,
                   *sets, *take6, *fast_changes, *flushes]
        after = replace(target, sysctls=sysctls, rooms=rooms, switch6=switch6)
    else:
        changes = [*fast_changes, *release6, *restores, *rule_dels, *route_dels, *room_changes, *nft_changes, *flushes]
        after = None
    before = None if allocation is None and not instances else _union(
        current, replace(target, sysctls=sysctls, rooms=rooms, switch6=switch6 or current.switch6))
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


def guard_missing(table: nft.Table, allocation: Allocation | None, facts: Facts) -> list[str]:
    """The guard's sets that miss an element the forwarding nswrap turned on needs now (someone
    flushed one): an interface nswrap made forward, or the global IPv6 switch it holds, not
    covered. (A host change that brings a new uplink is not one: nswrap turns its forwarding on
    only once the guard covers it.) What else differs is put back by the plan."""
    if allocation is None:
        return []
    missing = []
    for version in (4, 6):
        have = {e.key[0] for e in table.elements.get(f"guarded{version}", frozenset())}
        if {f'"{name}"' for name in guarded(allocation, facts, version)} - have:
            missing.append(f"guarded{version}")
    if allocation.switch6 is not None and not table.elements.get("held"):
        missing.append("held")
    return missing


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
    """Other tools' firewalls: the whole nft ruleset (*ruleset* if already listed),
    iptables-legacy's loaded tables, and the xt extensions of every rule, read from the kernel
    where the ruleset has one on marks (`nft -j` does not show their values)."""
    from nswrap import iptables
    from nswrap.netlink import nftrules

    listed = tuple(nft.ruleset() if ruleset is None else ruleset)
    xt: tuple[nftrules.Xt, ...] = ()
    error = ""
    if needs_xt(listed):
        try:
            xt = tuple(nftrules.xt_extensions())
        except OSError as e:
            error = f"its rules could not be read over netlink ({e.strerror or e})"
    return FirewallFacts(listed, iptables.legacy_save(), iptables.legacy_save("ip6tables-legacy"), xt, error)


def fail_closed(allocation: Allocation | None, read: Callable[[str], str | None] | None = None) -> list[Change]:
    """nswrap's guard is gone (or cannot be verified): the changes that stop forwarding for others
    before anything else, i.e. restore the forwarding nswrap turned on (the global IPv6 switch
    first), each only if it is still nswrap's value. Run them best effort (Transaction.run_each)."""
    read = read or read_sysctl
    changes: list[Change] = []
    if allocation is None:
        return changes
    if allocation.switch6 is not None and read(ALL6) == "1":
        changes.append(Forwarding6(False, allocation.switch6))
    ip_forward = read("net/ipv4/conf/all/forwarding") == "1"
    for change in allocation.sysctls:
        if not _admins(change, ip_forward) and read(change.key) == change.ours:
            changes.append(SetSysctl(change.key, change.original, change.ours))
    return changes
