"""Protocols on the dual-stack simulated host: IPv4 and IPv6, UDP and TCP, remapped ports, answers
larger than the path MTU (IP fragments both ways), and ICMP errors for published flows.

The lab's routers drop anything from the host whose source is not in their own subnet (IPv4 and
IPv6), and eth0's IPv6 gateway is link-local (fe80::1), as on uplinks configured by router
advertisements. dig ignores replies from any address but the one it asked.
"""

from __future__ import annotations

import signal
import sys

from tests.lab import TEST_ANSWER, dig, wait_answered
from tests.system.common import BIG, dual_stack_unbound, output, start, wait_ready


def test_dual_stack_udp_and_tcp_with_remapped_ports(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", "53:5300/udp,53:5300/tcp", "--", *dual_stack_unbound(tmp_path, 5300))
    for path in (*lab.paths, *lab.paths6):
        assert wait_answered(lab, path) == TEST_ANSWER, path.name
        assert dig(lab, path, tcp=True) == TEST_ANSWER, f"{path.name} over TCP"
    assert lab.stop(proc) == 0, output(tmp_path, stream="err")


def big_answer(lab, path) -> list[str]:
    argv = ["dig", f"@{path.address}", "big.example", "TXT", "+short", "+bufsize=4096", "+ignore", "+notcp",
            "+tries=2", "+time=2"]
    done = lab.exec(path.client, argv, check=False, timeout=20)
    return [line for line in done.stdout.splitlines() if line.startswith('"')]


def test_answers_larger_than_the_mtu_pass_fragmented(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", "53", "--", *dual_stack_unbound(tmp_path, 53))
    wait_answered(lab, lab.paths[2])
    for path in (lab.paths[2], lab.paths6[2], lab.paths[1], lab.paths6[1]):  # non-primary uplink, secondary address
        assert len(big_answer(lab, path)) == len(BIG), path.name
    assert lab.stop(proc) == 0


REFUSED_PROBE = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 5353))
s.settimeout(0.5)
for _ in range(10):
    try:
        s.send(b"anyone?")
        s.recv(100)
    except ConnectionRefusedError:
        print("refused"); sys.exit(0)
    except TimeoutError:
        continue
print("silence"); sys.exit(1)
"""


def test_port_unreachable_reaches_the_client_through_the_right_uplink(lab, tmp_path):
    """Nothing listens on the published port: the server namespace's ICMP error, rewritten by
    conntrack, must come back from the asked address on the client's own uplink, or the ISP
    router drops it."""
    proc = start(lab, tmp_path, "--ports", "5353", "--", "sh", "-c", "echo ready; exec sleep 60")
    wait_ready(tmp_path)
    for path in (lab.paths[2], lab.paths6[2], lab.paths[1]):
        done = lab.exec(path.client, [sys.executable, "-c", REFUSED_PROBE, path.address], check=False, timeout=30)
        assert done.stdout.strip() == "refused", path.name
    assert lab.stop(proc) == 128 + signal.SIGTERM
