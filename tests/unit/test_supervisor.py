"""The supervisor's logic without root and without any process: signal forwarding, Ctrl-C
escalation, the stop timeout and the exit status, with os.kill, waitpid and the timer replaced.

Never run the init (supervise._init) outside a PID namespace of its own: it signals pid -1,
"every process in our namespace but us", which outside one is every process on the machine."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from nswrap import supervise
from nswrap.supervise import INT_GRACE, Supervisor


@pytest.fixture(autouse=True)
def kills(monkeypatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []

    def kill(pid: int, signum: int) -> None:
        sent.append((pid, signum))
        if pid == 4242 and signum == 0:
            raise ProcessLookupError

    monkeypatch.setattr(supervise.os, "kill", kill)
    return sent


@pytest.fixture(autouse=True)
def timer(monkeypatch) -> list[float]:
    armed: list[float] = []
    monkeypatch.setattr(supervise.signal, "setitimer", lambda which, seconds: armed.append(seconds))
    return armed


def running(stop_timeout: float = 10.0) -> Supervisor:
    supervisor = Supervisor(stop_timeout)
    supervisor.init_pid = 4243
    return supervisor


def test_signals_are_forwarded_to_the_init_and_a_stop_arms_the_timeout(kills, timer):
    supervisor = running()
    supervisor._on_signal(signal.SIGHUP, None)
    assert kills == [(4243, signal.SIGHUP)] and supervisor.stop_asked is None and timer == []
    supervisor._on_signal(signal.SIGTERM, None)
    assert kills[-1] == (4243, signal.SIGTERM) and supervisor.stop_asked is not None and timer == [10.0]
    supervisor._on_signal(signal.SIGTERM, None)  # asked already: the timer runs on
    assert timer == [10.0] and supervisor.escalate_at is None


def test_ctrl_c_that_the_server_ignores_becomes_sigterm(kills, timer, caplog):
    supervisor = running()
    supervisor._on_signal(signal.SIGINT, None)
    assert supervisor.escalate_at is not None
    supervisor._escalate(supervisor.escalate_at - INT_GRACE / 2)  # not yet
    assert kills == [(4243, signal.SIGINT)]
    with caplog.at_level(logging.INFO, "nswrap"):
        supervisor._escalate(supervisor.escalate_at + 0.01)
    assert kills == [(4243, signal.SIGINT), (4243, signal.SIGTERM)] and supervisor.escalate_at is None
    assert "still running 0.5s after SIGINT: sending it SIGTERM" in caplog.text


def test_sigterm_after_ctrl_c_needs_no_escalation(kills, timer):
    supervisor = running()
    supervisor._on_signal(signal.SIGINT, None)
    supervisor._on_signal(signal.SIGTERM, None)
    assert supervisor.escalate_at is None


def test_the_stop_timeout_kills_and_is_said_once_waited(kills, timer, caplog):
    supervisor = running(3)
    supervisor._on_signal(signal.SIGTERM, None)
    assert supervisor.stop_asked is not None
    assert supervisor._still_waiting_due() == supervisor.stop_asked + 1.0
    with caplog.at_level(logging.WARNING, "nswrap"):
        supervisor._say_still_waiting(supervisor.stop_asked + 0.5)  # too early to say
        assert caplog.text == ""
        supervisor._say_still_waiting(supervisor.stop_asked + 1.5)
        supervisor._say_still_waiting(supervisor.stop_asked + 2.5)  # said once
        supervisor._on_stop_timeout(signal.SIGALRM, None)
    assert caplog.text.count("waiting for the server to exit: SIGKILL in 2 s (--stop-timeout 3)") == 1
    assert "did not exit within --stop-timeout 3s: killing it" in caplog.text
    assert kills[-1] == (4243, signal.SIGKILL) and supervisor._still_waiting_due() is None


def test_without_a_stop_timeout_nswrap_waits_forever(kills, timer, caplog):
    supervisor = running(0)
    supervisor._on_signal(signal.SIGINT, None)
    assert timer == []
    with caplog.at_level(logging.WARNING, "nswrap"):
        supervisor._say_still_waiting(supervisor.stop_asked + 1.0)
    assert "(--stop-timeout 0: never killed)" in caplog.text
    supervisor.tearing_down = True
    supervisor._on_stop_timeout(signal.SIGALRM, None)
    supervisor._escalate(supervisor.escalate_at + 1)
    assert kills == [(4243, signal.SIGINT)]


def test_kill_arms_the_timeout_once_and_a_gone_init_is_fine(kills, timer):
    supervisor = running()
    assert supervisor.alive()
    supervisor.kill()
    supervisor.kill(signal.SIGKILL)
    assert kills == [(4243, signal.SIGTERM), (4243, signal.SIGKILL)] and timer == [10.0]
    gone = Supervisor()
    gone.init_pid = 4242
    gone.kill(0)  # ProcessLookupError: nothing to say
    Supervisor().kill()  # no init: nothing to kill
    assert len(kills) == 3


@pytest.mark.parametrize("code, asked, quiet", [
    (-signal.SIGTERM, True, True), (128 + signal.SIGINT, True, True), (0, True, False),
    (-signal.SIGTERM, False, False), (1, True, False),
])
def test_a_server_that_stopped_as_asked_is_no_news(code, asked, quiet):
    supervisor = running()
    supervisor.stop_asked = 1.0 if asked else None
    assert supervisor._stopped_as_asked(code) is quiet


@pytest.mark.parametrize("told, init_code, status", [(b"-15", 1, -15), (b"3", 1, 3), (b"", 137, 137), (b"junk", 2, 2)])
def test_the_servers_own_status_is_what_the_init_says(told, init_code, status):
    supervisor = running()
    r, w = os.pipe()
    os.write(w, told)
    os.close(w)
    supervisor._status_r = r
    assert supervisor._server_status(init_code) == status


def test_reaping_returns_the_inits_status_only(monkeypatch):
    supervisor = running()
    results = iter([(77, 0), (4243, 3 << 8)])
    monkeypatch.setattr(supervise.os, "waitpid", lambda pid, flags: next(results))
    assert supervisor._reap() == 3 << 8
    monkeypatch.setattr(supervise.os, "waitpid", lambda pid, flags: (0, 0))
    assert supervisor._reap() is None

    def none(pid, flags):
        raise ChildProcessError

    monkeypatch.setattr(supervise.os, "waitpid", none)
    assert supervisor._reap() == supervise.EXIT_FAILED << 8


# --- the wait loop, on a plain child: `sh -c 'exit N'`, never the init (see above) -------------


def waiting_for(code: int, told: bytes = b"") -> Supervisor:
    """A supervisor whose "init" is a shell that exits `code` at once; `told`: what the init
    would have said of the server's status."""
    supervisor = Supervisor(5)
    supervisor.init_pid = os.posix_spawnp("sh", ["sh", "-c", f"exit {code}"], {"PATH": os.defpath})
    supervisor._status_r, w = os.pipe()
    os.write(w, told)
    os.close(w)
    supervisor._wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.write(wakeup_w, b"x")  # a signal was handled meanwhile
    os.close(wakeup_w)
    return supervisor


