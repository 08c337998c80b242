"""DNS on the lab: a self-contained unbound config and dig as the client.

dig ignores replies from any source but the address it asked, so "answered" proves the source
address; the lab's anti-spoofing routers make it prove the uplink too.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
from typing import TYPE_CHECKING

from tests.lab.shell import LabError, run
from tests.lab.wait import wait_until

if TYPE_CHECKING:
    from tests.lab.topology import Lab, Path

TEST_NAME = "test.example"
TEST_ANSWER = "192.0.2.99"


def unbound_conf(directory: str | os.PathLike, *, ipv6: bool = False, automatic: bool = False,
                 name: str = "unbound.conf", tuned: bool = False) -> str:
    """Write an unbound config into *directory* and return its path.

    A self-contained config for ``unbound -d -c <path>`` as root: listens on
    0.0.0.0:53 (and [::]:53 with *ipv6*; with *automatic*, unbound's own
    ``interface-automatic``, which answers from the address asked), UDP and
    TCP, serves ``test.example. A 192.0.2.99`` and uses nothing under
    /etc/unbound (no chroot, no privilege drop, no pidfile, no trust anchors,
    no remote control, logs errors to stderr). *tuned* gives it the socket
    buffers a benchmark needs. Validated with ``unbound-checkconf`` when that
    is installed.
    """
    directory = pathlib.Path(directory).resolve()
    path = directory / name
    yes_no = {True: "yes", False: "no"}
    family = "\n    interface: ::0\n    access-control: ::/0 allow" if ipv6 else ""
    buffers = "\n    so-rcvbuf: 4m\n    so-sndbuf: 4m\n    outgoing-range: 64" if tuned else ""
    path.write_text(f"""\
server:
    directory: "{directory}"
    interface: 0.0.0.0{family}
    interface-automatic: {yes_no[automatic]}
    port: 53
    do-ip4: yes
    do-ip6: {yes_no[ipv6]}
    do-udp: yes
    do-tcp: yes
    do-daemonize: no
    chroot: ""
    username: ""
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    so-reuseport: no{buffers}
    access-control: 0.0.0.0/0 allow
    module-config: "iterator"
    local-zone: "example." static
    local-data: "{TEST_NAME}. A {TEST_ANSWER}"

remote-control:
    control-enable: no
""")
    if shutil.which("unbound-checkconf"):
        res = run(["unbound-checkconf", str(path)], check=False)
        if res.returncode != 0:
            raise LabError(f"unbound-checkconf {path}: {(res.stderr or res.stdout).strip()}")
    return str(path)


def dig_from(lab: Lab, ns: str, address: str, name: str = TEST_NAME, tcp: bool = False,
             timeout: float = 2) -> str | None:
    """Ask *address* for the A record of *name* from namespace *ns*.

    Returns the answer (e.g. "192.0.2.99") or None when there was no valid
    answer. dig ignores replies from an unexpected source address, so an
    answer means the reply came from *address*.
    """
    argv = ["dig", f"@{address}", name, "A", "+short", "+tries=1", f"+time={max(1, round(timeout))}"]
    if tcp:
        argv.append("+tcp")
    try:
        res = lab.exec(ns, argv, timeout=2 * timeout + 5, check=False)
    except subprocess.TimeoutExpired:
        return None
    answer = [line for line in res.stdout.splitlines() if line.strip() and not line.startswith(";")]
    return "\n".join(answer) if res.returncode == 0 and answer else None


def dig(lab: Lab, path: Path, name: str = TEST_NAME, tcp: bool = False,
        timeout: float = 2) -> str | None:
    """:func:`dig_from` along *path*: from its client to its address."""
    return dig_from(lab, path.client, path.address, name, tcp=tcp, timeout=timeout)


def wait_answered(lab: Lab, path: Path, tcp: bool = False, timeout: float = 15) -> str:
    """Poll :func:`dig` along *path* until it is answered; TimeoutError otherwise."""
    return wait_until(
        lambda: dig(lab, path, tcp=tcp, timeout=1),
        timeout,
        interval=0.1,
        what=f"{path.name}{' (tcp)' if tcp else ''}: no answer within {timeout}s",
    )
