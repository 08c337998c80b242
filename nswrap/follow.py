"""Follow the host, not each other.

Every instance listens to rtnetlink (links, addresses, routes, rules, forwarding settings) and to
nftables' events, and drops those about nswrap's own objects: its veths and their addresses and
routes, the routes and rules it adds, elements other instances add to the shared table. What is
left is a real change of the host, a dead instance (its veth vanished), or someone deleting
nswrap's rules, routes or table (a firewall reload). That is handled once, after 100 ms of quiet
(at most 1 s into a burst), by the one instance that holds the `follow` lock; the kernel hands the
lock to another instance when that one dies. An instance whose own veth was deleted repairs it.
"""

from __future__ import annotations

import logging
import os
import time

from nswrap import netlink
from nswrap.facts import HOST_PREFIX
from nswrap.objects import PROTO
from nswrap.ruleset import TABLE

log = logging.getLogger("nswrap")

SETTLE, MAX_WAIT = 0.1, 1.0


def classify(event: netlink.Event, own_indexes: set[int], my_veth: str) -> str | None:
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
    if event.what == "nft":
        # other instances add and delete elements; anything else deleted is someone else's doing
        if event.table == TABLE and event.deleted and event.ifname != "delsetelem":
            return "table"
        return None
    return None


class Follower:
    def __init__(self, life):
        self.life = life
        self.monitor = netlink.Monitor()
        # subscribed first, then looked: a veth made in between is seen in one or the other
        self.own_indexes: set[int] = {info.link.index for info in life.kernel.routing.links()
                                      if info.link.ifname.startswith(HOST_PREFIX)}
        self.reasons: set[str] = set()
        self.first: float | None = None
        self.last: float | None = None
        self.lock_fd: int | None = None

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
        if ready:
            for event in self.monitor.events():
                reason = classify(event, self.own_indexes, self.life.instance.veth)
                if reason:
                    self.reasons.add(reason)
                    self.last = now
                    self.first = self.first or now
        if not self.reasons or self.first is None or self.last is None:
            return None
        due = min(self.last + SETTLE, self.first + MAX_WAIT)
        if now < due:
            return due - now
        reasons, self.reasons, self.first, self.last = self.reasons, set(), None, None
        if "repair" in reasons:
            self._try(self.life.repair, "repairing the veth")
        if reasons - {"repair"} and self._leading():
            self._try(lambda: self.life.follow("table" if "table" in reasons else "host"), "following the host")
        return None

    def _try(self, action, what: str) -> None:
        from nswrap.instance import FailClosed

        try:
            action()
        except FailClosed:
            raise
        except Exception as e:  # keep serving; the next change tries again
            log.warning("%s: %s (keeping the current setup)", what, e)
