"""An instance's life, top to bottom: `run` = start, serve, stop.

    start   (under the setup lock) look at the host (an older nswrap's or a crashed instance's
            leftovers go first), choose the instance and check it (precheck.py), write the
            record, create the server's network, sync the shared datapath (sync.py); dead
            instances' records go
    serve   start the server, forget stale flows to the published ports (flows.py), say READY
            once it listens (readiness.py), follow the host (follow.py: one instance does it
            for all) and repair this instance's veth if someone deletes it
    stop    (under the setup lock) drop the record, sync the shared datapath without this instance
            (the last one removes it and restores the sysctls), then forget this instance's flows

Every host change goes through a transaction (transaction.py): a failure or a signal during `start`
rolls back exactly what was done. Nothing slow (conntrack work, the server's start) happens
while holding the lock.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from nswrap import flows, legacy, namespaces, netlink, nft, sync
from nswrap.changes import DeleteLink, ForgetFlows, Forwarding6, ServerNetwork, SetSysctl, one_line, read_only_message
from nswrap.config import Config
from nswrap.datapath import Allocation, Instance, topic, veth_forwarding6, veth_mtu
from nswrap.errors import NswrapError, listed
from nswrap.facts import Facts, conntrack_count, gather, netns_id, proc_sys_read_only
from nswrap.follow import Follower
from nswrap.precheck import (
    check_fast,
    check_ready_fd,
    check_recordable,
    check_start,
    host_env,
    new_instance,
    require_capabilities,
    resolve_user,
    server_env,
)
from nswrap.readiness import Readiness
from nswrap.state import Record, State, StateDir, hold, new_id
from nswrap.supervise import FORWARDED, Credentials, Interrupted, Supervisor, check_command, exit_status
from nswrap.transaction import Kernel, Transaction

log = logging.getLogger("nswrap")

ALL6 = "net/ipv6/conf/all/forwarding"
STOP_FLUSH_SECONDS = 2.0  # forgetting this instance's flows at stop: bounded, the rest expire


class Life:
    """One instance from start to stop: what it holds (its record and liveness lock, the server's
    namespace until the server holds it) and the kernel adapters every change goes through."""

    def __init__(self, config: Config, supervisor: Supervisor):
        self.config = config
        self.supervisor = supervisor
        self.state = State(StateDir(netns_id()))
        self.kernel = Kernel()
        self.record: Record | None = None
        self.netns_fd: int | None = None
        self.live_fd: int | None = None
        self.facts: Facts | None = None
        self.follower: Follower | None = None
        self.said: set[str] = set()  # the datapath's warnings said so far, by topic (follow.py, _say_once)

    @property
    def instance(self) -> Instance:
        assert self.record is not None
        return self.record.instance

    # --- start ---------------------------------------------------------------------------

    def start(self) -> None:
        # listen before anything changes: a firewall reload during the rest of the start (or the
        # server's) is in the queue when serving begins, not lost
        self.follower = Follower(self)
        with self.supervisor.waiting():
            lock = self.state.dir.acquire(
                "lock", lambda: log.info("waiting for the setup lock: other instances are starting or stopping"))
        try:
            self._start_locked()
        finally:
            os.close(lock)

    def _start_locked(self) -> None:
        facts, records, live, allocation = self._look()
        instance, plan = self._plan(facts, live, allocation)
        record = Record(instance.id, os.getpid(), time.time(), list(self.config.command), instance, self.config.mark_mask)
        check_recordable(record)  # before any change: what cannot be read back cannot be cleaned up
        self.live_fd, self.record = hold(self.state, instance.id), record
        self.state.save(self.record)  # before the first host change: a crash from here on is recoverable
        tx = Transaction(self.kernel, checkpoint=self.supervisor.checkpoint)
        try:
            self.netns_fd = namespaces.new_netns()
            tx.run(self._server_network(facts, instance, self.netns_fd))
            sync.run(plan, tx, self.state.save_allocation)
        except BaseException:
            tx.rollback()
            self.state.save_allocation(allocation)
            self._forget_record()
            raise
        tx.commit()
        self.state.forget_dead([r for r in records if r not in live])
        self.facts = facts

    def _look(self) -> tuple[Facts, list[Record], list[Record], Allocation | None]:
        """The host, the records (all, and the live ones) and the shared allocation, once what an
        older nswrap or a crashed instance with another --mark-mask left behind is gone."""
        self.supervisor.checkpoint()
        facts = gather(self.kernel.routing)
        if legacy.dead_records():  # an older nswrap's leftovers, swept as that version did at start
            self._sweep_legacy(facts)
            facts = gather(self.kernel.routing)
        records = self.state.records()
        live = [r for r in records if self.state.dir.is_live(r.id)]
        allocation = self.state.allocation()
        if allocation is not None and allocation.mark_mask != self.config.mark_mask:
            if live:
                raise NswrapError(f"the nswrap instances here use --mark-mask {allocation.mark_mask:#x}; give the same")
            self._sweep_dead(facts, allocation)  # a crashed instance's marks: gone before ours are chosen
            facts, allocation = gather(self.kernel.routing), None
        return facts, records, live, allocation

    def _plan(self, facts: Facts, live: list[Record], allocation: Allocation | None) -> tuple[Instance, sync.Plan]:
        """This instance, checked against the host and the live ones, and what its start changes."""
        ids = {r.id for r in self.state.records()}
        instance = new_instance(self.config, facts, live, allocation, new_id(self.state, ids))
        check_start(facts, instance, live, self.config.take_over)
        # the shared part is (re)made when no instance lives: then first look at the other
        # firewalls, and one listing of the whole ruleset holds nswrap's table too
        listed = None if live else nft.ruleset()
        table = nft.read_table() if listed is None else nft.table_in(listed)
        if table is not None and not table.version and allocation is None:
            log.warning("replacing a table 'inet nswrap' that nswrap did not make (it has no version element)")
        rooms = None
        if table is None or not live:
            rooms = sync.wanted_rooms(sync.probe_firewall(listed), self.config.firewall, self.config.mark_mask)
        plan = sync.plan(facts, table, allocation, (*(r.instance for r in live), instance), self.config.mark_mask, rooms)
        writes = [c.key if isinstance(c, SetSysctl) else ALL6 for c in plan.changes if isinstance(c, (SetSysctl, Forwarding6))]
        if writes and proc_sys_read_only():  # say every --sysctl it takes at once, before any change
            raise NswrapError(read_only_message(writes))
        if instance.datapath == "bpf":
            check_fast()
        for warning in plan.datapath.warnings:
            log.warning("%s", warning)
        self.said = {topic(w) for w in plan.datapath.warnings}
        return instance, plan

    def _sweep_dead(self, facts: Facts, allocation: Allocation) -> None:
        with Transaction(self.kernel,
                         say=lambda line: log.warning("removed a dead instance's leftover: %s", one_line(line))) as tx:
            sync.run(sync.plan(facts, nft.read_table(), allocation, (), allocation.mark_mask), tx,
                     self.state.save_allocation)

    def _sweep_legacy(self, facts: Facts) -> None:
        tx = Transaction(self.kernel,
                         say=lambda line: log.warning("removed an older nswrap's leftover: %s", one_line(line)))
        tx.run_each(legacy.sweep(facts))
        legacy.forget(legacy.dead_records())

    def _server_network(self, facts: Facts, instance: Instance, netns_fd: int) -> ServerNetwork:
        """The server's side of the host: a veth pair, one end in its namespace `netns_fd`."""
        return ServerNetwork(
            instance, netns_fd, veth_mtu(facts),
            resolver_stub=str(facts.resolver_stub) if facts.resolver_stub else None,
            unprivileged_ports=self.config.user is not None and not proc_sys_read_only(),
            ipv6_forwarding=veth_forwarding6(facts, instance),
        )

    def _forget_record(self) -> None:
        if self.record is not None:
            self.state.forget(self.record.id)
            self.record = None
        if self.live_fd is not None:
            os.close(self.live_fd)
            self.live_fd = None
        if self.netns_fd is not None:
            os.close(self.netns_fd)
            self.netns_fd = None

    # --- serve ---------------------------------------------------------------------------

    def forget_stale_flows(self) -> None:
        """Flows to the published ports that began before the DNAT (a client that kept sending
        while no server ran) would bypass it until they expire. The kernel finds them: one dump
        per family and protocol (each walks the whole conntrack hash), filtered by port when one
        is published, and by address with --address (flows.py). Runs while the server starts
        (READY waits for it); not at all on an empty table."""
        if conntrack_count() == 0:
            return
        assert self.facts is not None
        ct = self.kernel.conntrack()
        changes = []
        for dump in flows.stale_dumps(self.instance, self.facts):
            found = flows.stale(dump, ct.flows(dump.version, orig_proto=flows.PROTO_NUMBERS[dump.proto],
                                               orig_dport=dump.single_port, orig_dst=dump.address))
            if found:
                changes.append(ForgetFlows(tuple(found), dump.render()))
        if changes:
            log.info("conntrack: forgetting %d flows that began before the DNAT", sum(len(c.flows) for c in changes))
            Transaction(self.kernel).run_each(changes, "conntrack")

    def start_server(self, creds: Credentials | None) -> None:
        assert self.netns_fd is not None
        assert self.facts is not None
        self.supervisor.start(self.config.command, self.netns_fd, server_env(host_env(self.facts, self.instance)), creds)
        os.close(self.netns_fd)  # the server holds its namespace now: it lives exactly as long
        self.netns_fd = None
        assert self.record is not None
        self.record.init_pid = self.supervisor.init_pid or 0
        self.state.save(self.record)

    def serve(self) -> int:
        follower = self.follower
        assert follower is not None
        ready = Readiness(self.instance, self.supervisor.init_pid or 0, self.config.ready_fd)
        return self.supervisor.wait(follower.filenos(), lambda fds: _min(ready.poll(), follower.on_ready(fds)))

    def server_gone(self) -> bool:
        """Has the server's init exited (its namespace with it)? Then this instance is stopping,
        and its teardown brings the shared datapath in line."""
        pid = self.supervisor.init_pid
        return bool(pid) and not os.path.exists(f"/proc/{pid}/ns/net")

    def repair(self) -> None:
        """Someone deleted our veth: make it again, into the server's namespace (its sockets
        survive), or stop."""
        assert self.record is not None and self.supervisor.init_pid
        try:
            fd = os.open(f"/proc/{self.supervisor.init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # the server is gone too: the supervisor sees it exit
        try:
            facts = gather(self.kernel.routing)
            with Transaction(self.kernel) as tx:
                tx.run(self._server_network(facts, self.instance, fd))
            log.warning("the veth %s was deleted: made it again", self.instance.veth)
        finally:
            os.close(fd)

    # --- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Teardown: best effort, never interrupted; what fails is said and left to the next
        sync (or `nswrap cleanup`), and never hides the error that made nswrap stop."""
        if self.follower is not None:
            self.follower.close()  # another instance follows the host from now on
            self.follower = None
        if self.record is None:
            self._leave_no_trace()
            return
        self.supervisor.tearing_down = True
        instance = self.instance
        had_flows = True
        try:
            with self.state.dir.lock():
                self.state.forget(instance.id)
                facts = gather(self.kernel.routing)
                live = tuple(r.instance for r in self.state.live() if r.id != instance.id)
                table, had_flows = self._table_at_stop(bool(live))
                plan = sync.plan(facts, table, self.state.allocation(), live, self.config.mark_mask)
                # the veth goes with the server's namespace, but the kernel destroys that in the
                # background, some milliseconds later: deleted here, it is gone when nswrap exits
                mine = [DeleteLink(instance.veth)] if facts.link(instance.veth) else []
                Transaction(self.kernel).run_each([*mine, *plan.changes], "teardown")
                self.state.save_allocation(plan.after)
                if plan.after is None and not live:
                    self.state.dir.retire()
        except Exception as e:  # whatever failed, the rest of the teardown still runs
            log.warning("teardown: %s (nswrap cleanup removes what is left)", str(e).splitlines()[0][:200] if str(e) else
                        type(e).__name__)
        if had_flows and conntrack_count() != 0:
            self._forget_flows(instance)
        self._forget_record()
        self.kernel.close()

    def _table_at_stop(self, others: bool) -> tuple[nft.Table | None, bool]:
        """The shared table as the teardown plan needs it, and whether this instance had flows.
        The last instance deletes the whole table: whether it exists is all it needs to know
        (reading a table of many elements back as JSON costs more than deleting it)."""
        try:
            if not others:
                return (nft.Table() if nft.has_table() else None), True
            table = nft.read_table()
        except Exception as e:  # NswrapError, or nft's output unreadable
            log.warning("teardown: cannot read nswrap's nft table: %s", str(e).splitlines()[0][:200] if str(e) else
                        type(e).__name__)
            return None, True
        had_flows = table is None or any(packets for (_, e), (packets, _) in table.counters.items()
                                         if e.comment == self.instance.id)
        return table, had_flows

    def _leave_no_trace(self) -> None:
        """A start refused before any host change: no directory of ours stays if nothing lives."""
        try:
            with self.state.dir.lock():
                if not self.state.live() and self.state.allocation() is None:
                    self.state.dir.retire()
        except (NswrapError, OSError) as e:
            log.debug("state directory: %s", e)
        self.kernel.close()

    def _forget_flows(self, instance: Instance) -> None:
        """This instance's flows (DNATed, their replies come from its server): found in one
        kernel-filtered dump, forgotten in batches, for at most a couple of seconds; what
        remains can only time out (its server is gone)."""
        deadline = time.monotonic() + STOP_FLUSH_SECONDS
        try:
            try:
                dumped = self.kernel.conntrack().flows(None, dnat_only=True, deadline=deadline)
            except netlink.FlowsTruncated as e:
                dumped = e.flows
        except OSError as e:
            log.warning("conntrack: could not forget this instance's flows: %s", e)
            return
        mine = flows.mine(instance, dumped)
        what = " ".join(f"conntrack -D --reply-src {instance.server(v)};" for v in instance.families).rstrip(";")
        tx = Transaction(self.kernel)
        for i in range(0, len(mine), 1000):
            if time.monotonic() > deadline:
                log.info("conntrack: %d flows of this instance are left to time out", len(mine) - i)
                return
            tx.run_each([ForgetFlows(tuple(mine[i:i + 1000]), what)], "conntrack")


def _min(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None


def run(config: Config) -> int:
    """`nswrap run`: start, serve, stop; the server's exit status (or 128+N for a signal)."""
    require_capabilities()
    check_ready_fd(config.ready_fd)
    check_command(config.command, server_env())
    creds = resolve_user(config.user) if config.user else None
    supervisor = Supervisor(config.stop_timeout)
    supervisor.install()
    life = Life(config, supervisor)
    try:
        life.start()
        supervisor.checkpoint()
        life.start_server(creds)
        life.forget_stale_flows()
        log.info("instance %s: serving %s", life.instance.id, listed(config.ports))
        return life.serve()
    except Interrupted as e:
        log.warning("%s during setup: rolling back", e)
        return exit_status(-e.signum)
    except NswrapError:
        if supervisor.alive():
            supervisor.kill(signal.SIGKILL)
            supervisor.wait()
        raise
    finally:
        supervisor.tearing_down = True
        life.stop()
        for signum in FORWARDED:  # the interpreter's shutdown must not die of a late stop signal
            signal.signal(signum, signal.SIG_IGN)

