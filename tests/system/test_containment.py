"""A wrapped server is contained: it sends from its own address or not at all.

A hostile server (tests/system/forger.py, root in its own namespace as nswrap's servers are by
default) gives its interface the addresses it wants to forge and sends from them: the host's own
addresses, foreign ones, another instance's private ones. The host's reverse-path filtering is
loose (systemd's default), which lets such packets through by itself. r1, the next hop, counts
what reaches it from the host, per destination port (one port per source): only the datagram
from the server's own address (masqueraded on the way out, as every connection of a server's own
is) may arrive.

A second test plays the cross-instance injection: a client of instance B waits for B's answer,
which never comes; instance A's server forges it, from B's private address and port.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab import wait_until
from tests.system.common import HERE, datapath, fast_flows, nswrap, output, start, wait_ready

FORGER = [sys.executable, str(HERE / "forger.py")]
C1 = ("203.0.113.2", "2001:db8:a::2")
CAPTURE = """
table inet capture {
    set seen { type inet_service; size 1024; flags dynamic; counter; }
    chain pre {
        type filter hook prerouting priority raw; policy accept;
        iifname "eth0" udp dport 7000-7999 update @seen { udp dport }
    }
}
"""
SILENT = """
import socket, sys
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s4.bind(("0.0.0.0", 5300))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s6.bind(("::", 5300))
print("ready", flush=True)
while True:
    s4.recvfrom(100)  # reads, never answers
"""
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40000))
s.settimeout(6)
s.sendto(b"query", ("192.0.2.10", 5300))
print("sent", flush=True)
try:
    data, peer = s.recvfrom(100)
    print("answered", peer, data, flush=True)
except TimeoutError:
    print("silence", flush=True)
"""


def seen_at_r1(lab) -> dict[int, int]:
    out = lab.exec(lab.ns("r1"), ["nft", "-j", "list", "set", "inet", "capture", "seen"]).stdout
    items = next(i["set"] for i in json.loads(out)["nftables"] if "set" in i).get("elem", [])
    return {e["elem"]["val"]: e["elem"]["counter"]["packets"] for e in items}


def server_address(lab, marker: str, version: int) -> str:
    """The private address nswrap gave a server (read in its namespace, with iproute2)."""
    from tests.system.common import processes_running

    (pid,) = [p.pid for p in processes_running(marker) if "nswrap" not in (p.info["cmdline"] or ())]
    out = lab.exec(lab.host, ["nsenter", "-t", str(pid), "-n", "ip", "-json", f"-{version}", "addr", "show", "eth0"]).stdout
    return next(a["local"] for link in json.loads(out) for a in link["addr_info"] if a.get("scope") == "global")


def loose_rp_filter(lab) -> dict[str, str]:
    keys = ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"]
    before = {k: lab.exec(lab.host, ["sysctl", "-n", k]).stdout.strip() for k in keys}
    lab.sysctl(lab.host, dict.fromkeys(keys, "2"))
    return before


def test_a_server_sends_from_its_own_address_only(lab, tmp_path):
    lab.exec(lab.ns("r1"), ["nft", "-f", "-"], input=CAPTURE)
    restore = loose_rp_filter(lab)
    try:
        other = start(lab, tmp_path, "--ports", "5300", "--", sys.executable, "-c", SILENT, str(tmp_path / "b"), name="b")
        wait_ready(tmp_path, "b")
        b4, b6 = server_address(lab, str(tmp_path / "b"), 4), server_address(lab, str(tmp_path / "b"), 6)
        go = tmp_path / "go"
        sources = {
            7000: "own4", 7001: "192.0.2.10", 7002: "198.51.100.77", 7003: b4,
            7100: "own6", 7101: "2001:db8:1::10", 7102: "2001:db8:0:1::10", 7103: "2001:db8:0:2::77", 7104: b6,
        }
        specs = [f"{source}:{6000 + i}:{dport}" for i, (dport, source) in enumerate(sources.items())]
        forger = start(lab, tmp_path, "--ports", "5400", "--", *FORGER, str(go), *C1, *specs, name="a")
        wait_ready(tmp_path, "a")
        go.touch()
        wait_until(lambda: "done" in output(tmp_path, "a"), 20, what="the forger sent")
        wait_until(lambda: seen_at_r1(lab).get(7000) and seen_at_r1(lab).get(7100), 10,
                   what="the server's ordinary datagrams, IPv4 and IPv6, reach r1")
        seen = seen_at_r1(lab)
        assert {port: n for port, n in seen.items() if port not in (7000, 7100)} == {}, \
            f"forged sources left the host: {({sources[p]: n for p, n in seen.items() if p not in (7000, 7100)})}"
        listed = json.loads(nswrap(lab, "list", "--json").stdout)
        assert max(row["forged"] for row in listed["instances"]) >= 3 * (len(sources) - 2), listed
        text = nswrap(lab, "list").stdout
        assert "packets the server sent from an address not its own" in text, text
        assert lab.stop(forger) == 128 + 15
        assert lab.stop(other) == 128 + 15
    finally:
        lab.sysctl(lab.host, restore)
        lab.exec(lab.ns("r1"), ["nft", "delete", "table", "inet", "capture"])


