"""`nswrap doctor`: would nswrap work here? One verdict per line; changes nothing on the host.

Each check uses the real machinery on throwaway objects: a new network namespace with a veth pair
inside it, `nft -c` (check only, nothing committed) on the very table a start would load, and
the datapath computed from this host's facts.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from nswrap import namespaces, netlink, nft, ruleset, sync
from nswrap.changes import read_only_message
from nswrap.config import Config
from nswrap.datapath import (
    Allocation,
    Instance,
    allocate_subnet,
    check_uplinks,
    choose_forwarding6,
    datapath,
    describe_forwarding6,
    free_priority,
    ula_subnet,
)
from nswrap.errors import NswrapError
from nswrap.facts import Facts, gather, netns_id
from nswrap.precheck import require_capabilities
from nswrap.state import existing

RP_FILTER = {"0": "off", "1": "strict", "2": "loose"}


def _namespaces_and_veth() -> str:
    fd = namespaces.new_netns()
    try:
        with namespaces.inside(fd):
            routing = netlink.Routing()
        with routing:  # both ends inside the throwaway namespace: gone with it
            routing.do(routing.veth("nswrap-probe0", "nswrap-probe1", fd, 1500, ("02:00:00:00:00:01", "02:00:00:00:00:02")))
    finally:
        os.close(fd)
    return "a throwaway namespace with a veth pair was created and removed"


def _pid_namespaces() -> str:
    pid = os.fork()
    if pid == 0:
        try:
            namespaces.unshare_pid()
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NswrapError("cannot create a PID namespace")
    return "available"


def _conntrack() -> str:
    use = {}
    for key in ("count", "max"):
        try:
            with open(f"/proc/sys/net/netfilter/nf_conntrack_{key}") as f:
                use[key] = f.read().strip()
        except OSError:
            use[key] = "?"
    with netlink.Conntrack() as ct:
        ct.flows(4, orig_proto=17, orig_dport=1)  # the kernel answers filtered dumps
        ct.flows(None, dnat_only=True)
    return f"{use['count']} of {use['max']} entries in use; filtered dumps work"


def _rp_filter(facts: Facts, names: list[str]) -> str:
    def mode(name: str) -> str:
        try:
            with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") as f:
                return RP_FILTER.get(f.read().strip(), "?")
        except OSError:
            return "?"

    return ", ".join(f"{name} {mode(name)}" for name in names) + " (all modes work: marks carry the uplink)"


def _sysctls(keys: list[str]) -> str:
    if not keys:
        return "nothing to change (the needed values are already in effect)"
    st = os.statvfs("/proc/sys")
    if st.f_flag & os.ST_RDONLY:
        raise NswrapError(read_only_message(keys))
    shown = ", ".join(k.replace("/", ".") for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"{len(keys)} to set ({shown}); /proc/sys is writable"


def doctor(config: Config) -> int:
    """Print one verdict per check; 0 only when nswrap would work here."""
    failed = 0

    def check(what: str, probe: Callable[[], str]) -> str | None:
        nonlocal failed
        try:
            detail = probe()
        except (NswrapError, OSError) as e:
            failed += 1
            print(f"FAIL  {what}: {e}")
            return None
        print(f"ok    {what}: {detail}")
        return detail

    def privileges() -> str:
        require_capabilities()
        return "CAP_NET_ADMIN and CAP_SYS_ADMIN"

    if check("privileges", privileges) is None:
        print("1 check(s) failed: nswrap would not work here (doctor needs root to look further)")
        return 1
    check("network namespaces and veth", _namespaces_and_veth)
    check("PID namespaces", _pid_namespaces)
    check("conntrack", _conntrack)
    with netlink.Routing() as routing:
        facts = gather(routing)
    found: dict = {}

    state = existing(netns_id())
    allocation = state.allocation() if state else None
    check("IPv6 forwarding", lambda: describe_forwarding6(config.ipv6_forwarding, facts, allocation, config.datapath))
    if config.datapath == "bpf":
        check("fast path (--datapath bpf)", _fast_path)

    def planning() -> str:
        # beside live instances, the plan is theirs plus one more: their marks, rules and table
        # are nswrap's own, not another tool's
        live = tuple(r.instance for r in state.live()) if state else ()
        if live and allocation is not None and allocation.mark_mask != config.mark_mask:
            raise NswrapError(f"the nswrap instances here use --mark-mask {allocation.mark_mask:#x}; give the same")
        subnet = allocate_subnet(facts, live, config.subnet)
        forwarding6 = choose_forwarding6(config.ipv6_forwarding, facts, allocation)
        instance = Instance("d0d0d0", config.ports, subnet, ula_subnet(subnet) if forwarding6 else None,
                            config.uplinks, config.addresses, (), config.outbound, config.helpers,
                            forwarding6 or "interface")
        check_uplinks(facts, instance)
        base = allocation if live and allocation is not None else Allocation(config.mark_mask, free_priority(facts))
        dp = datapath(facts, base, (*live, instance))
        found["dp"] = dp
        uplinks = ", ".join(u.ifname for u in dp.allocation.uplinks)
        marks = "free" if not live else f"free or live instances' ({len(live)})"
        return f"uplinks {uplinks}; internal subnet {subnet}; marks under {config.mark_mask:#x} are {marks}"

    check("plan (uplinks, addresses, marks, subnet)", planning)
    dp = found.get("dp")
    if dp is not None:
        def nftables() -> str:
            nft.check(ruleset.table_text(dp))
            return "the kernel accepts the table (NAT, maps, conntrack marks, timeouts): checked, not loaded"

        check("nftables", nftables)
        check("sysctls", lambda: _sysctls(sorted(k for k, v in dp.sysctls.items() if facts.sysctl(k) != v)))
        check("reverse-path filtering", lambda: _rp_filter(facts, [u.ifname for u in dp.allocation.uplinks]))

        def firewalls() -> str:
            rooms = sync.wanted_rooms(sync.probe_firewall(), config.firewall, config.mark_mask)
            said = "; ".join(f"iptables {r.binary} {r.chain}: nswrap adds narrow accepts there" for r in rooms[::2])
            return said or "nothing drops forwarded flows"

        check("other firewalls and marks", firewalls)
        for warning in dp.warnings:
            print(f"note  {warning}")
    print("nswrap would work here" if not failed else f"{failed} check(s) failed: nswrap would not work here")
    return 0 if not failed else 1


def _fast_path() -> str:
    from nswrap.bpf import fast

    fast.probe()
    here = fast.loaded_here()
    return ("the kernel loads it (bpf_redirect_peer, bpf_redirect_neigh): published flows will skip this host's "
            "netfilter (its firewall rules and conntrack) and forwarding; IPv6 needs no forwarding switch"
            + (f"; {here}" if here else ""))
