"""Namespaces and process attributes: the only module that calls setns, unshare or prctl.

A thin layer over libc (ctypes), raising OSError on failure. The server's network namespace is
anonymous on purpose: held only by the server's processes (and briefly by an fd of nswrap's), it
vanishes with them, and its veth with it, even when nswrap is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Iterator

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(fd: int, kind: int) -> None:
    _check(_libc.setns(fd, kind), "setns")


def enter_net(fd: int) -> None:
    _setns(fd, CLONE_NEWNET)


def own(kind: str) -> int:
    """An fd of the calling thread's namespace of this kind ("net", "pid", "mnt")."""
    return os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)


def new_netns() -> int:
    """Create an anonymous network namespace; return an fd that holds it (the caller closes it).
    The calling thread is back in its original namespace on return."""
    host = own("net")
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            return own("net")
        finally:
            enter_net(host)
    finally:
        os.close(host)


@contextlib.contextmanager
def inside(netns_fd: int) -> Iterator[None]:
    """Run the block in the namespace `netns_fd`; sockets opened there stay bound to it."""
    host = own("net")
    try:
        enter_net(netns_fd)
        try:
            yield
        finally:
            enter_net(host)
    finally:
        os.close(host)


def unshare_pid() -> None:
    """The next child of this process starts a new PID namespace (as its PID 1)."""
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")


def enter_pid(fd: int) -> None:
    """Later children go back to the PID namespace `fd` (ours)."""
    _setns(fd, CLONE_NEWPID)


def die_with_parent(signum: int) -> None:
    """PR_SET_PDEATHSIG: the kernel sends `signum` when the parent dies. Cleared by a uid change
    (set it after dropping privileges) but kept across exec."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def enter(net_fd: int, mnt_fd: int | None = None) -> None:
    """Join a network (and mount) namespace, e.g. for `nswrap exec` (a preexec_fn)."""
    enter_net(net_fd)
    if mnt_fd is not None:
        _setns(mnt_fd, CLONE_NEWNS)


PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
CAP_NET_BIND_SERVICE = 10
_CAPABILITY_VERSION_3 = 0x20080522


def keep_capabilities() -> None:
    """Keep the permitted capabilities across the coming uid change (PR_SET_KEEPCAPS)."""
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")


def bind_service_only() -> None:
    """After a uid change: keep CAP_NET_BIND_SERVICE and nothing else, and pass it on through
    exec as an ambient capability. Where /proc/sys is read-only (a container),
    ip_unprivileged_port_start cannot be set in the server's namespace: this is the fallback."""
    header = ctypes.create_string_buffer(struct.pack("=Ii", _CAPABILITY_VERSION_3, 0))
    bit = 1 << CAP_NET_BIND_SERVICE
    data = ctypes.create_string_buffer(struct.pack("=6I", bit, bit, bit, 0, 0, 0))
    _check(_libc.capset(header, data), "capset")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0), "prctl(PR_CAP_AMBIENT)")
