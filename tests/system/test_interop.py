"""Real, unmodified Debian servers and their real clients under nswrap, on the simulated host.

Topology: the multihomed host of tests/lab/ -- clients c1 (behind r1, uplink eth0, asking the
primary 192.0.2.10 and the secondary 192.0.2.11), c2 (behind r2, uplink eth1, asking
198.51.100.10) and c3 (on eth2's own subnet, no gateway, asking 203.0.113.65); r1 and r2 drop
spoofed sources, the host filters reverse paths strictly. Every server below binds 0.0.0.0 and
would, unwrapped, answer c1's secondary address from the primary one and never reach c2.

Each test starts one stock server under nswrap in the lab's host namespace exactly as a user
would (``python -m nswrap --ports ... -- SERVER ...``), then asks it from EVERY path of
``lab.paths`` with the protocol's own client, and proves that the answer came back from the
address that was asked, through the uplink the question came in on:

- dig (DNS, UDP and TCP) ignores replies from any other source;
- chronyd's NTP client, iperf3's UDP data stream and the echo client (tests/system/udpecho.py)
  use connected UDP sockets: the kernel drops datagrams from any other source;
- a TFTP server answers from a NEW port, so its client cannot connect its socket: there a filter
  in the client's namespace (:func:`only_from`) drops UDP from anywhere but the asked address.

A reply routed out of the wrong uplink is dropped by r1/r2 (spoofed source); so "answered on
every path" proves both the source address and the uplink. At the end nswrap gets SIGTERM, must
forward it to the server and exit with the server's status, and the ``lab`` fixture checks that
the host namespace is exactly as before.

Servers run with their state in ``tmp_path`` (pid, drift, config files): nothing of this machine
is used or left behind. Every client call is bounded in time and every wait polls.

TFTP uses the conntrack tftp helper (on by default for udp 69): the server answers from a new port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path as FsPath
from typing import TypeVar

import pytest

from tests.lab import TEST_ANSWER, TEST_NAME, Lab, Path, dig, wait_until
from tests.system import common

T = TypeVar("T")

SERVE_TIMEOUT = 20  # seconds for a path's first answer (covers nswrap's and the server's start)
SIGTERM_STATUS = 128 + signal.SIGTERM


# -- shared helpers -------------------------------------------------------------------------------


def require_commands(*commands: str) -> None:
    """Skip the test unless every command is installed (under CI a skip fails the run)."""
    missing = [c for c in commands if not shutil.which(c)]
    if missing:
        pytest.skip(f"missing commands: {' '.join(missing)} (run scripts/setup)")


@dataclasses.dataclass
class Wrapped:
    """nswrap running one server in the lab's host namespace."""

    proc: subprocess.Popen
    directory: FsPath  # holds nswrap.out and nswrap.err (nswrap's and the server's output)

    def output(self) -> str:
        return "".join(common.output(self.directory, stream=s) for s in ("out", "err"))


def start(lab: Lab, tmp_path: FsPath, ports: str, server: list[str],
          *options: str) -> Wrapped:
    """Start ``nswrap -v --ports PORTS [OPTIONS] -- SERVER`` in the background."""
    proc = common.start(lab, tmp_path, "-v", "--ports", ports, *options, "--", *server)
    return Wrapped(proc, tmp_path)


def served(wrapped: Wrapped, path: Path, ask: Callable[[Path], T], what: str) -> T:
    """Poll ``ask(path)`` until it returns something truthy, and return that.

    *ask* must be bounded in time itself. Fails at once, with nswrap's output, if nswrap exits
    meanwhile, and after SERVE_TIMEOUT seconds without an answer.
    """
    def attempt() -> T:
        if wrapped.proc.poll() is not None:
            pytest.fail(f"nswrap exited with {wrapped.proc.returncode} before {what} was served "
                        f"on {path.name}:\n{wrapped.output()}")
        return ask(path)

    try:
        return wait_until(attempt, SERVE_TIMEOUT, interval=0.2,
                          what=f"{what}: no answer on {path.name}")
    except TimeoutError as e:
        pytest.fail(f"{e} within {SERVE_TIMEOUT}s; nswrap's output:\n{wrapped.output()}")


def stop(lab: Lab, wrapped: Wrapped, status: int) -> None:
    """SIGTERM nswrap; it must forward it and exit with the server's *status*, cleanly."""
    code = lab.stop(wrapped.proc)
    assert code == status, f"nswrap exited with {code}, expected {status}:\n{wrapped.output()}"
    assert "Traceback" not in wrapped.output(), wrapped.output()


def run_client(lab: Lab, path: Path, argv: list[str],
               timeout: float = 10) -> subprocess.CompletedProcess | None:
    """Run a client in *path*'s client namespace; None if it had to be killed after *timeout*."""
    try:
        return lab.exec(path.client, argv, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@contextlib.contextmanager
def only_from(lab: Lab, path: Path) -> Iterator[None]:
    """Make *path*'s client namespace drop every UDP datagram not sent by *path*'s address.

    For clients that cannot verify the source themselves (their server answers from a new
    port). Only the client namespace changes, never the host.
    """
    table = "nswrap_test_only_from"
    lab.exec(path.client, ["nft", "-f", "-"], input=f"""\
table ip {table} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ip protocol udp ip saddr != {path.address} drop
    }}
}}
""")
    try:
        yield
    finally:
        lab.exec(path.client, ["nft", "delete", "table", "ip", table])


def processes(name: str, marker: str) -> list[int]:
    """Pids of live processes called *name* with *marker* (a unique tmp path) in their arguments."""
    return [p.pid for p in common.processes_running(marker, name)]


# -- DNS: dnsmasq ---------------------------------------------------------------------------------


def dnsmasq(tmp_path: FsPath, *, foreground: bool = True) -> list[str]:
    """dnsmasq listening on 0.0.0.0:5300 (UDP+TCP), answering test.example, no system state.

    No /etc/dnsmasq.conf (``-C /dev/null``), no resolv.conf, no /etc/hosts, pid file in
    *tmp_path*. In the foreground (``-k``) it logs to stderr; as a daemon to a file in
    *tmp_path*, because logging to stderr would keep it in the foreground.
    """
    log = "-" if foreground else tmp_path / "dnsmasq.log"
    return [
        "dnsmasq", *(["-k"] if foreground else []), "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", f"--address=/{TEST_NAME}/{TEST_ANSWER}", "--port=5300",
        f"--pid-file={tmp_path / 'dnsmasq.pid'}", f"--log-facility={log}",
    ]


def test_dnsmasq_udp_and_tcp(lab, tmp_path):
    """dnsmasq on port 5300, published as 53: dig over UDP and TCP on every path."""
    require_commands("dnsmasq", "dig")
    wrapped = start(lab, tmp_path, "53:5300,53:5300/tcp", dnsmasq(tmp_path))
    for path in lab.paths:
        assert served(wrapped, path, lambda p: dig(lab, p, timeout=1), "DNS") == TEST_ANSWER
        assert dig(lab, path, tcp=True) == TEST_ANSWER, f"{path.name} over TCP"
    stop(lab, wrapped, 0)  # dnsmasq exits 0 on SIGTERM


@pytest.fixture
def dnsmasq_daemon(lab, tmp_path):
    """The pid file path of the daemonizing dnsmasq (also a marker unique to the test, in its
    command line). Whatever nswrap did, the daemon (which left the lab's process group) is
    killed afterwards, and the kernel has dismantled its namespace before the lab compares."""
    marker = str(tmp_path / "dnsmasq.pid")
    yield marker
    for pid in processes("dnsmasq", marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not processes("dnsmasq", marker), 10, what="daemon still alive")
    wait_until(lambda: not any(
        link["ifname"].startswith("nsw-")
        for link in json.loads(lab.exec(lab.host, ["ip", "-json", "link"]).stdout)
    ), 10, what="the server namespace's veth is still on the host")


def test_daemonizing_dnsmasq(lab, tmp_path, dnsmasq_daemon):
    """A classic daemon: dnsmasq without -k forks into the background and its parent exits 0.

    nswrap must keep serving while the daemon lives, forward SIGTERM to it, and leave neither
    the daemon nor anything on the host behind.
    """
    require_commands("dnsmasq", "dig")
    wrapped = start(lab, tmp_path, "53:5300,53:5300/tcp", dnsmasq(tmp_path, foreground=False))
    pidfile = FsPath(dnsmasq_daemon)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), SERVE_TIMEOUT,
               what="dnsmasq wrote no pid file")
    for path in lab.paths:
        assert served(wrapped, path, lambda p: dig(lab, p, timeout=1), "DNS") == TEST_ANSWER
        assert dig(lab, path, tcp=True) == TEST_ANSWER, f"{path.name} over TCP"
    assert wrapped.proc.poll() is None, "nswrap must run as long as the daemon does"
    # The daemon exits 0 on SIGTERM; 128+15 would tell that nswrap reports the signal.
    assert lab.stop(wrapped.proc) in (0, SIGTERM_STATUS), wrapped.output()
    assert not processes("dnsmasq", dnsmasq_daemon), "the daemon outlived nswrap"


