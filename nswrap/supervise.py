"""Start the server, forward signals to it, reap, wait, and map its exit status.

The server runs under a small init of ours, forked as PID 1 of a new PID namespace:

    nswrap (host)  --fork-->  init (PID 1 of the server's PID namespace, in its network namespace)
                                 `--fork+exec-->  the server, and whatever it starts

- The init dies with nswrap (PR_SET_PDEATHSIG), and when the init of a PID namespace dies the
  kernel kills every process in it: no server process, daemonised or not, outlives its wrapper,
  even if nswrap is SIGKILLed. The network namespace and its veth then vanish with them.
- The init reaps orphans and waits until the *last* process has exited, so servers that fork into
  the background keep the instance alive; the exit status is the first process's (128+N for a signal).
- Signals: nswrap forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 to the init, which
  passes them to the server's first process while it lives, else to every process in the namespace;
  once a stop was asked for and the first process has exited, the rest get the stop signal too.
  SIGINT (Ctrl-C) means "stop" to nswrap, whatever the server makes of it (dnsmasq -k re-checks
  DNSSEC time on it and runs on): a server still alive INT_GRACE after it gets SIGTERM too. After
  SIGTERM or SIGINT, nswrap waits --stop-timeout seconds (and says so), then SIGKILLs.
- Setup phase: a signal is noted and setup stops at the next step (`checkpoint`), never in the
  middle of a netlink exchange or an nft batch; waiting for the setup lock is interrupted at once.
  Teardown phase: signals are ignored so teardown always completes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from nswrap import namespaces
from nswrap.datatypes import datatype
from nswrap.errors import EXIT_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, NswrapError

log = logging.getLogger("nswrap")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT)
# Ctrl-C: a server that handles SIGINT as a stop is gone within milliseconds; one still running
# this long after it does not take SIGINT as a stop (dnsmasq -k), and gets SIGTERM, which every
# server takes as one. Short: Ctrl-C must end a stock server within a second.
INT_GRACE = 0.5


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@datatype
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    bind_capability: bool = False  # keep CAP_NET_BIND_SERVICE (where the namespace's sysctl cannot be set)


def exit_status(returncode: int) -> int:
    """The shell's convention: the server's own code, or 128+N if it died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(waitstatus_code: int) -> str | None:
    """One line for a server that did not exit 0, or None."""
    if waitstatus_code < 0:
        try:
            name = signal.Signals(-waitstatus_code).name
        except ValueError:
            name = f"signal {-waitstatus_code}"
        return f"the server was killed by {name}"
    if waitstatus_code:
        return f"the server exited with status {waitstatus_code}"
    return None


def check_command(command: tuple[str, ...], env: dict[str, str]) -> None:
    """Before any host change: a command that exists nowhere (as execvpe would look for it, in
    the server's PATH) is refused at once, 127. Whether it may be executed is left to the exec."""
    name = command[0]
    places = [name] if "/" in name else [os.path.join(d or ".", name) for d in env.get("PATH", os.defpath).split(os.pathsep)]
    if not any(os.path.exists(p) for p in places):  # (not shutil.which: 4 ms of imports)
        raise _exec_error(name, errno.ENOENT)


