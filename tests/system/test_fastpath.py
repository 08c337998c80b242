"""--datapath bpf (docs/fastpath.md): published flows through the tc-BPF fast path, on the lab's
simulated multihomed host. Oracles: the clients' connected sockets (an answer from any other
address or port never reaches them), `conntrack -L`, `tc -j filter show`, `bpftool -j`, the
host's sysctls and its packet counters; the `lab` fixture compares the whole host before and
after (clsact qdiscs included)."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import TEST_ANSWER, dig, wait_answered, wait_until
from tests.lab.topology import Path as LabPath
from tests.system.common import dual_stack_unbound, nswrap, output, spoofing_client, start
from tests.system.udpmany import COMMAND as UDPMANY, unanswered
from tests.unit.fixtures.bpf import sections

pytestmark = pytest.mark.bpf_only("the fast path's own tests (each gives --datapath bpf)")
PORT = 5300
BENCH_TRAFFIC = [sys.executable, str(Path(__file__).parents[2] / "scripts" / "bench_traffic.py")]
PRIORITY = 65001
ROOT = Path(__file__).parents[2]
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH = 1, 9
SEAM = "NSWRAP_TEST_BPF_OBJECT"


def serving(lab, tmp_path, *options: str, port: int = PORT, env=None, name: str = "nswrap"):
    proc = start(lab, tmp_path, "--datapath", "bpf", "--ports", f"{port},{port}/tcp", *options, "--",
                 *UDPMANY, "serve", "--tag", str(tmp_path / name), str(port), env=env, name=name)
    wait_until(lambda: "ready" in output(tmp_path, name) or proc.poll() is not None, 30, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, name, stream="err")
    return proc


def filters(lab, dev: str) -> list[dict]:
    shown = lab.exec(lab.host, ["tc", "-j", "filter", "show", "dev", dev, "ingress"], check=False).stdout
    return [f for f in json.loads(shown or "[]") if f.get("options")]


def instance_id(lab) -> str:
    links = json.loads(lab.exec(lab.host, ["ip", "-j", "link", "show"]).stdout)
    (veth,) = [link["ifname"] for link in links if link["ifname"].startswith("nsw-")]
    return veth.removeprefix("nsw-")


def conntrack_entries(lab, port: int) -> list[str]:
    """The host's conntrack entries, UDP and TCP, whose original destination port is `port`."""
    found = []
    for proto in ("udp", "tcp"):
        done = lab.exec(lab.host, ["conntrack", "-L", "-p", proto, "--orig-port-dst", str(port)])
        found += [line for line in done.stdout.splitlines() if line.startswith(proto)]
    return found


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
    veth = filters(lab, "nsw-" + instance_id(lab))
    assert [f["options"]["bpf_name"] for f in veth] == ["nswrap_veth"]
    ids = {f["options"]["prog"]["id"] for dev in ("eth0", "eth1", "eth2", "nsw-" + instance_id(lab))
           for f in filters(lab, dev)}
    loaded = programs(ids)
    assert sorted(p["name"] for p in loaded) == ["nswrap_uplink", "nswrap_veth"], loaded  # loaded once, shared
    maps = {m for p in loaded for m in p["map_ids"]}
    assert len(maps) == 5, loaded  # published, sources, flows, frags, meta: shared by both
    meta = meta_of(maps)
    assert meta[0] != 0, meta  # the secret: written at load, at random (2^-32: zero)
    assert meta[1] == GENERATION, meta
    assert lab.stop(proc) == 0, output(tmp_path, stream="err")
    for dev in ("eth0", "eth1", "eth2"):
        assert filters(lab, dev) == []  # and the lab fixture: no clsact left either
    wait_until(lambda: not programs(ids) and not bpf_maps(maps), 10, what="the programs and their maps freed")


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


def test_tc_filters_and_qdiscs_removed_by_someone_are_put_back(lab, tmp_path):
    """An admin's `tc filter del` on an uplink, `tc qdisc del ... clsact` on another and on the
    server's veth: rtnetlink's tc events make nswrap look, and it puts each back."""
    proc = serving(lab, tmp_path)
    veth = "nsw-" + instance_id(lab)
    try:
        lab.exec(lab.host, ["tc", "filter", "del", "dev", "eth1", "ingress", "pref", str(PRIORITY)])
        lab.exec(lab.host, ["tc", "qdisc", "del", "dev", "eth2", "clsact"])
        lab.exec(lab.host, ["tc", "qdisc", "del", "dev", veth, "clsact"])
        for dev in ("eth1", "eth2", veth):
            wait_until(lambda dev=dev: any(f["pref"] == PRIORITY for f in filters(lab, dev)), 20,
                       what=f"nswrap puts its filter on {dev} back")
        assert unanswered(lab, (*lab.paths, *lab.paths6), [PORT]) == []
        assert conntrack_entries(lab, PORT) == [], "served by the fast path again"
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


