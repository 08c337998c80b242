"""nswrap on the simulated multihomed host (see tests/lab/ for the topology).

Every test runs nswrap inside the lab's host namespace, checks results with independent tools
(dig, ip -json, nft -j, conntrack), and the `lab` fixture asserts afterwards that the host state
is exactly what it was before.
"""

from __future__ import annotations

import json
import pathlib
import signal

import pytest

from tests.lab import TEST_ANSWER, diff_states, dig, wait_answered, wait_until
from tests.system import common
from tests.system.common import SIGECHO, UDPECHO, Held, echo_answered, nswrap, output, setup_steps, start, wait_ready

MARK_MASK = 0xF0000000


def stderr_of(tmp_path) -> str:
    return output(tmp_path, stream="err")


@pytest.mark.nft_only(
    "reads each flow's uplink mark from conntrack, which the fast path's flows skip (test_fastpath: every "
    "path)"
)
def test_every_path_is_answered_from_the_asked_address_udp_and_tcp(lab, tmp_path, unbound):
    proc = start(lab, tmp_path, "--ports", "53,53/tcp", "--", *unbound)
    for path in lab.paths:  # dig drops replies from any other source, so an answer proves the source
        assert wait_answered(lab, path) == TEST_ANSWER, path.name
        assert dig(lab, path, tcp=True) == TEST_ANSWER, f"{path.name} over TCP"

    # Oracle: conntrack kept, per flow, the mark of the uplink it came in on.
    flows = lab.exec(lab.host, ["conntrack", "-L", "-p", "udp", "--orig-port-dst", "53"]).stdout
    marks = {}
    for line in flows.splitlines():
        fields = {}
        for key, _, value in (f.partition("=") for f in line.split() if "=" in f):
            fields.setdefault(key, value)  # the first dst= is the original direction's
        marks.setdefault(fields["dst"], set()).add(int(fields.get("mark", "0")) & MARK_MASK)
    assert marks["192.0.2.10"] == marks["192.0.2.11"], "one uplink, one mark"
    assert len({m for ms in marks.values() for m in ms}) == 3 and 0 not in marks["198.51.100.10"]

    assert lab.stop(proc) == 0, stderr_of(tmp_path)  # unbound exits 0 on SIGTERM
    assert "Traceback" not in stderr_of(tmp_path)


def test_one_client_port_asking_two_addresses_is_answered_from_each(lab, tmp_path):
    """An NTP client sends from port 123 whatever it asks (ntpd; chronyd with `port 123`): asking
    two addresses of the host from one port, the second while the first's flow lives, it gets
    each answer from the address it asked, and the first flow keeps working. The server sees two
    flows: the second's client port is another (conntrack gives it one on the nft datapath, the
    fast path does likewise: docs/fastpath.md)."""
    proc = start(lab, tmp_path, "--ports", "5300", "--", *UDPECHO, "serve", "5300")
    wait_ready(tmp_path)
    for first, second in ((lab.paths[0], lab.paths[1]), (lab.paths6[0], lab.paths6[1])):
        assert (first.client, first.uplink) == (second.client, second.uplink) and first.address != second.address
        for path in (first, second, first, second):
            assert echo_answered(lab, path.client, path.address, 5300, sport=123), path.name
    if common.datapath() == "bpf":  # the fast path carried both (bpftool): two flows, the second on another port
        flows = [f for f in map(common.fast_flow, common.fast_flows(lab)) if f["client_port"] == 123]
        assert len(flows) == 4, flows
        for version in (4, 6):  # the other port is privileged too, as conntrack keeps it
            mine = [f for f in flows if (":" in f["client"]) == (version == 6)]
            assert len({f["asked"] for f in mine}) == 2, mine
            assert sorted(f["port_seen"] == 123 for f in mine) == [False, True], mine
            assert all(0 < f["port_seen"] < 512 for f in mine), mine
    assert lab.stop(proc) == 128 + signal.SIGTERM, stderr_of(tmp_path)


def conntrack_timeouts(lab, port: int) -> list[int]:
    """Seconds left of each UDP flow to *port* (the third field of `conntrack -L`)."""
    flows = lab.exec(lab.host, ["conntrack", "-L", "-p", "udp", "--orig-port-dst", str(port)], check=False).stdout
    return [int(line.split()[2]) for line in flows.splitlines() if line.startswith("udp")]