def flow_to(lab, port: int) -> bool:
    """Does a flow to the published `port` exist: in conntrack (nft datapath) or in the fast path's
    flow map (read with bpftool from the maps of the filter on eth0)?"""
    if datapath() == "nft":
        return str(port) in lab.exec(lab.host, ["conntrack", "-L", "-p", "udp", "--dport", str(port)], check=False).stdout
    return any(int.from_bytes(bytes(int(b, 16) for b in entry["key"][34:36]), "big") == port
               for entry in fast_flows(lab))


def test_another_instances_reply_cannot_be_forged(lab, tmp_path):
    restore = loose_rp_filter(lab)
    try:
        victim = start(lab, tmp_path, "--ports", "5300", "--", sys.executable, "-c", SILENT, str(tmp_path / "b"), name="b")
        wait_ready(tmp_path, "b")
        b4 = server_address(lab, str(tmp_path / "b"), 4)
        go = tmp_path / "go"
        forger = start(lab, tmp_path, "--ports", "5400", "--", *FORGER, str(go), *C1, f"{b4}:5300:40000", name="a")
        wait_ready(tmp_path, "a")
        client = subprocess.Popen(["ip", "netns", "exec", lab.ns("c1"), sys.executable, "-c", CLIENT],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "sent"
            wait_until(lambda: flow_to(lab, 5300), 5, what="the client's flow to B exists")
            go.touch()
            wait_until(lambda: "done" in output(tmp_path, "a"), 20, what="the forger sent")
            answer = client.stdout.readline().strip()
        finally:
            client.kill()
            client.wait()
        assert answer == "silence", f"the forged reply reached B's client: {answer}"
        assert lab.stop(forger) == 128 + 15
        assert lab.stop(victim) == 128 + 15
    finally:
        lab.sysctl(lab.host, restore)


INVALID = """
import socket, struct, sys, time

def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
own.connect(("192.0.2.10", 9))
source = own.getsockname()[0]
tcp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
print("ready", flush=True)
while not __import__("os").path.exists(sys.argv[1]):
    time.sleep(0.02)
for i in range(50):
    for target in ("192.0.2.10", sys.argv[2]):
        header = struct.pack("!HHIIBBHHH", 40000 + i, 22, 1000 + i, 2000 + i, 5 << 4, 0x12, 8192, 0, 0)
        pseudo = socket.inet_aton(source) + socket.inet_aton(target) + struct.pack("!BBH", 0, 6, len(header))
        header = header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]
        tcp.sendto(header, (target, 0))
        body = struct.pack("!BBHHH", 0, 0, 0, 4242, i) + b"pong"
        icmp.sendto(body[:2] + struct.pack("!H", checksum(body)) + body[4:], (target, 0))
print("done", flush=True)
time.sleep(600)
"""


def host_snmp(lab) -> dict[str, int]:
    """The host's own IP stack counters (/proc/net/snmp): what reached it, what it answered."""
    lines = lab.exec(lab.host, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        proto = names.split(":")[0]
        out.update({f"{proto}.{n}": int(v) for n, v in zip(names.split()[1:], values.split()[1:], strict=True)})
    return out


@pytest.mark.parametrize("closed", [True, False], ids=["no-outbound", "control"])
def test_a_closed_server_reaches_nothing_on_the_host_whatever_conntrack_thinks(lab, tmp_path, closed):
    """50 TCP SYN|ACK and 50 ICMP echo replies out of nowhere (conntrack: INVALID), to the host's
    address and to its end of the veth: from a --no-outbound server none reaches the host's stack
    (which would answer each SYN|ACK with a RST); the control, an ordinary server, shows they would."""
    go = tmp_path / "go"
    proc = start(lab, tmp_path, *(["--no-outbound"] if closed else []), "--ports", "5400", "--",
                 sys.executable, "-c", INVALID, str(go), "198.18.0.1")
    wait_ready(tmp_path)
    before = host_snmp(lab)
    go.touch()
    wait_until(lambda: "done" in output(tmp_path), 20, what="sent")
    after = host_snmp(lab)
    reached = {k: after[k] - before[k] for k in ("Tcp.InSegs", "Tcp.OutRsts", "Icmp.InEchoReps")}
    if closed:
        assert reached == {"Tcp.InSegs": 0, "Tcp.OutRsts": 0, "Icmp.InEchoReps": 0}, reached
    else:
        assert reached["Tcp.OutRsts"] >= 50 and reached["Icmp.InEchoReps"] >= 50, reached
    assert lab.stop(proc) == 128 + 15


def test_a_reply_with_no_route_through_its_uplink_is_dropped_and_counted(lab, tmp_path, unbound):
    """eth2 has no gateway: a client beyond its subnet that reaches it anyway (loose reverse-path
    filtering, and IPv6 has none) cannot be answered through eth2. Its reply must not leave
    through another uplink (main's default: eth0), as the warning says; `list` counts it."""
    lab.exec(lab.ns("r1"), ["nft", "-f", "-"], input=CAPTURE.replace("udp dport 7000-7999 update @seen { udp dport }",
                                                                      "udp sport 53 update @seen { udp sport }"))
    restore = loose_rp_filter(lab)
    c3 = lab.ns("c3")
    lab.exec(c3, ["ip", "addr", "add", "203.0.113.200/32", "dev", "eth0"])
    lab.exec(c3, ["ip", "-6", "addr", "add", "2001:db8:c::200/128", "dev", "eth0", "nodad"])
    try:
        proc = start(lab, tmp_path, "--ports", "53", "--", *unbound)
        from tests.lab import TEST_ANSWER, wait_answered

        assert wait_answered(lab, lab.paths[3]) == TEST_ANSWER  # c3, on eth2's subnet: served
        for source, address in (("203.0.113.200", "203.0.113.65"), ("2001:db8:c::200", "2001:db8:3::65")):
            done = lab.exec(c3, ["dig", f"@{address}", "-b", source, "test.example", "+short", "+tries=2", "+time=1"],
                            check=False)
            assert TEST_ANSWER not in done.stdout, f"{source} answered through eth2 without a route back?"
        assert seen_at_r1(lab) == {}, "a reply for eth2's client left through eth0"
        # the fast path leaves a source its uplink's table does not reach to the nft datapath: the same
        listed = json.loads(nswrap(lab, "list", "--json").stdout)
        assert listed["instances"][0]["misrouted"] >= 2, listed
        assert "replies that no route of their uplink could take" in nswrap(lab, "list").stdout
        assert lab.stop(proc) == 0
    finally:
        lab.sysctl(lab.host, restore)
        lab.exec(lab.ns("r1"), ["nft", "delete", "table", "inet", "capture"])


OWN_FLOW = r"""
import socket, sys, time
own = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); own.connect(("2001:db8:1::10", 9)); me = own.getsockname()[0]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::", 40000)); s.settimeout(0.2)
print("ready", me, flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:  # bounded: a flow of the server's own to the host, kept alive
    s.sendto(b"to the host", ("2001:db8:1::10", 7777))
    try:
        print("GOT", s.recvfrom(200)[0].decode(), flush=True)
    except TimeoutError:
        print("tick", flush=True)  # one more read that found nothing: the test counts them
"""
FORGE = r"""
import socket, sys
src, dst = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((src, 7777))
for i in range(3):
    s.sendto(b"forged %d" % i, (dst, 40000))
"""


def test_a_lan_peer_cannot_answer_a_servers_own_connection_in_the_hosts_name(lab, tmp_path):
    """Found by a hostile review: a server's own (unNATed) flow to the host's address has a reply
    direction that conntrack grants anyone with the right addresses; c3, posing as the host's
    2001:db8:1::10, had its datagrams forwarded into the server (IPv6 has no rp_filter)."""
    proc = start(lab, tmp_path, "--ports", "5300", "--", sys.executable, "-c", OWN_FLOW)
    wait_ready(tmp_path)
    me = output(tmp_path).split("ready ")[1].split()[0]
    c3 = lab.ns("c3")
    wait_until(lambda: "7777" in lab.exec(lab.host, ["conntrack", "-L", "-f", "ipv6", "-p", "udp", "--dport", "7777"],
                                          check=False).stdout, 10, what="the server's own flow to the host")
    lab.exec(c3, ["ip", "-6", "addr", "add", "2001:db8:1::10/128", "dev", "eth0", "nodad"])
    try:
        lab.exec(c3, [sys.executable, "-c", FORGE, "2001:db8:1::10", me])
        lab.exec(c3, [sys.executable, "-c", FORGE, "2001:db8:3::66", me])  # and a new flow from its own address
        ticks = output(tmp_path).count("tick")
        wait_until(lambda: output(tmp_path).count("tick") >= ticks + 3, 10, what="the server read on after the forgeries")
        assert "forged" not in output(tmp_path), "a LAN peer's forgery reached the server"
    finally:
        lab.exec(c3, ["ip", "-6", "addr", "del", "2001:db8:1::10/128", "dev", "eth0"])
    assert lab.stop(proc) == 128 + 15
