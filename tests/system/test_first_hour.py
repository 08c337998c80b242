"""The first hour, second pass (issue 25): no silent misconfiguration.

Each case runs nswrap in the lab's host namespace and checks its exit status and the exact line
it says; the `lab` fixture then checks that the host namespace is exactly as before. Waits poll
(tests/lab/wait.py), never sleep blindly.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import time

import pytest

from tests.lab import unbound_conf, wait_until
from tests.system.common import UDPECHO, nswrap, output, start, wait_ready


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- a gateway that is not on its uplink's link --------------------------------------------------

REFUSED_GATEWAYS = {
    # a container runtime that named its networks in another order: the gateway is eth0's
    "another-interfaces-subnet": (
        ["--uplink", "eth1=192.0.2.1"],
        "nswrap: uplink eth1=192.0.2.1: 192.0.2.1 is on eth0's subnet, not eth1's: --uplink eth0=192.0.2.1?"),
    "ipv6-another-interfaces-subnet": (
        ["--uplink", "eth0", "--uplink", "eth1=2001:db8:1::1"],
        "nswrap: uplink eth1=2001:db8:1::1: 2001:db8:1::1 is on eth0's subnet, not eth1's: --uplink eth0=2001:db8:1::1?"),
    "nowhere": (
        ["--uplink", "eth2=10.9.9.1"],
        "nswrap: uplink eth2=10.9.9.1: 10.9.9.1 is not on eth2's link (no subnet of its addresses holds it and no route "
        "in the main table says it is on-link): give a gateway on eth2's subnet"),
}


@pytest.mark.parametrize("case", list(REFUSED_GATEWAYS))
def test_a_gateway_off_the_uplinks_link_is_refused_in_one_line(lab, case):
    args, line = REFUSED_GATEWAYS[case]
    done = nswrap(lab, "--ports", "5353", *args, "--", "true")
    assert (done.returncode, lines(done.stderr), done.stdout) == (2, [line], "")


def test_a_gateway_on_the_link_is_accepted(lab):
    """eth2 has no gateway in the lab: one on its subnet is taken (IPv4), and so is a link-local
    IPv6 one (on-link by definition)."""
    done = nswrap(lab, "--ports", "5353", "--uplink", "eth2=203.0.113.66", "--uplink", "eth0=fe80::1", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "ip route add default via 203.0.113.66 dev eth2 table" in done.stdout
    assert "onlink" not in done.stdout


def test_an_unknown_uplink_names_the_candidates(lab):
    done = nswrap(lab, "--ports", "5353", "--uplink", "eth9", "--", "true")
    assert (done.returncode, lines(done.stderr)) == (
        125, ["nswrap: no such uplink: eth9 (interfaces with a global address here: eth0, eth1, eth2)"])


# --- Ctrl-C ends a stock server promptly -------------------------------------------------------

CTRL_C_TIMEOUT = 15  # a hang guard; README promises about a second: that speed is the benchmark's stop time


def ctrl_c(lab, tmp_path, *args) -> tuple[int, float, str]:
    """Start `nswrap ARGS` with --ready-fd, wait for READY, send SIGINT to nswrap alone (as a
    terminal's Ctrl-C reaches it: the server runs in its own process group) and return its exit
    status, the seconds it took, and what it said on stderr."""
    ready_r, ready_w = os.pipe()
    try:
        proc = start(lab, tmp_path, "--ready-fd", str(ready_w), *args, pass_fds=(ready_w,))
    finally:
        os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        assert select.select([ready], [], [], 30)[0] and ready.readline() == b"READY\n", output(tmp_path, stream="err")
    asked = time.monotonic()
    status = lab.stop(proc, sig=signal.SIGINT, timeout=CTRL_C_TIMEOUT)
    took = time.monotonic() - asked
    err = output(tmp_path, stream="err")
    server = args[args.index("--") + 1:][:2]
    print(f"Ctrl-C to nswrap running {' '.join(server)}: exit {status} after {took:.2f} s")
    return status, took, err


def needs(*commands: str) -> None:
    missing = [c for c in commands if not shutil.which(c)]
    if missing:
        pytest.skip(f"missing commands: {' '.join(missing)} (run scripts/setup)")


def test_ctrl_c_stops_dnsmasq_k_at_once_with_its_own_status(lab, tmp_path):
    """README's `dnsmasq -k`: SIGINT is a DNSSEC time check to it, not a stop; nswrap sends
    SIGTERM half a second later, which dnsmasq exits 0 on. Never the stop timeout's SIGKILL."""
    needs("dnsmasq")
    status, took, err = ctrl_c(lab, tmp_path, "-u", "eth0", "-p", "5353:5300", "--",
                               "dnsmasq", "-k", "-p", "5300", f"--pid-file={tmp_path / 'dnsmasq.pid'}")
    assert status == 0, err
    assert "SIGKILL" not in err and "waiting for the server" not in err, err


def test_ctrl_c_stops_unbound_with_its_own_status(lab, tmp_path):
    needs("unbound")
    status, took, err = ctrl_c(lab, tmp_path, "-u", "eth0", "-p", "53", "--", "unbound", "-d", "-c", unbound_conf(tmp_path))
    assert status == 0, err
    assert "SIGKILL" not in err and "waiting for the server" not in err, err


def test_ctrl_c_stops_a_server_that_ignores_sigint_with_sigterm(lab, tmp_path):
    """It dies of the SIGTERM that follows: 143, and nothing said (a stop as asked)."""
    status, took, err = ctrl_c(lab, tmp_path, "-u", "eth0", "-p", "5353", "--",
                               "python3", "-c", "import signal, socket, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                               "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 5353)); "
                               "time.sleep(60)")
    assert (status, lines(err)) == (128 + signal.SIGTERM, [])


