"""A running instance follows the host (issue 6): gateways and uplinks that come and go, rules
another tool deletes; `nswrap list --json` counters; `nswrap exec`.

Clients "far" from an uplink send from an extra address on their own loopback, so their answer
must be routed through that uplink's gateway: it comes back only if nswrap's table for that uplink
has the gateway. Strict rp_filter and the ISP routers' anti-spoofing drop anything else.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time

from tests.lab import wait_until
from tests.system.common import UDPECHO, echo_answered, nswrap, output, start, wait_ready

PORT = 5353


def answered(lab, client, address, source=None) -> bool:
    return echo_answered(lab, client, address, PORT, source=source)


def sh(lab, ns, script) -> None:
    lab.exec(ns, ["sh", "-ec", script])


def test_uplinks_are_followed_while_serving(lab, tmp_path):
    c3, host = lab.ns("c3"), lab.host
    c4 = f"{lab.prefix}-c4"  # a new uplink's peer, added while serving
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", *UDPECHO, "serve", str(PORT))
    wait_ready(tmp_path)
    try:
        # 1. eth2 had no gateway: a far client behind c3 is not served ...
        # c3 routes for the far address: it must ARP as a router does, with its own address
        sh(lab, c3, "ip addr add 203.0.113.200/32 dev lo; sysctl -qw net.ipv4.conf.eth0.arp_announce=2")
        assert not answered(lab, c3, "203.0.113.65", source="203.0.113.200")
        # ... until a default route appears for eth2
        sh(lab, host, "ip route add default via 203.0.113.66 dev eth2 metric 300")
        began = time.monotonic()
        wait_until(lambda: answered(lab, c3, "203.0.113.65", source="203.0.113.200"), 10, what="eth2's new gateway followed")
        print(f"eth2's new gateway served after {time.monotonic() - began:.2f} s")  # pytest -s shows it
        assert answered(lab, lab.paths[2].client, "198.51.100.10"), "other uplinks undisturbed"

        # 2. a new uplink comes up, with an address and a gateway
        subprocess.run(["ip", "netns", "add", c4], check=True)  # not inside `ip netns exec`: its mounts are private
        sh(lab, host, f"ip link add eth3 type veth peer name eth0 netns {c4}")
        sh(lab, c4, "sysctl -qw net.ipv4.conf.all.arp_announce=2; ip link set lo up; ip link set eth0 up; ip addr add 203.0.113.226/28 dev eth0; ip addr add 203.0.113.250/32 dev lo;"
                    " ip route add default via 203.0.113.225")
        sh(lab, host, "ip link set eth3 up; ip addr add 203.0.113.225/28 dev eth3; ip route add default via 203.0.113.226 dev eth3 metric 400")
        wait_until(lambda: answered(lab, c4, "203.0.113.225", source="203.0.113.250"), 10, what="new uplink eth3 served")

        # 3. an uplink loses its (IPv4) address: dropped there, the others keep answering; and back
        sh(lab, host, "ip addr del 198.51.100.10/24 dev eth1")
        assert answered(lab, lab.paths[0].client, "192.0.2.10")
        wait_until(lambda: "following the host" in output(tmp_path, stream="err"), 10, what="eth1's loss noticed")
        sh(lab, host, "ip addr add 198.51.100.10/24 dev eth1; ip route add default via 198.51.100.1 dev eth1 metric 200")
        wait_until(lambda: answered(lab, lab.paths[2].client, "198.51.100.10"), 10, what="eth1 served again")

        # 4. another tool deletes one of our rules: it is put back, and nswrap says so
        rules = json.loads(lab.exec(host, ["ip", "-json", "rule", "show"]).stdout)
        ours = [r for r in rules if str(r.get("protocol")) == "110"]
        said = output(tmp_path, stream="err").count("put back")
        lab.exec(host, ["ip", "rule", "del", "priority", str(ours[0]["priority"]), "fwmark", f"{ours[0]['fwmark']}/{ours[0]['fwmask']}",
                        "lookup", str(ours[0]["table"])])
        wait_until(lambda: ours[0] in json.loads(lab.exec(host, ["ip", "-json", "rule", "show"]).stdout), 10, what="deleted rule put back")
        assert output(tmp_path, stream="err").count("put back") > said, "and nswrap said so"
        assert answered(lab, lab.paths[0].client, "192.0.2.10")

        # 5. someone writes net.ipv4.ip_forward, which rewrites every interface's forwarding:
        # nswrap's per-interface settings are put back (the global switch stays as they left it)
        forwarding = "/proc/sys/net/ipv4/conf/eth1/forwarding"
        sh(lab, host, "sysctl -qw net.ipv4.ip_forward=1; sysctl -qw net.ipv4.ip_forward=0")
        wait_until(lambda: lab.exec(host, ["cat", forwarding]).stdout.strip() == "1", 10, what="eth1 forwarding put back")
        assert answered(lab, lab.paths[2].client, "198.51.100.10")
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM
        lab.exec(host, ["ip", "route", "del", "default", "via", "203.0.113.66", "dev", "eth2"], check=False)
        subprocess.run(["ip", "netns", "del", c4], capture_output=True)
        lab.exec(c3, ["ip", "addr", "del", "203.0.113.200/32", "dev", "lo"], check=False)
        lab.exec(c3, ["sysctl", "-qw", "net.ipv4.conf.eth0.arp_announce=0"], check=False)


def test_list_counts_the_queries_per_uplink(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", *UDPECHO, "serve", str(PORT))
    wait_ready(tmp_path)
    sent = {"eth0": 3, "eth1": 5}
    for path, n in ((lab.paths[0], sent["eth0"]), (lab.paths[2], sent["eth1"])):
        assert lab.exec(path.client, [*UDPECHO, "count", path.address, str(PORT), str(n)], check=False).returncode == 0
    listed = nswrap(lab, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    uplinks = {u["name"]: u for u in row["uplinks"]}
    assert {name: uplinks[name]["packets"] for name in ("eth0", "eth1", "eth2")} == {**sent, "eth2": 0}
    assert uplinks["eth0"]["flows"] == 1 and uplinks["eth1"]["flows"] == 1 and uplinks["eth2"]["flows"] == 0
    assert uplinks["eth1"]["gateways"] == ["198.51.100.1", "2001:db8:2::1"] and "198.51.100.10/24" in uplinks["eth1"]["addresses"]
    human = nswrap(lab, "list").stdout
    assert row["id"] in human and "eth1" in human
    assert lab.stop(proc) == 128 + signal.SIGTERM


def test_exec_runs_a_command_in_the_server_namespace(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", *UDPECHO, "serve", str(PORT))
    wait_ready(tmp_path)
    (row,) = json.loads(nswrap(lab, "list", "--json").stdout)
    inside = json.loads(nswrap(lab, "exec", row["id"], "--", "ip", "-json", "addr", "show").stdout)
    assert sorted(link["ifname"] for link in inside) == ["eth0", "lo"]
    assert nswrap(lab, "exec", row["id"], "--", "sh", "-c", "exit 7").returncode == 7
    missing = nswrap(lab, "exec", secrets.token_hex(3), "--", "true")
    assert missing.returncode == 125 and "no live nswrap instance" in missing.stderr
    assert lab.stop(proc) == 128 + signal.SIGTERM