@pytest.mark.nft_only("conntrack's timeouts of published flows, which the fast path's flows do not make")
def test_published_flows_get_the_short_conntrack_timeout(lab, tmp_path):
    """docs/design.md, Floods: a published UDP flow unanswered, or answered within its first 2 s
    (a DNS query), is forgotten after 10 s; a flow to a port nobody publishes keeps the kernel's 30."""
    proc = start(lab, tmp_path, "--ports", "5353,5354", "--", *UDPECHO, "serve", "5353")
    wait_ready(tmp_path)
    path = lab.paths[2]  # c2 -> eth1, not the main table's uplink
    assert echo_answered(lab, path.client, path.address, 5353)
    assert not echo_answered(lab, path.client, path.address, 5354), "nothing listens on 5354"
    unpublished = lab.spawn(lab.host, [*UDPECHO, "serve", "5355"], stdout=(tmp_path / "host.out").open("w"))
    wait_ready(tmp_path, name="host")
    direct = lab.paths[0]  # the main table's uplink: a host service answers there by itself
    assert echo_answered(lab, direct.client, direct.address, 5355), "a host service on a port nobody publishes"
    published = conntrack_timeouts(lab, 5353) + conntrack_timeouts(lab, 5354)
    unrelated = conntrack_timeouts(lab, 5355)
    assert len(published) == 2 and all(t <= 10 for t in published), published
    assert unrelated and all(t > 10 for t in unrelated), unrelated
    assert lab.stop(proc) == 128 + signal.SIGTERM, stderr_of(tmp_path)
    lab.stop(unpublished)


POOL = {4: ("198.18.0.0", 15), 6: ("fd6e:7377:7261::", 48)}  # nswrap's internal ranges
FIRST_PRIORITY = 5000  # P: the first free block from 5000 (the lab has no rules there)


def our_rules(lab, family: int) -> list[dict]:
    rules = json.loads(lab.exec(lab.host, ["ip", "-json", f"-{family}", "rule", "show"]).stdout)
    return [r for r in rules if str(r.get("protocol")) == "110"]


def nft_tables(lab) -> list[tuple[str, str]]:
    listed = json.loads(lab.exec(lab.host, ["nft", "-j", "list", "tables"]).stdout)["nftables"]
    return [(t["table"]["family"], t["table"]["name"]) for t in listed if "table" in t]


def test_rules_and_table_exist_while_serving_and_only_then(lab, tmp_path):
    """One shared datapath: per family two rules for the internal range and one fwmark rule per
    uplink (its own mark and table), one nft table `inet nswrap`; nothing per instance."""
    proc = start(lab, tmp_path, "--ports", "5353", "--", *UDPECHO, "serve", "5353")
    wait_ready(tmp_path)
    tables_of_marks = {}
    for family in (4, 6):
        dst, dstlen = POOL[family]
        pool = {"src": "all", "dst": dst, "dstlen": dstlen, "protocol": "110"}
        rules = our_rules(lab, family)
        assert rules[:2] == [
            {"priority": FIRST_PRIORITY, **pool, "table": "main", "suppress_prefixlen": 0},
            {"priority": FIRST_PRIORITY + 1, **pool, "action": "unreachable"},
        ], rules
        fwmark = rules[2:]
        assert len(fwmark) == 3, f"one fwmark rule per uplink: {rules}"
        assert all(r["priority"] == FIRST_PRIORITY + 2 and r["fwmask"] == f"{MARK_MASK:#x}" for r in fwmark), fwmark
        marks = {int(r["fwmark"], 16): int(r["table"]) for r in fwmark}
        assert len(marks) == 3 and all(m and m & MARK_MASK == m for m in marks), fwmark
        tables_of_marks[family] = marks
    assert tables_of_marks[4] == tables_of_marks[6], "an uplink's mark and table serve both families"

    # each mark's table routes through its own uplink (read from the kernel, not from nswrap)
    routes = json.loads(lab.exec(lab.host, ["ip", "-json", "-4", "route", "show", "table", "all"]).stdout)
    uplink_of_table = {}
    for table in tables_of_marks[4].values():
        devices = {r["dev"] for r in routes if str(r.get("table")) == str(table)}
        assert len(devices) == 1 and table >= FIRST_PRIORITY, (table, devices)
        uplink_of_table[table] = devices.pop()
    assert sorted(uplink_of_table.values()) == ["eth0", "eth1", "eth2"]

    assert [t for t in nft_tables(lab) if "nswrap" in t[1]] == [("inet", "nswrap")]
    forwarding = lab.exec(lab.host, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
    assert forwarding == "0", "nswrap must never flip the global switch"

    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert our_rules(lab, 4) == our_rules(lab, 6) == []
    assert not [t for t in nft_tables(lab) if "nswrap" in t[1]]


def test_signals_are_forwarded_and_the_server_exit_code_returned(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", "5353", "--", *SIGECHO)
    out = tmp_path / "nswrap.out"
    wait_ready(tmp_path)
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT):
        proc.send_signal(sig)
        wait_until(lambda name=sig.name: f"got {name}" in out.read_text(), 10, what=f"{sig.name} forwarded")
    assert lab.stop(proc, sig=signal.SIGTERM) == 3
    assert out.read_text().count("got SIGTERM") == 1, "forwarded exactly once"


@pytest.mark.parametrize(
    "command, code",
    [
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -KILL $$"], 128 + 9),
        (["no-such-command-nswrap"], 127),
        (["{not_executable}"], 126),
    ],
)
def test_exit_codes(lab, tmp_path, command, code):
    not_executable = tmp_path / "server.sh"
    not_executable.write_text("#!/bin/sh\n")
    command = [arg.format(not_executable=not_executable) for arg in command]
    done = nswrap(lab, "--ports", "5353", "--", *command)
    assert done.returncode == code, done.stderr
    if code in (126, 127):
        assert command[0] in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr
    if code == 127:  # known before any host change: nothing else is said (no setup warnings)
        assert done.stderr.splitlines() == [f"nswrap: command not found: {command[0]}"]


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--uplink", "eth9"], "eth9"),
        (["--subnet", "192.0.2.0/30"], "192.0.2.0/30"),
        (["--uplink", "eth1=198.51.100.10"], "198.51.100.10 is an address of this host"),  # its own, not a gateway
    ],
)
def test_failed_start_exits_125_and_changes_nothing(lab, args, culprit):
    done = nswrap(lab, "--ports", "53", *args, "--", "true")
    assert done.returncode == 125, done.stderr
    assert done.stderr.startswith("nswrap: ") and "Traceback" not in done.stderr, done.stderr
    assert culprit in done.stderr.splitlines()[-1], done.stderr


