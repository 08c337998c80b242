"""The commands, from start to end: run an instance, clean up after dead ones, list live ones.

`run`: (sweep dead instances) -> facts -> plan -> record -> apply -> serve -> tear down. Everything
it changes goes through apply.py and is rolled back on exit, on a signal, or on any failure during
setup; allocation and teardown run under the setup lock, so parallel instances never collide.
"""

from __future__ import annotations

import datetime
import grp
import json
import logging
import os
import pwd
import secrets
import socket
import subprocess
import sys
import time

from nswrap import netlink, nft
from nswrap.apply import Applier
from nswrap.config import Config, PortRange
from nswrap.errors import NswrapError, UsageError
from nswrap.facts import Facts, gather
from nswrap.plan import PROTO, TABLE_PREFIX, Plan, make_plan, render_plan
from nswrap.state import Journal, Record, hold_instance, live_records, setup_lock, sweep, write_resolv
from nswrap.supervise import Credentials, Interrupted, Supervisor, exit_status

log = logging.getLogger("nswrap")

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def _require_capabilities() -> None:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    missing = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")) if not caps >> bit & 1]
    if missing:
        raise NswrapError(f"not permitted: nswrap needs {' and '.join(missing)} (run it as root)")


def resolve_user(spec: str) -> Credentials:
    """USER[:GROUP] (names or numbers) -> uid, gid and the user's supplementary groups."""
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"invalid user {spec!r}: no such user {user!r}") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"invalid user {spec!r}: no such group {group!r}") from None
    return Credentials(entry.pw_uid, gid, tuple(os.getgrouplist(entry.pw_name, gid)))


def _plan(config: Config, facts: Facts) -> Plan:
    plan = make_plan(config, facts, secrets.token_hex(3))
    for warning in plan.warnings:
        log.warning("%s", warning)
    return plan


def _facts(nl) -> Facts:
    handed_over = {}
    for record in live_records():
        handed_over.update(record.changed)  # what the host had before any live nswrap changed it
    return gather(nl, handed_over)


def dry_run(config: Config) -> int:
    with netlink.Netlink() as nl:
        sys.stdout.write(render_plan(_plan(config, _facts(nl))))
    return 0


def _refuse_published_twice(ports: tuple[PortRange, ...]) -> None:
    for record in live_records():
        for proto, lo, hi, _ in record.ports:
            for p in ports:
                if p.proto == proto and p.outer_lo <= hi and lo <= p.outer_hi:
                    raise NswrapError(
                        f"port {p} is already published by nswrap instance {record.id} "
                        f"(pid {record.pid}: {' '.join(record.command)})"
                    )


def _record(config: Config, plan: Plan) -> Record:
    return Record(
        id=plan.instance,
        pid=os.getpid(),
        started=time.time(),
        command=list(config.command),
        ports=[[p.proto, p.outer_lo, p.outer_hi, p.inner_lo] for p in plan.ports],
        uplinks=[],
    ).describe(plan)


def _announce_ready(ready_fd: int | None) -> None:
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
        except OSError as e:
            log.warning("--ready-fd %d: %s", ready_fd, e.strerror)
    path = os.environ.get("NOTIFY_SOCKET")
    if path:  # systemd Type=notify
        address = "\0" + path[1:] if path.startswith("@") else path
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), address)
            except OSError as e:
                log.warning("NOTIFY_SOCKET %s: %s", path, e.strerror)


def run(config: Config) -> int:
    if config.dry_run:
        return dry_run(config)
    _require_capabilities()
    creds = resolve_user(config.user) if config.user else None
    supervisor = Supervisor(config.stop_timeout)
    supervisor.install()
    applier = liveness = None
    try:
        with setup_lock():
            with netlink.Netlink() as nl:
                facts = _facts(nl)
                removed = sweep(nl, facts)
                for line in removed:
                    log.warning("removed a dead instance's leftover: %s", line)
                if removed:
                    facts = _facts(nl)
            supervisor.checkpoint()
            _refuse_published_twice(config.ports)
            plan = _plan(config, facts)
            liveness = hold_instance(plan.instance)
            journal = Journal(_record(config, plan))
            journal.start()  # before the first host change: a crash from here on is recoverable
            applier = Applier(plan, journal)
            applier.apply(supervisor.checkpoint)
        supervisor.checkpoint()
        log.info("instance %s: serving %s on %s", plan.instance, ", ".join(map(str, plan.ports)), ", ".join(u.ifname for u in plan.uplinks))
        # readiness is ours to tell; our own settings are not the server's
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET" and not k.startswith("NSWRAP_")}
        resolv = write_resolv(plan.instance, plan.resolv_conf) if plan.resolv_conf else None
        supervisor.start(config.command, applier.netns_fd, env, creds, resolv)
        applier.release_netns()
        applier.journal.started(supervisor.init_pid)
        _announce_ready(config.ready_fd)
        monitor = netlink.Monitor()
        try:
            return supervisor.wait(monitor, lambda: _follow(config, applier))
        finally:
            monitor.close()
    except Interrupted as e:
        log.warning("%s during setup: rolling back", e)
        return exit_status(-e.signum)
    finally:
        supervisor.tearing_down = True
        if applier is not None:
            with setup_lock():
                applier.rollback()
                applier.journal.finish()
        if liveness is not None:
            liveness.close()


