"""IPv6 on kernels without per-interface forwarding: `--ipv6-forwarding global`.

nswrap sees an older kernel through a test seam (NSWRAP_TEST_NO_FORCE_FORWARDING=1: it then
neither reads nor writes `force_forwarding`), so the path Debian 12/13, Ubuntu and RHEL take is
exercised on the kernel these tests run on. The lab's host learns eth0's IPv6 default route from
router advertisements (radvd in r1, accept_ra=1 as the kernel defaults to), the case that turning
on `net.ipv6.conf.all.forwarding` breaks: the kernel purges RA routes unless accept_ra=2.

    c1 ── r1 (radvd: "I am a default router") ── eth0  host  eth1 ── r2 ── c2
                                                        eth2
                                                         │
                                                        c3  (a LAN peer that would like the host to route for it)

Each test compares the host with how it was before nswrap (every sysctl of every interface, RA
routes included, rules, the ruleset).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from tests.conftest import nswrap_state_left, require_system
from tests.lab import TEST_ANSWER, Lab, diff_states, dig, wait_answered, wait_until
from tests.system.common import NSWRAP, dual_stack_unbound, nswrap, output, processes_running, start

OLD_KERNEL = {"NSWRAP_TEST_NO_FORCE_FORWARDING": "1"}
RADVD_CONF = """interface eth0 {
    AdvSendAdvert on;
    MinRtrAdvInterval 3;
    MaxRtrAdvInterval 4;
    AdvDefaultLifetime 600;
};
"""
FORWARD6 = "/proc/sys/net/ipv6/conf/all/forwarding"

# c3 sends these through the host (c3's gateway) toward c1 behind r1: routed, they reach r1's eth0
PEER_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[1])):
    s.sendto(b"route me", ("2001:db8:a::2", 9999))
"""
R1_COUNTER = """
table inet probe {
    counter routed { }
    chain pre {
        type filter hook prerouting priority raw; policy accept;
        iifname "eth0" ip6 saddr 2001:db8:3::66 udp dport 9999 counter name "routed"
    }
}
"""


def ra_default(lab: Lab) -> list[dict]:
    routes = json.loads(lab.exec(lab.host, ["ip", "-json", "-6", "route", "show", "default", "proto", "ra"]).stdout or "[]")
    return [r for r in routes if r.get("dev") == "eth0"]


@pytest.fixture
def ra_lab(tmp_path):
    """The lab, with eth0's IPv6 default route learned from router advertisements; fails the test
    if the host's state (RA route included) is not what it was once nswrap is gone."""
    require_system()
    lab = Lab()
    try:
        lab.exec(lab.host, ["ip", "-6", "route", "del", "::/0", "via", "fe80::1", "dev", "eth0"])
        conf = tmp_path / "radvd.conf"
        conf.write_text(RADVD_CONF)
        radvd = lab.spawn(lab.ns("r1"), ["radvd", "-n", "-C", str(conf), "-p", str(tmp_path / "radvd.pid"),
                                         "-m", "stderr", "-u", "root"],
                          stdout=(tmp_path / "radvd.out").open("w"), stderr=(tmp_path / "radvd.err").open("w"))
        wait_until(lambda: ra_default(lab), 30, interval=0.2, what="eth0's default route from router advertisements")
        lab.exec(lab.ns("r1"), ["nft", "-f", "-"], input=R1_COUNTER)
        cookie = lab.netns_cookie(lab.host)
        before = lab.state()
        yield lab
        assert radvd.poll() is None, (tmp_path / "radvd.err").read_text()
        changes = diff_states(before, lab.state())
        assert not changes, f"host namespace state not restored:\n{changes}"
        assert ra_default(lab), "eth0's RA default route is gone"
        assert not nswrap_state_left(cookie), f"nswrap's state left behind: {nswrap_state_left(cookie)}"
    finally:
        lab.close()