def conntrack_count(lab) -> int:
    return int(lab.exec(lab.host, ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).stdout)


def test_a_spoofed_flood_leaves_conntrack_as_it_was_and_other_uplinks_served(lab, tmp_path):
    """80,000 spoofed flows (more than the flow map holds: its oldest entries are evicted), each
    answered, while the clients of the other uplinks ask: the host's conntrack table does not grow."""
    sources, flows = ("203.0.113.3", "203.0.113.4"), 80_000
    c1 = spoofing_client(lab, sources)
    proc = serving(lab, tmp_path)
    try:
        before = conntrack_count(lab)
        flood = lab.spawn(c1, [*BENCH_TRAFFIC, "flows", "192.0.2.10", str(PORT), ",".join(sources), "20000",
                               str(flows), "60"], stdout=(tmp_path / "flood.out").open("w"))
        others = (lab.paths[2], lab.paths[3], lab.paths6[2], lab.paths6[3])  # eth1, eth2
        assert unanswered(lab, others, [PORT]) == [], "while the flood runs"
        assert flood.wait(timeout=90) == 0
        result = json.loads((tmp_path / "flood.out").read_text())
        print(f"\nflood through the fast path: {result}; conntrack {before} -> {conntrack_count(lab)}")
        assert result["answered"] >= 0.9 * flows, result
        assert conntrack_entries(lab, PORT) == []
        assert conntrack_count(lab) <= before + 10, (before, conntrack_count(lab))
        assert unanswered(lab, (*lab.paths, *lab.paths6), [PORT]) == [], "after it, everyone"
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


REFUSED = Path(__file__).with_name("refused.bpf.c")


@pytest.mark.parametrize("case", ["refused", "missing"])
def test_a_fast_path_that_cannot_load_is_one_line_exit_2_and_changes_nothing(lab, tmp_path, case):
    """The verifier's reason (or the missing object), before any host change: the lab fixture
    compares the whole host, and no program is left loaded (bpftool, the kernel's own list)."""
    if case == "refused":
        obj = tmp_path / "refused.bpf.o"
        subprocess.run(["clang", "-O2", "-target", "bpf", "-c", str(REFUSED), "-o", str(obj)], check=True)
    else:
        obj = tmp_path / "absent.bpf.o"
    done = nswrap(lab, "--datapath", "bpf", "--ports", str(PORT), "--", "true", env={"NSWRAP_TEST_BPF_OBJECT": str(obj)})
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip()
    assert line.startswith("nswrap: --datapath bpf: ") and str(obj) in line, line
    if case == "refused":
        assert "R1 offset is outside of the packet (EACCES)" in line, line  # the verifier's own words
    else:
        assert "No such file or directory" in line, line
    assert not [f for dev in ("eth0", "eth1", "eth2") for f in filters(lab, dev)]  # and the lab fixture: no clsact


def bpftool(*args: str) -> list[dict]:
    shown = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(shown or "[]")


def programs(ids: set[int]) -> list[dict]:
    """The loaded programs among `ids` (bpftool: the kernel's own list; freed after an RCU grace period)."""
    return [p for p in bpftool("prog", "show") if p["id"] in ids]


def bpf_maps(ids: set[int]) -> list[dict]:
    return [m for m in bpftool("map", "show") if m["id"] in ids]


