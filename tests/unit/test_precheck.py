"""precheck.py: the checks before a start changes anything (issue 23): a host socket on a published
port is refused in one line naming it and its owner, or taken over with --take-over and said once.
Hand-built facts and a fake /proc: no root, no kernel."""

from __future__ import annotations

import logging

import pytest

from nswrap.config import Config, parse_address, parse_ports
from nswrap.errors import EXIT_USAGE, UsageError
from nswrap.objects import Listener
from nswrap.precheck import check_host_sockets, check_start, loopback_ports
from tests.unit.hosts import A, host, instance

SSHD = Listener("tcp", A("0.0.0.0"), 22, 1001)
SQUATTER = Listener("udp", A("127.0.0.1"), 5353, 1002)
RESOLVED = Listener("udp", A("127.0.0.53"), 53, 1003)
HINT = "publishing it would take its clients; leave it out of --ports, narrow with --address, or give --take-over"


@pytest.fixture
def proc(tmp_path):
    """A /proc where sshd (pid 812) holds SSHD and nobody's python3 (pid 4242) holds SQUATTER."""
    for pid, comm, inode in ((812, "sshd", SSHD.inode), (4242, "python3", SQUATTER.inode), (300, "systemd-resolve", 1003)):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        (tmp_path / str(pid) / "fd" / "3").symlink_to(f"socket:[{inode}]")
    return str(tmp_path)


def started(ports: str, addresses: tuple[str, ...] = ()):
    """The instance a start with these options makes (loopback_ports as the start decides it)."""
    config = Config(command=("true",), ports=parse_ports([ports]), addresses=tuple(map(parse_address, addresses)))
    loopback = ",".join(str(p) for p in loopback_ports(config)) or None
    return instance(ports=ports, addresses=addresses, loopback=loopback)


def refusal(listeners, ports, proc, addresses=()) -> UsageError:
    with pytest.raises(UsageError) as e:
        check_host_sockets(host(listeners=listeners), started(ports, addresses), False, proc)
    assert e.value.code == EXIT_USAGE == 2
    return e.value


def test_a_listener_on_every_address_is_refused_naming_its_owner(proc):
    e = refusal((RESOLVED, SSHD), "1-65535/tcp", proc)
    assert str(e) == f"port 22/tcp is served on this host by sshd (pid 812) on 0.0.0.0: {HINT}"


def test_a_squatter_on_127_0_0_1_is_refused_naming_it(proc):
    e = refusal((SQUATTER,), "5353", proc)
    assert str(e) == f"port 5353/udp is served on this host by python3 (pid 4242) on 127.0.0.1: {HINT}"


def test_an_owner_not_found_is_said(proc):
    lost = Listener("tcp", A("::"), 80, 999)
    assert "by a process nswrap cannot find (socket inode 999) on ::: " in str(refusal((lost,), "80/tcp", proc))
    kernel = Listener("udp", A("0.0.0.0"), 51820, 0)  # WireGuard's, say: a socket of the kernel's own
    assert "served on this host by the kernel on 0.0.0.0" in str(refusal((kernel,), "51820", proc))


def test_more_sockets_are_counted_in_the_same_line(proc):
    many = tuple(Listener("tcp", A("0.0.0.0"), port, 0) for port in (22, 25, 80, 443, 8080, 8443))
    e = refusal(many, "1-65535/tcp", proc)
    assert "on 0.0.0.0 (also 25/tcp on 0.0.0.0, 80/tcp on 0.0.0.0, 443/tcp on 0.0.0.0, 2 more): publishing" in str(e)
    assert "\n" not in str(e)


def test_reuseport_sockets_are_named_once(proc):
    twins = (SSHD, Listener("tcp", A("0.0.0.0"), 22, 1005))
    assert "(also" not in str(refusal(twins, "22/tcp", proc))


