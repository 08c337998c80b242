"""An instance's life (instance.Life) start -> follow -> stop against the fake kernel, no root.

After each step the fake must hold what sync.plan says the live instances need (planning again
asks for nothing, and routes, rules, sysctls and the table are the datapath's); after stop it
must be the host it was before start: sysctls restored, rules, routes, veth and table gone.
"""

from __future__ import annotations

import ipaddress
import logging
import os

import pytest

from nswrap import follow, netlink, nft, ruleset, sync
from nswrap.config import DEFAULT_MARK_MASK, Config, parse_ports
from nswrap.datatypes import replace
from nswrap.facts import gather
from nswrap.follow import Follower
from nswrap.instance import Life
from nswrap.objects import PROTO, Address, Link, Route
from nswrap.supervise import Supervisor
from tests.unit.fakekernel import FailClosed, FakeKernel, flow, install
from tests.unit.hosts import IF, A, N

BOOT = 3


class StubSupervisor(Supervisor):
    """The server is never started: its init is this process (whose namespace nothing enters),
    which is never signalled: signals and kills are recorded."""

    def start(self, command, netns_fd, env, creds) -> None:
        self.init_pid = os.getpid()
        self.env = env
        self.sent: list[int] = []

    def kill(self, signum: int = 15) -> None:
        self.sent.append(signum)

    def _on_signal(self, signum: int, frame) -> None:
        raise AssertionError("a unit test must not forward signals from a stub supervisor")

    def wait(self, fds=None, on_ready=None, report=True) -> int:
        return 0


@pytest.fixture
def kernel(monkeypatch, tmp_path) -> FakeKernel:
    return install(monkeypatch, tmp_path)


def config(ports: str = "53,53/tcp", **kw) -> Config:
    return Config(command=("true",), ports=parse_ports([ports]), **kw)


def planned(life: Life) -> sync.Plan:
    """What the live instances need, planned on what the fake holds now."""
    with netlink.Routing() as routing:
        facts = gather(routing)
    live = tuple(r.instance for r in life.state.live())
    return sync.plan(facts, nft.read_table(), life.state.allocation(), live, DEFAULT_MARK_MASK)


def assert_holds_the_plan(kernel: FakeKernel, life: Life) -> None:
    plan = planned(life)
    assert [c.render() for c in plan.changes] == []
    dp = plan.datapath
    assert {r for r in kernel.routes if r.proto == PROTO} == dp.routes
    assert {r for r in kernel.rules if r.proto == PROTO} == dp.rules
    assert {k: kernel.sysctl(k) for k in dp.sysctls} == dp.sysctls
    assert kernel.table is not None
    assert {k: v for k, v in kernel.table.elements.items() if v} == {k: v for k, v in dp.elements.items() if v}
    assert kernel.table.rules == ruleset.expected_chains(dp)
    assert kernel.table.version == ruleset.version(DEFAULT_MARK_MASK, dp.udp_timeout)


def started(kernel: FakeKernel, cfg: Config | None = None) -> Life:
    life = Life(cfg or config(), StubSupervisor())
    life.start()
    return life


def test_start_follow_stop_leaves_the_host_as_it_was(kernel):
    before = kernel.snapshot()
    life = started(kernel)
    veth = life.instance.veth
    assert veth in kernel.links and kernel.sysctl(f"net/ipv4/conf/{veth}/forwarding") == "1"
    assert kernel.sysctl(f"net/ipv6/conf/{veth}/accept_ra") == "0"
    assert kernel.server is not None and "eth0" in kernel.server.links
    assert kernel.server.routes and all(r.dev == "eth0" for r in kernel.server.routes)
    assert_holds_the_plan(kernel, life)
    assert kernel.snapshot() != before

    # a host change: eth1's gateway moves
    kernel.delete_route(Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), metric=200, proto=BOOT))
    kernel.add_route(Route(N("0.0.0.0/0"), "eth1", A("198.51.100.254"), metric=200, proto=BOOT))
    life.follower.follow("host")
    assert_holds_the_plan(kernel, life)
    assert any(r.gateway == A("198.51.100.254") for r in kernel.routes if r.proto == PROTO)

    # a new uplink comes, with an address and a gateway
    kernel.add_link(Link(0, "eth3"))
    kernel.add_address(Address("eth3", IF("100.64.0.2/24")))
    kernel.add_route(Route(N("0.0.0.0/0"), "eth3", A("100.64.0.1"), metric=300, proto=BOOT))
    life.follower.follow("host")
    assert_holds_the_plan(kernel, life)
    assert kernel.sysctl("net/ipv4/conf/eth3/forwarding") == "1"

    life.stop()
    kernel.delete_link("eth3")  # the host's own change, undone by the host
    kernel.delete_route(Route(N("0.0.0.0/0"), "eth1", A("198.51.100.254"), metric=200, proto=BOOT))
    kernel.add_route(Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), metric=200, proto=BOOT))
    assert kernel.snapshot() == before
    assert not os.listdir(kernel.run_dir)  # the last instance retires the state directory


