"""A running instance follows the host: gateways and uplinks that come and go, a rule another tool
deletes, a write to net.ipv4.ip_forward; `nswrap list --json` flows; `nswrap exec`.

One scenario per test. Each starts a UDP echo server under nswrap (the `serving` fixture), changes
the host while it serves, and registers the undo of its change with the `undo` fixture, which
runs it whatever happened, before the `lab` fixture compares the whole host with how it was.

Clients "far" from an uplink send from an extra address on their own loopback, so their answer
must be routed through that uplink's gateway: it comes back only if nswrap's table for that uplink
has the gateway. Strict rp_filter and the ISP routers' anti-spoofing drop anything else.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Callable

import pytest

from tests.lab import wait_until
from tests.system.common import UDPECHO, echo_answered, nswrap, output, start, wait_ready

PORT = 5353
SIGTERM_STATUS = 128 + signal.SIGTERM


def answered(lab, client, address, source=None) -> bool:
    return echo_answered(lab, client, address, PORT, source=source)


def sh(lab, ns, script) -> None:
    lab.exec(ns, ["sh", "-ec", script])


def stderr_of(tmp_path) -> str:
    return output(tmp_path, stream="err")


def listed(lab) -> list[dict]:
    done = nswrap(lab, "list", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["instances"]


def our_rules(lab, family: int = 4) -> list[dict]:
    rules = json.loads(lab.exec(lab.host, ["ip", "-json", f"-{family}", "rule", "show"]).stdout)
    return [r for r in rules if str(r.get("protocol")) == "110"]


def fwmark_rule_of(lab, uplink: str, family: int = 4) -> dict | None:
    """nswrap's fwmark rule whose table routes through `uplink` (read from the kernel)."""
    routes = json.loads(lab.exec(lab.host, ["ip", "-json", f"-{family}", "route", "show", "table", "all"]).stdout)
    for rule in our_rules(lab, family):
        if "fwmark" in rule and {r["dev"] for r in routes if str(r.get("table")) == str(rule["table"])} == {uplink}:
            return rule
    return None


def forwarding(lab, ifname: str) -> str:
    return lab.exec(lab.host, ["cat", f"/proc/sys/net/ipv4/conf/{ifname}/forwarding"]).stdout.strip()


def gone(lab, role: str, uplink: str) -> None:
    """Delete `role`'s namespace and wait until the kernel has dismantled it: its veth's host end
    `uplink` goes with it, but only once the namespace's cleanup (a kernel work item) ran."""
    lab.delete_namespace(role)
    links = lambda: [link["ifname"] for link in json.loads(lab.exec(lab.host, ["ip", "-json", "link"]).stdout)]  # noqa: E731
    wait_until(lambda: uplink not in links(), 10, what=f"{uplink} is gone with {role}")


@pytest.fixture
def serving(lab, tmp_path):
    """nswrap publishing PORT for a UDP echo server, which listens (its stderr: stderr_of(tmp_path)).

    The test stops it (and checks its status); if the test fails first, the lab stops it."""
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", *UDPECHO, "serve", str(PORT))
    wait_ready(tmp_path)
    return proc


@pytest.fixture
def undo(lab):
    """undo(fn): call fn() at teardown, newest first, whatever the test did (one failing undo
    does not skip the others); then the lab compares the host with how it was."""
    undos: list[Callable[[], object]] = []
    yield undos.append
    errors = []
    for fn in reversed(undos):
        try:
            fn()
        except Exception as e:
            errors.append(e)
    if errors:
        raise ExceptionGroup("undoing the test's host changes", errors)


def test_a_default_route_that_appears_on_an_uplink_is_followed(lab, tmp_path, serving, undo):
    """eth2 has no gateway: a far client behind c3 is not served, until a default route appears."""
    c3, host = lab.ns("c3"), lab.host
    # c3 routes for the far address: it must ARP as a router does, with its own address
    sh(lab, c3, "ip addr add 203.0.113.200/32 dev lo; sysctl -qw net.ipv4.conf.eth0.arp_announce=2")
    undo(lambda: sh(lab, c3, "ip addr del 203.0.113.200/32 dev lo; sysctl -qw net.ipv4.conf.eth0.arp_announce=0"))
    assert not answered(lab, c3, "203.0.113.65", source="203.0.113.200")

    sh(lab, host, "ip route add default via 203.0.113.66 dev eth2 metric 300")
    undo(lambda: sh(lab, host, "ip route del default via 203.0.113.66 dev eth2 metric 300"))
    began = time.monotonic()
    wait_until(lambda: answered(lab, c3, "203.0.113.65", source="203.0.113.200"), 10, what="eth2's new gateway followed")
    print(f"eth2's new gateway served after {time.monotonic() - began:.2f} s")  # pytest -s shows it
    assert answered(lab, lab.paths[2].client, "198.51.100.10"), "other uplinks undisturbed"
    (row,) = listed(lab)
    assert {u["name"]: u["gateways"] for u in row["uplinks"]}["eth2"] == ["203.0.113.66"]
    assert lab.stop(serving) == SIGTERM_STATUS


