"""One instance from start to end: facts -> plan -> apply -> serve -> tear down.

Runs in the host namespace; everything it changes goes through apply.py and is rolled back on
exit, on a signal, or on any failure during setup.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator

from nswrap import netlink
from nswrap.apply import Applier
from nswrap.config import Config
from nswrap.errors import NswrapError
from nswrap.facts import gather
from nswrap.plan import Plan, make_plan, render_plan
from nswrap.supervise import Interrupted, Supervisor, exit_status

log = logging.getLogger("nswrap")

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
LOCK_TIMEOUT = 30.0


def _require_capabilities() -> None:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    missing = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")) if not caps >> bit & 1]
    if missing:
        raise NswrapError(f"not permitted: nswrap needs {' and '.join(missing)} (run it as root)")


@contextlib.contextmanager
def setup_lock() -> Iterator[None]:
    """Serialise allocation between instances on this host namespace.

    An abstract unix socket name is scoped to the network namespace and released by the kernel
    when its holder dies, so a crashed instance can never leave the lock behind.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    deadline, pause = time.monotonic() + LOCK_TIMEOUT, 0.005
    try:
        while True:
            try:
                sock.bind("\0nswrap/setup-lock")
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise NswrapError(f"cannot take the setup lock: {e.strerror}") from None
                time.sleep(pause)  # polling a lock another instance holds for milliseconds
                pause = min(pause * 2, 0.1)
        yield
    finally:
        sock.close()


def _plan(config: Config) -> Plan:
    with netlink.Netlink() as nl:
        plan = make_plan(config, gather(nl), secrets.token_hex(3))
    for warning in plan.warnings:
        log.warning("%s", warning)
    return plan


def dry_run(config: Config) -> int:
    sys.stdout.write(render_plan(_plan(config)))
    return 0


def run(config: Config) -> int:
    if config.dry_run:
        return dry_run(config)
    _require_capabilities()
    supervisor = Supervisor()
    supervisor.install()
    applier = None
    try:
        with setup_lock():
            plan = _plan(config)
            applier = Applier(plan)
            applier.apply()
        log.info("serving %s on %s", ", ".join(map(str, plan.ports)), ", ".join(u.ifname for u in plan.uplinks))
        supervisor.start(config.command, netlink.child_setup(applier.netns_fd))
        applier.release_netns()
        return supervisor.wait()
    except Interrupted as e:
        log.warning("%s during setup: rolling back", e)
        return exit_status(-e.signum)
    finally:
        supervisor.tearing_down = True
        if applier is not None:
            applier.rollback()
