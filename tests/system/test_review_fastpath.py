"""A hostile review of the fast path (--datapath bpf, issue 27), tried as a LAN peer, a hostile
server and an admin would. Each test holds on the nft datapath; the fast path must hold as well.

The LAN peer is c3 (on eth2's link, which has no gateway): it can put any address on its own
interface and answer ARP / neighbour solicitations for it, as any host on a LAN can.
"""

from __future__ import annotations

import subprocess
import sys

from tests.lab import wait_until
from tests.system.common import output, start, wait_ready

PORT = 5300

# Logs every datagram's peer ("FROM <addr>"), echoes it.
LOGGING_ECHO = r"""
import socket, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", %d))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2000)
    print("FROM", peer[0], data.decode(errors="replace"), flush=True)
    if data == b"slow":  # a recursive resolver's answer: it takes a while
        time.sleep(1)
    s.sendto(data, peer)
""" % PORT

# c1's client: a connected socket from port 40000; "UP" once echoed, then on "go" (stdin) one more
# request, which the server answers a second later: "GOT" if its echo came back, "NOTHING" otherwise.
VICTIM = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", 40000)); s.connect((sys.argv[1], %d)); s.settimeout(0.5)
for _ in range(10):
    s.send(b"first")
    try:
        if s.recv(100) == b"first": break
    except socket.timeout:
        pass
else:
    sys.exit("no echo")
print("UP", flush=True)
sys.stdin.readline()
s.settimeout(4)
s.send(b"slow")
try:
    s.recv(100)
    print("GOT", flush=True)
except socket.timeout:
    print("NOTHING", flush=True)
""" % PORT

# c3, posing as c1 (its address and port 40000) toward eth2's address: "spoofed" once sent, then
# whatever reaches that socket within 4 s ("STOLEN <data>").
POSER = r"""
import socket, sys, time
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 40000)); s.settimeout(0.2)
for _ in range(3):
    s.sendto(b"spoof", (sys.argv[2], %d))
    time.sleep(0.05)
print("spoofed", flush=True)
end = time.monotonic() + 4
while time.monotonic() < end:
    try:
        data = s.recv(100)
        print("STOLEN", data.decode(), flush=True)
    except socket.timeout:
        pass
