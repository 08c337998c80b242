"""Many instances on one host share one datapath (issue 11).

Every instance here is nswrap with the default --mark-mask and every uplink of the lab, wrapping
udpmany.py serving one port of its own. Started together, they must all start (waiting for the
setup lock is normal, never an error) and all serve every path of the lab, IPv4 and IPv6;
stopping or SIGKILLing some never disturbs the others; and once all are gone the host is exactly
as before. The shared datapath is checked with independent oracles (`ip -json rule`,
`nft -j list ruleset`): its size depends on the uplinks, never on the number of instances.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.lab import diff_states, wait_until
from tests.system.common import nswrap, output, processes_running, start
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

PROTO = "110"  # nswrap's routing protocol number (rt_protos): its rules and routes carry it
UPLINKS = ("eth0", "eth1", "eth2")  # the lab's
WAITING = "nswrap: waiting for the setup lock"
POOLS = {4: "198.18.0.0/15", 6: "fd6e:7377:7261::/48"}


def start_instances(lab, tmp_path: Path, ports, *flags: str) -> dict[int, object]:
    """One nswrap per port, all launched at once (each takes ~0.2 s just to import: they overlap)."""
    return {port: start(lab, tmp_path, *flags, "--ports", str(port), "--", *UDPMANY, "serve", "--tag", str(tmp_path), str(port),
                        name=f"i{port}")
            for port in ports}


def wait_all_started(tmp_path: Path, procs: dict, timeout: float) -> None:
    """Every server printed "ready" (so its instance started); an instance that exited instead
    fails the test with its stderr."""
    def settled():
        return all("ready" in output(tmp_path, f"i{port}") or proc.poll() is not None for port, proc in procs.items())

    wait_until(settled, timeout, interval=0.2, what=f"{len(procs)} instances did not all start within {timeout}s")
    failed = {port: (proc.returncode, output(tmp_path, f"i{port}", "err"))
              for port, proc in procs.items() if proc.poll() is not None}
    assert not failed, f"{len(failed)} of {len(procs)} instances exited: {failed}"
    for port in procs:  # waiting for the lock is normal (said at -v); anything else about it is not
        err = output(tmp_path, f"i{port}", "err")
        assert not [line for line in err.splitlines() if "lock" in line and not line.startswith(WAITING)], err


def our_rules(lab, version: int) -> list[dict]:
    rules = json.loads(lab.exec(lab.host, ["ip", f"-{version}", "-json", "rule", "show"]).stdout)
    return [r for r in rules if str(r.get("protocol")) == PROTO]


def check_shared_datapath(lab) -> None:
    """Per family: the two rules for nswrap's pool (reach the servers; never route the pool
    elsewhere) and one fwmark rule per uplink; one nft table. Whatever the number of instances."""
    for version in (4, 6):
        rules = our_rules(lab, version)
        pool = [r for r in rules if r.get("dst") and f"{r['dst']}/{r.get('dstlen')}" == POOLS[version]]
        marks = [r for r in rules if "fwmark" in r]
        assert len(pool) == 2 and len(marks) == len(UPLINKS) and len(rules) == 2 + len(UPLINKS), \
            f"IPv{version} rules of protocol {PROTO}: {rules}"
        assert len({r["table"] for r in marks}) == len(UPLINKS), marks
        assert len({r["fwmark"] for r in marks}) == len(UPLINKS), marks
    ruleset = json.loads(lab.exec(lab.host, ["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
    tables = [(t["table"]["family"], t["table"]["name"]) for t in ruleset if "table" in t]
    assert [t for t in tables if "nswrap" in t[1]] == [("inet", "nswrap")], tables


def element_owners(lab) -> set[str]:
    """Instance ids named by the elements of nswrap's maps (the comment of each element)."""
    done = lab.exec(lab.host, ["nft", "-j", "list", "table", "inet", "nswrap"], check=False)
    if done.returncode:
        return set()
    owners = set()
    for item in json.loads(done.stdout)["nftables"]:
        for key, _value in item.get("map", {}).get("elem", []):
            if isinstance(key, dict) and "elem" in key and key["elem"].get("comment"):
                owners.add(key["elem"]["comment"])
    return owners


