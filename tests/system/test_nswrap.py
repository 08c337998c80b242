"""nswrap on the simulated multihomed host (see tests/lab.py for the topology).

Every test runs nswrap inside the lab's host namespace, checks results with independent tools
(dig, ip -json, nft -j, conntrack), and the `lab` fixture asserts afterwards that the host state
is exactly what it was before.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.lab import TEST_ANSWER, dig, wait_answered, wait_until
from tests.system.common import SIGECHO, nswrap, output, start, wait_ready

MARK_MASK = 0xF0000000


def stderr_of(tmp_path) -> str:
    return output(tmp_path, stream="err")


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


def test_rules_and_table_exist_while_serving_and_only_then(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", "5353", "--", *SIGECHO)
    wait_ready(tmp_path)
    rules = json.loads(lab.exec(lab.host, ["ip", "-json", "rule", "show"]).stdout)
    ours = [r for r in rules if r.get("protocol") == "110" or r.get("protocol") == 110]
    assert len(ours) == 3 and all(r["fwmask"] == "0xf0000000" for r in ours), rules
    tables = json.loads(lab.exec(lab.host, ["nft", "-j", "list", "tables"]).stdout)["nftables"]
    assert [t["table"]["name"] for t in tables if "table" in t and t["table"]["name"].startswith("nswrap-")]
    forwarding = lab.exec(lab.host, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
    assert forwarding == "0", "nswrap must never flip the global switch"
    assert lab.stop(proc) == 3


def test_signals_are_forwarded_and_the_server_exit_code_returned(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", "5353", "--", *SIGECHO)
    out = tmp_path / "nswrap.out"
    wait_ready(tmp_path)
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT):
        proc.send_signal(sig)
        wait_until(lambda: f"got {sig.name}" in out.read_text(), 10, what=f"{sig.name} forwarded")
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


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--uplink", "eth9"], "eth9"),
        (["--subnet", "192.0.2.0/30"], "192.0.2.0/30"),
        # passes the plan, fails in the kernel half-way through setup: must roll back
        (["--uplink", "eth0", "--uplink", "eth1=192.0.2.77"], "192.0.2.77"),
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
    for expected in ("table inet nswrap-", "ip rule add fwmark 0x10000000/0xf0000000", "sysctl -w net.ipv4.conf.eth1.src_valid_mark=1"):
        assert expected in done.stdout
    assert "uplink eth2 has no gateway" in done.stderr


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 0.8])
def test_sigterm_at_any_moment_leaves_the_host_exact(lab, tmp_path, delay):
    """Whether SIGTERM lands during setup (rolled back) or after (forwarded), the host ends exact."""
    proc = start(lab, tmp_path, "--ports", "53", "--", "sleep", "60")
    try:
        proc.wait(delay)
    except Exception:
        pass
    # before nswrap installs its handlers (interpreter start-up) SIGTERM simply kills it: nothing changed yet
    assert lab.stop(proc) in (128 + signal.SIGTERM, -signal.SIGTERM), stderr_of(tmp_path)