def test_a_plain_start_and_stop_is_exactly_undone(kernel):
    before = kernel.snapshot()
    life = started(kernel)
    life.stop()
    assert kernel.snapshot() == before


def test_a_deleted_table_fails_closed_first_then_is_put_back(kernel, caplog):
    life = started(kernel)
    turned_on = [k for k, v in kernel.sysctls().items() if k.endswith("/forwarding") and v == "1" and "nsw-" not in k]
    assert turned_on
    kernel.delete_table()
    kernel.log.clear()
    with caplog.at_level(logging.WARNING, "nswrap"):
        life.follower.follow("table")
    assert "nswrap's nft table was flushed or deleted" in caplog.text
    assert_holds_the_plan(kernel, life)
    # forwarding went off before the table came back, and on again only after
    rebuilt = kernel.log.index("nft add table inet nswrap")
    for key in turned_on:
        assert kernel.log.index(f"sysctl {key}=0") < rebuilt < kernel.log.index(f"sysctl {key}=1")
    life.stop()


def test_a_table_that_cannot_be_put_back_stops_nswrap_with_forwarding_restored(kernel):
    life = started(kernel)
    kernel.delete_table()
    kernel.fail_nft = "add table inet nswrap"
    with pytest.raises(FailClosed, match="could not put back nswrap's nft table.*forwarding restored"):
        life.follower.follow("table")
    assert kernel.sysctl("net/ipv4/conf/eth0/forwarding") == "0"
    kernel.fail_nft = None
    life.stop()


def test_a_flushed_guard_set_is_put_back(kernel, caplog):
    life = started(kernel)
    kernel.flush_set("guarded4")
    with caplog.at_level(logging.WARNING, "nswrap"):
        life.follower.follow("host")
    assert "nswrap's guard lost elements (set guarded4" in caplog.text
    assert_holds_the_plan(kernel, life)
    life.stop()


