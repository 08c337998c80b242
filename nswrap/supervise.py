"""Start the server, forward signals to it, reap, wait, and map its exit status.

The server runs under a small init of ours, forked as PID 1 of a new PID namespace:

    nswrap (host)  ──fork──▶  init (PID 1 of the server's PID namespace, in its network namespace)
                                └──fork+exec──▶  the server, and whatever it starts

- The init dies with nswrap (PR_SET_PDEATHSIG), and when the init of a PID namespace dies the
  kernel kills every process in it: no server process, daemonised or not, outlives its wrapper,
  even if nswrap is SIGKILLed. The network namespace and its veth then vanish with them.
- The init reaps orphans and waits until the *last* process has exited, so servers that fork into
  the background keep the instance alive; the exit status is the first process's (128+N for a signal).
- Signals: nswrap forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 to the init, which
  passes them to the server's first process while it lives, else to every process in the namespace;
  once a stop was asked for and the first process has exited, the rest get the stop signal too.
  After SIGTERM or SIGINT, nswrap waits --stop-timeout seconds, then SIGKILLs the whole namespace.
- Setup phase: a signal is noted and setup stops at the next step boundary (`checkpoint`), never
  in the middle of a netlink exchange or an nft batch; the caller rolls back and exits 128+N.
  Teardown phase: signals are ignored so teardown always completes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import time
from dataclasses import dataclass

from nswrap.errors import EXIT_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, NswrapError

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT)
CLONE_NEWPID = 0x20000000
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]


def exit_status(returncode: int) -> int:
    """The shell's convention: the server's own code, or 128+N if it died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _exec_error(command: str, err: int) -> NswrapError:
    if err == errno.ENOENT:
        return NswrapError(f"command not found: {command}", EXIT_NOT_FOUND)
    return NswrapError(f"cannot execute {command}: {os.strerror(err)}", EXIT_NOT_EXECUTABLE)


class Supervisor:
    def __init__(self, stop_timeout: float = 10.0):
        self.stop_timeout = stop_timeout
        self.init_pid: int | None = None
        self.tearing_down = False
        self.pending: int | None = None  # a signal that arrived during setup

    def install(self) -> None:
        for signum in FORWARDED:
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGALRM, self._on_stop_timeout)

    def _on_signal(self, signum: int, frame) -> None:
        if self.tearing_down:
            return
        if self.init_pid is None:
            self.pending = self.pending or signum  # acted on at the next checkpoint
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signum)
        if signum in STOPPING and self.stop_timeout > 0:
            signal.setitimer(signal.ITIMER_REAL, self.stop_timeout)

    def checkpoint(self) -> None:
        """Between setup steps: give up (and roll back) if a signal asked us to."""
        if self.pending is not None:
            raise Interrupted(self.pending)

    def _on_stop_timeout(self, signum: int, frame) -> None:
        if self.init_pid is not None and not self.tearing_down:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)  # the kernel then kills the whole namespace

    def start(self, command: tuple[str, ...], netns_fd: int, env: dict[str, str], creds: Credentials | None,
              resolv_conf: str | None = None) -> None:
        """Fork the init into a new PID namespace; return once the server has been exec'd.

        `resolv_conf`: a file the server sees as /etc/resolv.conf, through a private mount namespace."""
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # none lost, none half-handled
        try:
            self.checkpoint()  # a signal noted since the last step: do not start at all
            if _libc.unshare(CLONE_NEWPID) != 0:
                raise NswrapError(f"cannot create a PID namespace: {os.strerror(ctypes.get_errno())}")
            try:
                pid = os.fork()
                if pid == 0:
                    code = EXIT_FAILED
                    try:
                        _close_all_but(netns_fd, report_w)  # nswrap's sockets, a --ready-fd: not the init's
                        code = _init(command, netns_fd, env, creds, report_w, resolv_conf)
                    finally:
                        os._exit(code)
            finally:
                # later children (nft, at teardown) stay in our own PID namespace
                _libc.setns(own_pidns, CLONE_NEWPID)
            self.init_pid = pid
        finally:
            os.close(own_pidns)
            os.close(report_w)
            if self.init_pid is None:
                os.close(report_r)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        with os.fdopen(report_r, "rb") as report:
            outcome = report.read()
        if outcome != b"ok":
            self.wait()
            if outcome.startswith(b"exec:"):
                raise _exec_error(command[0], int(outcome[5:]))
            raise NswrapError(f"the server's init failed: {outcome.decode(errors='replace') or 'no report'}")

    def wait(self, monitor=None, on_change=None, settle: float = 0.1) -> int:
        """Wait for the init, reaping anything else that ends up as our child (nswrap as PID 1).

        With a `monitor` (something with fileno() and drain()), call `on_change()` once things
        have been quiet for `settle` seconds after an event: uplinks are followed while serving.
        """
        pidfd = os.pidfd_open(self.init_pid)
        changed_at = first_change = None
        try:
            while True:
                due = None if changed_at is None else min(changed_at + settle, first_change + 10 * settle)
                timeout = 1.0 if due is None else max(0.0, due - time.monotonic())
                fds = [pidfd] + ([monitor.fileno()] if monitor else [])
                ready, _, _ = select.select(fds, [], [], timeout)
                status = self._reap()
                if status is not None:
                    self.tearing_down = True
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    return exit_status(os.waitstatus_to_exitcode(status))
                now = time.monotonic()
                if monitor and monitor.fileno() in ready and monitor.drain():
                    changed_at = now  # settle first: one change often comes as a burst of events
                    first_change = first_change or now
                if due is not None and now >= due:  # quiet for `settle`, or busy for 10x that
                    changed_at = first_change = None
                    on_change()
        finally:
            os.close(pidfd)

    def _reap(self) -> int | None:
        """Reap every child that exited (orphans, when nswrap is PID 1); the init's status, if it did."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return EXIT_FAILED << 8
            if pid == 0:
                return None
            if pid == self.init_pid:
                return status


# --- the init, PID 1 of the server's PID namespace (runs in the forked child only) ------------


def _private_resolv_conf(path: str) -> str | None:
    """Bind `path` over /etc/resolv.conf in a mount namespace of our own; an error text or None."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        return f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}"
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing propagates back to the host
        return f"mount --make-rprivate /: {os.strerror(ctypes.get_errno())}"
    if _libc.mount(path.encode(), b"/etc/resolv.conf", None, MS_BIND, None) != 0:
        return f"bind-mount {path} on /etc/resolv.conf: {os.strerror(ctypes.get_errno())}"
    return None


