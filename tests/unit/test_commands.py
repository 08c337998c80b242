"""`cleanup`, `list`, `--dry-run`, `exec` and the sweep of an older nswrap's leftovers (legacy.py),
against the fake kernel: no root, nothing outside tmp_path."""

from __future__ import annotations

import json
import os

import pytest

from nswrap import commands, legacy, netlink
from nswrap.config import Config, parse_ports
from nswrap.errors import NswrapError, UsageError
from nswrap.facts import gather, netns_id
from nswrap.instance import Life
from nswrap.objects import PROTO, Link, Route, Rule
from tests.unit.fakekernel import FakeKernel, flow, install
from tests.unit.hosts import A, N
from tests.unit.test_life import StubSupervisor, assert_holds_the_plan


@pytest.fixture
def kernel(monkeypatch, tmp_path) -> FakeKernel:
    fake = install(monkeypatch, tmp_path)
    monkeypatch.setattr(commands, "_needs_root", lambda what, code=1: None)
    return fake


def config(ports: str = "53,53/tcp", **kw) -> Config:
    return Config(command=("unbound", "-d"), ports=parse_ports([ports]), **kw)


def started(ports: str = "53,53/tcp", **kw) -> Life:
    life = Life(config(ports, **kw), StubSupervisor())
    life.start()
    return life


def died(life: Life) -> None:
    """The instance's process is gone: its liveness lock with it, its leftovers stay."""
    assert life.follower is not None and life.live_fd is not None
    life.follower.close()
    os.close(life.live_fd)
    life.live_fd = None


def test_cleanup_removes_a_dead_instances_leftovers(kernel, capsys):
    before = kernel.snapshot()
    life = started()
    died(life)
    assert commands.cleanup() == 0
    out = capsys.readouterr().out
    assert f"ip link del {life.instance.veth}" in out
    assert "nft -f - <<'EOF'  # table inet nswrap deleted" in out
    assert f"instance {life.instance.id} (pid {os.getpid()}) is gone" in out
    assert kernel.snapshot() == before
    assert commands.cleanup() == 0
    assert capsys.readouterr().out == "nothing to clean up\n"


def test_cleanup_keeps_a_live_instance_and_removes_a_dead_ones_elements(kernel, capsys):
    live = started()
    dead = started("8053")
    died(dead)
    assert commands.cleanup() == 0
    out = capsys.readouterr().out
    assert "elements (" in out and f"instance {dead.instance.id}" in out
    assert dead.instance.veth not in kernel.links and live.instance.veth in kernel.links
    assert_holds_the_plan(kernel, live)
    live.stop()


def uplink_mark(life: Life) -> int:
    allocation = life.state.allocation()
    assert allocation is not None
    return allocation.mark(allocation.uplinks[0].index)


def old_netns() -> str:
    """This namespace as an older nswrap's record named it."""
    ours = netns_id()
    return f"cookie:{ours[1:]}" if ours.startswith("c") else f"inode:{ours[1:]}"


def test_list_says_each_instance_its_uplinks_and_flows(kernel, capsys):
    life = started()
    kernel.flows.append(flow(str(life.instance.server(4)), mark=uplink_mark(life)))
    assert commands.list_instances(False) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "PID", "SINCE", "PORTS", "COMMAND"]
    assert out[1].split()[:2] == [life.instance.id, str(os.getpid())]
    assert out[1].endswith("53/tcp,53/udp  unbound -d")
    uplinks = {line.split()[0]: line for line in out[2:5]}
    assert set(uplinks) == {"eth0", "eth1", "eth2"}
    assert "via 192.0.2.1" in uplinks["eth0"] and "no gateway" in uplinks["eth2"]
    assert out[-1] == "conntrack: 1 of 262144 entries in use"
    assert commands.list_instances(True) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["instances"]
    assert row["id"] == life.instance.id and row["flows_counted"] is True
    assert sum(u["flows"] for u in row["uplinks"]) + row["local_flows"] == 1
    assert data["conntrack"] == {"count": 1, "max": 262144}
    assert commands.check_serving() == 0
    assert capsys.readouterr().out == f"serving: {life.instance.id} (pid {os.getpid()})\n"
    life.stop()
    assert commands.check_serving() == 1
    assert commands.list_instances(False) == 0
    assert "no nswrap instances" in capsys.readouterr().out


def test_dry_run_prints_the_start_and_changes_nothing(kernel, capsys):
    before = kernel.snapshot()
    assert commands.dry_run(config(dry_run=True)) == 0
    out = capsys.readouterr().out
    assert out.startswith("# nswrap, dry run: ports 53/tcp, 53/udp; uplinks eth0, eth1, eth2\n")
    assert "ip link add nsw-d0d0d0" in out and "nft -f - <<'EOF'  # table inet nswrap (re)built" in out
    assert "sysctl -w net.ipv4.conf.eth0.forwarding=1" in out
    assert kernel.snapshot() == before


def test_dry_run_beside_a_live_instance_adds_only_its_elements(kernel, capsys):
    life = started()
    before = kernel.snapshot()
    assert commands.dry_run(config("8053", dry_run=True)) == 0
    out = capsys.readouterr().out
    assert "(re)built" not in out and "elements (" in out
    assert kernel.snapshot() == before
    life.stop()