# -- NTP: chrony ----------------------------------------------------------------------------------


def chrony_server_conf(tmp_path: FsPath) -> FsPath:
    """chronyd as an NTP server on 0.0.0.0:123 from its free-running local clock.

    ``-x`` (given on the command line) keeps it off the system clock; no command sockets (UDP
    ``cmdport 0``, Unix ``bindcmdaddress /``); pid and drift files in *tmp_path*; stays root so
    it can write them.
    """
    conf = tmp_path / "chrony-server.conf"
    conf.write_text(f"""\
allow
local stratum 8
port 123
cmdport 0
bindcmdaddress /
user root
pidfile {tmp_path / 'chrony-server.pid'}
driftfile {tmp_path / 'chrony-server.drift'}
""")
    return conf


def ntp_query(lab: Lab, tmp_path: FsPath, path: Path) -> str | None:
    """One-shot NTP query of *path*'s address by ``chronyd -Q`` in its client namespace.

    chronyd's client socket is connected to the server's address. Returns chronyd's
    "System clock wrong by ..." line, or None (no usable answer within 3 s).
    """
    name = path.address.replace(".", "-")
    conf = tmp_path / f"chrony-client-{name}.conf"
    conf.write_text(f"""\
server {path.address} iburst minpoll -6 maxpoll -6
port 0
cmdport 0
bindcmdaddress /
user root
pidfile {tmp_path / f'chrony-client-{name}.pid'}
""")
    res = run_client(lab, path, ["chronyd", "-Q", "-t", "3", "-f", conf])
    if res is None or res.returncode != 0:
        return None
    return next((line for line in (res.stdout + res.stderr).splitlines()
                 if "System clock wrong by" in line), None)


def test_chrony_ntp(lab, tmp_path):
    """chronyd serving NTP; chronyd -Q (one-shot client) measures it on every path."""
    require_commands("chronyd")
    server = ["chronyd", "-d", "-x", "-f", chrony_server_conf(tmp_path)]
    wrapped = start(lab, tmp_path, "123", server)
    for path in lab.paths:
        served(wrapped, path, lambda p: ntp_query(lab, tmp_path, p), "NTP")
    stop(lab, wrapped, 0)  # chronyd exits 0 on SIGTERM


# -- iperf3 UDP -----------------------------------------------------------------------------------


