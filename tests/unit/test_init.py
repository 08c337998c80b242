"""The init (supervise._init) and the server's exec, against a fake of every system call they make.

The real init must never run here: as PID 1 of a PID namespace it signals -1, "every process in
our namespace but us", which outside one is every process of the machine. `Calls` has no defaults,
so each fake below names every call; one it forgot fails the test instead of reaching the kernel.
What the real init does in a real namespace is the system suite's (test_containment, test_nswrap).
"""

from __future__ import annotations

import errno
import os
import signal

import pytest

from nswrap.errors import EXIT_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND
from nswrap.supervise import (
    FORWARDED,
    Calls,
    Credentials,
    InitState,
    _close_all_but,
    _exec_server,
    _init,
    _parent_gone,
    _read_all,
    _start_error,
)

REPORT_W, STATUS_W, NETNS = 5, 6, 4
EXEC_R, EXEC_W = 10, 11
SERVER = 100


class Exited(Exception):
    """os._exit in the fake: ends the forked branch."""


def exited(code: int) -> int:
    return code << 8  # a wait status


def killed(signum: int) -> int:
    return signum


class FakeInit:
    """The init's world: `script` is what happens while it waits, in order: ("exit", pid, wait
    status) is a child reaped, ("signal", signum) a signal delivered to the init meanwhile. Once it
    is used up, waitpid says there is no child left."""

    def __init__(self, script=(), pid: int = 1, exec_failure: bytes = b"", gone: bool = False,
                 setns_error: OSError | None = None, fork: int = SERVER, exec_error: OSError | None = None):
        self.script = list(script)
        self.pid = pid
        self.exec_failure = exec_failure
        self.gone = gone
        self.setns_error = setns_error
        self.forked = fork
        self.exec_error = exec_error
        self.handlers: dict[int, object] = {}
        self.written: dict[int, bytes] = {}
        self.closed: list[int] = []
        self.killed: list[tuple[int, int]] = []
        self.log: list[tuple] = []  # every call, in order
        self.gone_pids: set[int] = set()

    def _waitpid(self, pid: int, flags: int) -> tuple[int, int]:
        assert (pid, flags) == (-1, 0)
        while self.script:
            what, *args = self.script.pop(0)
            if what == "signal":
                handler = self.handlers[args[0]]
                assert callable(handler)
                handler(args[0], None)
            else:
                self.gone_pids.add(args[0])
                return args[0], args[1]
        raise ChildProcessError

    def _kill(self, pid: int, signum: int) -> None:
        self.killed.append((pid, signum))
        if pid in self.gone_pids:
            raise ProcessLookupError

    def _write(self, fd: int, data: bytes) -> int:
        self.written[fd] = self.written.get(fd, b"") + data
        return len(data)

    def _enter_net(self, fd: int) -> None:
        assert fd == NETNS
        if self.setns_error:
            raise self.setns_error

    def _execvpe(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.log.append(("execvpe", name, argv, env))
        if self.exec_error:
            raise self.exec_error

    def _exit(self, code: int) -> None:
        raise Exited(code)

    def _record(self, name: str, result=None):
        def call(*args):
            self.log.append((name, *args))
            return result
        return call

    def calls(self) -> Calls:
        def handle(signum: int, handler) -> None:
            self.handlers[signum] = handler

        return Calls(
            die_with_parent=self._record("die_with_parent"), parent_gone=lambda fd: self.gone,
            enter_net=self._enter_net, handle=handle, unblock_signals=self._record("unblock_signals"),
            pipe=lambda: (EXEC_R, EXEC_W), fork=lambda: self.forked, read_all=lambda fd: self.exec_failure,
            write=self._write, close=self.closed.append, waitpid=self._waitpid, kill=self._kill,
            getpid=lambda: self.pid, exit=self._exit, setpgid=self._record("setpgid"),
            keep_capabilities=self._record("keep_capabilities"), setgroups=self._record("setgroups"),
            setgid=self._record("setgid"), setuid=self._record("setuid"),
            bind_service_only=self._record("bind_service_only"), closerange=self._record("closerange"),
            max_fds=lambda: 1024, execvpe=self._execvpe,
        )

    def run(self, command=("server", "-d"), creds: Credentials | None = None) -> int:
        return _init(command, NETNS, {"PATH": "/bin"}, creds, REPORT_W, STATUS_W, self.calls())


# --- InitState: the decisions ----------------------------------------------------------------


@pytest.mark.parametrize("pid1", [True, False])
def test_a_signal_goes_to_the_first_process_while_it_lives(pid1):
    state = InitState(pid1)
    state.first = SERVER
    assert state.forward_to(signal.SIGHUP) == SERVER and state.stopping is None
    assert state.forward_to(signal.SIGTERM) == SERVER and state.stopping == signal.SIGTERM
    assert state.forward_to(signal.SIGINT) == SERVER and state.stopping == signal.SIGINT  # the last one counts


def test_once_the_first_process_is_gone_a_signal_goes_to_every_process_left_only_as_pid_1():
    assert InitState(pid1=True).forward_to(signal.SIGUSR1) == -1
    outside = InitState(pid1=False)
    assert outside.forward_to(signal.SIGUSR1) is None  # -1 would be every process of the host
    assert outside.forward_to(signal.SIGTERM) is None and outside.stopping == signal.SIGTERM


@pytest.mark.parametrize("pid1, stopping, raw, code, rest", [
    (True, None, 3, 3, None),  # exited on its own: what it left runs on (a daemon's children)
    (True, signal.SIGTERM, -signal.SIGTERM, 143, signal.SIGTERM),  # asked to stop: so is the rest
    (True, signal.SIGINT, 130, 130, signal.SIGINT),
    (False, signal.SIGTERM, -signal.SIGTERM, 143, None),  # never -1 outside a PID namespace of our own
    (True, None, -signal.SIGSEGV, 139, None),
])
def test_the_first_process_exiting_sets_the_code_and_what_the_rest_get(pid1, stopping, raw, code, rest):
    state = InitState(pid1)
    state.first = SERVER
    if stopping:
        state.forward_to(stopping)
    assert state.code == EXIT_FAILED  # until the first process has exited
    assert state.first_exited(raw) == rest
    assert state.code == code and state.first is None


# --- the init, run against the fake ----------------------------------------------------------


def test_the_init_reports_the_exec_then_reaps_until_the_last_process_and_exits_with_the_firsts_status():
    fake = FakeInit([("exit", 207, exited(0)), ("exit", SERVER, exited(3)), ("exit", 208, killed(9))])
    assert fake.run() == 3
    assert fake.written == {REPORT_W: b"ok", STATUS_W: b"3"}
    assert fake.killed == []  # exited on its own: nobody is signalled
    assert fake.log[0] == ("die_with_parent", signal.SIGKILL)
    assert set(fake.handlers) == {*FORWARDED, signal.SIGALRM} and fake.handlers[signal.SIGALRM] == signal.SIG_DFL
    assert fake.closed == [EXEC_W, REPORT_W, STATUS_W]
    assert ("unblock_signals",) in fake.log  # signals blocked since before the fork: none was lost


def test_the_status_told_to_nswrap_keeps_the_signal_apart_from_an_exit_code():
    fake = FakeInit([("exit", SERVER, killed(signal.SIGSEGV))])
    assert fake.run() == 139
    assert fake.written[STATUS_W] == b"-11"  # not "139": nswrap says "killed by SIGSEGV"


def test_a_stop_goes_to_the_server_then_to_what_it_left_running():
    fake = FakeInit([("signal", signal.SIGHUP), ("signal", signal.SIGTERM), ("exit", SERVER, killed(signal.SIGTERM)),
                     ("exit", 300, killed(signal.SIGTERM))])
    assert fake.run() == 143
    assert fake.killed == [(SERVER, signal.SIGHUP), (SERVER, signal.SIGTERM), (-1, signal.SIGTERM)]
    assert fake.written[STATUS_W] == b"-15"


def test_after_the_first_process_a_signal_goes_to_every_process_left():
    fake = FakeInit([("exit", SERVER, exited(0)), ("signal", signal.SIGUSR1), ("exit", 300, exited(0))])
    assert fake.run() == 0
    assert fake.killed == [(-1, signal.SIGUSR1)]


def test_outside_a_pid_namespace_of_its_own_the_init_never_signals_minus_one():
    fake = FakeInit([("signal", signal.SIGTERM), ("exit", SERVER, killed(signal.SIGTERM)), ("signal", signal.SIGINT),
                     ("signal", signal.SIGHUP)], pid=4711)
    assert fake.run() == 143
    assert fake.killed == [(SERVER, signal.SIGTERM)]


def test_a_signal_with_no_process_left_to_take_it_is_no_error():
    fake = FakeInit([("exit", SERVER, exited(0)), ("signal", signal.SIGHUP), ("signal", signal.SIGTERM)])
    fake.gone_pids.add(-1)  # kill(-1) with nobody left: ESRCH
    assert fake.run() == 0
    assert fake.killed == [(-1, signal.SIGHUP), (-1, signal.SIGTERM)]


def test_an_exec_failure_is_reported_with_its_errno():
    fake = FakeInit([("exit", SERVER, exited(EXIT_NOT_FOUND))], exec_failure=b"2")
    assert fake.run() == EXIT_NOT_FOUND
    assert fake.written[REPORT_W] == b"exec:2"


def test_an_init_whose_nswrap_is_gone_does_nothing():
    fake = FakeInit(gone=True)
    assert fake.run() == EXIT_FAILED
    assert fake.written == {} and fake.handlers == {} and fake.killed == []


def test_an_init_that_cannot_enter_the_network_namespace_says_why():
    fake = FakeInit(setns_error=PermissionError(errno.EPERM, "Operation not permitted"))
    assert fake.run() == EXIT_FAILED
    assert fake.written == {REPORT_W: b"setns: Operation not permitted"} and fake.handlers == {}


# --- the forked server: privileges, then exec -------------------------------------------------


def test_the_server_child_reports_a_failed_exec_and_exits_127():
    fake = FakeInit(fork=0, exec_error=PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(Exited) as raised:
        fake.run()
    assert raised.value.args == (EXIT_NOT_FOUND,)
    assert fake.closed == [EXEC_R] and fake.written == {EXEC_W: b"13"}
    assert ("execvpe", "server", ["server", "-d"], {"PATH": "/bin"}) in fake.log


def exec_log(creds: Credentials | None) -> list[tuple]:
    fake = FakeInit()
    _exec_server(("unbound", "-d"), {"PATH": "/bin"}, creds, EXEC_W, fake.calls())
    assert fake.handlers == dict.fromkeys((*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ), signal.SIG_DFL)
    return fake.log


def test_the_server_runs_in_its_own_process_group_with_default_signals_and_only_the_report_fd():
    assert exec_log(None) == [
        ("setpgid", 0, 0), ("unblock_signals",), ("closerange", 3, EXEC_W), ("closerange", EXEC_W + 1, 1024),
        ("execvpe", "unbound", ["unbound", "-d"], {"PATH": "/bin"}),
    ]


def test_privileges_are_dropped_groups_first_uid_last():
    log = exec_log(Credentials(uid=1000, gid=1001, groups=(1001, 27)))
    assert log[1:4] == [("setgroups", [1001, 27]), ("setgid", 1001), ("setuid", 1000)]
    assert "keep_capabilities" not in {call[0] for call in log}


def test_the_bind_capability_is_kept_across_the_uid_change_and_nothing_else():
    log = exec_log(Credentials(uid=1000, gid=1001, groups=(), bind_capability=True))
    assert log[1:6] == [("keep_capabilities",), ("setgroups", []), ("setgid", 1001), ("setuid", 1000),
                        ("bind_service_only",)]
    assert log[-1][0] == "execvpe"


def test_close_all_but_closes_every_gap_between_the_kept_fds():
    fake = FakeInit()
    _close_all_but(fake.calls(), 9, 3, 5)
    assert fake.log == [("closerange", 3, 3), ("closerange", 4, 5), ("closerange", 6, 9), ("closerange", 10, 1024)]


# --- the real helpers, on real pipes (no fork) -----------------------------------------------


def test_a_report_pipe_whose_reader_is_gone_tells_that_nswrap_is_gone():
    r, w = os.pipe()
    try:
        assert not _parent_gone(w)
        os.close(r)
        assert _parent_gone(w)
    finally:
        os.close(w)


def test_read_all_reads_to_the_end_and_closes():
    r, w = os.pipe()
    os.write(w, b"exec:")
    os.write(w, b"13")
    os.close(w)
    assert _read_all(r) == b"exec:13"
    with pytest.raises(OSError):
        os.fstat(r)


@pytest.mark.parametrize("outcome, code, message", [
    (b"exec:2", EXIT_NOT_FOUND, "command not found: unbound"),
    (b"exec:13", EXIT_NOT_EXECUTABLE, "cannot execute unbound: Permission denied"),
    (b"setns: Operation not permitted", EXIT_FAILED, "the server's init failed: setns: Operation not permitted"),
    (b"", EXIT_FAILED, "the server's init failed: no report"),  # the init died before it could say
])
def test_what_the_init_reports_becomes_one_error(outcome, code, message):
    assert _start_error("unbound", b"ok") is None
    error = _start_error("unbound", outcome)
    assert error is not None and error.code == code and str(error) == message