def meta_of(maps: set[int]) -> dict[int, int]:
    """The `meta` map among `maps`, as bpftool dumps it: index -> __u32 (little-endian here)."""
    (meta,) = [m["id"] for m in bpf_maps(maps) if m["name"] == "meta"]
    dumped = bpftool("map", "dump", "id", str(meta))
    return {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little"):
            int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little") for e in dumped}


GENERATION = int(re.search(r'GENERATION SEC\("generation"\) = (\d+);', (ROOT / "nswrap/bpf/fastpath.bpf.c").read_text())[1])


def variant(tmp_path, generations: int, resize: tuple[int, int, int] | None = None) -> Path:
    """nswrap's object `generations` older (< 0: newer; its `generation` section's __u32 moved),
    and if asked the map of (type, entries) given other entries: what another nswrap loads."""
    data = bytearray((ROOT / "nswrap/bpf/fastpath.bpf.o").read_bytes())
    found = sections(bytes(data))
    _h, at, _size = found["generation"]
    struct.pack_into("<I", data, at, struct.unpack_from("<I", data, at)[0] - generations)
    if resize is not None:
        _h, at, size = found["maps"]  # struct map_def: type, key_size, value_size, max_entries, map_flags
        defs = [struct.unpack_from("<5I", data, offset) for offset in range(at, at + size, 20)]
        (index,) = [i for i, d in enumerate(defs) if (d[0], d[3]) == resize[:2]]
        struct.pack_into("<I", data, at + index * 20 + 12, resize[2])
    path = tmp_path / f"variant-{generations}-{resize and resize[2]}.bpf.o"
    path.write_bytes(data)
    return path


def doctor_fast_path(lab) -> str:
    """`nswrap doctor --datapath bpf`'s line on the fast path."""
    done = nswrap(lab, "doctor", "--datapath", "bpf")
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("ok    fast path (--datapath bpf): ")]
    return line


def loaded_programs(lab) -> set[int]:
    """The ids of the programs on nswrap's filters, on the uplinks and on every server's veth."""
    links = json.loads(lab.exec(lab.host, ["ip", "-j", "link", "show"]).stdout)
    devices = [link["ifname"] for link in links if link["ifname"].startswith(("eth", "nsw-"))]
    return {f["options"]["prog"]["id"] for dev in devices for f in filters(lab, dev) if f["pref"] == PRIORITY}


BIG = 4000  # bytes of each answer: fragmented by the server's namespace (the veth's MTU is 1500)
BIG_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data * (%d // len(data)), peer)
""" % BIG
BIG_CLIENT = r"""
import socket, sys
address, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((address, port))  # an answer from any other address or port never arrives
s.settimeout(1)
for _ in range(5):
    s.send(b"0123456789")
    try:
        print(len(s.recv(65536)))
        break
    except socket.timeout:
        continue
else:
    print(0)
"""


def test_an_answer_fragmented_by_the_server_leaves_from_the_asked_address(lab, tmp_path):
    """A DNS server's answer over 1472 bytes (DNSSEC, EDNS 4096) leaves its namespace in fragments:
    the first one has the ports and finds the flow, the later ones follow it (every path, v4 and v6)."""
    proc = start(lab, tmp_path, "--datapath", "bpf", "--ports", str(PORT), "--",
                 sys.executable, "-c", BIG_SERVER, str(PORT))
    try:
        wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
        for path in (*lab.paths, *lab.paths6):
            got = lab.exec(path.client, [sys.executable, "-c", BIG_CLIENT, path.address, str(PORT)]).stdout
            assert got.strip() == str(BIG), path.name
        assert conntrack_entries(lab, PORT) == [], "not a fragment went through conntrack"
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


REFUSED_CLIENT = r"""
import socket, sys
address, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[3]) if len(sys.argv) > 3 else 0))
s.connect((address, port))  # an error is reported only if it quotes this socket's own datagram
s.settimeout(1)
for _ in range(5):
    s.send(b"anyone?")
    try:
        s.recv(64)
        print("answered")
        break
    except ConnectionRefusedError:
        print("refused")
        break
    except socket.timeout:
        continue
else:
    print("silence")
