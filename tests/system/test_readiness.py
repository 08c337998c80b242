"""READY is true (issue 13): the first query sent the moment READY arrives is answered, over
IPv4 and IPv6, on every path of the lab, every time.

The clients are armed before nswrap starts: one `udpmany.py once` per client namespace, its
connected sockets open, waiting for a line on stdin. The moment READY arrives (on --ready-fd, or
as READY=1 on NOTIFY_SOCKET), the test releases them all; each sends exactly ONE datagram per
path (a DNS query, or an echo) and waits at most 2 s: no retry can hide a path that was not yet
forwarding. Duplicate address detection is switched back on for new interfaces of the lab host
(the lab turns it off for its own links), as on a real host: an address still tentative on
nswrap's interfaces would lose the IPv6 queries.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.lab import wait_until
from tests.system.common import dual_stack_unbound, output, start
from tests.system.udpmany import COMMAND as UDPMANY, target

DAD_ON = {"net.ipv6.conf.default.accept_dad": "1"}

# Supervisor.wait (supervise.py) calls on_ready, which polls Readiness, only once a monitored
# netlink/nft socket is readable: `due` starts as None. On a quiet host READY never comes.

@pytest.fixture
def dad(lab):
    """New interfaces of the lab host do duplicate address detection, as on any real host."""
    before = {key: lab.exec(lab.host, ["sysctl", "-n", key]).stdout.strip() for key in DAD_ON}
    lab.exec(lab.host, ["sysctl", "-qw", *(f"{k}={v}" for k, v in DAD_ON.items())])
    yield
    lab.exec(lab.host, ["sysctl", "-qw", *(f"{k}={v}" for k, v in before.items())])


class Armed:
    """One strict one-shot client per client namespace, armed for every path on `port`."""

    def __init__(self, lab, port: int, dns: bool):
        self.targets: dict[str, list[tuple[str, str]]] = {}
        for path in (*lab.paths, *lab.paths6):
            self.targets.setdefault(path.client, []).append((path.name, target(path.address, port)))
        self.procs = {}
        try:
            for client, items in self.targets.items():
                self.procs[client] = subprocess.Popen(
                    ["ip", "netns", "exec", client, *UDPMANY, "once", *(["--dns"] if dns else []), *(t for _, t in items)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for client, proc in self.procs.items():
                ready, _, _ = select.select([proc.stdout], [], [], 30)
                assert ready and proc.stdout.readline() == "armed\n", f"the client in {client} did not arm"
        except BaseException:
            self.close()
            raise

    def fire(self) -> list[str]:
        """Release every client at once; the paths whose single datagram got no answer."""
        for proc in self.procs.values():
            proc.stdin.write("go\n")
            proc.stdin.flush()
        missed = []
        for client, proc in self.procs.items():
            out, _ = proc.communicate(timeout=30)
            answered = json.loads(out)
            missed += [name for name, t in self.targets[client] if not answered[t]]
        return missed

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def wait_ready_fd(fd: int, proc, timeout: float = 20) -> str:
    """The line nswrap writes on --ready-fd ("" if it closed the fd without one)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"no READY within {timeout}s"
    return os.read(fd, 64).decode()


def start_and_query_at_ready(lab, tmp_path, server: list[str], port: int, dns: bool, name: str) -> list[str]:
    """Start nswrap with --ready-fd; fire the armed clients the moment READY arrives; stop it."""
    armed = Armed(lab, port, dns)
    try:
        ready_r, ready_w = os.pipe()
        try:
            proc = start(lab, tmp_path, "--ready-fd", str(ready_w), "-p", str(port), "--", *server,
                         name=name, pass_fds=(ready_w,))
        finally:
            os.close(ready_w)
        try:
            line = wait_ready_fd(ready_r, proc)
        finally:
            os.close(ready_r)
        assert line == "READY\n", f"{name}: {line!r}; {output(tmp_path, name, 'err')}"
        missed = armed.fire()
    finally:
        armed.close()
    status = lab.stop(proc)
    assert status in (0, 128 + signal.SIGTERM), f"{name}: exit {status}; {output(tmp_path, name, 'err')}"
    return missed


def test_twenty_starts_each_answered_over_ipv4_and_ipv6_the_moment_ready_arrives(lab, tmp_path, dad):
    """A stock unbound bound to 0.0.0.0 and :: (it binds its sockets some time after it starts)."""
    server = dual_stack_unbound(tmp_path, 53)
    missed = {}
    for n in range(20):
        lost = start_and_query_at_ready(lab, tmp_path, server, 53, dns=True, name=f"start{n}")
        if lost:
            missed[n] = lost
    assert not missed, f"first queries lost after READY (start number: paths): {missed}"


def test_ready_waits_for_a_server_that_binds_late(lab, tmp_path, dad):
    """A server that binds its port a second after it starts: READY comes after that, not before."""
    server = ["sh", "-c", f"sleep 1; exec {' '.join(UDPMANY)} serve 5353"]
    assert start_and_query_at_ready(lab, tmp_path, server, 5353, dns=False, name="late") == []


def test_ready_to_notify_socket_is_true(lab, tmp_path, dad):
    directory = tempfile.mkdtemp(prefix="nswrap-notify-")  # short: a unix socket path has 108 bytes
    path = os.path.join(directory, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(path)
        notify.settimeout(20)
        armed = Armed(lab, 53, dns=True)
        try:
            proc = start(lab, tmp_path, "-p", "53", "--", *dual_stack_unbound(tmp_path, 53),
                         env={**os.environ, "NOTIFY_SOCKET": path})
            message = notify.recv(256)
            missed = armed.fire()
        finally:
            armed.close()
        assert message.startswith(b"READY=1"), message
        assert missed == []
        assert lab.stop(proc) == 0, output(tmp_path, stream="err")
    finally:
        notify.close()
        os.unlink(path) if os.path.exists(path) else None
        os.rmdir(directory)


def test_a_server_bound_only_to_its_loopback_is_told_and_not_ready(lab, tmp_path):
    """127.0.0.1 in the server's namespace is reached by no client: no READY, one clear warning."""
    loopback_only = [sys.executable, "-c", "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                     "s.bind(('127.0.0.1', 5353)); time.sleep(120)"]
    ready_r, ready_w = os.pipe()
    try:
        proc = start(lab, tmp_path, "--ports", "5353", "--ready-fd", str(ready_w), "--", *loopback_only, pass_fds=(ready_w,))
        os.close(ready_w)
        ready_w = -1
        try:
            wait_until(lambda: "only on its loopback" in output(tmp_path, stream="err") or proc.poll() is not None,
                       30, what="the loopback warning")
            assert proc.poll() is None, output(tmp_path, stream="err")
            assert select.select([ready_r], [], [], 0)[0] == [], "READY though no client can reach the server"
            line = next(x for x in output(tmp_path, stream="err").splitlines() if "loopback" in x)
            assert line.startswith("nswrap: the server listens on 5353/udp only on its loopback address"), line
        finally:
            assert lab.stop(proc) == 128 + signal.SIGTERM
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
