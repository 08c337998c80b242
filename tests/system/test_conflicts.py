"""A host process serving a published port keeps its clients (issue 23), in the lab's host.

    c1 --- r1 --- eth0 [host: 192.0.2.10]  an "sshd" (tcp 0.0.0.0:22, root's), a squatter
                                           (udp or tcp 127.0.0.1:5353, nobody's), a stub
                                           resolver (127.0.0.53:53)

- A start that would take their clients (a wildcard or one of the addresses it publishes on,
  127.0.0.1 when it publishes there) is refused: exit 2, one line naming the socket and its
  owner's pid, the host unchanged (the `lab` fixture compares the whole state), `--dry-run` too,
  and an open session to the host service goes on.
- Leaving the port out of the range starts, and the session and the host service are untouched
  while the other ports are served.
- `--take-over` publishes anyway, 127.0.0.1 included, with one warning line.
- 127.0.0.53 is not 127.0.0.1: systemd-resolved's stub is no conflict for `--ports 53,53/tcp`.
- netlink.listeners() sees what clients reach: listening TCP, bound unconnected UDP, never a
  client's connected UDP socket.

Runs pinned to eth0 and eth1 (`-u`), the uplinks that have gateways of both families, so that
nswrap has nothing else to say.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import diff_states, wait_until
from tests.system.common import HERE, UDPECHO, echo_answered, nswrap, output, start

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SERVICE = [sys.executable, str(HERE / "hostservice.py")]
PINNED = ("-u", "eth0", "-u", "eth1")  # the uplinks with gateways of both families: no notes about eth2
HINT = "publishing it would take its clients; leave it out of --ports, narrow with --address, or give --take-over"


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def host_service(lab, tmp_path, proto: str, address: str, port: int, banner: str, as_nobody: bool = False, name="service"):
    """A service of the host, ready (bound) when this returns."""
    argv = [*(NOBODY if as_nobody else []), *SERVICE, "serve", proto, address, str(port), banner]
    proc = lab.spawn(lab.host, argv, stdout=(tmp_path / f"{name}.out").open("w"), stderr=(tmp_path / f"{name}.err").open("w"))
    wait_until(lambda: "ready" in output(tmp_path, name) or proc.poll() is not None, 20, what=f"{name} is ready")
    assert proc.poll() is None, output(tmp_path, name, "err")
    return proc


def ask(lab, ns: str, address: str, port: int) -> str:
    done = lab.exec(ns, [*SERVICE, "ask", address, str(port)], check=False, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else f"no answer: {done.stderr.strip()}"


class Session:
    """A TCP connection from c1 to the host service, held open across the test."""

    def __init__(self, lab, tmp_path, address: str, port: int):
        self.lab, self.tmp_path = lab, tmp_path
        self.proc = lab.spawn(lab.ns("c1"), [*SERVICE, "session", address, str(port)], stdin=subprocess.PIPE, text=True,
                              stdout=(tmp_path / "session.out").open("w"), stderr=(tmp_path / "session.err").open("w"))
        wait_until(lambda: "connected" in output(tmp_path, "session") or self.proc.poll() is not None, 20,
                   what="the session is open")
        self.said = 0

    def say(self, line: str) -> str:
        """Send one line and return the answer ("closed" or "" if the session died)."""
        self.said += 1
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        wait_until(lambda: len(self._answers()) >= self.said or self.proc.poll() is not None, 20, what="the session answers")
        answers = self._answers()
        return answers[self.said - 1] if len(answers) >= self.said else ""

    def _answers(self) -> list[str]:
        return output(self.tmp_path, "session").splitlines()[1:]  # after "connected"

    def close(self) -> None:
        self.proc.stdin.close()
        self.lab.stop(self.proc)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_a_users_squatter_on_127_0_0_1_is_refused_by_name(lab, tmp_path, proto):
    """nobody binds 127.0.0.1:5353 before nswrap starts, to capture the host's own clients."""
    squatter = host_service(lab, tmp_path, proto, "127.0.0.1", 5353, "SQUATTER", as_nobody=True, name="squatter")
    spec = "5353" if proto == "udp" else "5353/tcp"
    owner = f"{comm(squatter.pid)} (pid {squatter.pid})"
    expected = f"nswrap: port 5353/{proto} is served on this host by {owner} on 127.0.0.1: {HINT}"
    before = lab.state()
    for dry in ([], ["--dry-run"]):
        done = nswrap(lab, *PINNED, *dry, "--ports", spec, "--", *UDPECHO, "serve", "5353")
        assert (done.returncode, lines(done.stderr), done.stdout) == (2, [expected], ""), done.stderr
        assert not diff_states(before, lab.state()), diff_states(before, lab.state())
    # --address without 127.0.0.1: the squatter's address is not published, no conflict
    done = nswrap(lab, *PINNED, "--address", "192.0.2.10", "--ports", spec, "--", "true")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    lab.stop(squatter)