def _start_error(command: str, outcome: bytes) -> NswrapError | None:
    """What the init reported on its pipe once the server was exec'd (`ok`), or why not."""
    if outcome == b"ok":
        return None
    if outcome.startswith(b"exec:"):
        return _exec_error(command, int(outcome[5:]))
    return NswrapError(f"the server's init failed: {outcome.decode(errors='replace') or 'no report'}")


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
        self.interruptible = False  # raise at once (waiting for the lock)
        self.stop_asked: float | None = None  # when a stop signal was forwarded
        self.escalate_at: float | None = None  # when a SIGINT not yet obeyed becomes a SIGTERM
        self._said_waiting = False
        self._wakeup_r = -1

    def install(self) -> None:
        for signum in FORWARDED:
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGALRM, self._on_stop_timeout)
        # every signal also wakes the wait loop (which otherwise sleeps until something happens)
        self._wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)

    def _on_signal(self, signum: int, frame) -> None:
        if self.tearing_down:
            return
        if self.init_pid is None:
            self.pending = self.pending or signum  # acted on at the next checkpoint
            if self.interruptible:
                raise Interrupted(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signum)
        if signum == signal.SIGINT and self.stop_asked is None:
            self.escalate_at = time.monotonic() + INT_GRACE
        elif signum == signal.SIGTERM:
            self.escalate_at = None  # asked already
        if signum in STOPPING and self.stop_asked is None:
            self.stop_asked = time.monotonic()
            if self.stop_timeout > 0:
                signal.setitimer(signal.ITIMER_REAL, self.stop_timeout)

    @contextlib.contextmanager
    def waiting(self):
        """A blocking wait that a stop signal must interrupt at once."""
        self.checkpoint()
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def checkpoint(self) -> None:
        """Between setup steps: give up (and roll back) if a signal asked us to."""
        if self.pending is not None:
            raise Interrupted(self.pending)

    def _on_stop_timeout(self, signum: int, frame) -> None:
        if self.init_pid is not None and not self.tearing_down:
            log.warning("the server did not exit within --stop-timeout %gs: killing it", self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)  # the kernel then kills the whole namespace

    def start(self, command: tuple[str, ...], netns_fd: int, env: dict[str, str], creds: Credentials | None) -> None:
        """Fork the init into a new PID namespace; return once the server has been exec'd."""
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        self._status_r, status_w = os.pipe2(os.O_CLOEXEC)
        own_pidns = namespaces.own("pid")
        held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # none lost, none half-handled
        try:
            self.checkpoint()  # a signal noted since the last step: do not start at all
            try:
                namespaces.unshare_pid()
            except OSError as e:
                raise NswrapError(f"cannot create a PID namespace: {e.strerror}") from None
            try:
                pid = os.fork()
                if pid == 0:
                    code = EXIT_FAILED
                    try:
                        signal.set_wakeup_fd(-1)  # nswrap's wait loop is not the init's
                        _close_all_but(REAL, netns_fd, report_w, status_w)  # nswrap's sockets, locks, --ready-fd: not the init's
                        code = _init(command, netns_fd, env, creds, report_w, status_w, REAL)
                    finally:
                        os._exit(code)
            finally:
                namespaces.enter_pid(own_pidns)  # later children (nft, at teardown) stay in ours
            self.init_pid = pid
        finally:
            os.close(own_pidns)
            os.close(report_w)
            os.close(status_w)
            if self.init_pid is None:
                os.close(report_r)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        with os.fdopen(report_r, "rb") as report:
            outcome = report.read()
        failed = _start_error(command[0], outcome)
        if failed is not None:
            self.wait(report=False)
            raise failed

    def wait(self, fds: list[int] | None = None, on_ready: Callable[[list[int]], float | None] | None = None,
             report: bool = True) -> int:
        """Wait for the init, reaping anything else that ends up as our child (nswrap as PID 1).

        `on_ready(ready_fds)` is called at once, then when one of `fds` is readable, or when the
        time it last returned (seconds from now) has passed; it returns the next such time, or None."""
        assert self.init_pid is not None
        pidfd = os.pidfd_open(self.init_pid)
        due: float | None = time.monotonic() if on_ready else None
        try:
            while True:
                now = time.monotonic()
                self._escalate(now)
                self._say_still_waiting(now)
                wake = [t for t in (due, self._still_waiting_due(), self.escalate_at) if t is not None]
                timeout = max(0.0, min(wake) - now) if wake else None  # idle: sleep until something happens
                ready, _, _ = select.select([pidfd, self._wakeup_r, *(fds or [])], [], [], timeout)
                if self._wakeup_r in ready:  # a signal was handled: look again
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wakeup_r, 512)
                status = self._reap()
                if status is not None:
                    self.tearing_down = True
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    code = self._server_status(os.waitstatus_to_exitcode(status))
                    said = describe_exit(code)
                    if said and report and not self._stopped_as_asked(code):
                        log.warning("%s", said)
                    return exit_status(code)
                ready = [fd for fd in ready if fd not in (pidfd, self._wakeup_r)]
                if on_ready and (ready or (due is not None and time.monotonic() >= due)):
                    next_in = on_ready(ready)
                    due = None if next_in is None else time.monotonic() + next_in
        finally:
            os.close(pidfd)

    def _stopped_as_asked(self, code: int) -> bool:
        """A server that died of the stop signal it was sent, or caught it and exited 128+N as
        shells and many servers do (socat: 130 after SIGINT): no news."""
        return self.stop_asked is not None and any(code in (-s, 128 + s) for s in STOPPING)

    def _server_status(self, init_code: int) -> int:
        """The server's own exit code (negative: its signal), as the init saw it: the init, PID 1
        of its namespace, cannot die of the server's signal itself. The init's if it said none
        (killed by --stop-timeout, say)."""
        try:
            told = os.read(self._status_r, 32)
        except OSError:
            told = b""
        finally:
            os.close(self._status_r)
        try:
            return int(told) if told else init_code
        except ValueError:
            return init_code

    def _escalate(self, now: float) -> None:
        """Ctrl-C that the server did not take as a stop: SIGTERM, which it does."""
        if self.escalate_at is None or now < self.escalate_at or self.init_pid is None or self.tearing_down:
            return
        self.escalate_at = None
        log.info("the server is still running %gs after SIGINT: sending it SIGTERM", INT_GRACE)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGTERM)

    def _still_waiting_due(self) -> float | None:
        if self.stop_asked is None or self._said_waiting:
            return None
        return self.stop_asked + 1.0

    def _say_still_waiting(self, now: float) -> None:
        """A server slow to stop (one that ignores SIGTERM too): say once what nswrap waits for."""
        if self.stop_asked is None or self._said_waiting or now - self.stop_asked < 1.0:
            return
        self._said_waiting = True
        if self.stop_timeout > 0:
            left = max(0.0, self.stop_timeout - (now - self.stop_asked))
            log.warning("waiting for the server to exit: SIGKILL in %.0f s (--stop-timeout %g)", left, self.stop_timeout)
        else:
            log.warning("waiting for the server to exit (--stop-timeout 0: never killed)")

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

    def alive(self) -> bool:
        return self.init_pid is not None and not self.tearing_down

    def kill(self, signum: int = signal.SIGTERM) -> None:
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signum)
            if signum in STOPPING and self.stop_asked is None and self.stop_timeout > 0:
                self.stop_asked = time.monotonic()
                signal.setitimer(signal.ITIMER_REAL, self.stop_timeout)


