"""Lifecycle on the simulated host: crashes, restarts, many instances, PID 1, daemons, --user.

The `lab` fixture checks after each test that the host namespace is exactly as before; these
tests add what only SIGKILL, parallelism and process trees can show. Server processes are found
by an independent oracle (psutil over /proc), never through nswrap.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import tempfile
import time

import psutil
import pytest

from tests.lab import TEST_ANSWER, diff_states, dig, unbound_conf, wait_answered, wait_until
from tests.system.common import (
    NSWRAP,
    SIGECHO,
    UDPECHO,
    Held,
    echo_answered,
    nswrap,
    output,
    processes_running,
    setup_steps,
    start,
    wait_ready,
)


def instances(lab) -> list[dict]:
    """`nswrap list --json`'s instances."""
    done = nswrap(lab, "list", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["instances"]


def kill_hard(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_sigkill_at_every_setup_step_then_cleanup_restores_the_host(lab, tmp_path):
    """Fault injection: SIGKILL before the first host change of the setup, right after each of
    them, and while serving. After each, `nswrap cleanup` restores the host exactly and no
    server process remains."""
    before = lab.state()
    marker = f"sigecho-{os.getpid()}"
    server = ("--ports", "5353,5353/tcp", "--", *SIGECHO, marker)
    proc = start(lab, tmp_path, "-v", *server)
    wait_until(lambda: "serving 5353/" in output(tmp_path, stream="err") or proc.poll() is not None, 30, what="serving")
    total = setup_steps(output(tmp_path, stream="err"))
    assert total > 20, output(tmp_path, stream="err")
    for step in ["serving", *range(total + 1)]:
        if step == "serving":
            kill_hard(proc)
        else:
            held = Held(lab, tmp_path, step, *server)
            assert held.finish(signal.SIGKILL) == -signal.SIGKILL
            step = f"{step} ({held.where})"
        wait_until(lambda: not processes_running(marker), 10, what=f"no server left after SIGKILL after change {step}")
        done = nswrap(lab, "cleanup")
        assert done.returncode == 0, done.stderr
        changes = diff_states(before, lab.state())
        assert not changes, f"after SIGKILL after change {step} and cleanup:\n{changes}\n{done.stdout}"
    assert nswrap(lab, "cleanup").stdout.strip() == "nothing to clean up"  # idempotent


def test_a_new_instance_starts_over_a_crashed_ones_leftovers(lab, tmp_path, unbound):
    crashed = start(lab, tmp_path, "--ports", "53,53/tcp", "--", *unbound, name="crashed")
    wait_answered(lab, lab.paths[0])
    kill_hard(crashed)
    proc = start(lab, tmp_path, "--ports", "53,53/tcp", "--", *unbound)
    for path in lab.paths:
        assert wait_answered(lab, path) == TEST_ANSWER, path.name
    assert "removed a dead instance's leftover" in output(tmp_path, stream="err")
    assert lab.stop(proc) == 0


def test_ten_parallel_instances_share_one_datapath_serve_and_clean_up_exactly(lab, tmp_path):
    """Ten instances started at once: each answers on every uplink; they share one nft table and
    one mark, table and fwmark rule per uplink (the default mark mask has room for 15 uplinks,
    whatever the number of instances); stopping some never disturbs the others."""
    ports = range(6000, 6010)
    procs = [
        start(lab, tmp_path, "--ports", str(port), "--", *UDPECHO, "serve", str(port), name=f"i{port}")
        for port in ports
    ]
    for port in ports:
        wait_ready(tmp_path, name=f"i{port}", timeout=60)
    listed = instances(lab)
    assert sorted(p for row in listed for p in row["ports"]) == sorted(f"{port}/udp" for port in ports)
    assert len({row["id"] for row in listed}) == 10
    for port in ports:
        for path in (lab.paths[1], lab.paths[2]):  # the paths that fail without nswrap
            assert echo_answered(lab, path.client, path.address, port), f"{path.name}:{port}"

    rules = json.loads(lab.exec(lab.host, ["ip", "-json", "rule", "show"]).stdout)
    assert len([r for r in rules if str(r.get("protocol")) == "110" and "fwmark" in r]) == 3, rules
    tables = json.loads(lab.exec(lab.host, ["nft", "-j", "list", "tables"]).stdout)["nftables"]
    assert [t["table"]["name"] for t in tables if "table" in t and "nswrap" in t["table"]["name"]] == ["nswrap"]
    links = json.loads(lab.exec(lab.host, ["ip", "-json", "link"]).stdout)
    assert len([link for link in links if link["ifname"].startswith("nsw-")]) == 10, "one veth per instance"

    for proc in procs[::3]:  # stopping some never disturbs the others
        assert lab.stop(proc) == 128 + signal.SIGTERM
    for port, proc in zip(ports, procs, strict=True):
        if proc.poll() is None:
            assert echo_answered(lab, lab.paths[2].client, lab.paths[2].address, port), port
    for proc in procs:
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_publishing_a_port_twice_is_refused_naming_the_owner(lab, tmp_path):
    first = start(lab, tmp_path, "--ports", "5353,53/tcp", "--", *SIGECHO)
    wait_ready(tmp_path)
    (owner,) = instances(lab)
    assert owner["ports"] == ["53/tcp", "5353/udp"] and owner["command"][-1].endswith("sigecho.py")
    second = nswrap(lab, "--ports", "5000-5400", "--", "true")
    assert second.returncode == 125
    assert f"already published by nswrap instance {owner['id']} (pid {owner['pid']}" in second.stderr
    dry = nswrap(lab, "--ports", "5000-5400", "--dry-run")  # a dry run says what the start would
    assert (dry.returncode, dry.stderr, dry.stdout) == (125, second.stderr, "")
    assert lab.stop(first) == 3
    assert instances(lab) == []


def test_a_gateway_that_differs_from_a_running_instances_is_refused(lab, tmp_path):
    """eth1's routing table is shared: a second instance may not move its gateway away from the
    host's default that the first one routes through; the first keeps serving eth1's clients."""
    first = start(lab, tmp_path, "--ports", "5353", "--", *UDPECHO, "serve", "5353")
    wait_ready(tmp_path)
    (owner,) = instances(lab)
    second = nswrap(lab, "--uplink", "eth1=198.51.100.254", "--ports", "5400", "--", "true")
    assert second.returncode == 125
    assert second.stderr.strip() == (f"nswrap: uplink eth1: gateway 198.51.100.254 differs from the host's 198.51.100.1, "
                                     f"which nswrap instance {owner['id']} routes through (pid {owner['pid']}: "
                                     f"{' '.join(owner['command'])})")
    c2 = lab.paths[2]
    assert echo_answered(lab, c2.client, c2.address, 5353)
    assert lab.stop(first) == 128 + signal.SIGTERM


def test_as_pid_1_of_a_container_it_forwards_sigterm_and_reaps_orphans(lab, tmp_path):
    server = ["sh", "-c", f'(sleep 0.3 &); exec {" ".join(SIGECHO)}']  # leaves an orphan behind
    proc = lab.spawn(
        lab.host,
        ["unshare", "--pid", "--fork", "--mount-proc", *NSWRAP, "--ports", "5353", "--", *server],
        stdout=(tmp_path / "nswrap.out").open("w"),
        stderr=(tmp_path / "nswrap.err").open("w"),
    )
    wait_ready(tmp_path)
    (pid1,) = psutil.Process(proc.pid).children()

    def tree() -> list[psutil.Process]:  # processes come and go while we look (nswrap's own nft, say)
        found = []
        for p in [pid1, *pid1.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                found.append((p.name(), p.status()))
        return found

    # the orphan is reaped: no sleep, and no zombie left for long (one of nswrap's own short-lived
    # children may be one for an instant, until nswrap waits for it)
    wait_until(lambda: not any("sleep" in name or status == psutil.STATUS_ZOMBIE for name, status in tree()), 10,
               what="the orphan exits and is reaped")
    pid1.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 3  # unshare passes on nswrap's status, which is the server's


def test_stop_timeout_kills_a_server_that_ignores_sigterm(lab, tmp_path):
    ignores_sigterm = "trap '' TERM; echo ready; exec sleep 60"
    proc = start(lab, tmp_path, "--stop-timeout", "0.5", "--ports", "5353", "--", "sh", "-c", ignores_sigterm)
    wait_ready(tmp_path)
    assert lab.stop(proc) == 128 + signal.SIGKILL


def test_a_daemonizing_server_keeps_the_instance_until_it_exits(lab, tmp_path):
    conf = unbound_conf(tmp_path)
    with open(conf) as f:
        text = f.read().replace("do-daemonize: no", "do-daemonize: yes")
    with open(conf, "w") as f:
        f.write(text)
    proc = start(lab, tmp_path, "--ports", "53,53/tcp", "--", "unbound", "-c", conf)
    for path in lab.paths:
        assert wait_answered(lab, path) == TEST_ANSWER, path.name
        assert dig(lab, path, tcp=True) == TEST_ANSWER, path.name
    assert proc.poll() is None, "the first process exited, the daemon still serves"
    assert [p for p in processes_running(conf) if p.info["name"] == "unbound"]
    assert lab.stop(proc) == 0
    assert not processes_running(conf)


@pytest.fixture
def world_readable_dir():
    """--user tests need a config the unprivileged server can read (pytest's tmp_path is 0700)."""
    directory = tempfile.mkdtemp(prefix="nswrap-test-")
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_user_nobody_serves_port_53_without_capabilities(lab, tmp_path, world_readable_dir):
    conf = unbound_conf(world_readable_dir)
    os.chmod(conf, 0o644)
    proc = start(lab, tmp_path, "--user", "nobody", "--ports", "53,53/tcp", "--", "unbound", "-d", "-c", conf)
    for path in lab.paths:
        assert wait_answered(lab, path) == TEST_ANSWER, path.name
    (server,) = [p for p in processes_running(conf) if p.info["name"] == "unbound"]
    assert server.uids().effective == 65534
    capabilities = [line for line in open(f"/proc/{server.pid}/status") if line.startswith("CapEff:")]
    assert capabilities == ["CapEff:\t0000000000000000\n"]
    assert lab.stop(proc) == 0


def test_readiness_on_a_fd_and_to_notify_socket_once_the_server_listens(lab, tmp_path):
    """READY comes once the server listens on the published port: a query sent the moment it
    arrives is answered."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    ready_r, ready_w = os.pipe()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = start(lab, tmp_path, "--ready-fd", str(ready_w), "--ports", "5353", "--", *UDPECHO, "serve", "5353",
                 pass_fds=(ready_w,), env=env)
    os.close(ready_w)
    with os.fdopen(ready_r) as ready:
        assert select.select([ready], [], [], 30)[0], f"no READY within 30 s:\n{output(tmp_path, stream='err')}"
        assert ready.readline() == "READY\n"
        c2 = lab.paths[2]
        assert echo_answered(lab, c2.client, c2.address, 5353), "READY, yet the server did not answer"
        assert ready.read() == "", "nswrap closes the fd; the server never got a copy"
    with notify:
        assert notify.recv(256).startswith(b"READY=1")
    assert lab.stop(proc) == 128 + signal.SIGTERM


def test_a_server_that_never_listens_never_gets_ready(lab, tmp_path):
    ready_r, ready_w = os.pipe()
    proc = start(lab, tmp_path, "--ready-fd", str(ready_w), "--ports", "5353", "--", *SIGECHO, pass_fds=(ready_w,))
    os.close(ready_w)
    os.set_blocking(ready_r, False)
    with os.fdopen(ready_r, "rb") as ready:
        wait_ready(tmp_path)  # the server runs ...
        # ... and after a while (10 s) nswrap says what READY waits for
        wait_until(lambda: "the server does not listen on 5353/udp yet" in output(tmp_path, stream="err"), 30,
                   what="nswrap says READY waits")
        assert ready.read() is None, "nothing written: READY never came"  # None: no data, still open
        # ... and it looks less and less often (it once looked every 10 ms forever: a fifth of a
        # CPU next to the server). Counted in wake-ups, as the kernel counts them (voluntary
        # context switches: each sleep in select, each blocking call), not in CPU time: a loaded
        # machine makes a process's CPU time grow and its timers fire late, never wake it more.
        # What that costs in CPU is the benchmark's (idle instances, scripts/bench).
        before = wakeups(proc.pid)
        time.sleep(WINDOW)  # a stretch of nswrap's life to count in, not a wait for anything
        woke = wakeups(proc.pid) - before
        print(f"nswrap woke {woke} times in {WINDOW} s waiting for READY")  # pytest -s shows it
        assert woke <= WINDOW * MAX_WAKEUPS, f"nswrap woke {woke} times in {WINDOW} s: it keeps polling the server's sockets"
    assert lab.stop(proc) == 3


# 10 s after start nswrap looks at the server's sockets every 0.5 s, and reads the settings it
# set every 2 s: a handful of wake-ups a second. Looking every 10 ms would be a hundred.
WINDOW, MAX_WAKEUPS = 2, 10


def wakeups(pid: int) -> int:
    """How many times the kernel put the process to sleep at its own request (/proc/PID/status)."""
    return psutil.Process(pid).num_ctx_switches().voluntary


@pytest.fixture
def tracking(lab):
    """The host tracks connections (as soon as any firewall uses conntrack; a fresh namespace
    does not), by a table of its own, removed afterwards."""
    tracker = "table inet tracker {\n chain in {\n type filter hook input priority 0;\n ct state new counter\n }\n}\n"
    lab.exec(lab.host, ["nft", "-f", "-"], input=tracker)
    yield
    lab.exec(lab.host, ["nft", "delete", "table", "inet", "tracker"])


@pytest.mark.parametrize("family", [4, 6])
def test_stale_conntrack_entries_do_not_bypass_a_new_instance(lab, tmp_path, tracking, family):
    """A client that kept sending (fixed source port) while no server ran has a conntrack entry
    without DNAT; nswrap deletes it at start, so the same flow reaches the new server."""
    # IPv4 on eth2 (c2's packets would be dropped by strict rp_filter before conntrack keeps them)
    c2 = lab.paths[3] if family == 4 else lab.paths6[2]
    assert not echo_answered(lab, c2.client, c2.address, 5353, sport=40000)
    stale = lab.exec(lab.host, ["conntrack", "-L", "-f", f"ipv{family}", "-p", "udp", "--orig-port-dst", "5353"]).stdout
    assert "sport=40000" in stale, "the stale flow exists before nswrap starts"
    proc = start(lab, tmp_path, "--ports", "5353", "--", *UDPECHO, "serve", "5353")
    wait_ready(tmp_path)
    assert echo_answered(lab, c2.client, c2.address, 5353, sport=40000)
    assert lab.stop(proc) == 128 + signal.SIGTERM