@pytest.mark.nft_only(
    "publishes 65,534 ports on every address: more endpoints than the fast path holds (refused, exit 2: "
    "test_fastpath)"
)
def test_a_host_service_on_every_address_is_refused_and_keeps_its_session(lab, tmp_path):
    sshd = host_service(lab, tmp_path, "tcp", "0.0.0.0", 22, "HOST", name="sshd")
    session = Session(lab, tmp_path, "192.0.2.10", 22)
    assert session.say("one") == "HOST one"
    expected = f"nswrap: port 22/tcp is served on this host by {comm(sshd.pid)} (pid {sshd.pid}) on 0.0.0.0: {HINT}"
    before = lab.state()
    for ports in (["--ports", "1-65535,1-65535/tcp"], ["--ports", "1-65535/tcp", "--address", "192.0.2.11"]):
        done = nswrap(lab, *PINNED, *ports, "--", *SERVICE, "serve", "tcp", "0.0.0.0", "22", "SERVER")
        assert (done.returncode, lines(done.stderr)) == (2, [expected]), done.stderr
        assert not diff_states(before, lab.state()), diff_states(before, lab.state())
    assert session.say("two") == "HOST two"

    # the port left out of the range: it starts, the session and the host service are untouched
    server = [*SERVICE, "serve", "tcp", "0.0.0.0", "7000", "SERVER"]
    proc = start(lab, tmp_path, *PINNED, "--ports", "1-21,23-65535/tcp", "--", *server)
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    assert wait_until(lambda: ask(lab, lab.ns("c1"), "192.0.2.10", 7000) == "SERVER hello", 20, what="the server answers")
    assert ask(lab, lab.host, "127.0.0.1", 7000) == "SERVER hello"
    assert session.say("three") == "HOST three"
    assert ask(lab, lab.ns("c1"), "192.0.2.10", 22) == "HOST hello"
    assert ask(lab, lab.host, "127.0.0.1", 22) == "HOST hello"
    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert lines(output(tmp_path, stream="err")) == []
    assert session.say("four") == "HOST four"
    session.close()
    lab.stop(sshd)


def test_take_over_publishes_anyway_with_one_warning(lab, tmp_path):
    sshd = host_service(lab, tmp_path, "tcp", "0.0.0.0", 22, "HOST", name="sshd")
    squatter = host_service(lab, tmp_path, "udp", "127.0.0.1", 5353, "SQUATTER", as_nobody=True, name="squatter")
    proc = start(lab, tmp_path, *PINNED, "--take-over", "--ports", "22/tcp,5353", "--", "sh", "-c",
                 f"{' '.join(UDPECHO)} serve 5353 & exec {' '.join(SERVICE)} serve tcp 0.0.0.0 22 SERVER")
    wait_until(lambda: output(tmp_path).count("ready") == 2 or proc.poll() is not None, 30, what="the servers are ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    assert wait_until(lambda: ask(lab, lab.ns("c1"), "192.0.2.10", 22) == "SERVER hello", 20, what="the server answers")
    assert ask(lab, lab.host, "127.0.0.1", 22) == "SERVER hello"  # 127.0.0.1 is taken over too
    assert ask(lab, lab.host, "192.0.2.11", 22) == "SERVER hello"
    assert echo_answered(lab, lab.host, "127.0.0.1", 5353)  # the echo, not the squatter (which prefixes)
    assert lines(output(tmp_path, stream="err")) == [
        f"nswrap: --take-over: clients of 22/tcp on 0.0.0.0 ({comm(sshd.pid)}, pid {sshd.pid}), "
        f"5353/udp on 127.0.0.1 ({comm(squatter.pid)}, pid {squatter.pid}) reach the server from now on"]
    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert ask(lab, lab.host, "127.0.0.1", 22) == "HOST hello"  # given back
    lab.stop(squatter)
    lab.stop(sshd)


def test_a_stub_resolver_on_127_0_0_53_is_no_conflict(lab, tmp_path):
    stubs = [host_service(lab, tmp_path, proto, "127.0.0.53", 53, "STUB", name=f"stub-{proto}") for proto in ("udp", "tcp")]
    proc = start(lab, tmp_path, *PINNED, "--ports", "53,53/tcp", "--", "sh", "-c",
                 f"{' '.join(UDPECHO)} serve 53 & exec {' '.join(SERVICE)} serve tcp 0.0.0.0 53 SERVER")
    wait_until(lambda: output(tmp_path).count("ready") == 2 or proc.poll() is not None, 30, what="the servers are ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    assert wait_until(lambda: ask(lab, lab.host, "127.0.0.1", 53) == "SERVER hello", 20, what="the server answers")
    assert echo_answered(lab, lab.paths[0].client, lab.paths[0].address, 53)
    assert ask(lab, lab.host, "127.0.0.53", 53) == "STUB hello"
    assert lines(output(tmp_path, stream="err")) == []
    assert lab.stop(proc) == 128 + signal.SIGTERM
    for stub in stubs:
        lab.stop(stub)


LISTENERS = """
import json, socket
from nswrap import netlink
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 5353))
query = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a client's: ephemeral port, connected
query.connect(("127.0.0.1", 5353))
bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, never listening
bound.bind(("0.0.0.0", 0))
v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
v6.bind(("::", 2222))
v6.listen()
mapped = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
mapped.bind(("::ffff:127.0.0.1", 5354))
print(json.dumps(sorted([s.proto, str(s.address), s.port, s.v6only] for s in netlink.listeners())))
"""


def test_listeners_are_what_clients_reach(lab):
    done = lab.exec(lab.host, [sys.executable, "-c", LISTENERS])
    assert json.loads(done.stdout) == [["tcp", "::", 2222, True], ["udp", "127.0.0.1", 5353, False],
                                       ["udp", "127.0.0.1", 5354, False]]