def test_wait_returns_the_servers_status_and_says_it(caplog):
    supervisor = waiting_for(1, b"3")
    with caplog.at_level(logging.WARNING, "nswrap"):
        assert supervisor.wait() == 3
    assert "the server exited with status 3" in caplog.text and supervisor.tearing_down
    os.close(supervisor._wakeup_r)


def test_wait_calls_back_until_the_server_exits(caplog):
    supervisor = waiting_for(0, b"-15")
    supervisor.stop_asked = 1.0  # it was asked to stop: its death by SIGTERM is no news
    calls: list[list[int]] = []

    def on_ready(ready: list[int]) -> float | None:
        calls.append(ready)
        return 0.01 if len(calls) < 3 else None

    with caplog.at_level(logging.WARNING, "nswrap"):
        assert supervisor.wait([], on_ready) == 128 + signal.SIGTERM
    assert "killed" not in caplog.text
    assert len(calls) <= 3
    os.close(supervisor._wakeup_r)


def test_install_takes_every_forwarded_signal_and_the_wakeup_fd():
    saved = {signum: signal.getsignal(signum) for signum in (*supervise.FORWARDED, signal.SIGALRM)}
    supervisor = Supervisor()
    try:
        supervisor.install()
        assert all(signal.getsignal(signum) == supervisor._on_signal for signum in supervise.FORWARDED)
        assert signal.getsignal(signal.SIGALRM) == supervisor._on_stop_timeout
    finally:
        wakeup_w = signal.set_wakeup_fd(-1)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        os.close(wakeup_w)
        os.close(supervisor._wakeup_r)