def routed_by_host(lab: Lab, count: int = 20) -> int:
    """c3 asks the host to route `count` datagrams to c1: how many reached r1 (the next hop)."""
    def seen() -> int:
        out = lab.exec(lab.ns("r1"), ["nft", "-j", "list", "counter", "inet", "probe", "routed"]).stdout
        return next(item["counter"]["packets"] for item in json.loads(out)["nftables"] if "counter" in item)

    first = seen()
    lab.exec(lab.ns("c3"), [sys.executable, "-c", PEER_PROBE, str(count)])
    # a probe of our own that must arrive, so that "none routed" is not "not yet"
    lab.exec(lab.ns("r1"), [sys.executable, "-c", "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
                            "s.sendto(b'x', ('2001:db8:1::10', 9))"], check=False)
    return seen() - first


def start_global(lab: Lab, tmp_path, name: str, port: int, *more: str):
    env = {**os.environ, **OLD_KERNEL}
    proc = start(lab, tmp_path, "--ipv6-forwarding", "global", *more, "--ports", f"{port},{port}/tcp", "--",
                 *dual_stack_unbound(tmp_path / name, port), name=name, env=env)
    return proc


def answering(lab: Lab, proc, tmp_path, name: str, port: int = 53) -> None:
    """Until the server answers on eth1's IPv6 address (or nswrap exits, which fails the test)."""
    path = lab.paths6[2]
    argv = ["dig", f"@{path.address}", "-p", str(port), "test.example", "+short", "+tries=1", "+time=1"]
    wait_until(lambda: proc.poll() is not None or lab.exec(path.client, argv, check=False).stdout.strip() == TEST_ANSWER,
               30, what=f"{name}: an answer over IPv6")
    assert proc.poll() is None, output(tmp_path, name, stream="err")


def every_path_answers(lab: Lab, port_note: str = "") -> None:
    for path in (*lab.paths, *lab.paths6):
        assert wait_answered(lab, path) == TEST_ANSWER, f"{path.name}{port_note}"
        assert dig(lab, path, tcp=True) == TEST_ANSWER, f"{path.name} over TCP{port_note}"


def kill_hard(proc, marker) -> None:
    """SIGKILL nswrap; its server dies with it (PR_SET_PDEATHSIG, then its PID namespace)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    wait_until(lambda: not processes_running(str(marker), "unbound"), 10, what="the server dies with nswrap")


def sysctl(lab: Lab, path: str) -> str:
    return lab.exec(lab.host, ["cat", path]).stdout.strip()


@pytest.fixture
def dirs(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_global_serves_every_path_keeps_ra_routes_and_routes_nothing_else(ra_lab, dirs):
    lab = ra_lab
    proc = start_global(lab, dirs, "a", 53)
    answering(lab, proc, dirs, "a")
    assert sysctl(lab, FORWARD6) == "1"
    assert sysctl(lab, "/proc/sys/net/ipv6/conf/eth0/accept_ra") == "2"
    assert ra_default(lab), "the RA default route was purged when forwarding went on"
    every_path_answers(lab)
    assert routed_by_host(lab) == 0, "the host routed a LAN peer's IPv6 while nswrap held the switch"
    listed = nswrap(lab, "list").stdout
    assert "nswrap holds net.ipv6.conf.all.forwarding=1" in listed, listed
    assert ra_default(lab), "the RA default route did not survive serving"
    assert lab.stop(proc) == 0, output(dirs, "a", stream="err")
    assert sysctl(lab, FORWARD6) == "0"


def test_two_instances_the_first_stops_first(ra_lab, dirs):
    lab = ra_lab
    first = start_global(lab, dirs, "a", 53)
    answering(lab, first, dirs, "a")
    second = start_global(lab, dirs, "b", 5353)
    answering(lab, second, dirs, "b", 5353)
    assert lab.stop(first) == 0, output(dirs, "a", stream="err")
    assert sysctl(lab, FORWARD6) == "1", "the switch went off while an instance needs it"
    for path in lab.paths6:
        out = lab.exec(path.client, ["dig", f"@{path.address}", "-p", "5353", "test.example", "+short", "+tries=3",
                                     "+time=2"], check=False).stdout.strip()
        assert out == TEST_ANSWER, path.name
    assert routed_by_host(lab) == 0
    assert lab.stop(second) == 0, output(dirs, "b", stream="err")


def test_kill_9_then_the_next_start_then_cleanup(ra_lab, dirs):
    lab = ra_lab
    first = start_global(lab, dirs, "a", 53)
    answering(lab, first, dirs, "a")
    kill_hard(first, dirs / "a")
    assert sysctl(lab, FORWARD6) == "1"  # left as it was: the next start or cleanup takes it over
    second = start_global(lab, dirs, "b", 53)
    answering(lab, second, dirs, "b")
    assert routed_by_host(lab) == 0
    kill_hard(second, dirs / "b")
    done = nswrap(lab, "cleanup")
    assert done.returncode == 0, done.stderr
    assert sysctl(lab, FORWARD6) == "0"


def test_a_flush_while_serving_is_healed_and_routes_nothing_meanwhile(ra_lab, dirs):
    lab = ra_lab
    proc = start_global(lab, dirs, "a", 53)
    answering(lab, proc, dirs, "a")
    lab.exec(lab.host, ["nft", "flush", "ruleset"])
    wait_until(lambda: "putting it back" in output(dirs, "a", stream="err"), 10, what="nswrap puts its table back")
    wait_until(lambda: json.loads(lab.exec(lab.host, ["nft", "-j", "list", "set", "inet", "nswrap", "held"], check=False)
                                  .stdout or '{"nftables": []}')["nftables"][1:2] != [] and sysctl(lab, FORWARD6) == "1",
               10, what="the guard and the switch are back")
    assert routed_by_host(lab) == 0
    every_path_answers(lab)
    assert lab.stop(proc) == 0, output(dirs, "a", stream="err")


def test_the_control_a_host_that_forwards_routes_the_peer(lab):
    """What `routed_by_host` would see if the guard did not hold: the peer's datagrams reach r1."""
    lab.exec(lab.ns("r1"), ["nft", "-f", "-"], input=R1_COUNTER)
    lab.sysctl(lab.host, {"net.ipv6.conf.all.forwarding": "1"})
    try:
        assert routed_by_host(lab, 5) == 5
    finally:
        lab.sysctl(lab.host, {"net.ipv6.conf.all.forwarding": "0"})
        lab.exec(lab.ns("r1"), ["nft", "delete", "table", "inet", "probe"])


