"""Every nswrap command README.md shows runs as written, on the simulated host of tests/lab.

The commands are read from README.md itself (tests/system/readme.py: every line of a code block
that starts with ``nswrap``, synopsis blocks left out), so README and this test cannot drift: a
new example without a scenario here fails :func:`test_every_readme_command_has_a_scenario`.

Each command runs in the lab's host namespace as shown -- ``nswrap`` being this checkout's
``python -m nswrap``, the working directory the repository root (for ``examples/unbound.conf``) --
except for the substitutions its :class:`Scenario` makes, each with its reason (the lab has no
``wg0``, ``./sip-server`` is the reader's own program, this machine's clock and /srv are not the
test's to touch). Then, from every path of the lab that the command serves (every uplink, or the
uplinks its ``--uplink`` options name), the protocol's own client asks the address of that path,
over IPv4 and, where the server listens there, IPv6: every answer must come back from the address
asked (dig, connected UDP sockets, or a filter in the client's namespace), and the paths of other
uplinks must get none. Then Ctrl-C, as a reader would stop it: SIGINT to nswrap alone (the server
runs in its own process group, so the terminal's SIGINT reaches only nswrap, which forwards it).
nswrap must exit with the status it should, and the ``lab`` fixture checks that the host
namespace is exactly as before.

``dnsmasq -k`` does not stop on SIGINT (only its debug mode ``-d`` does; ``-k`` re-checks DNSSEC
time on it): nswrap sends it SIGTERM half a second later, and it exits 0, well within a second.

Commands without a server (``--dry-run``, ``doctor``, ``list``, ``cleanup``) run once in the lab:
exit 0, showing what they are for, the host namespace unchanged. And examples/unbound.conf's
access-control note is shown true: unbound sees the clients' own addresses.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path as FsPath

import pytest

from tests.lab import Lab, Path, dig, wait_until
from tests.system import common, readme

REPO = readme.REPO
SERVE_TIMEOUT = 20  # seconds for a path's first answer (nswrap's and the server's start included)
LOCALHOST = "127.0.0.1"  # what unbound (its default local zone) and dnsmasq (/etc/hosts) answer

# ``./sip-server`` of the README: the reader's own program. This stands in for it: a plain UDP
# echo server on one dual-stack socket per port, answering with sendto() (no IP_PKTINFO: the
# kind nswrap exists for), exiting 0 on SIGINT.
SIP_SERVER = """\
import selectors, signal, socket, sys
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
selector = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    selector.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        data, peer = key.fileobj.recvfrom(65535)
        key.fileobj.sendto(data, peer)
"""
SIP_PORTS = (5060, 10050)  # README publishes 5060 and 10000-10100: one port of each item


@dataclasses.dataclass(frozen=True)
class Scenario:
    """How one README command is run and asked in the lab."""

    ask: Callable[[Lab, Path, FsPath], bool]  # one bounded attempt: answered from path.address?
    sigint_status: int  # nswrap's exit status after Ctrl-C
    ipv6: bool = False  # the server listens on IPv6 as well: ask lab.paths6 too
    needs: tuple[str, ...] = ()  # commands the scenario runs (server and client)
    substitute: Callable[[list[str], FsPath], list[str]] = lambda argv, tmp: argv

    def run_as(self, argv: list[str], tmp: FsPath) -> list[str]:
        return self.substitute(list(argv), tmp)


# -- asking ---------------------------------------------------------------------------------------


def ask_dns(lab: Lab, path: Path, tmp: FsPath) -> bool:
    """dig over UDP and over TCP; dig ignores answers from any other address than the asked one."""
    return all(dig(lab, path, name="localhost", tcp=tcp, timeout=1) == LOCALHOST for tcp in (False, True))


def ask_ntp(lab: Lab, path: Path, tmp: FsPath) -> bool:
    """One-shot NTP measurement by ``chronyd -Q`` (a connected socket) in the client's namespace;
    it only prints, never sets the clock."""
    name = path.address.replace(".", "-").replace(":", "-")
    conf = tmp / f"chrony-client-{name}.conf"
    conf.write_text(f"server {path.address} iburst minpoll -6 maxpoll -6\nport 0\ncmdport 0\n"
                    f"bindcmdaddress /\nuser root\npidfile {tmp / f'chrony-client-{name}.pid'}\n")
    done = run_client(lab, path, ["chronyd", "-Q", "-t", "3", "-f", conf], timeout=10)
    return done is not None and done.returncode == 0 and "System clock wrong by" in done.stdout + done.stderr


def ask_sip(lab: Lab, path: Path, tmp: FsPath) -> bool:
    """udpecho.py's client (a connected socket) on a port of each published item."""
    return all(common.echo_answered(lab, path.client, path.address, port) for port in SIP_PORTS)


