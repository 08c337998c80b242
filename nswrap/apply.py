"""Carries out a Plan with an undo stack: the only module that changes the host.

Each step pushes its undo *before* acting, and every undo treats "already gone" as success, so an
interruption at any point (Ctrl-C, SIGTERM, a failed step) rolls back exactly what exists.
Undo runs in reverse; a failing undo is logged and the rest still run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from nswrap import firewall, netlink, nft
from nswrap.errors import NswrapError
from nswrap.plan import Plan, Step, render
from nswrap.state import Journal, read_sysctl, write_sysctl

log = logging.getLogger("nswrap")


class Applier:
    def __init__(self, plan: Plan, journal: Journal):
        self.plan = plan
        self.journal = journal
        self.netns_fd: int | None = None
        self._host: netlink.Netlink | None = None
        self._server: netlink.Netlink | None = None
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def apply(self, checkpoint: Callable[[], None] = lambda: None) -> None:
        self._host = netlink.Netlink()
        for step in self.plan.steps():
            checkpoint()
            line = render(step, self.plan)
            log.info("%s", line)
            try:
                self._do(step)
            except OSError as e:
                raise NswrapError(f"{line.splitlines()[0]}: {e.strerror or e}") from e

    def release_netns(self) -> None:
        """Once the server holds its namespace, let go of ours: it then lives exactly as long as the server."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.netns_fd is not None:
            os.close(self.netns_fd)
            self.netns_fd = None

    def rollback(self) -> None:
        while self._undo:
            what, undo = self._undo.pop()
            log.info("%s", what)
            try:
                undo()
            except Exception as e:  # keep going: one failed undo must not skip the others
                log.warning("undo failed: %s: %s", what, e)
        self.release_netns()
        if self._host is not None:
            self._host.close()
            self._host = None

    def _push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def _do(self, step: Step) -> None:
        nl = self._server if step.ns == "server" else self._host
        obj = step.obj
        if step.kind == "netns":
            self.netns_fd = netlink.new_netns()
            self._server = netlink.Netlink(self.netns_fd)
        elif step.kind == "veth":
            host_if, peer, mtu = obj
            self._push(f"ip link del {host_if}", lambda: self._host.link_del(host_if))
            nl.veth_add(host_if, peer, self.netns_fd, mtu)
        elif step.kind == "addr":
            nl.addr_add(*obj)  # gone with its interface
        elif step.kind == "up":
            nl.link_up(obj)
        elif step.kind == "route":
            if step.ns == "host":
                self._push(render(step, self.plan).replace(" add ", " del ", 1), lambda: nl.route_del(obj))
            nl.route_add(obj)
        elif step.kind == "rule":
            self._push(render(step, self.plan).replace(" add ", " del ", 1), lambda: nl.rule_del(obj))
            nl.rule_add(obj)
        elif step.kind == "sysctl" and step.ns == "server":
            with netlink.inside(self.netns_fd):
                write_sysctl(obj.key, obj.value)  # the namespace's own: gone with it
        elif step.kind == "sysctl":
            before = read_sysctl(obj.key)
            if before != obj.value:
                # recorded before it changes, so even a SIGKILL right after leaves it restorable
                self.journal.changing(obj.key, before)
                self._push(f"restore {obj.key}", lambda: log.info("%s", self.journal.release(obj.key)))
                write_sysctl(obj.key, obj.value)
        elif step.kind == "nft":
            table = self.plan.nft_table
            self._push("# forget the flows of the published ports", lambda: forget_flows(self.plan))
            self._push(f"nft delete table inet {table}", lambda: nft.delete_table("inet", table))
            nft.apply(obj)
        elif step.kind == "iptables":
            binary, chain, rule = obj
            self._push(f"{binary} -D {chain} ...", lambda: firewall.iptables(binary, "-D", chain, list(rule)))
            firewall.iptables(binary, "-I", chain, list(rule))
        elif step.kind == "flush":
            netlink.flush_conntrack(published_ports(self.plan))
        else:
            raise ValueError(step.kind)


def published_ports(plan: Plan) -> list[tuple]:
    return [(p.proto, p.outer_lo, p.outer_hi) for p in plan.ports]


def forget_flows(plan: Plan) -> None:
    netlink.flush_conntrack(published_ports(plan), [u.mark for u in plan.uplinks], plan.mark_mask)