"""


def test_a_closed_port_is_refused_from_the_asked_address(lab, tmp_path):
    """The server's stack answers a datagram to a port nothing listens on with an ICMP error that
    quotes it: translated back, the client's connected socket sees ECONNREFUSED (it would not, were
    the quote wrong), as with the nft datapath."""
    proc = serving(lab, tmp_path, "--ports", str(PORT + 1))
    try:
        for path in (*lab.paths, *lab.paths6):
            got = lab.exec(path.client, [sys.executable, "-c", REFUSED_CLIENT, path.address, str(PORT + 1)]).stdout
            assert got.strip() == "refused", path.name
        # c1 asks its two addresses from one port: the second flow gets another port toward the
        # server (docs/fastpath.md), which the quote of its refusal must give back
        for path in (lab.paths[0], lab.paths[1], lab.paths6[0], lab.paths6[1]):
            got = lab.exec(path.client, [sys.executable, "-c", REFUSED_CLIENT, path.address, str(PORT + 1), "4124"]).stdout
            assert got.strip() == "refused", f"{path.name}, from port 4124"
        assert conntrack_entries(lab, PORT + 1) == []
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


BULK = 200_000  # bytes a TCP server sends each client: more than fits in one round of small segments
BULK_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"x" * %d)
    c.close()
""" % BULK
BULK_CLIENT = r"""
import socket, sys
address, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[3]) if len(sys.argv) > 3 else 0))
s.settimeout(10)
s.connect((address, port))
got = 0
try:
    while chunk := s.recv(65536):
        got += len(chunk)
except socket.timeout:
    pass
print(got)
"""


def test_a_path_with_a_smaller_mtu_gets_every_byte_over_tcp(lab, tmp_path):
    """r1's link to c1 carries 1280 bytes at most: r1 answers the server's full-size segments with
    "fragmentation needed" / "packet too big", addressed to the address asked. Translated into
    the server's namespace, they make its TCP send smaller segments; lost, the transfer stalls."""
    lab.exec(lab.ns("r1"), ["ip", "link", "set", "dev", "eth1", "mtu", "1280"])
    proc = start(lab, tmp_path, "--datapath", "bpf", "--ports", f"{PORT}/tcp", "--",
                 sys.executable, "-c", BULK_SERVER, str(PORT))
    try:
        wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
        for path in (lab.paths[0], lab.paths[1], lab.paths6[0], lab.paths6[1]):  # c1, behind r1
            got = lab.exec(path.client, [sys.executable, "-c", BULK_CLIENT, path.address, str(PORT)], timeout=60).stdout
            assert got.strip() == str(BULK), path.name
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_a_second_flow_of_one_client_port_gets_every_byte_over_a_smaller_mtu(lab, tmp_path):
    """c1 fetches from its first address with the full MTU, then from the second from the same
    port while the first flow lives, over r1's link shrunk to 1280: the second flow has another
    port toward the server (docs/fastpath.md), and r1's "too big" errors, which quote the client's
    own port, must find it (the server's namespace learned no smaller MTU from the first)."""
    proc = start(lab, tmp_path, "--datapath", "bpf", "--ports", f"{PORT}/tcp", "--",
                 sys.executable, "-c", BULK_SERVER, str(PORT))
    r1 = lab.ns("r1")
    try:
        wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
        for first, second in ((lab.paths[0], lab.paths[1]), (lab.paths6[0], lab.paths6[1])):
            lab.exec(r1, ["ip", "link", "set", "dev", "eth1", "mtu", "1500"])
            for path in (first, second):
                got = lab.exec(path.client, [sys.executable, "-c", BULK_CLIENT, path.address, str(PORT), "4125"],
                               timeout=60).stdout
                assert got.strip() == str(BULK), path.name
                lab.exec(r1, ["ip", "link", "set", "dev", "eth1", "mtu", "1280"])
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_more_endpoints_than_the_map_holds_are_refused_before_any_change(lab):
    """Every port on every address of every uplink: 65,535 x 4 x 3 IPv4 endpoints (and IPv6's)
    against the map's 262,144. One line naming what to narrow, exit 2; the lab fixture compares
    the host."""
    done = nswrap(lab, "--datapath", "bpf", "--ports", "1-65535", "--", "true")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("nswrap: --datapath bpf: ") and "--uplink or --address" in line, line
    done = nswrap(lab, "--datapath", "bpf", "--ports", "1-65535", "--uplink", "eth2", "--address", "203.0.113.65",
                  "--ipv6-forwarding", "off", "--dry-run")
    assert done.returncode == 0, done.stderr  # narrowed: 65,535 endpoints fit



# 24 endpoints per port on the lab host (4 IPv4 and 4 IPv6 addresses x 3 uplinks): 10,900 ports fill
# 261,600 of the map's 262,144
MANY = (20000, 30899)


