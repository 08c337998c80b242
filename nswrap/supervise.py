"""Start the server in its namespace, forward signals to it, wait for it, map its exit status.

Signals have three phases. During setup a signal aborts it (the caller rolls back and exits
128+N); while the server runs, SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 are forwarded to it;
during teardown they are ignored so teardown always completes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from nswrap.errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, NswrapError

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def exit_status(returncode: int) -> int:
    """The shell's convention: the server's own code, or 128+N if it died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.tearing_down = False

    def install(self) -> None:
        for signum in FORWARDED:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.tearing_down:
            return
        if self.child is None:
            raise Interrupted(signum)
        if self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signum)

    def start(self, command: tuple[str, ...], enter_namespace) -> None:
        """Start the server. Signals are held while it starts, so none is lost or half-handled."""

        def child_setup() -> None:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            enter_namespace()

        held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            # Own process group: a terminal's Ctrl-C reaches nswrap only, which forwards it once.
            self.child = subprocess.Popen(command, preexec_fn=child_setup, process_group=0)
        except FileNotFoundError:
            raise NswrapError(f"command not found: {command[0]}", EXIT_NOT_FOUND) from None
        except PermissionError:
            raise NswrapError(f"command not executable: {command[0]}", EXIT_NOT_EXECUTABLE) from None
        except OSError as e:
            raise NswrapError(f"cannot run {command[0]}: {e.strerror}", EXIT_NOT_EXECUTABLE) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def wait(self) -> int:
        returncode = self.child.wait()
        self.tearing_down = True
        return exit_status(returncode)
