"""`nswrap doctor` against the fake kernel: its probes that fork or need a real kernel stubbed,
the rest (the throwaway veth, the plan, `nft -c` of the table, sysctls) run on the fake."""

from __future__ import annotations

import os

import pytest

from nswrap import doctor, sync
from nswrap.config import Config, parse_ports, parse_uplink
from nswrap.errors import NswrapError
from nswrap.firewall import Blocker
from tests.unit.fakekernel import FakeKernel, install


class Writable:
    f_flag = 0


@pytest.fixture
def kernel(monkeypatch, tmp_path) -> FakeKernel:
    fake = install(monkeypatch, tmp_path)
    monkeypatch.setattr(doctor, "_pid_namespaces", lambda: "available")  # it forks: not in a unit test
    monkeypatch.setattr(os, "statvfs", lambda path: Writable())
    return fake


def config(**kw) -> Config:
    return Config(command=("true",), ports=parse_ports(["53"]), **kw)


def verdicts(capsys) -> dict[str, str]:
    return {line[6:].split(":")[0]: line[:4].strip() for line in capsys.readouterr().out.splitlines() if line[4:6] == "  "}


def test_nswrap_would_work_on_the_fake_host(kernel, capsys):
    before = kernel.snapshot()
    assert doctor.doctor(config()) == 0
    out = capsys.readouterr().out
    assert "ok    network namespaces and veth: a throwaway namespace with a veth pair was created and removed" in out
    assert "ok    conntrack:" in out and "filtered dumps work" in out
    assert "ok    plan (uplinks, addresses, marks, subnet): uplinks eth0, eth1, eth2; internal subnet 198.18.0.4/30" in out
    assert "ok    nftables: the kernel accepts the table" in out
    assert "ok    sysctls: 7 to set (net.ipv4.conf.eth0.forwarding, net.ipv4.conf.eth0.src_valid_mark, " in out
    assert "ok    reverse-path filtering: eth0" in out
    assert "ok    other firewalls and marks: nothing drops forwarded flows" in out
    assert "note  uplink eth2 has no gateway" in out
    assert out.endswith("nswrap would work here\n")
    assert kernel.snapshot() == before  # the veth pair was made in a namespace of its own


def test_each_failed_check_is_said_and_counted(kernel, monkeypatch, capsys):
    def refuse(text):
        raise NswrapError("Error: Could not process rule: Operation not supported")

    monkeypatch.setattr(doctor.nft, "check", refuse)
    monkeypatch.setattr(sync, "probe_firewall", lambda: (_ for _ in ()).throw(NswrapError("iptables-legacy-save: lock")))
    monkeypatch.setattr(os, "statvfs", lambda path: type("RO", (), {"f_flag": os.ST_RDONLY})())
    assert doctor.doctor(config()) == 1
    said = verdicts(capsys)
    assert said["nftables"] == "FAIL" and said["other firewalls and marks"] == "FAIL" and said["sysctls"] == "FAIL"
    assert said["conntrack"] == "ok"


def test_an_unknown_uplink_fails_the_plan(kernel, capsys):
    assert doctor.doctor(config(uplinks=(parse_uplink("wlan9"),))) == 1
    out = capsys.readouterr().out
    assert "FAIL  plan (uplinks, addresses, marks, subnet):" in out and "wlan9" in out
    assert "nftables" not in out  # nothing to check without a plan


def test_a_blocking_firewall_is_named(kernel, monkeypatch, capsys):
    from nswrap import firewall

    monkeypatch.setattr(firewall, "blockers", lambda facts: [Blocker("iptables-nft chain FORWARD (policy drop)",
                                                                     "iptables-nft", "FORWARD")])
    monkeypatch.setattr(sync, "blockers", firewall.blockers)
    assert doctor.doctor(config()) == 0
    assert "ok    other firewalls and marks: iptables iptables-nft FORWARD: nswrap adds narrow accepts there" in \
        capsys.readouterr().out


def test_without_privileges_nothing_else_is_looked_at(kernel, monkeypatch, capsys):
    def unprivileged():
        raise NswrapError("not permitted: nswrap needs CAP_NET_ADMIN (run it as root)")

    monkeypatch.setattr(doctor, "require_capabilities", unprivileged)
    assert doctor.doctor(config()) == 1
    assert capsys.readouterr().out.splitlines() == [
        "FAIL  privileges: not permitted: nswrap needs CAP_NET_ADMIN (run it as root)",
        "1 check(s) failed: nswrap would not work here (doctor needs root to look further)"]


def test_another_mark_mask_than_the_live_instances_fails(kernel, capsys):
    from nswrap.instance import Life
    from tests.unit.test_life import StubSupervisor

    life = Life(config(), StubSupervisor())
    life.start()
    assert doctor.doctor(config(mark_mask=0x0F000000)) == 1
    assert "the nswrap instances here use --mark-mask 0xf0000000" in capsys.readouterr().out
    assert doctor.doctor(config()) == 0
    assert "marks under 0xf0000000 are free or live instances' (1)" in capsys.readouterr().out
    life.stop()


def test_rp_filter_modes_are_named(tmp_path, monkeypatch):
    assert doctor._rp_filter(None, ["no-such-interface"]) == "no-such-interface ? (all modes work: marks carry the uplink)"
    assert doctor._sysctls([]) == "nothing to change (the needed values are already in effect)"
