"""When READY is true: the server listens on every published port (asked of its own namespace).

`Readiness.poll` looks at the server's sockets, sooner at first and less often as time goes
(`readiness_interval`), warns once about a server that listens where no client reaches it
(its loopback address, another port: `elsewhere`), and says READY once (`announce_ready`: on
--ready-fd, and to systemd's NOTIFY_SOCKET). Reads only; writes nothing to the host.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from nswrap import namespaces, netlink
from nswrap.config import PortRange
from nswrap.datapath import Instance
from nswrap.errors import listed

log = logging.getLogger("nswrap")


class Readiness:
    """READY (on --ready-fd, and to systemd) once the server listens on every published port:
    a query sent the moment READY arrives is answered, over IPv4 and IPv6."""

    def __init__(self, instance: Instance, init_pid: int, ready_fd: int | None):
        self.instance, self.ready_fd = instance, ready_fd
        self.done = False
        self.began = time.monotonic()
        self.warned = self.warned_loopback = self.warned_elsewhere = False
        self.others: set[tuple[str, int]] = set()  # what the server listens on that is not published
        self.explained: set[PortRange] = set()  # missing ports a warning named another port for
        try:
            self.netns: int | None = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.netns = None  # the server is already gone: the supervisor sees it

    def poll(self) -> float | None:
        if self.done or self.netns is None:
            return None
        missing, loopback = self._missing()
        if missing:
            waited = time.monotonic() - self.began
            if loopback and not self.warned_loopback and waited > 1:
                self.warned_loopback = True
                log.warning("the server listens on %s only on its loopback address, which no client reaches: "
                            "bind it to 0.0.0.0 or :: (or to its namespace's address)", listed(loopback))
            if not self.warned_elsewhere and waited > 1:
                self.warned_elsewhere = True
                for line in elsewhere(missing, self.others):
                    self.explained.add(line[0])
                    log.warning("%s", line[1])
            unexplained = [p for p in missing if p not in self.explained and p not in loopback]
            if not self.warned and waited > 10 and unexplained:
                self.warned = True
                log.warning("the server does not listen on %s yet: READY waits for it", listed(unexplained))
            return readiness_interval(waited)
        self.done = True
        os.close(self.netns)
        announce_ready(self.ready_fd)
        return None

    def _missing(self) -> tuple[list[PortRange], list[PortRange]]:
        """Published ports the server does not listen on yet (asked of its own namespace), and
        those of them it listens on only on its loopback address."""
        assert self.netns is not None
        with namespaces.inside(self.netns):
            sockets = netlink.listening()
        bound = {(proto, port) for proto, address, port in sockets if not address.is_loopback}
        local = {(proto, port) for proto, address, port in sockets if address.is_loopback}

        def any_of(p: PortRange, where: set) -> bool:  # the sockets are few, a range may be 64k ports
            return any(proto == p.proto and p.inner_lo <= port <= p.inner_hi for proto, port in where)

        missing = [p for p in self.instance.ports if not any_of(p, bound)]
        self.others = {(proto, port) for proto, port in bound
                       if not any(proto == p.proto and p.inner_lo <= port <= p.inner_hi for p in self.instance.ports)}
        return missing, [p for p in missing if any_of(p, local)]


EPHEMERAL = range(32768, 61000)  # the kernel's default ip_local_port_range: a client socket's, most likely


def elsewhere(missing: list[PortRange], others: set[tuple[str, int]]) -> list[tuple[PortRange, str]]:
    """A server that listens on other ports of a published protocol than the published ones
    (5300 instead of 53): one line per published port it misses, naming where it listens and
    the --ports that would match (issue 25). Ports of the ephemeral range are left out: a
    server's own client sockets (upstream queries) are bound there."""
    lines = []
    for p in missing:
        ports = sorted(port for proto, port in others if proto == p.proto and port not in EPHEMERAL)
        if not ports:
            continue
        where = listed(f"{port}/{p.proto}" for port in ports)
        inner = f"{PortRange(p.proto, p.inner_lo, p.inner_hi, p.inner_lo)}"
        published = f"{PortRange(p.proto, p.outer_lo, p.outer_hi, p.outer_lo)}"
        wanted = f"the published {published}" if not p.remapped else f"{inner} (published as {published})"
        line = f"the server listens on {where}, not on {wanted}"
        if p.count == 1:
            line += f": --ports {p.outer_lo}:{ports[0]}{'/tcp' if p.proto == 'tcp' else ''}?"
        lines.append((p, line))
    return lines


def readiness_interval(waited: float) -> float:
    """Seconds until the next look at the server's sockets: every 10 ms at first (READY comes
    the moment a quick server binds), then less and less often, at most a second apart, so that
    a server that never listens on one of its ports (iperf3's UDP port between tests) costs
    nothing noticeable for as long as it runs."""
    return min(1.0, max(0.01, waited / 20))


def announce_ready(ready_fd: int | None) -> None:
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
        except OSError as e:
            log.warning("--ready-fd %d: %s", ready_fd, e.strerror)
    path = os.environ.get("NOTIFY_SOCKET")
    if path:  # systemd Type=notify
        address = "\0" + path[1:] if path.startswith("@") else path
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), address)
            except OSError as e:
                log.warning("NOTIFY_SOCKET %s: %s", path, e.strerror)