def test_an_uplink_that_comes_up_is_followed(lab, tmp_path, serving, undo):
    """A new uplink eth3 appears, with an address and a gateway: its far client is served."""
    host = lab.host
    c4 = lab.add_namespace("c4")  # the new uplink's peer
    undo(lambda: gone(lab, "c4", "eth3"))
    sh(lab, host, f"ip link add eth3 type veth peer name eth0 netns {c4}")
    sh(lab, c4, "sysctl -qw net.ipv4.conf.all.arp_announce=2; ip link set lo up; ip link set eth0 up;"
                " ip addr add 203.0.113.226/28 dev eth0; ip addr add 203.0.113.250/32 dev lo;"
                " ip route add default via 203.0.113.225")
    sh(lab, host, "ip link set eth3 up; ip addr add 203.0.113.225/28 dev eth3;"
                  " ip route add default via 203.0.113.226 dev eth3 metric 400")
    wait_until(lambda: answered(lab, c4, "203.0.113.225", source="203.0.113.250"), 10, what="new uplink eth3 served")
    assert answered(lab, lab.paths[2].client, "198.51.100.10"), "other uplinks undisturbed"
    assert len([r for r in our_rules(lab) if "fwmark" in r]) == 4, "one more uplink: one more mark and fwmark rule"
    assert lab.stop(serving) == SIGTERM_STATUS


def test_an_uplink_that_loses_its_address_is_dropped_and_comes_back(lab, tmp_path, serving, undo):
    """eth1 loses its IPv4 address: nswrap drops it for IPv4 (its fwmark rule, its forwarding), keeps
    it for IPv6, the other uplinks keep answering; and once the address is back, so is eth1."""
    host = lab.host
    assert fwmark_rule_of(lab, "eth1") and forwarding(lab, "eth1") == "1"
    ipv6_rule = fwmark_rule_of(lab, "eth1", 6)
    sh(lab, host, "ip addr del 198.51.100.10/24 dev eth1")  # its default route goes with it
    undo(lambda: sh(lab, host, "ip addr replace 198.51.100.10/24 dev eth1;"
                               " ip route replace default via 198.51.100.1 dev eth1 metric 200"))
    wait_until(lambda: fwmark_rule_of(lab, "eth1") is None and forwarding(lab, "eth1") == "0", 10,
               what="eth1 dropped for IPv4")
    assert fwmark_rule_of(lab, "eth1", 6) == ipv6_rule, "eth1 still serves IPv6"
    assert answered(lab, lab.paths[0].client, "192.0.2.10"), "the other uplinks keep answering"

    sh(lab, host, "ip addr add 198.51.100.10/24 dev eth1; ip route add default via 198.51.100.1 dev eth1 metric 200")
    wait_until(lambda: answered(lab, lab.paths[2].client, "198.51.100.10"), 10, what="eth1 served again")
    assert fwmark_rule_of(lab, "eth1") and forwarding(lab, "eth1") == "1"
    assert lab.stop(serving) == SIGTERM_STATUS


def test_a_deleted_fwmark_rule_is_put_back(lab, tmp_path, serving):
    """Another tool (systemd-networkd, say) deletes one of nswrap's fwmark rules: it is put back,
    exactly, and nswrap says so."""
    rule = next(r for r in our_rules(lab) if "fwmark" in r)
    spec = ["priority", str(rule["priority"]), "fwmark", f"{rule['fwmark']}/{rule['fwmask']}", "lookup", str(rule["table"])]
    lab.exec(lab.host, ["ip", "rule", "del", *spec])
    assert rule not in our_rules(lab)
    wait_until(lambda: rule in our_rules(lab), 10, what="deleted rule put back")
    said = f"following the host: ip rule add fwmark {rule['fwmark']}/{rule['fwmask']} lookup {rule['table']}"
    wait_until(lambda: said in stderr_of(tmp_path), 10, what=f"nswrap says {said!r}")
    assert answered(lab, lab.paths[0].client, "192.0.2.10")
    assert lab.stop(serving) == SIGTERM_STATUS


