"""--datapath bpf (docs/fastpath.md): published flows through the tc-BPF fast path, on the lab's
simulated multihomed host. Oracles: the clients' connected sockets (an answer from any other
address or port never reaches them), `conntrack -L`, `tc -j filter show`, `bpftool -j`, the
host's sysctls and its packet counters; the `lab` fixture compares the whole host before and
after (clsact qdiscs included)."""

from __future__ import annotations

import json
import os
import signal

from tests.lab import TEST_ANSWER, dig, wait_answered, wait_until
from tests.system.common import dual_stack_unbound, output, start
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

PORT = 5300
PRIORITY = 65001


def serving(lab, tmp_path, *options: str, port: int = PORT, env=None):
    proc = start(lab, tmp_path, "--datapath", "bpf", "--ports", f"{port},{port}/tcp", *options, "--",
                 *UDPMANY, "serve", "--tag", str(tmp_path), str(port), env=env)
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    return proc


def filters(lab, dev: str) -> list[dict]:
    shown = lab.exec(lab.host, ["tc", "-j", "filter", "show", "dev", dev, "ingress"], check=False).stdout
    return [f for f in json.loads(shown or "[]") if f.get("options")]


def conntrack_entries(lab, port: int) -> list[str]:
    done = lab.exec(lab.host, ["conntrack", "-L", "--orig-port-dst", str(port)], check=False)
    return [line for line in done.stdout.splitlines() if line.startswith(("udp", "tcp"))]


def test_every_path_is_served_through_the_fast_path_with_no_conntrack_entry(lab, tmp_path):
    proc = start(lab, tmp_path, "--datapath", "bpf", "--ports", "53,53/tcp", "--", *dual_stack_unbound(tmp_path, 53))
    for path in (*lab.paths, *lab.paths6):  # dig takes no answer from another source
        assert wait_answered(lab, path) == TEST_ANSWER, path.name
        assert dig(lab, path, tcp=True) == TEST_ANSWER, f"{path.name} over TCP"
    # the fast path carried them: conntrack never saw a published flow
    assert conntrack_entries(lab, 53) == []
    for dev in ("eth0", "eth1", "eth2"):
        ours = [f for f in filters(lab, dev) if f["pref"] == PRIORITY]
        assert len(ours) == 1 and ours[0]["options"]["bpf_name"] == "nswrap_uplink", (dev, ours)
        assert ours[0]["options"].get("direct-action") or "direct-action" in json.dumps(ours[0]), ours
    assert lab.stop(proc) == 0, output(tmp_path, stream="err")
    for dev in ("eth0", "eth1", "eth2"):
        assert filters(lab, dev) == []  # and the lab fixture: no clsact left either


def test_ipv6_is_served_with_every_forwarding_switch_of_the_host_off(lab, tmp_path):
    """An older kernel (no force_forwarding: the test seam) with net.ipv6.conf.all.forwarding=0:
    the nft datapath serves IPv4 only there, the fast path serves IPv6 too, switching nothing on."""
    before = lab.state()["sysctl"]
    proc = serving(lab, tmp_path, env={**os.environ, "NSWRAP_TEST_NO_FORCE_FORWARDING": "1"})
    try:
        assert unanswered(lab, (*lab.paths, *lab.paths6), [PORT]) == []
        now = lab.state()["sysctl"]
        v6 = {k: (before.get(k), v) for k, v in now.items() if "ipv6" in k and "forwarding" in k and v != "0"}
        assert not v6, f"IPv6 forwarding turned on: {v6}"
        assert "IPv6 clients are not served" not in output(tmp_path, stream="err")
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_tc_filter_removed_by_someone_is_put_back(lab, tmp_path):
    proc = serving(lab, tmp_path)
    try:
        lab.exec(lab.host, ["tc", "filter", "del", "dev", "eth1", "ingress", "pref", str(PRIORITY)])
        wait_until(lambda: any(f["pref"] == PRIORITY for f in filters(lab, "eth1")), 20,
                   what="nswrap puts its filter back")
        assert unanswered(lab, (lab.paths[2], lab.paths6[2]), [PORT]) == []
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM
