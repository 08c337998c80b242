"""The tc-BPF plumbing on a real kernel: maps made, the fixture program linked, loaded and attached
with nswrap.bpf and nswrap.netlink.tc, then checked with oracles that never import nswrap (`tc -j`,
`bpftool -j`), packets counted and dropped by it, its maps found again by other processes through
the filter, and nothing left once it is detached.

    nswt-bpf<hex>-a                                  nswt-bpf<hex>-b
    veth0 192.0.2.1/24  <--------- veth ---------->  veth1 192.0.2.2/24
      clsact ingress: bpf pref 1 handle 0x1
      fixture.bpf.o:[tc/ingress] (counts, settings)

Each step runs as a process of its own in a namespace (bpfplumbing.py): maps and program live only
as long as the filter holds them, as nswrap's instances will find them. Both namespaces are
deleted at the end, whatever happened, and with them whatever was still attached.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import wait_until

REPO = Path(__file__).resolve().parents[2]
HELPER = [sys.executable, "-m", "tests.system.bpfplumbing"]
PORT = 5027


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check, cwd=REPO,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)})


class Pair:
    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.a, self.b = f"nswt-bpf{suffix}-a", f"nswt-bpf{suffix}-b"
        self.made: list[str] = []
        for ns in (self.a, self.b):
            run(["ip", "netns", "add", ns])
            self.made.append(ns)
        self.ip(self.a, "link add veth0 type veth peer name veth1 netns", self.b)
        self.ip(self.a, "addr add 192.0.2.1/24 dev veth0")
        self.ip(self.b, "addr add 192.0.2.2/24 dev veth1")
        for ns, dev in ((self.a, "veth0"), (self.b, "veth1")):
            self.ip(ns, f"link set {dev} up")
            self.ip(ns, "link set lo up")

    def ip(self, ns: str, command: str, *more: str) -> None:
        run(["ip", "netns", "exec", ns, "ip", *command.split(), *more])

    def json(self, ns: str, *argv: str, check: bool = True) -> object:
        done = run(["ip", "netns", "exec", ns, *argv], check=check)
        return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None

    def step(self, ns: str, *args: str) -> dict:
        result = self.json(ns, *HELPER, *args)
        assert isinstance(result, dict)
        return result

    def close(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


@pytest.fixture
def pair() -> Iterator[Pair]:
    missing = [tool for tool in ("tc", "bpftool") if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        pytest.skip(f"missing commands: {' '.join(missing)}")
    made = Pair()
    try:
        yield made
    finally:
        made.close()


def bpftool(*argv: str) -> object:
    done = run(["bpftool", "-j", *argv], check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def tc_filters(pair: Pair, direction: str = "ingress") -> list[dict]:
    found = pair.json(pair.a, "tc", "-j", "filter", "show", "dev", "veth0", direction)
    assert isinstance(found, list)
    return [entry for entry in found if "options" in entry]


def gone(kind: str, ident: int) -> bool:
    """The kernel frees a program or map once its last holder lets go, after an RCU grace period."""
    return bpftool(kind, "show", "id", str(ident)) is None


def test_attach_count_find_again_detach(pair):
    first = pair.step(pair.a, "attach", "veth0")
    assert first["added_clsact"] is True
    [entry] = tc_filters(pair)
    assert (entry["pref"], entry["kind"], entry["protocol"]) == (1, "bpf", "all")
    assert entry["options"]["handle"] == "0x1" and entry["options"]["direct-action"] is True
    assert (entry["options"]["bpf_name"], entry["options"]["prog"]["id"]) == ("fixture.bpf.o:[tc/ingress]", first["prog_id"])
    prog = bpftool("prog", "show", "id", str(first["prog_id"]))
    assert isinstance(prog, dict)
    assert (prog["name"], prog["type"], prog["tag"]) == ("count", "sched_cls", first["tag"])
    assert sorted(prog["map_ids"]) == sorted(first["maps"].values())
    counts = bpftool("map", "dump", "id", str(first["maps"]["counts"]))
    assert isinstance(counts, list) and len(counts) == 4

    # attached again at the same priority and handle: replaced, and the old program and maps freed
    second = pair.step(pair.a, "attach", "veth0")
    assert second["added_clsact"] is False and second["prog_id"] != first["prog_id"]
    assert [e["options"]["prog"]["id"] for e in tc_filters(pair)] == [second["prog_id"]]
    wait_until(lambda: gone("prog", first["prog_id"]) and all(gone("map", i) for i in first["maps"].values()), 10,
               what="the replaced program and its maps freed")

    # another process finds the maps through the filter, while packets go through
    found = pair.step(pair.a, "maps", "veth0")
    assert found["maps"] == second["maps"] and found["counts"] == [0, 0, 0, 0] and found["settings"] == {}
    assert found["filters"] == [[1, 1, "fixture.bpf.o:[tc/ingress]", second["prog_id"]]]
    receiver = subprocess.Popen(["ip", "netns", "exec", pair.a, *HELPER, "receive", "192.0.2.1", str(PORT)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    try:
        assert line(receiver) == "ready"
        send(pair, "one")
        assert line(receiver) == "one"
        assert pair.step(pair.a, "set", "veth0", "1") == {"set": 1}
        send(pair, "two")  # dropped at veth0's ingress
        assert pair.step(pair.a, "set", "veth0", "0") == {"deleted": True}
        send(pair, "three")
        assert line(receiver) == "three"  # the datagram before it never arrived
        send(pair, "stop")
        assert line(receiver) == "stop"
    finally:
        receiver.kill()
        receiver.wait(timeout=10)
    found = pair.step(pair.a, "maps", "veth0")
    assert found["counts"][0] == 4 and found["counts"][2:] == [0, 0]  # IPv4: the four datagrams
    assert found["counts"][1] >= 1  # the rest: ARP at least
    dumped = bpftool("map", "dump", "id", str(second["maps"]["counts"]))
    assert isinstance(dumped, list)
    assert {number(e["key"]): number(e["value"]) for e in dumped}[0] == 4

    # detached: nothing left, in tc or in the kernel's BPF objects
    assert pair.step(pair.a, "detach", "veth0") == {"detached": [True, False], "removed": [True, False], "left": False}
    assert tc_filters(pair) == [] and tc_filters(pair, "egress") == []
    qdiscs = pair.json(pair.a, "tc", "-j", "qdisc", "show", "dev", "veth0")
    assert isinstance(qdiscs, list) and not [q for q in qdiscs if q["kind"] == "clsact"]
    wait_until(lambda: gone("prog", second["prog_id"]) and all(gone("map", i) for i in second["maps"].values()), 10,
               what="the detached program and its maps freed")


def test_a_program_the_verifier_refuses_is_one_line(pair):
    result = pair.step(pair.a, "refused")
    assert result == {"error": "BPF program nswt_refused: R1 invalid mem access 'scalar' (EACCES)", "errno": 13}
    programs = bpftool("prog", "show")
    assert isinstance(programs, list) and not [p for p in programs if p.get("name") == "nswt_refused"]


def number(hex_bytes: list[str]) -> int:
    """A little-endian number as bpftool dumps it without BTF: ["0x04", "0x00", ...]."""
    return int.from_bytes(bytes(int(b, 16) for b in hex_bytes), "little")


def line(proc: subprocess.Popen) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready, "no datagram within 10 s"
    return proc.stdout.readline().strip()


def send(pair: Pair, text: str) -> None:
    run(["ip", "netns", "exec", pair.b, *HELPER, "send", "192.0.2.1", str(PORT), text])


@pytest.mark.parametrize("kind", ["hash", "lpm-trie"])
def test_batches_write_read_and_delete_what_bpftool_sees(kind):
    """map_update_batch, map_items and map_delete_batch on a real map of 20,000 entries (the
    fast path's `published` is a hash map; `sources`, an LPM trie, has no batch commands: one by
    one), checked entry by entry against `bpftool map dump` (the maps are the kernel's, not a
    namespace's: freed when this test closes them)."""
    from nswrap.bpf import syscall

    if shutil.which("bpftool", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        pytest.skip("missing command: bpftool")
    n = 20_000 if kind == "hash" else 2_000
    if kind == "hash":
        fd = syscall.map_create(syscall.BPF_MAP_TYPE_HASH, 8, 8, n, 0, "nswt_batch")
        keys = [i.to_bytes(8, "little") for i in range(n)]
    else:  # struct bpf_lpm_trie_key: prefixlen, then the address (/32s of 10.x.y.z)
        fd = syscall.map_create(11, 8, 8, n, syscall.BPF_F_NO_PREALLOC, "nswt_batch")
        keys = [(32).to_bytes(4, "little") + bytes([10, 0, i >> 8, i & 0xFF]) for i in range(n)]
    try:
        written = {k: (i * 7).to_bytes(8, "little") for i, k in enumerate(keys)}
        syscall.map_update_batch(fd, list(written.items()))
        map_id = syscall.map_info(fd).id

        def dumped() -> dict[bytes, bytes]:
            entries = bpftool("map", "dump", "id", str(map_id))
            assert isinstance(entries, list)
            return {bytes(int(b, 16) for b in e["key"]): bytes(int(b, 16) for b in e["value"]) for e in entries}

        assert dumped() == written
        assert dict(syscall.map_items(fd, 8, 8)) == written and len(syscall.map_items(fd, 8, 8)) == n
        gone_keys = keys[::3] + [(n + 5).to_bytes(8, "little") if kind == "hash" else
                                 (32).to_bytes(4, "little") + bytes([10, 1, 0, 0])]  # one that never was
        syscall.map_delete_batch(fd, gone_keys)
        left = {k: v for k, v in written.items() if k not in set(gone_keys)}
        assert dumped() == left and dict(syscall.map_items(fd, 8, 8)) == left
    finally:
        os.close(fd)


def test_a_veth_gone_before_the_fast_path_is_applied_leaves_the_rest_applied(pair):
    """A sync's facts name a veth that is gone by the time it applies (an instance dying while
    another syncs, as 30 instances stopping together do): the uplink's filter is attached and the
    endpoints through interfaces that exist are written all the same (before, the whole apply
    stopped at the missing veth, and every other change waited for a retry). Oracles: tc, and the
    map read back in another process."""
    assert pair.step(pair.a, "fast", "veth0", "nsw-gone") == {"applied": True}
    [entry] = tc_filters(pair)
    assert entry["options"]["bpf_name"] == "nswrap_uplink"
    prog = bpftool("prog", "show", "id", str(entry["options"]["prog"]["id"]))
    assert isinstance(prog, dict)
    (published,) = [i for i in prog["map_ids"] if (bpftool("map", "show", "id", str(i)) or {}).get("name") == "published"]
    dumped = bpftool("map", "dump", "id", str(published))
    assert isinstance(dumped, list)  # struct endpoint_key: ifindex, family, proto, port (network order)
    assert [int(e["key"][6], 16) << 8 | int(e["key"][7], 16) for e in dumped] == [7000]
    assert pair.step(pair.a, "fast", "none") == {"applied": True}
    assert tc_filters(pair) == []