def instance_ids(lab) -> dict[int, str]:
    """nswrap's pid -> instance id, from `nswrap list --json`."""
    listed = nswrap(lab, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {row["pid"]: row["id"] for row in json.loads(listed.stdout)["instances"]}


def follow_holder(instance_id: str) -> int | None:
    """The pid holding the `follow` lock of the state directory that holds this instance's
    record (state.py: the one instance that follows the host for all), from /proc/locks."""
    (directory,) = [d for d in Path("/run/nswrap").iterdir() if (d / f"{instance_id}.json").exists()]
    try:
        st = (directory / "follow").stat()
    except FileNotFoundError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"  # as /proc/locks writes it
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE <pid> <maj:min:inode> 0 EOF" ("->" lines: waiters)
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where:
            return int(fields[4])
    return None


def stopped_by_sigterm(lab, proc, timeout: float = 60) -> bool:
    """One SIGTERM was sent to all at once: wait (never signal again) for the server's status."""
    status = proc.wait(timeout)
    lab.stop(proc)  # nothing of it is left
    return status == 128 + signal.SIGTERM


def kill_hard(proc) -> None:
    """SIGKILL nswrap itself (its server's init dies with it, by PR_SET_PDEATHSIG) and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def servers_gone(tmp_path: Path, ports) -> bool:
    alive = {arg for p in processes_running(str(tmp_path)) for arg in p.info["cmdline"] or () if arg.isdigit()}
    return not alive & {str(port) for port in ports}


def test_thirty_instances_started_together_serve_every_path_and_survive_each_other(lab, tmp_path):
    before = lab.state()
    ports = list(range(7100, 7130))
    procs = start_instances(lab, tmp_path, ports)
    wait_all_started(tmp_path, procs, timeout=180)
    everywhere = (*lab.paths, *lab.paths6)
    assert unanswered(lab, everywhere, ports) == []
    check_shared_datapath(lab)

    # SIGTERM six at once, the first one (which created the shared parts) among them
    stopped = ports[::5]
    for port in stopped:
        procs[port].send_signal(signal.SIGTERM)
    for port in stopped:
        assert stopped_by_sigterm(lab, procs.pop(port)), output(tmp_path, f"i{port}", "err")
    assert unanswered(lab, everywhere, list(procs)) == []

    # SIGKILL five at once: nothing of theirs runs any more, and the others do not notice
    ids = instance_ids(lab)
    killed = list(procs)[1::5]
    for port in killed:
        procs[port].send_signal(signal.SIGKILL)
    for port in killed:
        kill_hard(procs.pop(port))
    wait_until(lambda: servers_gone(tmp_path, killed), 10, what="the SIGKILLed instances' servers are gone")
    assert unanswered(lab, everywhere, list(procs)) == []
    live = {ids[p.pid] for p in procs.values()}
    wait_until(lambda: element_owners(lab) == live, 10,
               what="the SIGKILLed instances' elements are removed by the instance that follows the host")
    check_shared_datapath(lab)

    # SIGKILL the instance that follows the host for all (if one does): another takes over
    holder = follow_holder(next(iter(live)))
    if holder is not None:
        (port,) = [port for port, proc in procs.items() if proc.pid == holder]
        kill_hard(procs.pop(port))
        wait_until(lambda: servers_gone(tmp_path, [port]), 10, what="the follower's server is gone")
        assert unanswered(lab, everywhere, list(procs)) == []
        live = {ids[p.pid] for p in procs.values()}
        wait_until(lambda: element_owners(lab) == live, 10, what="a new follower removes the dead follower's elements")

    # the rest stop together; the last one out leaves the host exactly as it found it
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for port, proc in list(procs.items()):
        assert stopped_by_sigterm(lab, proc), output(tmp_path, f"i{port}", "err")
    assert servers_gone(tmp_path, ports)
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())
    done = nswrap(lab, "cleanup")
    assert done.returncode == 0, done.stderr
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())
    assert nswrap(lab, "list").stdout.strip() == "no nswrap instances in this network namespace"


def test_fifty_instances_started_together_all_start(lab, tmp_path):
    """Waiting for the setup lock is normal however long the queue; the datapath stays the same
    size; and each instance serves (on a path that needs nswrap: c2 through eth1, both families)."""
    ports = list(range(7200, 7250))
    procs = start_instances(lab, tmp_path, ports, "-v")
    wait_all_started(tmp_path, procs, timeout=300)
    said = [port for port in ports if WAITING in output(tmp_path, f"i{port}", "err")]
    assert said, "50 starts at once, and none waited for the lock (or said so at -v)?"
    check_shared_datapath(lab)
    assert len(instance_ids(lab)) == 50
    assert unanswered(lab, (lab.paths[2], lab.paths6[2]), ports) == []
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for port, proc in procs.items():
        assert stopped_by_sigterm(lab, proc, timeout=120), output(tmp_path, f"i{port}", "err")


def test_a_hundred_listed_ports_are_all_published(lab, tmp_path):
    ports = list(range(7000, 7200, 2))
    proc = start(lab, tmp_path, "--ports", ",".join(map(str, ports)), "--", *UDPMANY, "serve", *map(str, ports))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 60, what="the server is ready")
    assert proc.poll() is None, output(tmp_path, stream="err")
    sample = [ports[0], ports[37], ports[-1]]
    assert unanswered(lab, (*lab.paths, *lab.paths6), sample) == []
    assert lab.stop(proc) == 128 + signal.SIGTERM