""" % PORT

C1 = {4: "203.0.113.2", 6: "2001:db8:a::2"}
ASKED = {4: "192.0.2.10", 6: "2001:db8:1::10"}
ETH2 = {4: "203.0.113.65", 6: "2001:db8:3::65"}


def _add(lab, ns: str, address: str) -> None:
    six = ["-6"] if ":" in address else []
    extra = ["nodad"] if ":" in address else []
    lab.exec(ns, ["ip", *six, "addr", "add", f"{address}/{128 if six else 32}", "dev", "eth0", *extra])


def _del(lab, ns: str, address: str) -> None:
    six = ["-6"] if ":" in address else []
    lab.exec(ns, ["ip", *six, "addr", "del", f"{address}/{128 if six else 32}", "dev", "eth0"], check=False)


import pytest  # noqa: E402


def neighbour(lab, version: int) -> None:
    """c3 knows eth2's MAC (as a LAN peer does): the neighbour discovery of a forged source does
    not decide the test."""
    import json

    mac = json.loads(lab.exec(lab.host, ["ip", "-j", "link", "show", "eth2"]).stdout)[0]["address"]
    six = ["-6"] if version == 6 else []
    lab.exec(lab.ns("c3"), ["ip", *six, "neigh", "replace", ETH2[version], "lladdr", mac, "dev", "eth0", "nud", "permanent"])


@pytest.mark.parametrize("version", [4, 6])
def test_a_lan_peer_posing_as_a_client_on_another_uplink_cannot_take_its_answers(lab, tmp_path, version):
    """c1 talks to 192.0.2.10 (eth0). c3, on eth2's link, sends one datagram from c1's address and
    port to eth2's address. The nft datapath drops it (strict rp_filter: eth2's table has no route
    to c1; IPv6: the source chain) or, were it let through, conntrack keeps c1's flow as it was.
    c1's next answer must reach c1, and never c3."""
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", sys.executable, "-c", LOGGING_ECHO)
    wait_ready(tmp_path)
    victim = lab.spawn(lab.ns("c1"), [sys.executable, "-c", VICTIM, ASKED[version]],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    c3 = lab.ns("c3")
    try:
        assert victim.stdout.readline().strip() == "UP"
        _add(lab, c3, C1[version])
        neighbour(lab, version)
        victim.stdin.write("go\n")  # c1 asks; while the server works on it, c3 poses as c1
        victim.stdin.flush()
        poser = lab.spawn(c3, [sys.executable, "-c", POSER, C1[version], ETH2[version], "0.3"],
                          stdout=subprocess.PIPE, text=True)
        assert poser.stdout.readline().strip() == "spoofed"
        answer = victim.stdout.readline().strip()
        stolen = poser.communicate(timeout=15)[0]
        assert "STOLEN" not in stolen, f"c3 received c1's answer: {stolen!r}"
        assert answer == "GOT", "c1's answer did not come back after c3 posed as it"
    finally:
        _del(lab, c3, C1[version])
        victim.kill()
        victim.wait()
    assert lab.stop(proc) == 128 + 15


@pytest.mark.parametrize("version", [4, 6])
def test_a_lan_peer_cannot_reach_the_server_from_the_hosts_own_address(lab, tmp_path, version):
    """The host's stack drops a packet that arrives from outside with one of the host's own
    addresses as its source (a martian, whatever rp_filter says). A server that trusts "the
    host" (an access-control list) must not see such a datagram from c3."""
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", sys.executable, "-c", LOGGING_ECHO)
    wait_ready(tmp_path)
    c3 = lab.ns("c3")
    forged = {4: "192.0.2.10", 6: "2001:db8:1::10"}[version]
    _add(lab, c3, forged)
    neighbour(lab, version)
    try:
        lab.spawn(c3, [sys.executable, "-c", POSER.replace("40000", "40001"), forged, ETH2[version]],
                  stdout=subprocess.DEVNULL).wait(timeout=15)
        # the control: c3's own address is served (so the forgery had its chance)
        lab.spawn(c3, [sys.executable, "-c", POSER.replace("40000", "40002"), {4: "203.0.113.66", 6: "2001:db8:3::66"}[version],
                       ETH2[version]], stdout=subprocess.DEVNULL).wait(timeout=15)
        wait_until(lambda: "FROM" in output(tmp_path), 10, what="c3's own datagram reached the server")
        seen = [line for line in output(tmp_path).splitlines() if line.startswith("FROM")]
        assert not [line for line in seen if forged in line], f"the server saw the host's address as a peer: {seen}"
    finally:
        _del(lab, c3, forged)
    assert lab.stop(proc) == 128 + 15


def published_veths(lab) -> list[int]:
    """The veth (host end, ifindex) of every entry of the fast path's `published` map (bpftool)."""
    import json

    def bpftool(*args: str):
        return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)

    shown = json.loads(lab.exec(lab.host, ["tc", "-j", "filter", "show", "dev", "eth0", "ingress"]).stdout or "[]")
    (prog,) = [f["options"]["prog"]["id"] for f in shown if f.get("options", {}).get("bpf_name") == "nswrap_uplink"]
    for map_id in bpftool("prog", "show", "id", str(prog))["map_ids"]:
        if bpftool("map", "show", "id", str(map_id))["name"] == "published":
            return [int.from_bytes(bytes(int(b, 16) for b in e["value"][:4]), "little")
                    for e in bpftool("map", "dump", "id", str(map_id))]
    raise AssertionError("no published map")


@pytest.mark.bpf_only("the fast path's map of published endpoints")
def test_a_killed_instances_endpoints_are_dropped_by_the_survivor(lab, tmp_path):
    """Two bpf instances; one is killed -9 (its namespace and veth go with it). The survivor follows
    the host: the dead instance's entries in `published` must go (they name a veth that no longer
    exists: its published port would stay taken by the fast path, redirected into nowhere, ahead
    of anything that later serves that port on the nft datapath or the host)."""
    import json
    import signal

    from tests.system.udpmany import COMMAND as UDPMANY, unanswered

    procs = {}
    for name, port in (("a", PORT), ("b", PORT + 1)):
        procs[name] = start(lab, tmp_path, "--datapath", "bpf", "--ports", str(port), "--",
                            *UDPMANY, "serve", "--tag", str(tmp_path / name), str(port), name=name)
        wait_ready(tmp_path, name, timeout=30)
    procs["a"].send_signal(signal.SIGKILL)
    procs["a"].wait(10)

    def veths() -> set[int]:
        return {link["ifindex"] for link in json.loads(lab.exec(lab.host, ["ip", "-j", "link", "show"]).stdout)
                if link["ifname"].startswith("nsw-")}

    wait_until(lambda: len(veths()) == 1, 10, what="the dead instance's veth gone")
    wait_until(lambda: set(published_veths(lab)) == veths(), 10,
               what=f"the dead instance's endpoints dropped (entries name {set(published_veths(lab))}, veths {veths()})")
    assert unanswered(lab, (lab.paths[0], lab.paths6[0]), [PORT + 1]) == []
    assert lab.stop(procs["b"]) == 128 + signal.SIGTERM