# --- a wrong published port is named at once ----------------------------------------------------

def test_a_server_on_another_port_is_named_while_it_runs(lab, tmp_path):
    proc = start(lab, tmp_path, "-u", "eth0", "-p", "5353", "--", *UDPECHO, "serve", "5300")
    wait_ready(tmp_path)
    began = time.monotonic()
    line = "nswrap: the server listens on 5300/udp, not on the published 5353/udp: --ports 5353:5300?"
    wait_until(lambda: line in output(tmp_path, stream="err"), 10, what="nswrap names the port the server listens on")
    print(f"named {time.monotonic() - began:.2f} s after the server was ready")
    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert lines(output(tmp_path, stream="err")) == [line]


# --- health check, doctor beside a live instance -------------------------------------------------

def test_list_check_is_a_health_check(lab, tmp_path):
    none = nswrap(lab, "list", "--check")
    assert (none.returncode, none.stdout) == (1, "no nswrap instance is serving in this network namespace\n")
    proc = start(lab, tmp_path, "-u", "eth0", "-p", "5353", "--", *UDPECHO, "serve", "5353")
    wait_ready(tmp_path)
    serving = nswrap(lab, "list", "--check")
    assert serving.returncode == 0 and serving.stdout.startswith("serving: "), serving
    assert lab.stop(proc) == 128 + signal.SIGTERM


def test_doctor_beside_a_live_instance_passes_and_names_the_gateway_option(lab, tmp_path):
    """Its own marks, rules and table are the live instance's, not a conflict; eth2 has no
    gateway: the note names --uplink eth2=GATEWAY."""
    proc = start(lab, tmp_path, "-p", "5353", "--", *UDPECHO, "serve", "5353")
    wait_ready(tmp_path)
    done = nswrap(lab, "doctor")
    print(done.stdout)
    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note  uplink eth2 has no gateway: it serves only clients on its own subnets " \
           "(give one with --uplink eth2=GATEWAY to serve the others)" in lines(done.stdout), done.stdout


# --- a gateway lost while serving ----------------------------------------------------------------

LOST = ("nswrap: uplink eth1 has no gateway: it serves only clients on its own subnets "
        "(give one with --uplink eth1=GATEWAY to serve the others)")
LOST6 = ("nswrap: uplink eth1 has no IPv6 gateway: it serves only IPv6 clients on its own subnets "
         "(give one with --uplink eth1=GATEWAY to serve the others)")


def test_a_gateway_lost_while_serving_is_one_line_naming_the_option(lab, tmp_path):
    """Once per loss, not per event: the IPv6 gateway's loss afterwards (more events about eth1)
    is its own line, and the IPv4 one is not said again."""
    proc = start(lab, tmp_path, "-u", "eth0", "-u", "eth1", "-p", "5353", "--", *UDPECHO, "serve", "5353")
    wait_ready(tmp_path)
    try:
        lab.exec(lab.host, ["ip", "route", "del", "default", "via", "198.51.100.1", "dev", "eth1"])
        wait_until(lambda: LOST in output(tmp_path, stream="err"), 10, what="nswrap says eth1 lost its gateway")
        lab.exec(lab.host, ["ip", "-6", "route", "del", "default", "via", "2001:db8:2::1", "dev", "eth1"])
        wait_until(lambda: LOST6 in output(tmp_path, stream="err"), 10, what="nswrap says eth1 lost its IPv6 gateway")
    finally:
        lab.exec(lab.host, ["ip", "route", "replace", "default", "via", "198.51.100.1", "dev", "eth1", "metric", "200"])
        lab.exec(lab.host, ["ip", "-6", "route", "replace", "default", "via", "2001:db8:2::1", "dev", "eth1", "metric", "200"])
    assert lab.stop(proc) == 128 + signal.SIGTERM
    said = lines(output(tmp_path, stream="err"))
    assert (said.count(LOST), said.count(LOST6)) == (1, 1), said


# --- the server learns the host's public side ----------------------------------------------------

def test_the_server_sees_the_published_addresses_in_its_environment(lab, tmp_path):
    """NSWRAP_HOST_*: the served uplinks and the addresses published on each (IPv4 only here:
    --ipv6-forwarding off, so that the expected lines do not depend on the kernel). nswrap's own
    settings (NSWRAP_STOP_TIMEOUT) stay nswrap's."""
    proc = start(lab, tmp_path, "-u", "eth0", "-u", "eth1", "--ipv6-forwarding", "off", "-p", "5353", "--",
                 "sh", "-c", "env | grep ^NSWRAP_ | sort; echo ready; exec sleep 60",
                 env={**os.environ, "NSWRAP_STOP_TIMEOUT": "5"})
    wait_ready(tmp_path)
    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert lines(output(tmp_path))[:-1] == [
        "NSWRAP_HOST_ADDRESSES=192.0.2.10 192.0.2.11 198.51.100.10",
        "NSWRAP_HOST_ADDRESSES_eth0=192.0.2.10 192.0.2.11",
        "NSWRAP_HOST_ADDRESSES_eth1=198.51.100.10",
        "NSWRAP_HOST_UPLINKS=eth0 eth1",
    ]