def _init(command, netns_fd: int, env, creds: Credentials | None, report_w: int, resolv_conf: str | None) -> int:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # nswrap, outside our PID namespace, shows as ppid 0: tell whether it died before PDEATHSIG
    # was armed by its end of the report pipe (a closed read end makes ours poll POLLERR).
    poller = select.poll()
    poller.register(report_w, select.POLLOUT)
    if any(events & select.POLLERR for _, events in poller.poll(0)):
        return EXIT_FAILED
    if _libc.setns(netns_fd, 0x40000000) != 0:  # CLONE_NEWNET
        os.write(report_w, f"setns: {os.strerror(ctypes.get_errno())}".encode())
        return EXIT_FAILED
    failure = _private_resolv_conf(resolv_conf) if resolv_conf else None
    if failure:
        os.write(report_w, failure.encode())
        return EXIT_FAILED
    running: list[int] = []  # the server's first process, until it is reaped
    stopping: list[int] = []  # the stop signal we were asked to pass on, once one came

    def forward(signum: int, frame) -> None:
        if signum in STOPPING:
            stopping.append(signum)
        target = running[0] if running else -1  # -1: every process in our namespace but us
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    exec_r, exec_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(exec_r)
            _exec_server(command, env, creds, exec_w)
        except OSError as e:
            os.write(exec_w, str(e.errno or errno.EIO).encode())
        os._exit(EXIT_NOT_FOUND)
    running.append(pid)
    os.close(exec_w)
    with os.fdopen(exec_r, "rb") as failure:
        err = failure.read()
    os.write(report_w, b"exec:" + err if err else b"ok")
    os.close(report_w)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())

    code = EXIT_FAILED
    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return code  # the last process of the namespace is gone
        if reaped == pid:
            running.clear()
            code = exit_status(os.waitstatus_to_exitcode(status))
            if stopping:  # asked to stop and the server is gone: so is everything it left running
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, stopping[-1])


def _close_all_but(*keep: int) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _exec_server(command, env, creds: Credentials | None, report_fd: int) -> None:
    for signum in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    os.setpgid(0, 0)
    if creds is not None:
        os.setgroups(list(creds.groups))
        os.setgid(creds.gid)
        os.setuid(creds.uid)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    _close_all_but(report_fd)  # which closes on exec
    os.execvpe(command[0], list(command), env)