@pytest.mark.nft_only("the fast path serves IPv6 on an old kernel without forwarding (test_fastpath)")
def test_auto_on_an_old_kernel_warns_and_serves_ipv4_and_doctor_says_why(lab, tmp_path):
    env = {**os.environ, **OLD_KERNEL}
    proc = start(lab, tmp_path, "--ports", "53", "--", *dual_stack_unbound(tmp_path, 53), env=env)
    wait_answered(lab, lab.paths[2])
    err = output(tmp_path, stream="err")
    warnings = [line for line in err.splitlines() if "IPv6 clients are not served" in line]
    assert len(warnings) == 1 and "--ipv6-forwarding global" in warnings[0], err
    assert lab.exec(lab.host, ["cat", FORWARD6]).stdout.strip() == "0"
    assert lab.stop(proc) == 0
    done = lab.exec(lab.host, ["env", "NSWRAP_TEST_NO_FORCE_FORWARDING=1", *NSWRAP, "doctor"], check=False, timeout=60)
    line = next(line for line in done.stdout.splitlines() if "IPv6 forwarding" in line)
    assert "no per-interface IPv6 forwarding" in line and "--ipv6-forwarding global" in line, done.stdout
    done = lab.exec(lab.host, ["env", "NSWRAP_TEST_NO_FORCE_FORWARDING=1", *NSWRAP, "doctor", "--ipv6-forwarding",
                               "global"], check=False, timeout=60)
    line = next(line for line in done.stdout.splitlines() if "IPv6 forwarding" in line)
    assert "nswrap turns net.ipv6.conf.all.forwarding on while it runs" in line, done.stdout


def test_interface_on_an_old_kernel_and_an_unknown_mode_are_refused(lab, tmp_path):
    done = lab.exec(lab.host, ["env", "NSWRAP_TEST_NO_FORCE_FORWARDING=1", *NSWRAP, "--ipv6-forwarding", "interface",
                               "--ports", "53", "--", "true"], check=False, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "no per-interface IPv6 forwarding" in done.stderr, done.stderr
    done = nswrap(lab, "--ipv6-forwarding", "sometimes", "--ports", "53", "--", "true")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "sometimes" in done.stderr, done.stderr


def test_an_interface_put_back_to_accept_ra_1_while_held_gets_2_again(ra_lab, dirs):
    """No event says accept_ra changed: the follower looks every couple of seconds."""
    lab = ra_lab
    proc = start_global(lab, dirs, "a", 53)
    answering(lab, proc, dirs, "a")
    lab.sysctl(lab.host, {"net.ipv6.conf.eth0.accept_ra": "1"})
    wait_until(lambda: sysctl(lab, "/proc/sys/net/ipv6/conf/eth0/accept_ra") == "2", 10, interval=0.1,
               what="nswrap sets accept_ra=2 again")
    assert ra_default(lab)
    assert lab.stop(proc) == 0, output(dirs, "a", stream="err")


RA_SENDER = r"""
import socket, struct, subprocess, sys, time
subprocess.run(["ip", "-6", "addr", "add", "fe80::bad/64", "dev", "eth0", "nodad"], check=True)
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
index = socket.if_nametoindex("eth0")
s.bind(("fe80::bad", 0, 0, index))
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0x08, 1800, 0, 0)  # preference high, router lifetime 1800 s
prefix = struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + socket.inet_pton(socket.AF_INET6, "2001:db8:66::")
redirect = struct.pack("!BBHI", 137, 0, 0, 0) + socket.inet_pton(socket.AF_INET6, "fe80::bad") \
    + socket.inet_pton(socket.AF_INET6, "2001:db8:a::2")
print("ready", flush=True)
for _ in range(5):  # bounded
    s.sendto(ra + prefix, ("ff02::1", 0, 0, index))
    s.sendto(redirect, ("ff02::1", 0, 0, index))
print("sent", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("mode", ["auto", "off", "global"])
def test_a_server_cannot_advertise_itself_as_the_hosts_router(lab, tmp_path, mode):
    """Found by a hostile review: a server's router advertisement (preference high, a prefix)
    became the host's IPv6 default route through the server's veth, with a SLAAC address there,
    whatever the mode (an IPv4-only instance's veth too)."""
    env = {**os.environ, **(OLD_KERNEL if mode == "global" else {})}
    proc = start(lab, tmp_path, "--ipv6-forwarding", mode, "--ports", "5300", "--", sys.executable, "-c", RA_SENDER,
                 env=env)
    wait_until(lambda: "sent" in output(tmp_path) or proc.poll() is not None, 30, what="the server sent its RAs")
    assert proc.poll() is None, output(tmp_path, stream="err")
    routes = json.loads(lab.exec(lab.host, ["ip", "-json", "-6", "route", "show", "table", "all"]).stdout)
    assert not [r for r in routes if r.get("dev", "").startswith("nsw-") and r.get("dst") in ("default", "2001:db8:66::/64")]
    addresses = json.loads(lab.exec(lab.host, ["ip", "-json", "-6", "addr"]).stdout)
    assert not [a for link in addresses if link["ifname"].startswith("nsw-") for a in link["addr_info"]
                if a["local"].startswith("2001:db8:66:")]
    got = lab.exec(lab.host, ["ip", "-6", "route", "get", "2001:db8:a::2"]).stdout
    assert "nsw-" not in got, got
    assert lab.stop(proc) == 128 + signal.SIGTERM


def test_a_flushed_guard_set_routes_nothing_and_is_put_back(ra_lab, dirs):
    """Found by a hostile review: after `nft flush set inet nswrap held`, a LAN peer's IPv6 was
    routed for as long as nswrap ran (element deletions were all taken for other instances')."""
    lab = ra_lab
    proc = start_global(lab, dirs, "a", 53)
    answering(lab, proc, dirs, "a")
    for name in ("held", "guarded6", "guarded4"):
        lab.exec(lab.host, ["nft", "flush", "set", "inet", "nswrap", name])
        assert routed_by_host(lab) == 0, f"routed after a flush of {name}"
    wait_until(lambda: '"ipv6"' in lab.exec(lab.host, ["nft", "-j", "list", "set", "inet", "nswrap", "held"]).stdout,
               5, what="the held set is put back")
    assert "guard lost elements" in output(dirs, "a", stream="err")
    assert routed_by_host(lab) == 0
    answering(lab, proc, dirs, "a")
    assert lab.stop(proc) == 0, output(dirs, "a", stream="err")