def test_dry_run_prints_the_plan_and_changes_nothing(lab):
    done = nswrap(lab, "--ports", "53,53/tcp", "--dry-run")
    assert done.returncode == 0, done.stderr
    expected = (
        "table inet nswrap {",
        "ip rule add to 198.18.0.0/15 lookup 254 suppress_prefixlength 0 priority 5000 protocol 110",
        "ip rule add to 198.18.0.0/15 unreachable priority 5001 protocol 110",
        "ip rule add fwmark 0x10000000/0xf0000000 lookup 5000 priority 5002 protocol 110",
        "ip -6 rule add fwmark 0x30000000/0xf0000000 lookup 5002 priority 5002 protocol 110",
        "sysctl -w net.ipv4.conf.eth1.src_valid_mark=1",
    )
    lines = done.stdout.splitlines()
    for line in expected:
        assert line in lines, f"{line!r} not in the plan:\n{done.stdout}"
    assert not [line for line in lines if "nswrap-" in line and line.startswith(("table", "nft"))], "no per-instance table"
    assert "uplink eth2 has no gateway" in done.stderr
    # the lab fixture checks that nothing changed


def test_sigterm_at_every_setup_step_or_while_serving_leaves_the_host_exact(lab, tmp_path):
    """SIGTERM while serving is forwarded to the server; SIGTERM during the setup, before its
    first host change or right after any of them, rolls back what was done. Either way nswrap
    exits 128+15 and the host is exactly as before."""
    before = lab.state()
    server = ("--ports", "53,53/tcp", "--", "sleep", "60")
    proc = start(lab, tmp_path, "-v", *server)
    wait_until(lambda: "serving 53/" in stderr_of(tmp_path) or proc.poll() is not None, 30, what="nswrap serving")
    total = setup_steps(stderr_of(tmp_path))
    assert total > 20, stderr_of(tmp_path)
    assert lab.stop(proc) == 128 + signal.SIGTERM, stderr_of(tmp_path)
    assert "rolling back" not in stderr_of(tmp_path) and "Traceback" not in stderr_of(tmp_path), stderr_of(tmp_path)
    assert not diff_states(before, lab.state()), f"after SIGTERM while serving:\n{diff_states(before, lab.state())}"

    for step in range(total + 1):
        held = Held(lab, tmp_path, step, *server)
        status = held.finish(signal.SIGTERM)
        log = stderr_of(tmp_path)
        assert status == 128 + signal.SIGTERM, f"SIGTERM after change {step} ({held.where}):\n{log}"
        # after the last change the server starts: from there on, SIGTERM is the server's to handle
        assert ("interrupted by SIGTERM during setup: rolling back" in log) == (step < total), f"{held.where}\n{log}"
        assert "Traceback" not in log, log
        changes = diff_states(before, lab.state())
        assert not changes, f"after SIGTERM after change {step} ({held.where}):\n{changes}\n{log}"


# nswrap bug (reported): commands that only read (list, --dry-run, exec) and starts refused before
# any host change create the namespace's state directory (StateDir() makes it) and never remove it.

@pytest.mark.parametrize(
    "args",
    [
        ["--ports", "53", "--", "true"],
        ["cleanup"],
        ["doctor"],
        ["list"],
        ["list", "--json"],
        ["--ports", "53", "--dry-run"],
        ["exec", "abcdef", "--", "true"],
        ["--ports", "53", "--uplink", "eth9", "--", "true"],
    ],
    ids=lambda args: " ".join(args),
)
def test_no_state_directory_is_left_for_the_namespace(lab, args):
    """Once no instance runs, /run/nswrap/<the namespace's cookie>/ is gone (not only its records)."""
    nswrap(lab, *args)
    directory = pathlib.Path(f"/run/nswrap/c{lab.netns_cookie(lab.host)}")
    assert not directory.exists(), sorted(p.name for p in directory.iterdir())