# --- the init, PID 1 of the server's PID namespace (runs in the forked child only) ------------


@datatype
class Calls:
    """Every system call the init and the server's exec make. The forked child gets `REAL`; unit
    tests pass a fake with every field given (there are no defaults: a call a fake forgot fails,
    it never reaches the real kernel, where the init's `kill(-1, ...)` would stop the machine)."""

    die_with_parent: Callable[[int], None]
    parent_gone: Callable[[int], bool]
    enter_net: Callable[[int], None]
    handle: Callable[[int, Any], object]  # signal.signal
    unblock_signals: Callable[[], None]
    pipe: Callable[[], tuple[int, int]]
    fork: Callable[[], int]
    read_all: Callable[[int], bytes]
    write: Callable[[int, bytes], object]
    close: Callable[[int], None]
    waitpid: Callable[[int, int], tuple[int, int]]
    kill: Callable[[int, int], None]
    getpid: Callable[[], int]
    exit: Callable[[int], None]  # os._exit
    setpgid: Callable[[int, int], None]
    keep_capabilities: Callable[[], None]
    setgroups: Callable[[list[int]], None]
    setgid: Callable[[int], None]
    setuid: Callable[[int], None]
    bind_service_only: Callable[[], None]
    closerange: Callable[[int, int], None]
    max_fds: Callable[[], int]
    execvpe: Callable[[str, list[str], dict[str, str]], None]