def frozen_clock(monkeypatch) -> list[float]:
    """follow.py's clock, stopped at 100 s: the test moves it (now[0] += ...)."""
    now = [100.0]
    monkeypatch.setattr(follow, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    return now


def test_the_follower_sees_the_hosts_changes_not_its_own(kernel, monkeypatch):
    now = frozen_clock(monkeypatch)
    life = started(kernel)
    follower = life.follower
    assert isinstance(follower, Follower)
    followed: list[str] = []
    monkeypatch.setattr(follower, "follow", followed.append)
    follower.on_ready([])  # the start's own events: nothing to do
    assert followed == [] and not follower.reasons
    kernel.add_address(Address("eth0", IF("192.0.2.12/24"), 0), connected=False)
    wait = follower.on_ready(follower.filenos())
    assert followed == [] and wait is not None and 0 < wait <= follow.SETTLE
    now[0] += follow.SETTLE
    follower.on_ready([])
    assert followed == ["host"]
    kernel.delete_table()
    follower.on_ready(follower.filenos())  # a deleted table is repaired at once
    assert followed == ["host", "table"]
    life.stop()


def test_the_follower_tries_again_when_following_fails(kernel, monkeypatch, caplog):
    now = frozen_clock(monkeypatch)
    life = started(kernel)
    follower = life.follower
    assert follower is not None
    follower.on_ready([])

    def fails(why):
        raise OSError("busy")

    monkeypatch.setattr(follower, "follow", fails)
    kernel.delete_table()
    with caplog.at_level(logging.WARNING, "nswrap"):
        assert follower.on_ready(follower.filenos()) == follow.RETRY
    assert "following the host: busy (trying again)" in caplog.text
    assert follower.reasons == {"table"}

    def closes(why):
        raise FailClosed("no table")

    monkeypatch.setattr(follower, "follow", closes)
    now[0] += follow.RETRY
    with pytest.raises(FailClosed):
        follower.on_ready([])
    life.stop()


def test_the_follower_polls_the_settings_without_events(kernel, monkeypatch):
    now = frozen_clock(monkeypatch)
    life = started(kernel)
    follower = life.follower
    assert follower is not None
    followed: list[str] = []
    monkeypatch.setattr(follower, "follow", followed.append)
    assert follower.on_ready([]) == pytest.approx(follow.POLL)
    kernel.write("net/ipv4/conf/eth0/src_valid_mark", "0")  # someone put it back: no event says so
    now[0] += follow.POLL
    follower.on_ready([])
    now[0] += follow.SETTLE
    follower.on_ready([])
    assert followed == ["host"]
    life.stop()


def test_an_instance_whose_server_exited_does_not_follow_the_host(kernel, monkeypatch, caplog):
    """Its veth is gone while its record is still live (the race run 13 of the loaded suite hit:
    a follow announced attaching the fast path to it): nothing is changed or said; its teardown
    syncs."""
    life = started(kernel)
    kernel.delete_route(Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), metric=200, proto=BOOT))
    kernel.add_route(Route(N("0.0.0.0/0"), "eth1", A("198.51.100.254"), metric=200, proto=BOOT))
    before = kernel.snapshot()
    monkeypatch.setattr(life, "server_gone", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.INFO, "nswrap"):
        life.follower.follow("host")
    assert kernel.snapshot() == before and caplog.text == ""
    monkeypatch.setattr(life, "server_gone", lambda: False)
    life.follower.follow("host")
    assert kernel.snapshot() != before  # the same follow, the server alive: the gateway followed
    life.stop()


def test_a_deleted_veth_is_made_again(kernel, caplog):
    life = started(kernel)
    life.start_server(None)
    kernel.delete_link(life.instance.veth)
    with caplog.at_level(logging.WARNING, "nswrap"):
        life.repair()
    assert life.instance.veth in kernel.links
    assert f"the veth {life.instance.veth} was deleted: made it again" in caplog.text
    life.stop()


def test_stale_flows_are_forgotten_at_start_and_the_instances_own_at_stop(kernel):
    stale = replace(flow("192.0.2.10", 53), status=0)  # to the host's port 53, from before the DNAT
    kernel.flows = [stale, flow("198.18.99.2", 80)]
    life = started(kernel)
    life.forget_stale_flows()
    assert stale not in kernel.flows
    server = str(life.instance.server(4))
    kernel.flows.append(flow(server, 53))
    life.stop()
    assert [f.reply_src for f in kernel.flows] == [ipaddress.ip_address("198.18.99.2")]


def test_a_second_instance_shares_the_table_and_the_last_one_removes_it(kernel):
    before = kernel.snapshot()
    first = started(kernel)
    second = started(kernel, config("8053"))
    assert_holds_the_plan(kernel, second)
    assert {e.comment for e in kernel.table.elements["any4"]} == {first.instance.id, second.instance.id}
    first.stop()
    assert_holds_the_plan(kernel, second)
    assert {e.comment for e in kernel.table.elements["any4"]} == {second.instance.id}
    second.stop()
    assert kernel.snapshot() == before


def test_a_failed_start_rolls_back_everything(kernel):
    before = kernel.snapshot()
    kernel.fail_nft = "add table inet nswrap"
    life = Life(config(), StubSupervisor())
    with pytest.raises(Exception, match="nft refused"):
        life.start()
    life.stop()
    assert kernel.snapshot() == before


def test_the_server_learns_the_hosts_public_side(kernel):
    life = started(kernel, config("53", uplinks=()))
    life.start_server(None)
    env = life.supervisor.env
    assert env["NSWRAP_HOST_UPLINKS"] == "eth0 eth1 eth2"
    assert env["NSWRAP_HOST_ADDRESSES_eth0"].split() == ["192.0.2.10", "192.0.2.11", "2001:db8:1::10"]
    assert life.record is not None and life.record.init_pid == os.getpid()
    life.stop()