def published_holds(lab, ifname: str, address: str, port: int) -> bool:
    """Does the fast path's `published` map hold (ifname, address, udp, port)? Asked with bpftool,
    the key built from nswrap/bpf/fastpath.bpf.c's struct endpoint_key."""
    shown = json.loads(lab.exec(lab.host, ["tc", "-j", "filter", "show", "dev", ifname, "ingress"]).stdout or "[]")
    (prog,) = [f["options"]["prog"]["id"] for f in shown if f.get("options", {}).get("bpf_name") == "nswrap_uplink"]
    ids = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog)], capture_output=True,
                                    text=True, check=True).stdout)["map_ids"]
    (map_id,) = [i for i in ids if json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(i)],
                                                             capture_output=True, text=True,
                                                             check=True).stdout)["name"] == "published"]
    (link,) = json.loads(lab.exec(lab.host, ["ip", "-j", "link", "show", "dev", ifname]).stdout)
    key = (link["ifindex"].to_bytes(4, "little") + bytes([4, 17]) + port.to_bytes(2, "big")
           + bytes(map(int, address.split("."))) + bytes(12))
    done = subprocess.run(["bpftool", "map", "lookup", "id", str(map_id), "key", "hex", *(f"{b:02x}" for b in key)],
                          capture_output=True, text=True)
    return done.returncode == 0


def many(lab, tmp_path):
    """An instance publishing MANY, its server listening on the range's first and last ports."""
    proc = start(lab, tmp_path, "--datapath", "bpf", "--ports", "%d-%d" % MANY, "--",
                 *UDPMANY, "serve", "--tag", str(tmp_path), *map(str, MANY))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 120, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    return proc


def test_instances_that_fit_the_map_alone_but_not_together_are_refused(lab, tmp_path):
    """The map of published endpoints is shared: the second of two instances that each fit alone
    is refused in one line naming both counts, exit 2 (before: a map write failed mid-start with
    E2BIG, exit 125); the lab fixture compares the host, and the first keeps serving."""
    first = many(lab, tmp_path)
    try:
        done = nswrap(lab, "--datapath", "bpf", "--ports", "40000-40099", "--", "true")
        assert done.returncode == 2, done.stderr
        line = done.stderr.splitlines()[-1]
        assert line == ("nswrap: --datapath bpf: 2400 endpoints (ports x addresses x uplinks) beside the 261600 of "
                        "the live bpf instances are more than the fast path holds (262144): publish fewer with "
                        "--uplink or --address, or use --datapath nft"), line
        assert unanswered(lab, (*lab.paths, *lab.paths6), [MANY[0]]) == []
    finally:
        assert lab.stop(first) == 128 + signal.SIGTERM


