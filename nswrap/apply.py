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
from nswrap.plan import Plan, Step, nft_ruleset, render
from nswrap.state import Journal, read_sysctl, write_sysctl

log = logging.getLogger("nswrap")


class Applier:
    def __init__(self, plan: Plan, journal: Journal):
        self.plan = plan
        self.journal = journal
        self.netns_fd: int | None = None
        self._host: netlink.Netlink | None = None
        self._server: netlink.Netlink | None = None
        self._undo: list[tuple[str, Callable[[], None], tuple | None]] = []  # (shell line, undo, step key)

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
            what, undo, _ = self._undo.pop()
            log.info("%s", what)
            try:
                undo()
            except Exception as e:  # keep going: one failed undo must not skip the others
                log.warning("undo failed: %s: %s", what, e)
        self.release_netns()
        if self._host is not None:
            self._host.close()
            self._host = None

    def _push(self, what: str, undo: Callable[[], None], key: tuple | None = None) -> None:
        self._undo.append((what, undo, key))

    def update(self, new: Plan, facts) -> list[str]:
        """Move the running instance to `new` (same id and subnets; see plan.make_plan's
        `previous`): undo what is no longer wanted, do what is newly wanted, put back what someone
        else removed, replace the nft table atomically. Returns one line per change, to log."""
        said = []
        old_steps = {_key(s): s for s in self.plan.steps() if _followed(s)}
        new_steps = {_key(s): s for s in new.steps() if _followed(s)}
        for entry in [e for e in self._undo if e[2] in old_steps.keys() - new_steps.keys()]:
            self._undo.remove(entry)
            said.append(entry[0])
            entry[1]()
        gone = [u for u in self.plan.uplinks if u.ifname not in {n.ifname for n in new.uplinks}]
        if gone:  # their flows lost their table: let them start over
            netlink.flush_conntrack([], [u.mark for u in gone], self.plan.mark_mask)
        for key, step in new_steps.items():
            if key not in old_steps:
                said.append(render(step, new))
                self._do(step, new)
            elif not _present(step, facts):
                said.append(f"{render(step, new)}  # put back: something else removed it")
                self._redo(step)
        text = nft_ruleset(new)
        if text != nft_ruleset(self.plan):
            nft.replace("inet", new.nft_table, text)
            said.append(f"nft -f -  # table inet {new.nft_table} replaced atomically")
        self.plan = new
        return said

    def _redo(self, step: Step) -> None:
        if step.kind == "route":
            self._host.route_add(step.obj)
        elif step.kind == "rule":
            self._host.rule_add(step.obj)
        elif step.kind == "sysctl":
            self._do(step)  # journals the value found (the first original recorded wins)

    def _do(self, step: Step, plan: Plan | None = None) -> None:
        plan = plan or self.plan
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
                self._push(render(step, plan).replace(" add ", " del ", 1), lambda: nl.route_del(obj), _key(step))
            nl.route_add(obj)
        elif step.kind == "rule":
            self._push(render(step, plan).replace(" add ", " del ", 1), lambda: nl.rule_del(obj), _key(step))
            nl.rule_add(obj)
        elif step.kind == "sysctl" and step.ns == "server":
            with netlink.inside(self.netns_fd):
                write_sysctl(obj.key, obj.value)  # the namespace's own: gone with it
        elif step.kind == "sysctl":
            before = read_sysctl(obj.key)
            if before != obj.value:
                # recorded before it changes, so even a SIGKILL right after leaves it restorable
                self.journal.changing(obj.key, before)
                self._push(f"restore {obj.key}", lambda: log.info("%s", self.journal.release(obj.key)), _key(step))
                write_sysctl(obj.key, obj.value)
        elif step.kind == "nft":
            table = self.plan.nft_table
            self._push("# forget the flows of the published ports", lambda: forget_flows(self.plan))
            self._push(f"nft delete table inet {table}", lambda: nft.delete_table("inet", table))
            nft.apply(obj)
        elif step.kind == "iptables":
            binary, chain, rule = obj
            self._push(f"{binary} -D {chain} ...", lambda: firewall.iptables(binary, "-D", chain, list(rule)), _key(step))
            firewall.iptables(binary, "-I", chain, list(rule))
        elif step.kind == "flush":
            netlink.flush_conntrack(published_ports(self.plan))
        else:
            raise ValueError(step.kind)


def _key(step: Step) -> tuple:
    return (step.kind, step.ns, step.obj)


def _followed(step: Step) -> bool:
    """Steps that change while an instance follows its uplinks (the rest is fixed at start)."""
    return step.ns == "host" and step.kind in ("route", "rule", "sysctl", "iptables")


def _present(step: Step, facts) -> bool:
    """Is this step's effect still in place (routes, rules: per the kernel; sysctls: per /proc)?"""
    obj = step.obj
    if step.kind == "route":
        return any(r.table == obj.table and r.dst == obj.dst and r.dev == obj.dev and r.gateway == obj.gateway for r in facts.routes)
    if step.kind == "rule":
        return any(
            (r.priority, r.table, r.fwmark, r.fwmask, r.family) == (obj.priority, obj.table, obj.fwmark, obj.fwmask, obj.family)
            for r in facts.rules
        )
    if step.kind == "sysctl":
        try:
            return read_sysctl(obj.key) == obj.value
        except OSError:
            return True  # its interface is gone: nothing to put back
    return True


def published_ports(plan: Plan) -> list[tuple]:
    return [(p.proto, p.outer_lo, p.outer_hi) for p in plan.ports]


def forget_flows(plan: Plan) -> None:
    netlink.flush_conntrack(published_ports(plan), [u.mark for u in plan.uplinks], plan.mark_mask)