def _follow(config: Config, applier: Applier) -> None:
    """Links, addresses, routes or rules changed: bring the instance in line with the host."""
    try:
        with setup_lock(), netlink.Netlink() as nl:
            facts = _facts(nl)
            new = make_plan(config, facts, applier.plan.instance, previous=applier.plan)
            for warning in set(new.warnings) - set(applier.plan.warnings):
                log.warning("%s", warning)
            for line in applier.update(new, facts):
                log.warning("following the host: %s", line)
            applier.journal.follow(new)
    except (NswrapError, OSError) as e:
        log.warning("following the host: %s (keeping the current setup)", e)


def cleanup() -> int:
    _require_capabilities()
    with setup_lock(), netlink.Netlink() as nl:
        removed = sweep(nl, gather(nl))
    for line in removed:
        print(line)
    if not removed:
        print("nothing to clean up")
    return 0


def _uplink_rows(record: Record, facts: Facts) -> list[dict]:
    """Per uplink: its addresses, the gateways in its table, the published traffic that came in on
    it (the nft counters of its mark rules) and its live flows (conntrack entries with its mark)."""
    counted = nft.counters("inet", TABLE_PREFIX + record.id, "remember_uplink")
    rows = []
    for name, mark in zip(record.uplinks, record.marks):
        tables = {r.table for r in facts.rules if r.proto == PROTO and r.fwmark == mark and r.fwmask == record.mark_mask}
        packets, octets = counted.get(name, (0, 0))
        rows.append({
            "name": name,
            "addresses": [str(a) for v in (4, 6) for a in facts.global_addresses(name, v)],
            "gateways": sorted({str(r.gateway) for r in facts.routes if r.table in tables and r.is_default and r.gateway}),
            "packets": packets,
            "bytes": octets,
            "flows": netlink.conntrack_count(mark, record.mark_mask),
        })
    return rows


def list_instances(as_json: bool) -> int:
    with netlink.Netlink() as nl:
        facts = gather(nl)
    rows = [
        {
            "id": r.id,
            "pid": r.pid,
            "command": r.command,
            "ports": [str(PortRange(*p)) for p in r.ports],
            "started": datetime.datetime.fromtimestamp(r.started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "uplinks": _uplink_rows(r, facts),
        }
        for r in live_records()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['id']}  pid {row['pid']}  since {row['started']}  ports {','.join(row['ports'])}  {' '.join(row['command'])}")
        for u in row["uplinks"]:
            via = ",".join(u["gateways"]) or "no gateway"
            print(f"    {u['name']:15} {' '.join(u['addresses']):40} via {via:28} {u['packets']:>9} pkts {u['bytes']:>11} bytes {u['flows']:>7} flows")
    return 0


def exec_in(instance: str, command: tuple[str, ...]) -> int:
    """Run `command` in a live instance's network (and mount) namespace, e.g. tcpdump or ss."""
    found = [r for r in live_records() if r.id.startswith(instance)]
    if len(found) != 1:
        raise NswrapError(f"no live nswrap instance {instance!r}" if not found else f"instance id {instance!r} is ambiguous")
    if not command:
        raise UsageError("no command given: nswrap exec ID -- COMMAND [ARG...]")
    target = found[0].init_pid
    try:
        namespaces = [os.open(f"/proc/{target}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in ("net", "mnt")]
    except OSError as e:
        raise NswrapError(f"instance {found[0].id}: cannot open its namespaces: {e.strerror}") from None
    try:
        done = subprocess.run(command, preexec_fn=lambda: netlink.enter(namespaces))
    except FileNotFoundError:
        raise NswrapError(f"command not found: {command[0]}", 127) from None
    except PermissionError:
        raise NswrapError(f"command not executable: {command[0]}", 126) from None
    finally:
        for fd in namespaces:
            os.close(fd)
    return exit_status(done.returncode)