def test_a_host_that_grows_past_the_map_keeps_its_endpoints_and_the_rest_take_nft(lab, tmp_path):
    """A new address on eth0 while 261,600 endpoints are published asks for 32,700 more. The
    entries in the map stay (no flow changes path), the new ones fill it in a fixed order (eth0's
    new address, lowest ports first), the rest take the nft datapath: answered too, with a
    conntrack entry. One warning says so, and only once while it lasts, though its count changes
    (another address comes, the first goes: its room goes to the second's first ports); another
    says when every endpoint fits again."""
    proc = many(lab, tmp_path)
    new = LabPath("c1 -> 192.0.2.12 (eth0, added)", lab.paths[0].client, "192.0.2.12", "eth0")
    full = "nswrap: the fast path's map of published endpoints is full: "
    try:
        lab.exec(lab.host, ["ip", "addr", "add", "192.0.2.12/24", "dev", "eth0"])
        wait_until(lambda: full in output(tmp_path, stream="err") or proc.poll() is not None, 120,
                   what="the warning on the endpoints left out")
        assert proc.poll() is None
        assert f"{full}32156 endpoints the live bpf instances publish" in output(tmp_path, stream="err")
        wait_until(lambda: published_holds(lab, "eth0", "192.0.2.12", MANY[0]), 60, what="the new address's first port")
        assert not published_holds(lab, "eth0", "192.0.2.12", MANY[1]) and published_holds(lab, "eth0", "192.0.2.10",
                                                                                              MANY[1])
        assert unanswered(lab, (*lab.paths, *lab.paths6, new), [MANY[0], MANY[1]]) == []
        tracked = lab.exec(lab.host, ["conntrack", "-L", "-p", "udp", "-d", "192.0.2.12"], check=False).stdout
        assert f"dport={MANY[1]} " in tracked and f"dport={MANY[0]} " not in tracked, tracked
        assert conntrack_entries(lab, MANY[0]) == []  # the first port, on every path asked: the fast path

        lab.exec(lab.host, ["ip", "addr", "add", "192.0.2.13/24", "dev", "eth0"])
        lab.exec(lab.host, ["ip", "addr", "del", "192.0.2.12/24", "dev", "eth0"])
        wait_until(lambda: published_holds(lab, "eth0", "192.0.2.13", MANY[0]), 120, what="the freed room refilled")
        assert not published_holds(lab, "eth0", "192.0.2.12", MANY[0])
        lab.exec(lab.host, ["ip", "addr", "del", "192.0.2.13/24", "dev", "eth0"])
        wait_until(lambda: "map of published endpoints has room again" in output(tmp_path, stream="err")
                   or proc.poll() is not None, 120, what="the map has room again")
        assert output(tmp_path, stream="err").count(full) == 1, output(tmp_path, stream="err")
        assert unanswered(lab, (*lab.paths, *lab.paths6), [MANY[0], MANY[1]]) == []
    finally:
        for address in ("192.0.2.12/24", "192.0.2.13/24"):
            lab.exec(lab.host, ["ip", "addr", "del", address, "dev", "eth0"], check=False)
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_an_nft_instance_and_a_bpf_instance_side_by_side(lab, tmp_path):
    """One host, both datapaths: each serves every path; only the nft instance's flows are in
    conntrack. The bpf one stops first: the nft one keeps serving, and the fast path is gone."""
    nft = start(lab, tmp_path, "--datapath", "nft", "--ports", str(PORT + 10), "--",
                *UDPMANY, "serve", "--tag", f"{tmp_path}/nft", str(PORT + 10), name="nft")
    bpf = start(lab, tmp_path, "--datapath", "bpf", "--ports", str(PORT), "--",
                *UDPMANY, "serve", "--tag", f"{tmp_path}/bpf", str(PORT), name="bpf")
    try:
        for name, proc in (("nft", nft), ("bpf", bpf)):
            wait_until(lambda name=name, proc=proc: "ready" in output(tmp_path, name) or proc.poll() is not None, 30,
                       what=f"the {name} instance's server is ready")
        everywhere = (*lab.paths, *lab.paths6)
        assert unanswered(lab, everywhere, [PORT, PORT + 10]) == []
        assert conntrack_entries(lab, PORT) == [] and conntrack_entries(lab, PORT + 10) != []
        listed = json.loads(nswrap(lab, "list", "--json").stdout)["instances"]
        assert sorted(i["datapath"] for i in listed) == ["bpf", "nft"], listed
        assert lab.stop(bpf) == 128 + signal.SIGTERM
        assert not [f for dev in ("eth0", "eth1", "eth2") for f in filters(lab, dev)], "the fast path left"
        assert unanswered(lab, everywhere, [PORT + 10]) == []
    finally:
        lab.stop(bpf)
        assert lab.stop(nft) == 128 + signal.SIGTERM


def test_an_upgrade_replaces_older_programs_and_an_older_nswrap_keeps_newer_ones(lab, tmp_path):
    """docs/fastpath.md, *Upgrades*. An instance of before the upgrade (an object one generation
    older, its maps as this one's) serves; this nswrap starts beside it and replaces its programs
    with its own at once, on every filter, and both serve. An older instance whose own `flows` map
    differs starts next, and later puts back a filter an admin deleted after the newer instance
    stopped: the newer programs stay, and every instance is served through them."""
    everywhere = (*lab.paths, *lab.paths6)
    procs = {"before": serving(lab, tmp_path, port=PORT, name="before", env={**os.environ, SEAM: str(variant(tmp_path, 1))})}
    try:
        first = loaded_programs(lab)
        assert len(first) == 2, first  # tc/uplink and tc/veth, loaded once
        assert meta_of({m for p in programs(first) for m in p["map_ids"]})[1] == GENERATION - 1
        assert (f"programs of generation {GENERATION - 1} are attached here, an older nswrap's (this one's: "
                f"{GENERATION}): the next start replaces them") in doctor_fast_path(lab)

        procs["upgraded"] = serving(lab, tmp_path, port=PORT + 1, name="upgraded")
        newer = loaded_programs(lab)
        assert len(newer) == 2 and not newer & first, (first, newer)
        assert meta_of({m for p in programs(newer) for m in p["map_ids"]})[1] == GENERATION
        wait_until(lambda: not programs(first), 10, what="the older programs freed")
        assert f"programs of generation {GENERATION} are attached here (this nswrap's: {GENERATION}): used as they are" \
            in doctor_fast_path(lab)
        assert unanswered(lab, everywhere, [PORT, PORT + 1]) == []

        env = {**os.environ, SEAM: str(variant(tmp_path, 1, (BPF_MAP_TYPE_LRU_HASH, 65536, 1024)))}
        procs["downgraded"] = serving(lab, tmp_path, port=PORT + 2, name="downgraded", env=env)
        assert loaded_programs(lab) == newer
        assert unanswered(lab, everywhere, [PORT, PORT + 1, PORT + 2]) == []

        assert lab.stop(procs.pop("upgraded")) == 128 + signal.SIGTERM
        lab.exec(lab.host, ["tc", "filter", "del", "dev", "eth1", "ingress", "pref", str(PRIORITY)])
        wait_until(lambda: any(f["pref"] == PRIORITY for f in filters(lab, "eth1")), 20, what="eth1's filter back")
        assert loaded_programs(lab) == newer
        assert unanswered(lab, everywhere, [PORT, PORT + 2]) == []
    finally:
        for name, proc in procs.items():
            assert lab.stop(proc) == 128 + signal.SIGTERM, output(tmp_path, name, stream="err")


