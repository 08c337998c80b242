"""Processes started in the lab's namespaces: each in its own session, tracked until it is
gone with its whole process group, so nothing a test starts outlives the lab."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from tests.lab.shell import LabError
from tests.lab.wait import wait_until


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid*, read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields start after the last ")"
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is the state, fields[2] the process group
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Processes:
    """The processes (and their process groups) one lab started."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def spawn(self, ns: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start *argv* in namespace *ns* in a new session and track it (see :meth:`Lab.spawn`)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *map(str, argv)], start_new_session=True, **popen_kwargs
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, *, sig: int = signal.SIGTERM,
             timeout: float = 10) -> int:
        """Send *sig* to *proc* only, wait for it to exit and return its status.

        Afterwards nothing of its process group may survive.  Raises
        :class:`TimeoutError` if it did not exit within *timeout* seconds and
        :class:`LabError` if it left processes behind; in both cases the whole
        group is killed first.
        """
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise TimeoutError(
                    f"{proc.args!r} did not exit within {timeout}s of signal {sig}; killed"
                ) from None
        leftovers = group_members(proc.pid)
        if leftovers:
            self._kill(proc)
            raise LabError(f"{proc.args!r} exited but left processes {leftovers}; killed")
        # Fully gone: stop tracking it, so its (reusable) pid is never signalled.
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def _kill(self, proc: subprocess.Popen, grace: float = 5) -> None:
        """SIGTERM, then SIGKILL, the process group of *proc*; reap *proc*."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is None or group_members(proc.pid):
                _signal_group(proc.pid, sig)
            try:
                proc.wait(grace)
                wait_until(lambda: not group_members(proc.pid), grace)
                return
            except (subprocess.TimeoutExpired, TimeoutError):
                continue
        raise LabError(f"could not kill {proc.args!r} (pid {proc.pid})")

    def stop_all(self) -> None:
        """Kill every tracked process (group) still running and reap it."""
        errors = []
        for proc in self._procs:
            try:
                self._kill(proc)
            except LabError as e:
                errors.append(str(e))
        self._procs = [p for p in self._procs if p.poll() is None]
        if errors:
            raise LabError("; ".join(errors))
