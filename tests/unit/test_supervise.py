"""supervise.py without a server: the exit status mapping (the shell's and tini's convention) and
what a signal does during setup and teardown. No fork, no namespace, no root.
"""

from __future__ import annotations

import errno
import signal

import pytest

from nswrap.errors import EXIT_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, NswrapError
from nswrap.supervise import Interrupted, Supervisor, _exec_error, check_command, describe_exit, exit_status


@pytest.mark.parametrize("code, status", [(0, 0), (1, 1), (7, 7), (125, 125), (255, 255), (-9, 137), (-15, 143), (-2, 130),
                                          (-1, 129), (-64, 192)])
def test_exit_status_is_the_code_or_128_plus_the_signal(code, status):
    assert exit_status(code) == status


@pytest.mark.parametrize(
    "code, said",
    [
        (0, None),
        (7, "the server exited with status 7"),
        (1, "the server exited with status 1"),
        (-9, "the server was killed by SIGKILL"),
        (-15, "the server was killed by SIGTERM"),
        (-11, "the server was killed by SIGSEGV"),
        (-6, "the server was killed by SIGABRT"),
        (-signal.SIGRTMIN - 3, f"the server was killed by signal {signal.SIGRTMIN + 3}"),  # no name in signal.Signals
        (-64, "the server was killed by SIGRTMAX"),
    ],
)
def test_describe_exit(code, said):
    assert describe_exit(code) == said


@pytest.mark.parametrize(
    "err, code, message",
    [
        (errno.ENOENT, EXIT_NOT_FOUND, "command not found: unboundd"),
        (errno.EACCES, EXIT_NOT_EXECUTABLE, "cannot execute unboundd: Permission denied"),
        (errno.ENOEXEC, EXIT_NOT_EXECUTABLE, "cannot execute unboundd: Exec format error"),
        (errno.EISDIR, EXIT_NOT_EXECUTABLE, "cannot execute unboundd: Is a directory"),
        (errno.E2BIG, EXIT_NOT_EXECUTABLE, "cannot execute unboundd: Argument list too long"),
    ],
)
def test_exec_errors_map_to_126_and_127(err, code, message):
    error = _exec_error("unboundd", err)
    assert isinstance(error, NswrapError) and error.code == code and str(error) == message


def test_exit_codes_are_those_of_the_shell():
    assert (EXIT_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND) == (125, 126, 127)  # docker run's, env's, tini's


# --- signals during setup and teardown (handlers called directly) ------------------------------------


def test_a_signal_during_setup_stops_at_the_next_checkpoint():
    supervisor = Supervisor()
    supervisor.checkpoint()  # nothing pending
    supervisor._on_signal(signal.SIGTERM, None)
    supervisor._on_signal(signal.SIGINT, None)  # the first one is kept
    with pytest.raises(Interrupted, match="interrupted by SIGTERM") as raised:
        supervisor.checkpoint()
    assert raised.value.signum == signal.SIGTERM and exit_status(-raised.value.signum) == 143


def test_a_signal_while_waiting_for_the_lock_interrupts_at_once():
    supervisor = Supervisor()
    with pytest.raises(Interrupted, match="SIGINT"):
        with supervisor.waiting():
            assert supervisor.interruptible
            supervisor._on_signal(signal.SIGINT, None)
    assert not supervisor.interruptible


def test_signals_are_ignored_while_tearing_down():
    supervisor = Supervisor()
    supervisor.tearing_down = True
    supervisor._on_signal(signal.SIGTERM, None)
    supervisor.checkpoint()
    assert supervisor.pending is None and not supervisor.alive()


def test_waiting_checks_first():
    supervisor = Supervisor()
    supervisor._on_signal(signal.SIGHUP, None)
    with pytest.raises(Interrupted, match="SIGHUP"):
        with supervisor.waiting():
            pytest.fail("a pending signal must stop before the wait")


def test_a_command_that_exists_nowhere_is_refused_before_any_change(tmp_path):
    env = {"PATH": f"/nonexistent:{tmp_path}"}
    (tmp_path / "server").write_text("")  # exists: whether it may be executed is the exec's to say
    check_command(("server",), env)
    check_command((str(tmp_path / "server"),), env)
    check_command((str(tmp_path),), env)  # a directory: the exec says 126
    for missing in ("no-such-server", str(tmp_path / "nope"), "./nope"):
        with pytest.raises(NswrapError, match=f"^command not found: {missing}$") as e:
            check_command((missing,), env)
        assert e.value.code == EXIT_NOT_FOUND