def test_a_newer_nswraps_programs_whose_maps_this_one_cannot_write_are_left_as_they_are(lab, tmp_path):
    """Were the permanent maps ever changed (tests/unit/test_bpf_generation.py forbids it), an
    older nswrap still would not replace the newer programs: here a newer object whose `published`
    holds one entry more. This nswrap starts beside it, says so once, and neither replaces nor
    writes them; every path is served (its own flows by the newer instance's entries or the nft
    datapath), also after the newer instance stops and eth1's filter is put back."""
    everywhere = (*lab.paths, *lab.paths6)
    newer = variant(tmp_path, -1, (BPF_MAP_TYPE_HASH, 262144, 262145))
    procs = {"newer": serving(lab, tmp_path, port=PORT, name="newer", env={**os.environ, SEAM: str(newer)})}
    try:
        programs_of_newer = loaded_programs(lab)
        assert (f"programs of generation {GENERATION + 1} are attached here, a newer nswrap's whose maps this one "
                f"(generation {GENERATION}) cannot write") in doctor_fast_path(lab)
        procs["this"] = serving(lab, tmp_path, port=PORT + 1, name="this")
        assert loaded_programs(lab) == programs_of_newer
        assert unanswered(lab, everywhere, [PORT, PORT + 1]) == []
        assert lab.stop(procs.pop("newer")) == 128 + signal.SIGTERM
        lab.exec(lab.host, ["tc", "filter", "del", "dev", "eth1", "ingress", "pref", str(PRIORITY)])
        wait_until(lambda: any(f["pref"] == PRIORITY for f in filters(lab, "eth1")), 20, what="eth1's filter back")
        assert loaded_programs(lab) == programs_of_newer
        assert unanswered(lab, everywhere, [PORT + 1]) == []
        warned = [line for line in output(tmp_path, "this", stream="err").splitlines() if "a newer nswrap's" in line]
        assert len(warned) == 1 and f"(generation {GENERATION + 1})" in warned[0], warned
    finally:
        for name, proc in procs.items():
            assert lab.stop(proc) == 128 + signal.SIGTERM, output(tmp_path, name, stream="err")


def test_an_instance_whose_uplink_is_no_ethernet_keeps_its_one_program(lab, tmp_path):
    """A bpf instance whose only uplink is a tun device (no Ethernet frames: nft datapath) has the
    veth program alone: one program of a load, which every sync keeps (another instance's start
    and stop here), not loads anew."""
    for step in (["tuntap", "add", "dev", "tun7", "mode", "tun"], ["addr", "add", "203.0.113.1/24", "dev", "tun7"],
                 ["link", "set", "tun7", "up"]):
        lab.exec(lab.host, ["ip", *step])
    procs = {}
    try:
        procs["tun"] = serving(lab, tmp_path, "--uplink", "tun7", name="tun")
        first = loaded_programs(lab)
        assert len(first) == 1, first  # the veth's
        assert "filters here hold one of its two programs (no instance has an Ethernet uplink)" in doctor_fast_path(lab)
        other = start(lab, tmp_path, "--datapath", "nft", "--ports", str(PORT + 1), "--", *UDPMANY, "serve", str(PORT + 1),
                      name="other")
        procs["other"] = other
        wait_until(lambda: "ready" in output(tmp_path, "other") or other.poll() is not None, 30, what="the nft instance")
        assert loaded_programs(lab) == first
        assert lab.stop(procs.pop("other")) == 128 + signal.SIGTERM
        assert loaded_programs(lab) == first
        assert "older nswrap" not in output(tmp_path, "tun", stream="err") + output(tmp_path, "other", stream="err")
    finally:
        for name, proc in procs.items():
            assert lab.stop(proc) == 128 + signal.SIGTERM, output(tmp_path, name, stream="err")
        lab.exec(lab.host, ["ip", "link", "del", "tun7"], check=False)


