"""Follow the host, not each other.

Every instance listens to rtnetlink (links, addresses, routes, rules, forwarding settings) and to
nftables' events, and drops those about nswrap's own objects: its veths and their addresses and
routes, the routes and rules it adds, elements other instances add to the shared table. What is
left is a real change of the host, a dead instance (its veth vanished), or someone deleting
nswrap's rules, routes or table (a firewall reload). That is handled once, after 100 ms of quiet
(at most 1 s into a burst), by the one instance that holds the `follow` lock; the kernel hands the
lock to another instance when that one dies. An instance whose own veth was deleted repairs it.

Following (`Follower.follow`) re-plans the shared datapath (sync.py) for the live instances and
runs the difference in a transaction, best effort: what fails is tried again (TryAgain) a second
later. nswrap's guard comes first: a table or guard set found missing turns the forwarding nswrap
turned on off before anything else; a table that cannot be put back stops the instance with that
forwarding restored (FailClosed).

One setting nswrap turns on has no event: `src_valid_mark` (the kernel announces only forwarding
and rp_filter changes). The instance that follows reads the settings nswrap set every POLL
seconds, a few small files, and follows the host when one was put back by someone else.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

from nswrap import netlink, nft, sync
from nswrap.changes import NftBatch, one_line
from nswrap.datapath import Allocation, topic
from nswrap.errors import FailClosed, TryAgain
from nswrap.facts import HOST_PREFIX, gather, read_sysctl
from nswrap.fastpath import SPILLED
from nswrap.objects import PROTO
from nswrap.ruleset import TABLE
from nswrap.transaction import Transaction

log = logging.getLogger("nswrap")

SETTLE, MAX_WAIT, RETRY, POLL = 0.1, 1.0, 1.0, 2.0
# Why the host must be looked at again: it changed ("host"), an instance may have died (its veth
# vanished: "instance"), this instance's veth was deleted ("repair"), someone removed part of
# nswrap's table ("table")
Reason = Literal["host", "instance", "repair", "table"]
GUARD_SETS = ("guarded4", "guarded6", "held")  # sync.guard_missing: elements only a host change changes


def classify(event: netlink.Event, own_indexes: set[int], my_veth: str) -> Reason | None:
    """What an event means to nswrap: None (nothing: ours, or irrelevant), "host" (the host
    changed), "instance" (a veth vanished: an instance may have died), "repair" (ours
    vanished), "table" (someone removed part of nswrap's table)."""
    if event.what == "lost":
        return "host"
    if event.what == "link":
        if event.ifname.startswith(HOST_PREFIX) or event.ifindex in own_indexes:
            if event.deleted:
                own_indexes.discard(event.ifindex)
                return "repair" if event.ifname == my_veth else "instance"
            own_indexes.add(event.ifindex)
            return None
        return "host"
    if event.what in ("addr", "netconf"):
        return None if event.ifindex in own_indexes or event.ifindex < 0 else "host"
    if event.what == "route":
        if event.ifindex in own_indexes or (event.proto == PROTO and not event.deleted):
            return None
        return "host"
    if event.what == "rule":
        return None if event.proto == PROTO and not event.deleted else "host"
    if event.what == "tc":  # someone's `tc filter del` or `tc qdisc del` may have taken the fast path's
        return "host" if event.deleted else None
    if event.what == "nft":
        # other instances add and delete elements; anything else deleted is someone else's doing.
        # An element deleted from the guard's own sets (someone's `nft flush set`; instances never
        # touch them) makes the follower look: they are compared with what they must hold
        if event.table == TABLE and event.deleted:
            if event.nft != "delsetelem":
                return "table"
            return "host" if event.set in GUARD_SETS else None
        return None
    return None


def switch6_held() -> bool:
    """The global IPv6 switch nswrap holds is still as it set it: on, and no interface back at
    accept_ra=1 (which would lose its routes from router advertisements; no event says so)."""
    if read_sysctl("net/ipv6/conf/all/forwarding") != "1":
        return False
    try:
        names = os.listdir("/proc/sys/net/ipv6/conf")
    except OSError:
        return True
    return not any(read_sysctl(f"net/ipv6/conf/{name}/accept_ra") == "1" for name in names
                   if name != "all" and not name.startswith(HOST_PREFIX))


class Follower:
    """An instance's ear on the host: its events, classified and settled, make the instance that
    holds the `follow` lock follow the host for all, and this instance repair its own veth."""

    def __init__(self, life):
        self.life = life
        self.monitor = netlink.Monitor()
        # subscribed first, then looked: a veth made in between is seen in one or the other
        self.own_indexes: set[int] = {info.link.index for info in life.kernel.routing.links()
                                      if info.link.ifname.startswith(HOST_PREFIX)}
        self.reasons: set[Reason] = set()
        self.first: float | None = None
        self.last: float | None = None
        self.lock_fd: int | None = None
        self.next_poll = 0.0

    def filenos(self) -> list[int]:
        return self.monitor.filenos()

    def close(self) -> None:
        self.monitor.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # someone else follows from now on
            self.lock_fd = None

    def _leading(self) -> bool:
        if self.lock_fd is None:
            self.lock_fd = self.life.state.dir.try_lock("follow")
        return self.lock_fd is not None

    def on_ready(self, ready: list[int]) -> float | None:
        """Events arrived (or the settle time passed): act when things are quiet."""
        now = time.monotonic()
        if ready or self.first is None:  # (the first call reads what queued up during the start)
            for event in self.monitor.events():
                reason = classify(event, self.own_indexes, self.life.instance.veth)
                if reason:
                    self.reasons.add(reason)
                    self.last = now
                    self.first = self.first or now
        poll = self._poll(now)
        if not self.reasons or self.first is None or self.last is None:
            return poll
        # a flushed table is no guard: repaired at once (the forwarding nswrap turned on goes
        # off first), not after the host settles
        due = now if "table" in self.reasons else min(self.last + SETTLE, self.first + MAX_WAIT)
        if now < due:
            return due - now
        reasons, self.reasons, self.first, self.last = self.reasons, set(), None, None
        again: set[Reason] = set()
        if "repair" in reasons and not self._try(self.life.repair, "repairing the veth"):
            again.add("repair")
        if reasons - {"repair"} and self._leading():
            why: Literal["host", "table"] = "table" if "table" in reasons else "host"
            if not self._try(lambda: self.follow(why), "following the host"):
                again |= reasons - {"repair"}
        if again:  # the host is still changing: once more in a second
            self.reasons, self.first, self.last = again, now, now + RETRY - SETTLE
            return RETRY
        return poll

    def _poll(self, now: float) -> float | None:
        """The follower reads the settings without events when due: seconds to its next look
        (None: another instance follows, this one sleeps until an event)."""
        if not self._leading():
            return None
        if now >= self.next_poll:
            self.next_poll = now + POLL
            allocation = self.life.state.allocation()
            if allocation and (any(read_sysctl(c.key) not in (None, c.ours) for c in allocation.sysctls)
                               or allocation.switch6 is not None and not switch6_held()):
                self.reasons.add("host")
                self.last, self.first = now, self.first or now
        return self.next_poll - now

    def follow(self, why: Literal["host", "table"]) -> None:
        """A host change (or a dead instance, or a flushed table): bring the shared datapath in
        line, once, for every instance (this instance follows the host for all). Every change
        that can be made is made; what fails is tried again (TryAgain) once the host settles.
        nswrap's guard comes first: a table found flushed means no guard, so the forwarding
        nswrap turned on is restored before anything else, and turned on again only once the
        table is back (the plan's order); a table that cannot be put back, or cannot even be
        read, stops nswrap with the forwarding restored (fail closed), whatever the error."""
        if self.life.server_gone():
            # stopping: its veth may be gone already while its record is still live, and a sync
            # now would announce changes for it (attaching the fast path to that veth, say); the
            # teardown syncs without it
            return
        state, kernel, mark_mask = self.life.state, self.life.kernel, self.life.config.mark_mask
        with state.dir.lock():
            allocation = state.allocation()
            guarded = False  # is nswrap's guard known to be in place?
            try:
                live = tuple(r.instance for r in state.live())
                table = nft.read_table()
                guarded = table is not None and sync.intact(table, allocation, live)
                if not guarded:  # no guard: before anything else, route nothing for others
                    self._stop_forwarding(allocation)
                    if why == "table":
                        log.warning("nswrap's nft table was flushed or deleted (a firewall reload?): putting it back")
                facts = gather(kernel.routing)
                emptied = sync.guard_missing(table, allocation, facts) if guarded and table is not None else []
                if emptied:  # a set of the guard flushed: the same, and the facts again with forwarding off
                    guarded = False
                    self._stop_forwarding(allocation)
                    log.warning("nswrap's guard lost elements (set %s: someone's `nft flush set`?): putting them back",
                                ", ".join(emptied))
                    facts = gather(kernel.routing)
                plan = sync.plan(facts, table, allocation, live, mark_mask)
            except Exception as e:
                self._fail_closed_if(not guarded, allocation, e)
                raise TryAgain(str(e) or type(e).__name__) from None
            self._say_once(plan.datapath.warnings)
            if plan.before is not None:
                state.save_allocation(plan.before)
            tx = Transaction(kernel, say=lambda line: log.warning("following the host: %s", one_line(line)))
            failed: list[str] = []
            for change in plan.changes:
                try:
                    tx.run(change)
                except Exception as e:
                    self._fail_closed_if(isinstance(change, NftBatch) and not guarded, allocation, e)
                    failed.append(f"{one_line(change.render())}: {e}")
            tx.commit()  # what was done moves toward what is wanted: it stays
            if failed:
                raise TryAgain("; ".join(failed))
            state.save_allocation(plan.after)
            state.forget_dead([r for r in state.records() if not state.dir.is_live(r.id)])

    def _stop_forwarding(self, allocation: Allocation | None) -> list[str]:
        """Fail closed: the forwarding nswrap turned on goes off, before anything else."""
        changes = sync.fail_closed(allocation)
        Transaction(self.life.kernel, say=lambda line: log.info("fail closed: %s", line)).run_each(changes, "fail closed")
        return [c.render().splitlines()[0].removeprefix("sysctl -w ") for c in changes]

    def _say_once(self, warnings: tuple[str, ...]) -> None:
        """The datapath's warnings on the host as it is now (an uplink whose gateway went, the fast
        path's map full), each said once while it lasts, however many events follow: a warning is
        known by its words before the first colon (the rest may name a count that changes); said
        again only after it went and came back. The map's having room again is said too."""
        topics = {topic(w) for w in warnings}
        for warning in warnings:
            if topic(warning) not in self.life.said:
                log.warning("%s", warning)
        if SPILLED in self.life.said and SPILLED not in topics:
            log.warning("the fast path's map of published endpoints has room again: every endpoint is on it")
        self.life.said = topics

    def _fail_closed_if(self, table_lost: bool, allocation: Allocation | None, error: Exception) -> None:
        if table_lost:
            restored = self._stop_forwarding(allocation)
            said = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise FailClosed(f"could not put back nswrap's nft table ({said}); forwarding restored "
                             f"({', '.join(restored) or 'nothing to restore'}): stopping") from None

    def _try(self, action, what: str) -> bool:
        """Whether it worked; FailClosed stops nswrap."""
        try:
            action()
            return True
        except FailClosed:
            raise
        except Exception as e:  # keep serving and try again
            log.warning("%s: %s (trying again)", what, e)
            return False
