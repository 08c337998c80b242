"""instance.run and what it relies on, against the fake kernel with a stub supervisor: READY once
the server listens, a signal during setup, a server that cannot start, --user, --ready-fd,
NOTIFY_SOCKET, a crashed instance with another --mark-mask swept at the next start."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from types import SimpleNamespace

import pytest

from nswrap import instance, precheck
from nswrap.config import Config, PortRange, parse_address, parse_ports
from nswrap.errors import NswrapError, UsageError
from nswrap.instance import Life
from nswrap.precheck import check_ready_fd, resolve_user
from nswrap.readiness import Readiness, announce_ready, elsewhere, readiness_interval
from tests.unit.fakekernel import FakeKernel, install
from tests.unit.test_life import StubSupervisor, assert_holds_the_plan

A = ipaddress.ip_address


class Server(StubSupervisor):
    """A server that binds its ports while nswrap waits, then exits with `code`."""

    code = 0
    binds: set = set()
    fails: Exception | None = None

    def install(self) -> None:
        pass

    def start(self, command, netns_fd, env, creds) -> None:
        if self.fails is not None:
            raise self.fails
        super().start(command, netns_fd, env, creds)

    def wait(self, fds=None, on_ready=None, report=True) -> int:
        assert on_ready is not None and fds
        on_ready([])  # not listening yet
        KERNEL.listening |= self.binds
        on_ready([])
        return self.code


KERNEL: FakeKernel


@pytest.fixture
def kernel(monkeypatch, tmp_path) -> FakeKernel:
    global KERNEL
    KERNEL = install(monkeypatch, tmp_path)
    monkeypatch.setattr(instance, "Supervisor", lambda timeout: Server(timeout))
    monkeypatch.setattr(instance, "signal", SimpleNamespace(signal=lambda *a: None, SIGKILL=signal.SIGKILL,
                                                          SIG_IGN=signal.SIG_IGN))
    Server.code, Server.binds, Server.fails = 0, {("udp", A("0.0.0.0"), 53), ("tcp", A("::"), 53)}, None
    return KERNEL


def config(ports: str = "53,53/tcp", **kw) -> Config:
    return Config(command=("true",), ports=parse_ports([ports]), **kw)


def test_run_serves_says_ready_and_leaves_the_host_as_it_was(kernel, monkeypatch, caplog):
    before = kernel.snapshot()
    r, w = os.pipe()
    Server.code = 3
    with caplog.at_level(logging.INFO, "nswrap"):
        assert instance.run(config(ready_fd=w)) == 3
    assert os.read(r, 100) == b"READY\n"
    os.close(r)
    assert "serving 53/tcp, 53/udp" in caplog.text
    assert kernel.snapshot() == before


def test_a_signal_during_setup_rolls_back(kernel, monkeypatch, caplog):
    before = kernel.snapshot()

    class Interrupted(Server):
        def checkpoint(self) -> None:
            if self.init_pid is None and kernel.table is not None:  # after the datapath is made
                self.pending = signal.SIGTERM
            super().checkpoint()

    monkeypatch.setattr(instance, "Supervisor", lambda timeout: Interrupted(timeout))
    assert instance.run(config()) == 143
    assert "interrupted by SIGTERM during setup: rolling back" in caplog.text
    assert kernel.snapshot() == before


def test_a_server_that_cannot_start_stops_nswrap_cleanly(kernel):
    before = kernel.snapshot()
    Server.fails = NswrapError("command not found: true", 127)
    with pytest.raises(NswrapError, match="command not found"):
        instance.run(config())
    assert kernel.snapshot() == before


def test_readiness_names_what_the_server_does_instead(kernel, caplog):
    life = Life(config("53,8080/tcp"), Server())
    life.start()
    ready = Readiness(life.instance, os.getpid(), None)
    kernel.listening |= {("udp", A("127.0.0.1"), 53), ("tcp", A("0.0.0.0"), 8081), ("udp", A("0.0.0.0"), 40000)}
    assert ready.poll() == pytest.approx(0.01, abs=0.01)
    ready.began -= 25  # the server took its time
    with caplog.at_level(logging.WARNING, "nswrap"):
        assert ready.poll() == 1.0
    assert "the server listens on 53/udp only on its loopback address" in caplog.text
    assert "the server listens on 8081/tcp, not on the published 8080/tcp: --ports 8080:8081/tcp?" in caplog.text
    assert "the server does not listen on" not in caplog.text  # both explained
    kernel.listening |= {("udp", A("0.0.0.0"), 53), ("tcp", A("::"), 8080)}
    assert ready.poll() is None and ready.done
    assert ready.poll() is None
    life.stop()


def test_elsewhere_and_the_polling_interval():
    udp53 = PortRange("udp", 53, 53, 53)
    remapped = PortRange("tcp", 8080, 8080, 80)
    assert elsewhere([udp53], {("udp", 5300), ("udp", 40000), ("tcp", 53)}) == [
        (udp53, "the server listens on 5300/udp, not on the published 53/udp: --ports 53:5300?")]
    assert elsewhere([remapped], {("tcp", 81)})[0][1] == \
        "the server listens on 81/tcp, not on 80/tcp (published as 8080/tcp): --ports 8080:81/tcp?"
    assert elsewhere([udp53], {("udp", 40000)}) == []
    assert [readiness_interval(w) for w in (0, 1, 100)] == [0.01, 0.05, 1.0]


def test_user_specs_resolve_or_are_refused():
    root = resolve_user("root")
    assert (root.uid, root.gid) == (0, 0) and 0 in root.groups
    assert resolve_user("0:0").uid == 0
    with pytest.raises(UsageError, match="no such user 'no-such-user-xyz'"):
        resolve_user("no-such-user-xyz")
    with pytest.raises(UsageError, match="no such group 'no-such-group-xyz'"):
        resolve_user("root:no-such-group-xyz")


def test_ready_fd_must_be_open_for_writing(tmp_path):
    check_ready_fd(None)
    r, w = os.pipe()
    try:
        check_ready_fd(w)
        with pytest.raises(UsageError, match=f"invalid --ready-fd {r}: open for reading only"):
            check_ready_fd(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(UsageError, match="no such open file descriptor"):
        check_ready_fd(w)


def test_ready_is_told_to_systemd_and_a_closed_fd_is_said(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        with caplog.at_level(logging.WARNING, "nswrap"):
            announce_ready(w)  # closed meanwhile: said, and systemd is still told
        assert sock.recv(100) == f"READY=1\nMAINPID={os.getpid()}".encode()
    assert f"--ready-fd {w}: Bad file descriptor" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    announce_ready(None)
    assert "NOTIFY_SOCKET" in caplog.text


def test_a_crashed_instance_with_another_mark_mask_is_swept_first(kernel, caplog):
    before = kernel.snapshot()
    old = Life(config(mark_mask=0x0F000000), Server())
    old.start()
    assert old.follower is not None and old.live_fd is not None
    new = Life(config("8053"), Server())
    with pytest.raises(NswrapError, match="use --mark-mask 0xf000000; give the same"):
        new.start()
    new.stop()
    old.follower.close()
    os.close(old.live_fd)  # it crashed
    new = Life(config("8053"), Server())
    with caplog.at_level(logging.WARNING, "nswrap"):
        new.start()
    assert "removed a dead instance's leftover" in caplog.text
    assert f"removed a dead instance's leftovers: instance {old.instance.id}" in caplog.text
    assert_holds_the_plan(kernel, new)
    new.stop()
    kernel.delete_link(old.instance.veth)  # its namespace's end: the kernel's to remove once it died
    assert kernel.snapshot() == before


def test_what_cannot_be_recorded_is_refused_before_any_change(kernel):
    before = kernel.snapshot()
    life = Life(Config(command=("true", *["x"] * 70000), ports=parse_ports(["53"])), Server())
    with pytest.raises(UsageError, match="too much to record for cleanup after a crash"):
        life.start()
    life.stop()
    assert kernel.snapshot() == before


def test_the_host_environment_names_the_published_addresses(kernel):
    life = Life(config(addresses=(parse_address("192.0.2.11"),)), Server())
    life.start()
    env = precheck.host_env(life.facts, life.instance)
    assert env["NSWRAP_HOST_ADDRESSES"] == "192.0.2.11"
    assert env["NSWRAP_HOST_ADDRESSES_eth0"] == "192.0.2.11"
    life.stop()
    assert precheck.env_name("eth0.100") == "eth0_100"