# A replacement cut short (a kill between two filters): the server's veth holds the veth program
# of another load, whose maps know none of the flows the uplinks' program remembers.
CUT_SHORT = """
import socket, sys
from nswrap.bpf import fast
from nswrap.netlink.tc import Tc
loaded = fast.load()
with Tc() as t:
    t.attach(socket.if_nametoindex(sys.argv[1]), "ingress", loaded.programs["nswrap_veth"], "nswrap_veth", 65001, 1)
"""


def test_filters_of_two_loads_are_made_anew_on_one_load(lab, tmp_path):
    """Filters left on two loads of the programs (a replacement cut short: done here by loading a
    second copy and attaching its veth program to the server's veth) are all made anew on one
    load at nswrap's next look (here: an admin deletes eth2's filter), and every path is served."""
    proc = serving(lab, tmp_path)
    try:
        before = loaded_programs(lab)
        lab.exec(lab.host, [sys.executable, "-c", CUT_SHORT, "nsw-" + instance_id(lab)])
        lab.exec(lab.host, ["tc", "filter", "del", "dev", "eth2", "ingress", "pref", str(PRIORITY)])
        wait_until(lambda: any(f["pref"] == PRIORITY for f in filters(lab, "eth2")), 20, what="eth2's filter back")
        wait_until(lambda: len(after := loaded_programs(lab)) == 2 and not after & before, 20,
                   what="every filter on one new load")
        assert unanswered(lab, (*lab.paths, *lab.paths6), [PORT]) == []
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_an_unprivileged_user_can_neither_read_nor_change_the_fast_path(lab, tmp_path):
    """As nobody, on the host: the maps cannot be opened (bpf() needs CAP_BPF or CAP_SYS_ADMIN) and
    the filters cannot be deleted (CAP_NET_ADMIN); the fast path keeps serving."""
    proc = serving(lab, tmp_path)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    try:
        (prog,) = [f["options"]["prog"]["id"] for f in filters(lab, "eth0") if f["pref"] == PRIORITY]
        done = lab.exec(lab.host, [*nobody, "bpftool", "-j", "prog", "show", "id", str(prog)], check=False)
        assert done.returncode != 0 and "Operation not permitted" in done.stdout + done.stderr, done
        done = lab.exec(lab.host, [*nobody, "tc", "filter", "del", "dev", "eth0", "ingress", "pref", str(PRIORITY)],
                        check=False)
        assert done.returncode != 0, done
        assert any(f["pref"] == PRIORITY for f in filters(lab, "eth0"))
        assert unanswered(lab, (lab.paths[0], lab.paths6[0]), [PORT]) == []
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_doctor_and_list_say_what_the_fast_path_skips(lab, tmp_path):
    done = nswrap(lab, "doctor", "--datapath", "bpf", env={"NSWRAP_TEST_NO_FORCE_FORWARDING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    (fast,) = [line for line in lines if line.startswith("ok    fast path (--datapath bpf): ")]
    assert "skip this host's netfilter" in fast and "attached here" not in fast, fast  # none loaded yet
    (ipv6,) = [line for line in lines if "IPv6 forwarding" in line]
    assert "through the fast path" in ipv6, ipv6  # an "old kernel" with forwarding off: served anyway
    proc = serving(lab, tmp_path)
    try:
        assert unanswered(lab, (lab.paths[0],), [PORT]) == []
        listed = nswrap(lab, "list").stdout
        (line,) = [line for line in listed.splitlines() if line.startswith("fast path (--datapath bpf) for ")]
        assert "flows remembered" in line and "skip the host's netfilter" in line, listed
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM
