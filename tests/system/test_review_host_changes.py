"""Review (issue 12): a busy host changes things under a serving nswrap.

- An uplink renamed while serving keeps the forwarding and src_valid_mark nswrap turned on, for
  good: the allocation forgets the old name's originals, and under the new name the values are
  "already as needed", so nothing is recorded and nothing restored. The host forwards on that
  interface after nswrap has exited (and `nswrap cleanup` sees nothing to do).
- `src_valid_mark` reset by another tool is never put back (no netconf event carries it): strict
  reverse-path filtering then drops that uplink's clients.
- An admin who turns on `net.ipv4.ip_forward` while nswrap serves gets the uplinks' forwarding
  turned off again when nswrap stops (README: restored "unless something else changed it since").
- An uplink whose default route has an `onlink` gateway (a /32 address, as many VPS providers set
  up) cannot be served at all: nswrap copies the route without `onlink` and exits 125.
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest

from tests.lab import Lab, wait_until
from tests.system.common import nswrap, output, start
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

PORT = 7321


def sysctl(lab, key: str) -> str:
    return lab.exec(lab.host, ["cat", f"/proc/sys/{key.replace('.', '/')}"]).stdout.strip()


def serving(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", *UDPMANY, "serve", "--tag", str(tmp_path), str(PORT))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    return proc


@pytest.fixture
def own_lab():
    """A lab of this test's own: renaming an uplink cannot be undone exactly enough (routes come
    back in another order) for the `lab` fixture's before/after comparison."""
    lab = Lab()
    cookie = lab.netns_cookie(lab.host)
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(f"/run/nswrap/c{cookie}", ignore_errors=True)


def test_a_renamed_uplink_gets_its_sysctls_back(own_lab, tmp_path):
    lab = own_lab
    keys = ("net.ipv4.conf.{}.forwarding", "net.ipv4.conf.{}.src_valid_mark")
    before = {k: sysctl(lab, k.format("eth1")) for k in keys}
    assert set(before.values()) == {"0"}
    proc = serving(lab, tmp_path)
    try:
        lab.exec(lab.host, ["sh", "-c", "ip link set eth1 down && ip link set eth1 name wan1 && ip link set wan1 up && "
                            "ip route add default via 198.51.100.1 dev wan1 metric 200"])
        wait_until(lambda: "dev wan1" in output(tmp_path, stream="err"), 10, what="nswrap follows the rename")
        assert unanswered(lab, (lab.paths[2],), [PORT]) == []  # it serves wan1 as it served eth1
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM
    assert nswrap(lab, "cleanup").returncode == 0
    after = {k: sysctl(lab, k.format("wan1")) for k in keys}
    assert after == before, f"after nswrap exited, the renamed uplink has {after} (before: {before})"


def test_src_valid_mark_reset_by_another_tool_is_put_back(lab, tmp_path):
    proc = serving(lab, tmp_path)
    try:
        assert unanswered(lab, (lab.paths[2],), [PORT]) == []
        lab.exec(lab.host, ["sysctl", "-qw", "net.ipv4.conf.eth1.src_valid_mark=0"])
        # no event announces it: nswrap reads it every follow.POLL seconds (the bound is a hang guard)
        wait_until(lambda: sysctl(lab, "net.ipv4.conf.eth1.src_valid_mark") == "1", 30, interval=0.05,
                   what="src_valid_mark put back")
        assert unanswered(lab, (lab.paths[2],), [PORT]) == []
    finally:
        lab.exec(lab.host, ["sysctl", "-qw", "net.ipv4.conf.eth1.src_valid_mark=1"])  # as nswrap had it
        assert lab.stop(proc) == 128 + signal.SIGTERM


def test_forwarding_the_admin_turned_on_meanwhile_stays_on(lab, tmp_path):
    proc = serving(lab, tmp_path)
    try:
        lab.exec(lab.host, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])  # the admin makes the host a router
        time.sleep(1)
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM
    try:
        left = {i: sysctl(lab, f"net.ipv4.conf.{i}.forwarding") for i in ("eth0", "eth1", "eth2")}
        assert sysctl(lab, "net.ipv4.ip_forward") == "1"
        assert set(left.values()) == {"1"}, f"ip_forward is 1, yet nswrap turned the uplinks' forwarding off: {left}"
    finally:
        lab.exec(lab.host, ["sysctl", "-qw", "net.ipv4.ip_forward=0"])  # every interface back to 0


# Loose reverse-path filtering (Debian's and Ubuntu's default) while eth1 has a /32: under the lab's
# strict setting the host would drop the gateway's ARP requests (198.51.100.1 routes via eth0), with
# or without nswrap.
ONLINK = ("sysctl -qw net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.eth1.rp_filter=2 && "
          "ip route del default via 198.51.100.1 dev eth1 && ip addr del 198.51.100.10/24 dev eth1 && "
          "ip addr add 198.51.100.10/32 dev eth1 && ip route add default via 198.51.100.1 dev eth1 metric 200 onlink")
BACK = ("ip route del default via 198.51.100.1 dev eth1; ip addr del 198.51.100.10/32 dev eth1; "
        "ip addr add 198.51.100.10/24 dev eth1 && ip route add default via 198.51.100.1 dev eth1 metric 200; "
        "sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.eth1.rp_filter=1")


def test_an_uplink_with_an_onlink_gateway_is_served(lab, tmp_path):
    lab.exec(lab.host, ["sh", "-c", ONLINK])
    try:
        proc = start(lab, tmp_path, "--ports", str(PORT), "--", *UDPMANY, "serve", "--tag", str(tmp_path), str(PORT))
        wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
        try:
            assert proc.poll() is None, output(tmp_path, stream="err")
            assert unanswered(lab, (lab.paths[2],), [PORT]) == []
        finally:
            lab.stop(proc)
    finally:
        lab.exec(lab.host, ["sh", "-c", BACK])
