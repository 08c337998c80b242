"""The commands besides `run`: `--dry-run`, `cleanup`, `list` and `exec`.

`cleanup` is the sweep: the shared datapath brought in line with the live instances (dead ones'
elements go, and everything goes when none is alive), dead records removed, and what an older
nswrap left (legacy.py). It removes only what a valid record or the allocation proves is
nswrap's. `list` reads; `exec` enters an instance's namespaces.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time

from nswrap import legacy, namespaces, netlink, nft, sync
from nswrap.changes import DeleteLink, ServerNetwork
from nswrap.config import DEFAULT_MARK_MASK, Config
from nswrap.datapath import instance_uplinks
from nswrap.errors import EXIT_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, NswrapError, UsageError, quoted
from nswrap.facts import Facts, gather, netns_id
from nswrap.precheck import check_start, new_instance, require_capabilities
from nswrap.state import RUN_DIR, Record, State, StateDir, existing, readable, remove_dir, vanished
from nswrap.supervise import exit_status
from nswrap.transaction import Kernel, Transaction

log = logging.getLogger("nswrap")

LIST_FLOWS_SECONDS = 1.0  # counting live flows on a full conntrack table: bounded


def _needs_root(what: str, code: int = 1) -> None:
    if os.geteuid() != 0 or not readable():
        raise NswrapError(f"{what} needs root: nswrap's state (/run/nswrap) and the kernel's tables are root's only",
                          code)


def dry_run(config: Config) -> int:
    """What a start would do here, as shell lines; nothing is changed."""
    _needs_root("--dry-run", EXIT_FAILED)  # the code a start would exit with
    state = existing(netns_id())
    with netlink.Routing() as routing:
        facts = gather(routing)
    live = state.live() if state else []
    allocation = state.allocation() if state else None
    instance = new_instance(config, facts, live, allocation, "d0d0d0")  # as a start would make it
    forwarding6 = instance.forwarding6 if instance.subnet6 else None
    check_start(facts, instance, live, config.take_over)
    table = nft.read_table()
    rooms = sync.wanted_rooms(sync.probe_firewall(), config.firewall, config.mark_mask) if table is None or not live else None
    plan = sync.plan(facts, table, allocation, (*(r.instance for r in live), instance), config.mark_mask, rooms)
    for warning in plan.datapath.warnings:
        log.warning("%s", warning)
    out = [f"# nswrap, dry run: ports {', '.join(map(str, config.ports))}; uplinks "
           + ", ".join(sorted({u for v in instance.families for u in instance_uplinks(facts, instance, v)})),
           "", "# the server's own network: a veth pair, one end in its (anonymous) namespace",
           ServerNetwork(instance, -1, 1500, str(facts.resolver_stub) if facts.resolver_stub else None,
                         config.user is not None,
                         forwarding6 == "interface" and facts.sysctl("net/ipv6/conf/all/forwarding") != "1").render(),
           "", "# the shared datapath: what changes for this instance (all of it for the first one)"]
    out += [change.render() for change in plan.changes]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def cleanup() -> int:
    require_capabilities()
    state = State(StateDir(netns_id()))
    said: list[str] = []
    with state.dir.lock(), Kernel() as kernel:
        facts = gather(kernel.routing)
        records = state.records()
        live = [r for r in records if state.dir.is_live(r.id)]
        dead = [r for r in records if r not in live]
        allocation = state.allocation()
        table = nft.read_table()
        changes: list = []
        after = allocation
        if allocation is not None or table is not None or dead:
            mask = allocation.mark_mask if allocation else (live[0].mark_mask if live else DEFAULT_MARK_MASK)
            plan = sync.plan(facts, table, allocation, tuple(r.instance for r in live), mask)
            changes, after = plan.changes, plan.after
        changes += [DeleteLink(r.instance.veth) for r in dead if facts.link(r.instance.veth)]
        changes += legacy.sweep(facts)
        Transaction(kernel, say=said.append).run_each(changes)  # best effort: what fails is said
        state.save_allocation(after)
        for record in dead:
            state.forget(record.id)
            said.append(f"rm {state.dir.path}/{record.id}.json  # instance {record.id} (pid {record.pid}) is gone")
        said += legacy.forget(legacy.dead_records())
        if after is None and not live:
            state.dir.retire()
    for name in vanished(current=state.dir.netns):
        remove_dir(name)
        said.append(f"rm -r {RUN_DIR}/{name}  # its network namespace is gone")
    for line in said:
        print(line)
    if not said:
        print("nothing to clean up")
    return 0


def _flows(records: list[Record], marks: dict[int, str], deadline: float) -> tuple[dict[tuple[str, str], int], bool]:
    """Live flows per (instance, uplink), from one kernel-filtered dump of the DNATed flows of
    both families (their replies come from the instance's server); whether counting finished."""
    owner = {address.packed: r for r in records for v in r.instance.families
             if (address := r.instance.server(v)) is not None}
    counts: dict[tuple[str, str], int] = {}
    with netlink.Conntrack() as ct:
        tally, complete = ct.tally_dnat(deadline)
    for (mark, server), n in tally.items():
        record = owner.get(server)
        if record is not None:
            key = (record.id, marks.get(mark & record.mark_mask, "lo"))
            counts[key] = counts.get(key, 0) + n
    return counts, complete


def _conntrack_use() -> dict[str, int]:
    use = {}
    for key in ("count", "max"):
        try:
            with open(f"/proc/sys/net/netfilter/nf_conntrack_{key}") as f:
                use[key] = int(f.read())
        except (OSError, ValueError):
            pass
    return use


def _rows(state: State, facts: Facts) -> list[dict]:
    allocation = state.allocation()
    marks = {allocation.mark(u.index): u.ifname for u in allocation.uplinks} if allocation else {}
    table = nft.read_table()
    live = state.live()
    flows, complete = _flows(live, marks, time.monotonic() + LIST_FLOWS_SECONDS)
    forged = {e.key[0].strip('"'): packets for (name, e), (packets, _) in (table.counters.items() if table else ())
              if name == "forged"}
    misrouted = table.named_counters.get("misrouted", 0) if table else 0
    rows = []
    for record in live:
        started: dict[str, int] = {}
        for (name, element), (packets, _) in (table.counters.items() if table else ()):
            if element.comment == record.id and name.startswith(("keep", "remap", "any")):
                uplink = element.key[0].strip('"')
                started[uplink] = started.get(uplink, 0) + packets
        uplinks: list[dict] = []
        for version in record.instance.families:
            for name in instance_uplinks(facts, record.instance, version):
                if any(u["name"] == name for u in uplinks):
                    continue
                tables = {u.table for u in allocation.uplinks if u.ifname == name} if allocation else set()
                uplinks.append({
                    "name": name,
                    "addresses": [str(a) for v in (4, 6) for a in facts.global_addresses(name, v)],
                    "gateways": sorted({str(r.gateway) for r in facts.routes
                                        if r.table in tables and r.is_default and r.gateway}),
                    "flows_started": started.get(name, 0),
                    "flows": flows.get((record.id, name), 0),
                })
        rows.append({
            "id": record.id, "pid": record.pid, "command": record.command,
            "ports": [str(p) for p in record.instance.ports],
            "started": datetime.datetime.fromtimestamp(record.started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "local_flows_started": started.get("lo", 0),
            "local_flows": flows.get((record.id, "lo"), 0),
            "flows_counted": complete,
            "uplinks": uplinks,
            "forwarding6": record.instance.forwarding6 if 6 in record.instance.families else None,
            "datapath": record.instance.datapath,
            "forged": forged.get(record.instance.veth, 0),
            "misrouted": misrouted,
        })
    return rows


def check_serving() -> int:
    """`nswrap list --check`, a health check: 0 while an instance of this network namespace is
    live, 1 otherwise; cheap (no conntrack dump, no nft listing)."""
    _needs_root("nswrap list")
    state = existing(netns_id())
    live = state.live() if state else []
    if not live:
        print("no nswrap instance is serving in this network namespace")
        return 1
    print(f"serving: {', '.join(f'{r.id} (pid {r.pid})' for r in live)}")
    return 0


def list_instances(as_json: bool) -> int:
    _needs_root("nswrap list")
    state = existing(netns_id())
    with netlink.Routing() as routing:
        facts = gather(routing)
    rows = _rows(state, facts) if state else []
    use = _conntrack_use()
    if as_json:
        print(json.dumps({"instances": rows, "conntrack": use}, indent=2))
        return 0
    if not rows:
        print("no nswrap instances in this network namespace")
        return 0
    for line in _table(rows):
        print(line)
    if rows and rows[0]["misrouted"]:
        print(f"dropped {rows[0]['misrouted']} replies that no route of their uplink could take "
              "(an uplink without a gateway: give --uplink IFACE=GATEWAY)")
    if use:
        print(f"conntrack: {use.get('count', '?')} of {use.get('max', '?')} entries in use")
    fast = [r["id"] for r in rows if r["datapath"] == "bpf"]
    if fast:
        from nswrap.bpf.fast import remembered

        count = remembered(facts)
        flows = f"{count} flows remembered" if count is not None else "its programs are a newer nswrap's"
        print(f"fast path (--datapath bpf) for {', '.join(fast)}: {flows}; their packets "
              "skip the host's netfilter (firewall rules, conntrack: not in the counts above) and forwarding")
    if state is not None and (allocation := state.allocation()) is not None and allocation.switch6 is not None:
        needing = [r["id"] for r in rows if r["forwarding6"] == "global"]
        print(f"IPv6: nswrap holds net.ipv6.conf.all.forwarding=1 for {', '.join(needing) or 'no live instance'} "
              "(--ipv6-forwarding global: accept_ra=2 where it was 1; nothing else is forwarded)")
    return 0


def _columns(cells: list[list[str]], right: set[int] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Rows of cells, each column as wide as its widest cell (right-aligned where asked)."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))] if cells else []
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
            .rstrip() for row in cells]


def _table(rows: list[dict]) -> list[str]:
    """`nswrap list`: one line per instance, then one per uplink under it; the columns of each
    kind of line aligned to their widest cell."""
    heads = _columns([["ID", "PID", "SINCE", "PORTS", "COMMAND"]]
                     + [[r["id"], str(r["pid"]), r["started"], ",".join(r["ports"]), " ".join(r["command"])] for r in rows],
                     right={1})
    cells = []
    for row in rows:
        more = "" if row["flows_counted"] else "+"
        cells.append([[u["name"], " ".join(u["addresses"]), "via " + ",".join(u["gateways"]) if u["gateways"] else "no gateway",
                       "flows:", str(u["flows_started"]), "started", f"{u['flows']}{more}", "live"] for u in row["uplinks"]])
    every = [c for group in cells for c in group]
    aligned = iter(_columns(every, right={4, 6}))
    out = [heads[0]]
    for i, row in enumerate(rows):
        out.append(heads[i + 1])
        out += [f"    {next(aligned)}" for _ in cells[i]]
        if row["forged"]:
            out.append(f"    dropped {row['forged']} packets the server sent from an address not its own")
    return out


def exec_in(instance: str, command: tuple[str, ...]) -> int:
    """Run `command` in a live instance's network namespace, e.g. tcpdump or ss."""
    _needs_root("nswrap exec")
    if not command or not command[0]:
        raise UsageError(f"{'empty command name' if command else 'no command given'}: nswrap exec ID -- COMMAND [ARG...]")
    state = existing(netns_id())
    found = [r for r in state.live() if r.id.startswith(instance)] if instance and state else []
    if len(found) != 1:
        raise NswrapError(f"no live nswrap instance {quoted(instance)}" if not found
                          else f"instance id {quoted(instance)} is ambiguous")
    target = found[0].init_pid
    try:
        net = os.open(f"/proc/{target}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NswrapError(f"instance {found[0].id}: cannot open its namespace: {e.strerror}") from None
    try:
        done = subprocess.run(command, preexec_fn=lambda: namespaces.enter(net), pass_fds=(net,))
    except FileNotFoundError:
        raise NswrapError(f"command not found: {command[0]}", EXIT_NOT_FOUND) from None
    except PermissionError:
        raise NswrapError(f"command not executable: {command[0]}", EXIT_NOT_EXECUTABLE) from None
    finally:
        os.close(net)
    return exit_status(done.returncode)