def _parent_gone(report_w: int) -> bool:
    """nswrap, outside our PID namespace, shows as ppid 0: tell whether it died before PDEATHSIG
    was armed by its end of the report pipe (a closed read end makes ours poll POLLERR)."""
    poller = select.poll()
    poller.register(report_w, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


REAL = Calls(
    die_with_parent=namespaces.die_with_parent, parent_gone=_parent_gone, enter_net=namespaces.enter_net,
    handle=signal.signal, unblock_signals=_unblock_signals, pipe=lambda: os.pipe2(os.O_CLOEXEC), fork=os.fork,
    read_all=_read_all, write=os.write, close=os.close, waitpid=os.waitpid, kill=os.kill, getpid=os.getpid,
    exit=os._exit, setpgid=os.setpgid, keep_capabilities=namespaces.keep_capabilities, setgroups=os.setgroups,
    setgid=os.setgid, setuid=os.setuid, bind_service_only=namespaces.bind_service_only, closerange=os.closerange,
    max_fds=lambda: os.sysconf("SC_OPEN_MAX"), execvpe=os.execvpe,
)


class InitState:
    """The init's decisions, without a system call: whom a forwarded signal goes to, and what is
    left to do once the server's first process has exited."""

    def __init__(self, pid1: bool):
        # Only as PID 1 of its own PID namespace does -1 mean "the server's processes": anywhere
        # else it would be every process the caller may signal (a unit test once ran the init
        # without its namespace, as root: it stopped the whole machine)
        self.pid1 = pid1
        self.first: int | None = None  # the server's first process, until it is reaped
        self.stopping: int | None = None  # the last stop signal we were asked to pass on
        self.code = EXIT_FAILED  # the init's own exit code: the first process's status

    def forward_to(self, signum: int) -> int | None:
        """The pid to pass `signum` on to (-1: every process in our namespace but us), or None."""
        if signum in STOPPING:
            self.stopping = signum
        if self.first is not None:
            return self.first
        return -1 if self.pid1 else None

    def first_exited(self, raw: int) -> int | None:
        """The first process ended (`raw`: waitstatus_to_exitcode). The signal every process left
        gets: asked to stop and the server is gone, so is everything it left running. Or None."""
        self.first = None
        self.code = exit_status(raw)
        return self.stopping if self.stopping is not None and self.pid1 else None


def _init(command, netns_fd: int, env, creds: Credentials | None, report_w: int, status_w: int, calls: Calls) -> int:
    calls.die_with_parent(signal.SIGKILL)
    if calls.parent_gone(report_w):
        return EXIT_FAILED
    try:
        calls.enter_net(netns_fd)
    except OSError as e:
        calls.write(report_w, f"setns: {e.strerror}".encode())
        return EXIT_FAILED
    state = InitState(pid1=calls.getpid() == 1)

    def forward(signum: int, frame) -> None:
        target = state.forward_to(signum)
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                calls.kill(target, signum)

    for signum in FORWARDED:
        calls.handle(signum, forward)
    calls.handle(signal.SIGALRM, signal.SIG_DFL)

    exec_r, exec_w = calls.pipe()
    pid = calls.fork()
    if pid == 0:
        try:
            calls.close(exec_r)
            _exec_server(command, env, creds, exec_w, calls)
        except OSError as e:
            calls.write(exec_w, str(e.errno or errno.EIO).encode())
        calls.exit(EXIT_NOT_FOUND)
    state.first = pid
    calls.close(exec_w)
    err = calls.read_all(exec_r)
    calls.write(report_w, b"exec:" + err if err else b"ok")
    calls.close(report_w)
    calls.unblock_signals()

    while True:
        try:
            reaped, status = calls.waitpid(-1, 0)
        except ChildProcessError:
            return state.code  # the last process of the namespace is gone
        if reaped == pid:
            raw = os.waitstatus_to_exitcode(status)
            rest = state.first_exited(raw)
            calls.write(status_w, str(raw).encode())  # nswrap tells "killed by SIGSEGV" from "exited 139"
            calls.close(status_w)
            if rest is not None:
                with contextlib.suppress(ProcessLookupError):
                    calls.kill(-1, rest)


def _close_all_but(calls: Calls, *keep: int) -> None:
    low = 3
    for fd in sorted(keep):
        calls.closerange(low, fd)
        low = fd + 1
    calls.closerange(low, calls.max_fds())


def _exec_server(command, env, creds: Credentials | None, report_fd: int, calls: Calls) -> None:
    for signum in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
        calls.handle(signum, signal.SIG_DFL)
    calls.setpgid(0, 0)
    if creds is not None:
        if creds.bind_capability:
            calls.keep_capabilities()
        calls.setgroups(list(creds.groups))
        calls.setgid(creds.gid)
        calls.setuid(creds.uid)
        if creds.bind_capability:
            calls.bind_service_only()
    calls.unblock_signals()
    _close_all_but(calls, report_fd)  # which closes on exec
    calls.execvpe(command[0], list(command), env)