def server_veth(lab) -> str:
    (veth,) = [link["ifname"] for link in json.loads(lab.exec(lab.host, ["ip", "-json", "link"]).stdout)
               if link["ifname"].startswith("nsw-")]
    return veth


# nswrap bug (reported): the veth's own forwarding=1 (set once by changes.ServerNetwork) is not
# among the sysctls the follower keeps (datapath.wanted_sysctls: uplinks only), and follow.classify
# ignores netconf events of nswrap's own links: after a write to net.ipv4.ip_forward the server's
# replies, which enter the host on that veth, are no longer forwarded.
def test_a_write_to_ip_forward_is_repaired(lab, tmp_path, serving):
    """Writing net.ipv4.ip_forward rewrites every interface's forwarding, nswrap's veth's too:
    nswrap puts its per-interface settings back (the global switch stays as the writer left it)."""
    ours = ["eth0", "eth1", "eth2", server_veth(lab)]
    assert [forwarding(lab, ifname) for ifname in ours] == ["1"] * 4
    sh(lab, lab.host, "sysctl -qw net.ipv4.ip_forward=1; sysctl -qw net.ipv4.ip_forward=0")
    wait_until(lambda: [forwarding(lab, ifname) for ifname in ours] == ["1"] * 4, 10,
               what=f"forwarding put back on {', '.join(ours)}")
    assert answered(lab, lab.paths[2].client, "198.51.100.10")
    assert forwarding(lab, "all") == "0" and lab.exec(lab.host, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
    assert lab.stop(serving) == SIGTERM_STATUS


@pytest.mark.nft_only("counts conntrack's entries, which the fast path's flows do not make")
def test_list_counts_flows_per_uplink(lab, tmp_path, serving):
    """`nswrap list --json`: per uplink the flows started (first packets) and the live flows."""
    flows = {"eth0": 2, "eth1": 3}  # each `count` is one flow (one socket) of 3 datagrams
    for path in (lab.paths[0], lab.paths[2]):
        for _ in range(flows[path.uplink]):
            done = lab.exec(path.client, [*UDPECHO, "count", path.address, str(PORT), "3"], check=False)
            assert done.returncode == 0, path.name
    listed_json = json.loads(nswrap(lab, "list", "--json").stdout)
    (row,) = listed_json["instances"]
    uplinks = {u["name"]: u for u in row["uplinks"]}
    expected = {**flows, "eth2": 0}
    assert {name: u["flows_started"] for name, u in uplinks.items()} == expected
    assert {name: u["flows"] for name, u in uplinks.items()} == expected
    assert row["flows_counted"] is True and row["local_flows_started"] == 0
    assert uplinks["eth1"]["gateways"] == ["198.51.100.1", "2001:db8:2::1"] and "198.51.100.10/24" in uplinks["eth1"]["addresses"]
    assert listed_json["conntrack"]["count"] >= sum(flows.values()) and listed_json["conntrack"]["max"] > 0
    human = nswrap(lab, "list").stdout
    assert row["id"] in human and "eth1" in human and "flows: " in human and " started " in human
    assert lab.stop(serving) == SIGTERM_STATUS
    assert nswrap(lab, "list").stdout.strip() == "no nswrap instances in this network namespace"


def test_exec_runs_a_command_in_the_server_namespace(lab, tmp_path, serving):
    (row,) = listed(lab)
    inside = json.loads(nswrap(lab, "exec", row["id"], "--", "ip", "-json", "addr", "show").stdout)
    assert sorted(link["ifname"] for link in inside) == ["eth0", "lo"]
    assert nswrap(lab, "exec", row["id"], "--", "sh", "-c", "exit 7").returncode == 7
    missing = nswrap(lab, "exec", secrets.token_hex(3), "--", "true")
    assert missing.returncode == 125 and "no live nswrap instance" in missing.stderr
    assert lab.stop(serving) == SIGTERM_STATUS