def ask_echo7(lab: Lab, path: Path, tmp: FsPath) -> bool:
    return common.echo_answered(lab, path.client, path.address, 7)


TFTP_CONTENT = b"".join(b"block %04d of a multi-block TFTP transfer\n" % i for i in range(40))


def ask_tftp(lab: Lab, path: Path, tmp: FsPath) -> bool:
    """tftp-hpa fetches a file. The server sends from a NEW port, so the client cannot connect its
    socket: a filter in the client's namespace drops UDP from anywhere but the asked address."""
    table = "nswrap_test_only_from"
    family, saddr = ("ip6", "ip6 saddr") if ":" in path.address else ("ip", "ip saddr")
    lab.exec(path.client, ["nft", "-f", "-"], input=f"""\
table {family} {table} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        meta l4proto udp {saddr} != {path.address} drop
    }}
}}
""")
    try:
        got = tmp / "got-hello.txt"
        got.unlink(missing_ok=True)
        done = run_client(lab, path, ["tftp", "-m", "binary", path.address, "-c", "get", "hello.txt", got])
        return done is not None and done.returncode == 0 and got.exists() and got.read_bytes() == TFTP_CONTENT
    finally:
        lab.exec(path.client, ["nft", "delete", "table", family, table])


def run_client(lab: Lab, path: Path, argv: list, timeout: float = 10) -> subprocess.CompletedProcess | None:
    try:
        return lab.exec(path.client, argv, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


# -- substitutions --------------------------------------------------------------------------------


def replace(argv: list[str], old: str, new: str) -> list[str]:
    assert old in argv, f"{old!r} is not in {argv}: update the scenario with README"
    return [new if a == old else a for a in argv]


def dnsmasq_pid_file(argv: list[str], tmp: FsPath) -> list[str]:
    # As written it writes /run/dnsmasq/dnsmasq.pid, this machine's own (and a killed dnsmasq
    # leaves it behind): the test's goes to its tmp directory instead.
    return [*argv, f"--pid-file={tmp / 'dnsmasq.pid'}"]


def chronyd_in_the_lab(argv: list[str], tmp: FsPath) -> list[str]:
    # The lab has no WireGuard interface: its eth1 stands in for wg0, so "only these uplinks"
    # means eth0 and eth1 here, and c3 (eth2) must get no answer.
    argv = replace(argv, "wg0", "eth1")
    # The lab has no internet: its own clock (local stratum 8) stands in for the pool, and -x
    # keeps chronyd's hands off this machine's clock (not namespaced); its files go to tmp. The
    # README's `allow` stays as written: without it chronyd would serve nothing.
    assert "allow" in argv, argv
    argv = [a for a in argv if not a.startswith("pool ")]
    return [*argv, "-x", "local stratum 8", "cmdport 0", "bindcmdaddress /", "user root",
            f"pidfile {tmp / 'chrony-server.pid'}", f"driftfile {tmp / 'chrony-server.drift'}"]


def sip_server(argv: list[str], tmp: FsPath) -> list[str]:
    return replace(argv, "./sip-server", sys.executable) + ["-c", SIP_SERVER, *map(str, SIP_PORTS)]


def tftp_root(argv: list[str], tmp: FsPath) -> list[str]:
    # /srv/tftp is this machine's; the test serves a directory of its own (tftpd chroots there
    # and drops to "nobody": world-readable).
    root = tmp / "tftp"
    root.mkdir(mode=0o755, exist_ok=True)
    root.chmod(0o755)
    (root / "hello.txt").write_bytes(TFTP_CONTENT)
    (root / "hello.txt").chmod(0o644)
    return replace(argv, "/srv/tftp", str(root))


# The server program (first word after "--") -> its scenario. The exit statuses after Ctrl-C are
# the servers' own (nswrap passes them on): unbound, chronyd, tftpd exit 0 on SIGINT, socat 130;
# dnsmasq -k runs on after SIGINT, gets SIGTERM half a second later, and exits 0. Every README
# example serves both families (tftpd's `--address :69` binds 0.0.0.0 and ::, socat's UDP6 socket
# takes IPv4 as v4-mapped, chronyd's bare `allow` admits both, the SIP stand-in is dual-stack), so
# every scenario asks the IPv6 paths too.
SCENARIOS: dict[str, Scenario] = {
    "unbound": Scenario(ask_dns, sigint_status=0, ipv6=True, needs=("unbound", "dig")),
    "dnsmasq": Scenario(ask_dns, sigint_status=0, ipv6=True, needs=("dnsmasq", "dig"),
                        substitute=dnsmasq_pid_file),
    "chronyd": Scenario(ask_ntp, sigint_status=0, ipv6=True, needs=("chronyd",), substitute=chronyd_in_the_lab),
    "./sip-server": Scenario(ask_sip, sigint_status=0, ipv6=True, substitute=sip_server),
    "in.tftpd": Scenario(ask_tftp, sigint_status=0, ipv6=True, needs=("in.tftpd", "tftp"), substitute=tftp_root),
    "socat": Scenario(ask_echo7, sigint_status=128 + signal.SIGINT, ipv6=True, needs=("socat",)),
}


# -- the commands ---------------------------------------------------------------------------------

COMMANDS = readme.commands("nswrap")


def split(argv: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """nswrap's options and the server's command (empty without ``--``)."""
    if "--" not in argv:
        return list(argv[1:]), []
    i = argv.index("--")
    return list(argv[1:i]), list(argv[i + 1:])


def uplinks(options: list[str]) -> set[str]:
    """The interfaces --uplink/-u name (empty: every uplink)."""
    names = set()
    for i, option in enumerate(options):
        if option in ("-u", "--uplink"):
            names.add(options[i + 1].split("=")[0])
        elif option.startswith("--uplink="):
            names.add(option.removeprefix("--uplink=").split("=")[0])
    return names


def test_readme_shows_commands():
    """The extraction works on README as it is: the headline and the examples are found."""
    assert COMMANDS, "README.md shows no nswrap command in a code block"
    servers = [split(c.argv)[1] for c in COMMANDS]
    assert any(server[:1] == ["unbound"] for server in servers), "README's headline (unbound) is gone"


# Commands that run once and exit (no server): what their output must show. In the lab, doctor
# finds that nswrap would work; list and cleanup find nothing to list or remove of this lab's.
ONE_SHOT = {
    "--dry-run": "table inet nswrap",  # the plan, with the nft ruleset
    "doctor": "nswrap would work here",
    "list": "",
    "cleanup": "",
}


def one_shot(argv: tuple[str, ...]) -> str | None:
    """The ONE_SHOT key of a command without a server, if it has one."""
    if split(argv)[1]:
        return None
    if "--dry-run" in argv:
        return "--dry-run"
    return argv[1] if len(argv) > 1 and argv[1] in ONE_SHOT else None


def test_every_readme_command_has_a_scenario():
    unknown = [c.line for c in COMMANDS
               if split(c.argv)[1] and split(c.argv)[1][0] not in SCENARIOS
               or not split(c.argv)[1] and one_shot(c.argv) is None]
    assert not unknown, f"README shows commands tests/system/test_readme.py cannot run yet: {unknown}"


@pytest.fixture
def cache_path(monkeypatch):
    """Commands scripts/setup unpacked into .cache/bin (chronyd next to systemd-timesyncd) are found
    as under scripts/test."""
    cache = REPO / ".cache" / "bin"
    if cache.is_dir():
        monkeypatch.setenv("PATH", f"{cache}{os.pathsep}{os.environ.get('PATH', '')}")


def server_commands() -> list:
    return [pytest.param(c, id=str(c)) for c in COMMANDS if split(c.argv)[1]]


@pytest.mark.parametrize("command", server_commands())
def test_readme_command(lab, tmp_path, cache_path, command):
    """The command serves its paths, Ctrl-C stops it with the right status, the host is restored."""
    options, server = split(command.argv)
    scenario = SCENARIOS.get(server[0])
    if scenario is None:
        pytest.fail(f"no scenario for {command.line!r} (see test_every_readme_command_has_a_scenario)")
    missing = [c for c in scenario.needs if not shutil.which(c)]
    if missing:
        pytest.skip(f"missing commands: {' '.join(missing)} (run scripts/setup)")
    argv = scenario.run_as(list(command.argv), tmp_path)
    assert argv[0] == "nswrap"
    out, err = (tmp_path / "nswrap.out").open("w"), (tmp_path / "nswrap.err").open("w")
    proc = lab.spawn(lab.host, [*common.NSWRAP, *argv[1:]], stdout=out, stderr=err, cwd=REPO)

    def output() -> str:
        return (tmp_path / "nswrap.out").read_text() + (tmp_path / "nswrap.err").read_text()

    served_uplinks = uplinks(split(tuple(argv))[0])
    paths = [*lab.paths, *(lab.paths6 if scenario.ipv6 else ())]
    served = [p for p in paths if not served_uplinks or p.uplink in served_uplinks]
    unserved = [p for p in paths if p not in served]
    assert served, f"{command.line}: the lab has none of the uplinks {served_uplinks}"

    for path in served:
        def attempt(path=path) -> bool:
            if proc.poll() is not None:
                pytest.fail(f"{command.line}: nswrap exited with {proc.returncode} before {path.name} "
                            f"was served:\n{output()}")
            return scenario.ask(lab, path, tmp_path)
        try:
            wait_until(attempt, SERVE_TIMEOUT, interval=0.2, what=path.name)
        except TimeoutError:
            pytest.fail(f"{command.line}: no answer on {path.name} within {SERVE_TIMEOUT}s:\n{output()}")
    for path in unserved:  # the uplinks --uplink left out (their gateways are there: routed clients)
        assert not scenario.ask(lab, path, tmp_path), f"{command.line}: {path.name} was served"

    stop_timeout = 10.0  # nswrap's default; README's examples do not change it
    started = time.monotonic()
    status = lab.stop(proc, sig=signal.SIGINT, timeout=stop_timeout + 15)
    elapsed = time.monotonic() - started
    said = output()
    assert status == scenario.sigint_status, f"{command.line}: Ctrl-C -> exit {status}:\n{said}"
    assert "Traceback" not in said, said
    waiting = [line for line in said.splitlines() if "waiting for the server to exit" in line]
    if status == 128 + signal.SIGKILL:  # the server ignored SIGINT: nswrap said so, once, and waited
        assert len(waiting) == 1, f"{command.line}: nswrap must say once that it waits:\n{said}"
        assert f"--stop-timeout {stop_timeout:g}" in waiting[0] and "SIGKILL in " in waiting[0], waiting
        assert elapsed >= stop_timeout - 1, f"SIGKILLed after {elapsed:.1f}s, before --stop-timeout"
    else:
        assert not waiting, f"{command.line}: stopped in {elapsed:.1f}s, yet nswrap said it waits:\n{said}"


def one_shot_commands() -> list:
    return [pytest.param(c, id=str(c)) for c in COMMANDS if one_shot(c.argv)]


@pytest.mark.parametrize("command", one_shot_commands())
def test_readme_one_shot_command(lab, command):
    """``--dry-run``, ``doctor``, ``list``, ``cleanup``: exit 0 with what they are for, and (the
    ``lab`` fixture) change nothing in the host namespace."""
    done = lab.exec(lab.host, [*common.NSWRAP, *command.argv[1:]], check=False, timeout=60)
    said = done.stdout + done.stderr
    assert done.returncode == 0, f"{command.line}: exit {done.returncode}:\n{said}"
    assert ONE_SHOT[one_shot(command.argv)] in done.stdout and "Traceback" not in said, said


def test_unbound_conf_access_control_sees_the_clients(lab, tmp_path):
    """examples/unbound.conf's note holds: nswrap rewrites only the destination, so unbound's
    access-control sees each client's own address. Allowing only c1's network (203.0.113.0/26),
    c1 is answered on every path it has, and c2 is REFUSED (by unbound: the query got there)."""
    text = (REPO / "examples" / "unbound.conf").read_text()
    allow_all = ["access-control: 0.0.0.0/0 allow", "access-control: ::/0 allow"]
    assert all(line in text for line in allow_all), "the note's lines changed: update this test"
    conf = tmp_path / "unbound.conf"
    conf.write_text(text.replace(allow_all[0], "access-control: 203.0.113.0/26 allow").replace(allow_all[1], ""))
    out, err = (tmp_path / "nswrap.out").open("w"), (tmp_path / "nswrap.err").open("w")
    proc = lab.spawn(lab.host, [*common.NSWRAP, "--ports", "53", "--", "unbound", "-d", "-c", conf],
                     stdout=out, stderr=err)
    c1 = [p for p in lab.paths if p.client == lab.ns("c1")]
    for path in c1:
        wait_until(lambda path=path: proc.poll() is None and dig(lab, path, name="localhost", timeout=1) == LOCALHOST,
                   SERVE_TIMEOUT, interval=0.2, what=f"{path.name}: no answer")
    [c2] = [p for p in lab.paths if p.client == lab.ns("c2")]
    asked = lab.exec(c2.client, ["dig", f"@{c2.address}", "localhost", "A", "+tries=1", "+time=2"], check=False)
    assert "status: REFUSED" in asked.stdout, asked.stdout
    assert lab.stop(proc, sig=signal.SIGINT) == 0, (tmp_path / "nswrap.err").read_text()
