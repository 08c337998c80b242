"""The fast path's programs (nswrap/bpf/fastpath.bpf.c) run by the kernel on packets built here
(tests/system/fastprog.py, BPF_PROG_TEST_RUN in a throwaway namespace per case): what the lab's
clients cannot make happen on demand, such as a flow's entry evicted from the LRU, and every
checksum recomputed. About one client port asking two addresses (docs/fastpath.md): the second
flow gets another port toward the server, of the same class, that its packets keep; its answers
and the ICMP errors about it get the client's own port back.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REDIRECT, UNSPEC = 7, -1


def run_case(case: str) -> dict:
    ns = f"nswt-fp{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.system.fastprog", case],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def whole(packet: dict) -> bool:
    return packet["verdict"] == REDIRECT and packet["ip_ok"] and packet["l4_ok"] is True


def test_one_client_port_asking_two_addresses_is_two_flows_of_the_same_port_class():
    for name, got in run_case("two_addresses").items():
        if name == "zero":
            assert [a["l4_ok"] for a in got] == ["zero", "zero"], got  # no checksum stays none
            assert [a["src"] for a in got] == ["198.51.100.10", "198.51.100.11"], got
            continue
        client, _proto, sport = name.split()
        seen, answers = got["seen"], got["answers"]
        assert all(whole(p) for p in seen + answers), got
        ports = [p["sport"] for p in seen]
        assert ports[0] == int(sport) and ports[1] != int(sport) and ports[2:] == ports[:2], (name, ports)
        low, high = (1, 511) if int(sport) < 512 else (600, 1023) if int(sport) < 1024 else (1024, 65535)
        assert low <= ports[1] <= high, (name, ports)  # as conntrack keeps a port's class
        assert [a["src"] for a in answers] == got["asked"] * 2, name  # each from the address asked
        assert {(a["dst"], a["dport"]) for a in answers} == {(client, int(sport))}, name


def test_a_connection_keeps_its_port_when_entries_are_evicted():
    got = run_case("tcp_keeps_its_port")
    assert all(whole(got[k]) for k in ("first", "second", "after", "again")), got
    assert got["first"]["sport"] == 41000 != got["second"]["sport"]
    assert got["after"]["sport"] == got["second"]["sport"], "the first flow's entry gone, the second moved"
    assert got["again"]["sport"] == 41000
    # its own entry gone while the first flow lives: left to the host's stack, not moved mid-connection
    assert got["lost"] == {"verdict": UNSPEC}


def test_a_quiet_flows_port_is_taken_by_the_next():
    got = run_case("quiet")
    assert whole(got["first"]) and whole(got["then"]), got
    assert got["then"]["sport"] == got["first"]["sport"] == 42000


def test_icmp_errors_about_a_flow_given_another_port_are_translated():
    got = run_case("errors")
    for client, server in (("192.0.2.50", "198.18.0.2"), ("2001:db8:1::50", "fd6e:7377:7261::2")):
        seen = got[client]["seen"]
        asked = "198.51.100.11" if ":" not in client else "2001:db8:2::11"
        verdict, closed = got[client]["closed"]  # the server's refusal: to the client, quoting its own datagram
        assert verdict == REDIRECT and closed["icmp_ok"] and closed["ip_ok"] and closed["quoted_ip_ok"], closed
        assert (closed["src"], closed["dst"]) == (asked, client), closed
        assert (closed["qsrc"], closed["qsport"], closed["qdst"], closed["qdport"]) == (client, 43000, asked, 5300)
        verdict, about = got[client]["about"]  # the client's error about an answer: to the server, quoting its own
        assert verdict == REDIRECT and about["icmp_ok"] and about["quoted_ip_ok"], about
        assert (about["dst"], about["qsrc"], about["qsport"]) == (server, server, 5300), about
        assert (about["qdst"], about["qdport"]) == (client, seen["sport"]) and seen["sport"] != 43000, about
    # one address asked through two uplinks from one port: the second flow's error finds it
    verdict, about = got["two uplinks"]["about"]
    assert verdict == REDIRECT and about["qdport"] == got["two uplinks"]["seen"]["sport"] != 44000, got["two uplinks"]