def test_exec_names_what_it_cannot_run_in(kernel):
    with pytest.raises(UsageError, match="no command given"):
        commands.exec_in("abc", ())
    with pytest.raises(UsageError, match="empty command name"):
        commands.exec_in("abc", ("",))
    with pytest.raises(NswrapError, match="no live nswrap instance 'abc'"):
        commands.exec_in("abc", ("ss",))
    first, second = started(), started("8053")
    assert first.record is not None
    first.record.init_pid = 2**22 - 1  # no such process (the highest pid there can be)
    first.state.save(first.record)
    with pytest.raises(NswrapError, match=f"instance {first.instance.id}: cannot open its namespace"):
        commands.exec_in(first.instance.id, ("ss",))
    first.stop()
    second.stop()


# --- an older nswrap's leftovers ---------------------------------------------------------------

OLD = "abcdef"
OLD_RULE = Rule(4, 100, 100, fwmark=0x1, fwmask=0xFF)
OLD_ROUTE = Route(N("0.0.0.0/0"), "eth0", A("192.0.2.1"), table=100)
OLD_IPTABLES = ["-A", "FORWARD", "-i", f"nsw-{OLD}", "-m", "comment", "--comment", f"nswrap-{OLD}", "-j", "ACCEPT"]


def old_leftovers(kernel: FakeKernel) -> dict:
    """What an older nswrap's instance left when it died: its record, a forwarding it turned on,
    its veth, its own table, an iptables rule and its fwmark rule and routing table."""
    before = kernel.snapshot()
    record = {"id": OLD, "netns": old_netns(),
              "changed": {"net/ipv4/conf/eth0/forwarding": "0"}}
    (kernel.run_dir / f"{OLD}.json").write_text(json.dumps(record))
    (kernel.run_dir / f"{OLD}.resolv.conf").write_text("nameserver 127.0.0.53\n")
    kernel.write("net/ipv4/conf/eth0/forwarding", "1")
    kernel.add_link(Link(0, f"nsw-{OLD}"))
    kernel.tables |= {("inet", f"nswrap-{OLD}"), ("ip", "filter")}
    kernel.iptables_rules["iptables-nft"] = [["-P", "FORWARD", "ACCEPT"], OLD_IPTABLES,
                                             ["-A", "FORWARD", "-m", "comment", "--comment", "nswrap-nothex", "-j", "ACCEPT"]]
    kernel.add_rule(OLD_RULE)
    kernel.add_route(OLD_ROUTE)
    kernel.events.clear()
    return {**before, "tables": {("ip", "filter")}}


def test_the_sweep_finds_every_leftover_of_an_older_nswrap(kernel):
    old_leftovers(kernel)
    assert legacy.dead_records() == [OLD]
    with netlink.Routing() as routing:
        found = [c.render() for c in legacy.sweep(gather(routing))]
    assert found == [
        "sysctl -w net.ipv4.conf.eth0.forwarding=0",
        f"ip link del nsw-{OLD}",
        "nft -f - <<'EOF'  # an older nswrap's table\ndelete table inet nswrap-abcdef\nEOF",
        f"iptables-nft -D FORWARD -i nsw-{OLD} -m comment --comment nswrap-{OLD} -j ACCEPT",
        OLD_RULE.render("del"),
        OLD_ROUTE.render("del"),
    ]


def test_cleanup_sweeps_an_older_nswrap(kernel, capsys):
    expected = old_leftovers(kernel)
    assert commands.cleanup() == 0
    out = capsys.readouterr().out
    assert f"rm {kernel.run_dir}/{OLD}.json" in out and f"rm {kernel.run_dir}/{OLD}.resolv.conf" in out
    assert kernel.iptables == [f"iptables-nft -D FORWARD {' '.join(OLD_IPTABLES[2:])}"]
    assert kernel.snapshot() == expected
    assert legacy.dead_records() == []


def test_a_start_sweeps_an_older_nswrap_first(kernel, caplog):
    expected = old_leftovers(kernel)
    life = started()
    assert "removed an older nswrap's leftover: ip link del nsw-abcdef" in caplog.text
    assert_holds_the_plan(kernel, life)
    life.stop()
    assert kernel.snapshot() == expected


def test_invalid_or_foreign_old_records_are_left_alone(kernel, caplog):
    run = kernel.run_dir
    (run / "123456.json").write_text(json.dumps({"id": "123456", "netns": "cookie:1", "changed": {}}))  # another netns
    (run / "234567.json").write_text(json.dumps({"id": "234567", "netns": old_netns(),
                                                 "changed": {"/etc/passwd": "0"}}))
    (run / "345678.json").write_text("not json")
    (run / "456789.json").write_text(json.dumps({"id": "999999"}))
    (run / "notanid.json").write_text("{}")
    assert legacy.dead_records() == []
    assert "ignoring" in caplog.text and "234567.json: not a valid record of an older nswrap" in caplog.text
    assert PROTO == 110
