"""Control experiment: the bug nswrap fixes, shown without nswrap.

unbound bound to 0.0.0.0 directly in the lab host answers a client only
when the kernel's choice of source address and outgoing interface happens
to match the query: the primary address of the default uplink and the
directly connected subnet work; the secondary address (reply comes from
192.0.2.10) and the second uplink (strict rp_filter drops the query; the
reply would leave via eth0 and r1's anti-spoofing would drop it) do not.
Also checks the lab itself: topology, stable state snapshots, cleanup.
"""

from __future__ import annotations

import subprocess

from tests.lab import TEST_ANSWER, Lab, dig, dig_from, unbound_conf, wait_until

# Expected outcome per asked address when unbound runs on the host unwrapped.
EXPECTED_WITHOUT_NSWRAP = {
    "192.0.2.10": True,  # c1, eth0 primary: kernel picks the right source
    "192.0.2.11": False,  # c1, eth0 secondary: reply comes from 192.0.2.10
    "198.51.100.10": False,  # c2, eth1: rp_filter / r1 anti-spoofing drop it
    "203.0.113.65": True,  # c3, eth2 connected subnet
}


def test_lab_topology(lab):
    state = lab.state()
    addrs = {
        (link["ifname"], a["local"])
        for link in state["addr"]
        for a in link["addr_info"]
        if a["family"] == "inet"
    }
    assert {("eth0", "192.0.2.10"), ("eth0", "192.0.2.11"), ("eth1", "198.51.100.10"),
            ("eth2", "203.0.113.65")} <= addrs
    for name in ("all", "default", "eth0", "eth1", "eth2"):
        assert state["sysctl"][f"net/ipv4/conf/{name}/rp_filter"] == "1"
    assert state["sysctl"]["net/ipv4/ip_forward"] == "0"
    assert {p.uplink for p in lab.paths} == {"eth0", "eth1", "eth2"}


def test_unbound_without_nswrap_answers_only_some_paths(lab, tmp_path):
    conf = unbound_conf(tmp_path)
    log = tmp_path / "unbound.log"
    with log.open("w") as stderr:
        server = lab.spawn(lab.host, ["unbound", "-d", "-c", conf],
                           stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)

    def ready():
        assert server.poll() is None, f"unbound exited: {log.read_text()}"
        return dig_from(lab, lab.host, "127.0.0.1", timeout=1)

    assert wait_until(ready, 15, interval=0.1, what="unbound did not start") == TEST_ANSWER

    # Positive checks first: they prove the server is up before the
    # negative ones wait out their (bounded) timeouts.
    for path in sorted(lab.paths, key=lambda p: not EXPECTED_WITHOUT_NSWRAP[p.address]):
        answer = dig(lab, path)
        if EXPECTED_WITHOUT_NSWRAP[path.address]:
            assert answer == TEST_ANSWER, f"{path.name}: expected an answer"
        else:
            assert answer is None, f"{path.name}: unexpectedly answered {answer!r}"

    assert lab.stop(server) == 0, log.read_text()


def test_state_is_stable_and_close_removes_namespaces():
    lab = Lab()
    try:
        assert lab.state() == lab.state()
    finally:
        lab.close()
    lab.close()  # idempotent
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout
    assert lab.prefix not in listed
