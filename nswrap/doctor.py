"""`nswrap doctor`: would nswrap work here? One verdict per line; changes nothing on the host.

Each check uses the real machinery on throwaway objects: a new network namespace with a veth pair
inside it, `nft -c` (check only, nothing committed) on the very ruleset a start would load, and
the plan computed from this host's facts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

from nswrap import firewall, netlink
from nswrap.config import Config
from nswrap.errors import NswrapError
from nswrap.facts import Facts, gather
from nswrap.plan import TABLE_PREFIX, make_plan, nft_ruleset

RP_FILTER = {"0": "off", "1": "strict", "2": "loose"}


def _capabilities() -> str:
    from nswrap.run import _require_capabilities

    _require_capabilities()
    return "CAP_NET_ADMIN and CAP_SYS_ADMIN"


def _namespaces_and_veth() -> str:
    fd = netlink.new_netns()
    try:
        with netlink.Netlink(fd) as inside:
            inside.veth_add("nswrap-probe0", "nswrap-probe1", fd, 1500)  # both ends inside: gone with it
    finally:
        os.close(fd)
    return "a throwaway namespace with a veth pair was created and removed"


def _pid_namespaces() -> str:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _unshare_pid() else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NswrapError("cannot create a PID namespace")
    return "available"


def _unshare_pid() -> bool:
    from nswrap.supervise import CLONE_NEWPID, _libc

    return _libc.unshare(CLONE_NEWPID) == 0


def _nft(ruleset: str) -> str:
    if not shutil.which("nft"):
        raise NswrapError("nft not found: install nftables")
    done = subprocess.run(["nft", "-c", "-f", "-"], input=ruleset, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NswrapError(next((line for line in done.stderr.splitlines() if line.strip()), "nft -c failed"))
    return "the kernel accepts the ruleset (NAT, conntrack marks, fib, maps): checked, not loaded"


def _conntrack() -> str:
    return f"{netlink.conntrack_count()} flows tracked now"


def _rp_filter(facts: Facts, names: list[str]) -> str:
    def mode(name: str) -> str:
        try:
            with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") as f:
                return RP_FILTER.get(f.read().strip(), "?")
        except OSError:
            return "?"

    return ", ".join(f"{name} {mode(name)}" for name in names) + " (all modes work: marks carry the uplink)"


def doctor(config: Config) -> int:
    """Print one verdict per check; 0 only when nswrap would work here."""
    failed = 0

    def check(what: str, probe: Callable[[], str]) -> object:
        nonlocal failed
        try:
            detail = probe()
        except (NswrapError, OSError) as e:
            failed += 1
            print(f"FAIL  {what}: {e}")
            return None
        print(f"ok    {what}: {detail}")
        return detail

    check("privileges", _capabilities)
    check("network namespaces and veth", _namespaces_and_veth)
    check("PID namespaces", _pid_namespaces)
    check("conntrack", _conntrack)
    with netlink.Netlink() as nl:
        facts = gather(nl)
    plan = [None]

    def planning() -> str:
        plan[0] = make_plan(config, facts, "doctor")
        p = plan[0]
        uplinks = ", ".join(f"{u.ifname}" + (f" via {u.gateway}" if u.gateway else " (no gateway)") for u in p.uplinks)
        return f"uplinks {uplinks}; internal subnet {p.subnet}; marks under {p.mark_mask:#x} are free"

    check("plan (uplinks, addresses, marks, subnet, forward path)", planning)
    if plan[0] is not None:
        p = plan[0]
        check("nftables", lambda: _nft(nft_ruleset(p)))
        check("reverse-path filtering", lambda: _rp_filter(facts, [u.ifname for u in p.uplinks]))
        blockers = firewall.blockers(facts.firewall, TABLE_PREFIX)
        check("other firewalls", lambda: "; ".join(f"{b.where}: nswrap adds narrow accepts there" for b in blockers) or "nothing drops forwarded flows")
        for warning in p.warnings:
            print(f"note  {warning}")
    print("nswrap would work here" if not failed else f"{failed} check(s) failed: nswrap would not work here")
    return 0 if not failed else 1