def test_what_is_not_taken_over_passes(proc, caplog):
    facts = host(listeners=(SSHD, SQUATTER, RESOLVED))
    check_host_sockets(facts, started("1-21,23-65535/tcp"), False, proc)
    check_host_sockets(facts, started("53,53/tcp"), False, proc)
    check_host_sockets(facts, started("5353", ("192.0.2.10",)), False, proc)  # 127.0.0.1 is not published then
    assert caplog.records == []


def test_take_over_publishes_with_one_warning(proc, caplog):
    facts = host(listeners=(SSHD, SQUATTER))
    with caplog.at_level(logging.WARNING, logger="nswrap"):
        check_host_sockets(facts, started("1-65535,1-65535/tcp"), True, proc)
    assert [r.getMessage() for r in caplog.records] == [
        "--take-over: clients of 22/tcp on 0.0.0.0 (sshd, pid 812), 5353/udp on 127.0.0.1 (python3, pid 4242) "
        "reach the server from now on"]


def test_check_start_refuses_before_anything_changes(monkeypatch):
    from nswrap import precheck as module

    monkeypatch.setattr(module, "socket_owners", lambda inodes, proc="/proc": {})
    facts = host(listeners=(SSHD,))
    with pytest.raises(UsageError, match="port 22/tcp is served on this host by a process nswrap cannot find"):
        check_start(facts, started("22/tcp"), [])
    check_start(facts, started("22/tcp"), [], take_over=True)


def test_loopback_is_published_for_every_port_unless_address_leaves_it_out():
    def ports(*addresses: str):
        return loopback_ports(Config(command=("true",), ports=parse_ports(["53,53/tcp"]),
                                     addresses=tuple(map(parse_address, addresses))))

    assert ports() == parse_ports(["53,53/tcp"])
    assert ports("127.0.0.1", "192.0.2.10") == parse_ports(["53,53/tcp"])
    assert ports("192.0.2.10") == ()


def test_a_server_listening_on_other_ports_is_named_with_the_ports_that_would_match():
    from nswrap.readiness import elsewhere

    [p53] = parse_ports(["53"])
    assert elsewhere([p53], {("udp", 5300), ("tcp", 53)}) == [
        (p53, "the server listens on 5300/udp, not on the published 53/udp: --ports 53:5300?")]
    [remapped] = parse_ports(["53:5300/tcp"])
    assert elsewhere([remapped], {("tcp", 5301)}) == [
        (remapped, "the server listens on 5301/tcp, not on 5300/tcp (published as 53/tcp): --ports 53:5301/tcp?")]
    [span] = parse_ports(["10000-10100"])
    assert elsewhere([span], {("udp", 20000)}) == [
        (span, "the server listens on 20000/udp, not on the published 10000-10100/udp")]
    assert elsewhere([p53], {("udp", 41234), ("tcp", 5300)}) == []  # a client socket; another protocol


def test_the_server_learns_the_published_addresses_per_uplink(monkeypatch):
    from nswrap.precheck import host_env, server_env

    every = host_env(host(), instance(uplinks=("eth0", "eth1")))
    assert every == {"NSWRAP_HOST_UPLINKS": "eth0 eth1",
                     "NSWRAP_HOST_ADDRESSES_eth0": "192.0.2.10 192.0.2.11 2001:db8:1::10",
                     "NSWRAP_HOST_ADDRESSES_eth1": "198.51.100.10",
                     "NSWRAP_HOST_ADDRESSES": "192.0.2.10 192.0.2.11 2001:db8:1::10 198.51.100.10"}
    only = host_env(host(), instance(uplinks=("eth0",), addresses=(A("192.0.2.11"),)))
    assert only["NSWRAP_HOST_ADDRESSES_eth0"] == "192.0.2.11" and only["NSWRAP_HOST_ADDRESSES"] == "192.0.2.11"
    monkeypatch.setenv("NSWRAP_HOST_ADDRESSES", "forged")
    monkeypatch.setenv("NSWRAP_PORTS", "53")
    env = server_env(every)
    assert env["NSWRAP_HOST_ADDRESSES"] == every["NSWRAP_HOST_ADDRESSES"] and "NSWRAP_PORTS" not in env