def iperf3_udp(lab: Lab, path: Path) -> dict | None:
    """1 s of UDP at 1 Mbit/s to *path*'s address; the summary, or None if the test failed.

    The TCP control connection and the connected UDP data socket both verify the source, and
    the client waits for the server's reply on the data socket before it sends.
    """
    res = run_client(lab, path, ["iperf3", "-u", "-c", path.address, "-t", "1", "-b", "1M",
                                 "--connect-timeout", "2000", "-J"], timeout=15)
    if res is None:
        return None
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        return None
    # iperf3 -J exits 0 even when it fails; the report says so ("server is busy", refused...).
    if report.get("error"):
        return None
    return report["end"]["sum"]


def test_iperf3_udp(lab, tmp_path):
    """An iperf3 server (TCP control + UDP data on 5201) measured from every path."""
    require_commands("iperf3")
    wrapped = start(lab, tmp_path, "5201,5201/tcp", ["iperf3", "-s"])
    for path in lab.paths:
        summary = served(wrapped, path, lambda p: iperf3_udp(lab, p), "iperf3")
        assert summary["packets"] > 0, (path.name, summary)
        assert summary["lost_percent"] < 50, (path.name, summary)
    stop(lab, wrapped, 1)  # iperf3 -s reports "interrupt - the server has terminated", exit 1


# -- socat UDP echo -------------------------------------------------------------------------------


def test_socat_udp_echo(lab, tmp_path):
    """socat as a UDP echo server on port 7 (one child per datagram, replying by sendto)."""
    require_commands("socat")
    wrapped = start(lab, tmp_path, "7", ["socat", "-T", "2", "UDP4-RECVFROM:7,fork", "EXEC:cat"])
    for path in lab.paths:  # udpecho.py's client: a connected socket, checks the payload
        served(wrapped, path, lambda p: common.echo_answered(lab, p.client, p.address, 7),
               "UDP echo")
    stop(lab, wrapped, SIGTERM_STATUS)  # socat exits 128+15 on SIGTERM


# -- TFTP: tftpd-hpa ------------------------------------------------------------------------------


def tftp_get(lab: Lab, path: Path, name: str, dest: FsPath) -> bytes | None:
    """Fetch *name* from *path*'s address with the tftp-hpa client; its content, or None.

    Run inside :func:`only_from`: the data arrives from a new server port, so the client
    cannot verify the source address itself.
    """
    dest.unlink(missing_ok=True)
    res = run_client(lab, path, ["tftp", "-m", "binary", path.address, "-c", "get", name,
                                 str(dest)])
    if res is None or res.returncode != 0 or not dest.exists():
        return None
    return dest.read_bytes() or None


@pytest.mark.parametrize("helper", [(), ("--helper", "tftp")], ids=["default", "helper-tftp"])
def test_tftpd_hpa(lab, tmp_path, helper):
    """tftpd-hpa serving a file; tftp-hpa fetches it on every path, the non-primary uplinks
    included, with or without --helper tftp (published udp 69 turns it on by default).

    The request goes to port 69, but the server sends the data from a new port: a new flow
    from the server namespace that only the conntrack tftp helper relates to the request (and
    NATs back to the address the client asked).
    """
    require_commands("in.tftpd", "tftp")
    root = tmp_path / "tftp"
    root.mkdir(mode=0o755)
    root.chmod(0o755)  # tftpd chroots here and drops to "nobody"
    content = b"".join(b"block %04d of a multi-block TFTP transfer\n" % i for i in range(40))
    (root / "hello.txt").write_bytes(content)
    (root / "hello.txt").chmod(0o644)
    server = ["in.tftpd", "-L", "--address", "0.0.0.0:69", "-s", str(root)]
    wrapped = start(lab, tmp_path, "69", server, *helper)
    for i, path in enumerate(lab.paths):
        with only_from(lab, path):
            got = served(wrapped, path,
                         lambda p, i=i: tftp_get(lab, p, "hello.txt", tmp_path / f"got-{i}"), "TFTP")
        assert got == content, path.name
    stop(lab, wrapped, 0)  # in.tftpd exits 0 on SIGTERM
