"""state.py: records and the allocation are never trusted, the state directory is opened safely,
liveness is a lock the kernel releases. Everything under tmp_path: no root, nothing under /run.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable

import pytest

from nswrap.datapath import Allocation, SysctlChange, Uplink
from nswrap.errors import NswrapError
from nswrap.firewall import Blocker, rooms
from nswrap.state import (
    ALLOCATION,
    MAX_FILE,
    CannotTell,
    InvalidState,
    Record,
    State,
    StateDir,
    allocation_to_json,
    hold,
    new_id,
    parse_allocation,
    parse_record,
    remove_dir,
    vanished,
)
from tests.unit.hosts import MASK, instance

NETNS = "c4242"


def record(**instance_kw: object) -> Record:
    kw = {"id": "abcdef", "uplinks": ("eth0", "eth1=198.51.100.1"), "addresses": ("192.0.2.10", "2001:db8:1::10"),
          "loopback": "53", "helpers": ("tftp",), "ports": "53,69,8080-8081:80-81/tcp", **instance_kw}
    return Record("abcdef", 4242, 1764600000.5, ["unbound", "-d"], instance(**kw), MASK, 4243)  # type: ignore[arg-type]


def good_record() -> dict:
    return json.loads(record().to_json())


def good_allocation() -> dict:
    return json.loads(allocation_to_json(Allocation(
        MASK, 5000, (Uplink("eth0", 1, 5000), Uplink("eth0.100", 15, 5001)),
        (SysctlChange("net/ipv4/conf/eth0/forwarding", "0", "1"), SysctlChange("net/ipv4/conf/eth1/src_valid_mark", "2", "1"),
         SysctlChange("net/ipv6/conf/eth0/force_forwarding", "0", "1")),
        tuple(rooms(Blocker("", "iptables-legacy", "DOCKER-USER"))),
    )))


def with_(data: dict, **changes: object) -> bytes:
    out = dict(data)
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        else:
            out[key] = value
    return json.dumps(out).encode()


DELETE = object()


# --- records ---------------------------------------------------------------------------------------


def test_a_record_round_trips():
    original = record()
    assert parse_record(original.to_json(), "abcdef.json") == original
    plain = record(uplinks=(), addresses=(), loopback=None, helpers=(), ipv6=False, outbound=False)
    assert parse_record(plain.to_json(), "abcdef.json") == plain


def test_a_record_keeps_the_datapath_and_an_older_one_has_nft():
    fast = with_(good_record(), datapath="bpf", forwarding6="fast")
    assert parse_record(fast, "abcdef.json").instance.datapath == "bpf"
    assert parse_record(with_(good_record(), datapath=DELETE), "abcdef.json").instance.datapath == "nft"


def test_a_record_keeps_the_udp_timeout_and_an_older_one_has_the_default():
    longer = record(udp_timeout=300)
    assert parse_record(longer.to_json(), "abcdef.json").instance.udp_timeout == 300
    older = with_(good_record(), udp_timeout=DELETE)
    assert parse_record(older, "abcdef.json").instance.udp_timeout == 20


@pytest.mark.parametrize(
    "changes, culprit",
    [
        ({"udp_timeout": 5}, "udp_timeout"),
        ({"udp_timeout": "20"}, "udp_timeout"),
        ({"udp_timeout": True}, "udp_timeout"),
        ({"udp_timeout": None}, "udp_timeout"),
        ({"datapath": "xdp"}, "bad datapath"),
        ({"datapath": ["bpf"]}, "bad datapath"),
        ({"forwarding6": "everything"}, "bad forwarding6"),
        ({"id": "../.."}, "not 6 hex digits"),
        ({"id": "../../etc/passwd"}, "not 6 hex digits"),
        ({"id": "ABCDEF"}, "not 6 hex digits"),
        ({"id": "abcdef\n"}, "not 6 hex digits matching the file name"),
        ({"id": "abcde0"}, "matching the file name"),
        ({"id": 123456}, "'id' is missing or not a str"),
        ({"version": 2}, "not a version 1 record"),
        ({"version": DELETE}, "not a version 1 record"),
        ({"ports": []}, "no ports"),
        ({"ports": ["70000"]}, "port 70000"),
        ({"ports": ["53;reboot"]}, "invalid port spec"),
        ({"ports": [53]}, "'ports' must be a list of strings"),
        ({"ports": "53"}, "'ports' is missing or not a list"),
        ({"ports": ["53"] * 65537}, "'ports' must be a list of strings"),
        ({"loopback_ports": ["\u0665\u0663"]}, "invalid port spec"),
        ({"uplinks": ['eth0"']}, "invalid uplink"),
        ({"uplinks": ["a" * 16]}, "invalid uplink"),
        ({"uplinks": ["eth0=nope"]}, "not a gateway address"),
        ({"uplinks": ["eth0"] * 65}, "'uplinks' must be a list of strings"),
        ({"addresses": ["not-an-ip"]}, "does not appear to be an IPv4 or IPv6 address"),
        ({"addresses": ["192.0.2.1"] * 257}, "'addresses' must be a list of strings"),
        ({"subnet": "198.18.0.0/29"}, "subnet is not a /30"),
        ({"subnet": "198.18.0.1/30"}, "has host bits set"),
        ({"subnet": "fd6e:7377:7261::/126"}, "Expected 4 octets"),
        ({"subnet": 5}, "'subnet' is missing or not a str"),
        ({"subnet6": "fd6e:7377:7261:8001::/80"}, "subnet6 is not a /64 of fd6e:7377:7261::/48"),
        ({"subnet6": "2001:db8::/64"}, "subnet6 is not a /64 of fd6e:7377:7261::/48"),
        ({"subnet6": 6}, ""),
        ({"helpers": ["ftp"]}, "unknown helper"),
        ({"helpers": ["tftp"] * 5}, "'helpers' must be a list of strings"),
        ({"mark_mask": 0}, "mark_mask is not one contiguous run of bits"),
        ({"mark_mask": 0x5}, "mark_mask is not one contiguous run of bits"),
        ({"mark_mask": 1 << 32}, "mark_mask is not one contiguous run of bits"),
        ({"mark_mask": -1}, "mark_mask is not one contiguous run of bits"),
        ({"mark_mask": True}, "'mark_mask' is missing or not a int"),
        ({"mark_mask": "0xf0000000"}, "'mark_mask' is missing or not a int"),
        ({"pid": 0}, "bad pid"),
        ({"pid": -1}, "bad pid"),
        ({"pid": True}, "'pid' is missing or not a int"),
        ({"pid": "1"}, "'pid' is missing or not a int"),
        ({"init_pid": -1}, "bad pid"),
        ({"outbound": "yes"}, "'outbound' is missing or not a bool"),
        ({"outbound": 1}, "'outbound' is missing or not a bool"),
        ({"started": "now"}, "'started'"),
        ({"command": [1]}, "'command' must be a list of strings"),
        ({"command": "true"}, "'command' is missing or not a list"),
        ({"command": ["x"] * 65537}, "'command' must be a list of strings"),
        ({"command": ["x" * (128 * 1024 + 1)]}, "'command' must be a list of strings"),
    ],
)
def test_hostile_records_are_refused(changes, culprit):
    with pytest.raises(InvalidState) as raised:
        parse_record(with_(good_record(), **changes), "abcdef.json")
    assert culprit in str(raised.value)


@pytest.mark.parametrize("raw", [b"", b"not json", b"\xff\xfe", b"[]", b"null", b'"abcdef"', b"1", b"{}",
                                 b'{"version": 1}', b"\x00" * 100])
def test_garbage_is_not_a_record(raw):
    with pytest.raises(InvalidState):
        parse_record(raw, "abcdef.json")
    with pytest.raises(InvalidState):
        parse_allocation(raw)


def test_deeply_nested_json_is_refused():
    nested = b"[" * 30000 + b"]" * 30000
    assert len(nested) < MAX_FILE
    with pytest.raises(InvalidState):
        parse_record(nested, "abcdef.json")


@pytest.mark.parametrize("started", ["1" + "0" * 400, "NaN", "Infinity", "1e300"])
def test_a_start_time_must_be_a_time(started):
    raw = json.dumps(good_record()).replace('"started": 1764600000.5', f'"started": {started}').encode()
    with pytest.raises(InvalidState):
        parse_record(raw, "abcdef.json")


# --- the allocation ---------------------------------------------------------------------------------


def test_an_allocation_round_trips():
    raw = json.dumps(good_allocation()).encode()
    allocation = parse_allocation(raw)
    assert allocation_to_json(allocation) == allocation_to_json(parse_allocation(allocation_to_json(allocation)))
    assert [u.index for u in allocation.uplinks] == [1, 15] and len(allocation.rooms) == 2


def sysctl(key: str, original: str = "0", ours: str = "1") -> dict:
    return {"key": key, "original": original, "ours": ours}


def uplink(ifname: object = "eth0", index: object = 1, table: object = 5000) -> dict:
    return {"ifname": ifname, "index": index, "table": table}


ROOM = {"binary": "iptables-nft", "chain": "FORWARD",
        "rule": ["-i", "nsw-+", "-m", "comment", "--comment", "nswrap", "-j", "ACCEPT"]}


@pytest.mark.parametrize(
    "changes, culprit",
    [
        ({"sysctls": [sysctl("../../../tmp/x")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("net/ipv4/conf/../../../tmp/x/forwarding")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("net/ipv4/conf/eth0/../../x/forwarding")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("net/ipv4/conf/eth0/rp_filter")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("net/ipv4/conf/eth0/route_localnet")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("net/ipv4/ip_forward")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("net/ipv6/conf/all/forwarding")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("kernel/core_pattern")]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("/proc/sys/net/ipv4/conf/eth0/forwarding")]}, "is not one nswrap sets"),
        ({"sysctls": ["net/ipv4/conf/eth0/forwarding"]}, "is not one nswrap sets"),
        ({"sysctls": [sysctl("net/ipv4/conf/eth0/forwarding", original="3")]}, "bad sysctl value"),
        ({"sysctls": [sysctl("net/ipv4/conf/eth0/forwarding", original="|/tmp/x")]}, "bad sysctl value"),
        ({"sysctls": [sysctl("net/ipv4/conf/eth0/forwarding", original=0)]}, "bad sysctl value"),
        ({"sysctls": [sysctl("net/ipv4/conf/eth0/forwarding", ours="0")]}, "bad sysctl value"),
        ({"uplinks": [uplink(index=0)]}, "uplink index outside the mark mask"),
        ({"uplinks": [uplink(index=16)]}, "uplink index outside the mark mask"),  # 0xf0000000 has 15 marks
        ({"uplinks": [uplink(index=1 << 40)]}, "uplink index outside the mark mask"),
        ({"uplinks": [uplink(index="1")]}, "uplink index outside the mark mask"),
        ({"uplinks": [uplink(table=254)]}, "bad routing table"),
        ({"uplinks": [uplink(table=253)]}, "bad routing table"),
        ({"uplinks": [uplink(table=255)]}, "bad routing table"),
        ({"uplinks": [uplink(table=0)]}, "bad routing table"),
        ({"uplinks": [uplink(table=1 << 31)]}, "bad routing table"),
        ({"uplinks": [uplink(ifname='eth0"')]}, "bad uplink"),
        ({"uplinks": [uplink(ifname=None)]}, "bad uplink"),
        ({"uplinks": [uplink(ifname="../x")]}, "bad uplink"),
        ({"uplinks": ["eth0"]}, "bad uplink"),
        ({"uplinks": "eth0"}, "'uplinks' is missing or not a list"),
        ({"mark_mask": 0}, "mark_mask is not one contiguous run of bits"),
        ({"mark_mask": 0xF00F0000}, "mark_mask is not one contiguous run of bits"),
        ({"priority": 0}, "priority out of range"),
        ({"priority": 32001}, "priority out of range"),
        ({"priority": "5000"}, "'priority' is missing or not a int"),
        ({"rooms": [{**ROOM, "rule": ["-j", "ACCEPT"]}]}, "an iptables rule that is not nswrap's"),
        ({"rooms": [{**ROOM, "rule": ["-i", "nsw-+", "-j", "ACCEPT", "-m", "comment", "--comment", "nswrap"]}]}, "not nswrap's"),
        ({"rooms": [{**ROOM, "binary": "sh"}]}, "not nswrap's"),
        ({"rooms": [{**ROOM, "binary": "/usr/sbin/iptables-nft"}]}, "not nswrap's"),
        ({"rooms": [{**ROOM, "chain": "INPUT"}]}, "not nswrap's"),
        ({"rooms": [{k: v for k, v in ROOM.items() if k != "rule"}]}, "not nswrap's"),
        ({"rooms": ["iptables-nft -I FORWARD -j ACCEPT"]}, "not nswrap's"),
        ({"version": 2}, "not a version 1 allocation"),
    ],
)
def test_hostile_allocations_are_refused(changes, culprit):
    with pytest.raises(InvalidState) as raised:
        parse_allocation(with_(good_allocation(), **changes))
    assert culprit in str(raised.value)


def test_a_vlan_sysctl_key_is_accepted():
    vlan = {**good_allocation(), "sysctls": [sysctl("net/ipv4/conf/eth0.100/forwarding")]}
    assert parse_allocation(json.dumps(vlan).encode()).sysctls[0].key == "net/ipv4/conf/eth0.100/forwarding"


def test_a_narrower_mask_narrows_the_indexes():
    narrow = {**good_allocation(), "mark_mask": 0x30000000, "uplinks": [uplink(index=3)]}
    assert parse_allocation(json.dumps(narrow).encode()).uplinks == (Uplink("eth0", 3, 5000),)
    narrow["uplinks"] = [uplink(index=4)]
    with pytest.raises(InvalidState, match="outside the mark mask"):
        parse_allocation(json.dumps(narrow).encode())


# --- the state directory --------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "run")


@pytest.fixture
def sd(root):
    d = StateDir(NETNS, root=root)
    yield d
    d.close()


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_directories_are_made_0700_even_under_umask_000(root):
    old = os.umask(0)
    try:
        d = StateDir(NETNS, root=root)
        d.close()
    finally:
        os.umask(old)
    assert mode(root) == 0o700 and mode(f"{root}/{NETNS}") == 0o700


def test_a_too_open_directory_of_ours_is_closed(root):
    os.makedirs(f"{root}/{NETNS}")
    os.chmod(root, 0o755)
    os.chmod(f"{root}/{NETNS}", 0o777)
    StateDir(NETNS, root=root).close()
    assert mode(root) == 0o700 and mode(f"{root}/{NETNS}") == 0o700


def test_a_symlinked_state_directory_is_refused(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.mkdir(root, 0o700)
    os.symlink(elsewhere, f"{root}/{NETNS}")
    with pytest.raises(NswrapError, match="a symlink.*refusing to use it"):
        StateDir(NETNS, root=root)
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_root_is_refused(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, root)
    with pytest.raises(NswrapError, match="refusing to use it"):
        StateDir(NETNS, root=root)


def test_a_file_where_the_directory_should_be_is_refused(root):
    os.mkdir(root, 0o700)
    open(f"{root}/{NETNS}", "w").close()
    with pytest.raises(NswrapError, match="refusing to use it"):
        StateDir(NETNS, root=root)


def test_files_are_written_0600_even_under_umask_000(sd):
    old = os.umask(0)
    try:
        sd.write("abcdef.json", b"{}")
        fd = sd.acquire("lock")
        os.close(fd)
    finally:
        os.umask(old)
    assert mode(f"{sd.path}/abcdef.json") == 0o600 and mode(f"{sd.path}/lock") == 0o600


def test_writes_are_atomic(sd):
    sd.write("abcdef.json", b"old")
    reader = os.open(f"{sd.path}/abcdef.json", os.O_RDONLY)
    try:
        sd.write("abcdef.json", b"new")
        assert os.pread(reader, 10, 0) == b"old", "replaced by rename, never rewritten in place"
    finally:
        os.close(reader)
    assert sd.read("abcdef.json") == b"new"
    assert not [n for n in sd.names() if n.endswith(".tmp")]


def test_read_remove_and_names(sd):
    assert sd.read("absent.json") is None
    sd.write("b.json", b"1")
    sd.write("a.json", b"2")
    assert [n for n in sd.names() if n.endswith(".json")] == ["a.json", "b.json"]
    sd.remove("a.json")
    sd.remove("a.json")  # already gone: fine
    assert sd.read("a.json") is None


def run_within(seconds: float, action: Callable[[], object]) -> object:
    """action(), failing the test (instead of hanging it) if it blocks."""
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_capture(action)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"blocked for more than {seconds} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _capture(action: Callable[[], object]) -> object:
    try:
        return action()
    except BaseException as e:  # re-raised in the test's thread
        return e


def test_a_fifo_planted_as_a_record_is_refused_without_blocking(sd):
    os.mkfifo(f"{sd.path}/abcdef.json")
    with pytest.raises(InvalidState, match="not a regular file"):
        run_within(5, lambda: sd.read("abcdef.json"))
    state = State(sd)
    assert run_within(5, state.records) == []
    assert state.problems == [f"{sd.path}/abcdef.json: not a regular file"]


def test_a_fifo_planted_as_the_allocation_or_a_lock(sd):
    os.mkfifo(f"{sd.path}/{ALLOCATION}")
    state = State(sd)
    assert run_within(5, state.allocation) is None and "not a regular file" in state.problems[0]
    os.mkfifo(f"{sd.path}/lock")
    with pytest.raises(NswrapError, match="lock is not a regular file"):
        run_within(5, lambda: sd.acquire("lock"))


def test_a_symlink_planted_as_a_record_is_not_followed(sd, tmp_path):
    target = tmp_path / "secret.json"
    target.write_bytes(record().to_json())
    os.symlink(target, f"{sd.path}/abcdef.json")
    with pytest.raises(InvalidState, match="cannot open"):
        sd.read("abcdef.json")
    state = State(sd)
    assert state.records() == [] and len(state.problems) == 1


def test_a_huge_file_is_refused(sd):
    with open(f"{sd.path}/abcdef.json", "wb") as f:
        f.truncate(MAX_FILE + 1)
    with pytest.raises(InvalidState, match=f"larger than {MAX_FILE} bytes"):
        sd.read("abcdef.json")


def test_invalid_records_are_reported_and_skipped(sd):
    state = State(sd)
    state.save(record())
    sd.write("bbbbbb.json", b"{not json")
    sd.write("cccccc.json", record().to_json())  # a record naming another id
    sd.write(".hidden.json", b"garbage")
    sd.write("notes.txt", b"garbage")
    assert [r.id for r in state.records()] == ["abcdef"]
    assert len(state.problems) == 2 and all(p.startswith(sd.path) for p in state.problems)
    state.records()
    assert len(state.problems) == 2, "each problem is reported once"


def test_the_allocation_is_saved_and_removed(sd):
    state = State(sd)
    assert state.allocation() is None
    allocation = parse_allocation(json.dumps(good_allocation()).encode())
    state.save_allocation(allocation)
    assert state.allocation() == allocation and mode(f"{sd.path}/{ALLOCATION}") == 0o600
    state.save_allocation(None)
    assert state.allocation() is None and state.problems == []


# --- liveness ------------------------------------------------------------------------------------


def test_liveness_is_a_lock_held(sd):
    state = State(sd)
    state.save(record())
    assert not sd.is_live("abcdef") and state.live() == []
    fd = hold(state, "abcdef")
    try:
        assert sd.is_live("abcdef") and [r.id for r in state.live()] == ["abcdef"]
        with pytest.raises(NswrapError, match="instance id abcdef is taken"):
            hold(state, "abcdef")
        assert os.get_inheritable(fd) is False, "close-on-exec: the server must not keep it"
    finally:
        os.close(fd)
    assert not sd.is_live("abcdef"), "released with its descriptor (the kernel does it at death)"


def test_liveness_of_a_planted_fifo_or_symlink(sd, tmp_path):
    os.mkfifo(f"{sd.path}/aaaaaa.live")
    assert run_within(5, lambda: sd.is_live("aaaaaa")) is False
    held = tmp_path / "held"
    held.write_text("")
    fd = os.open(held, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        os.symlink(held, f"{sd.path}/bbbbbb.live")
        assert sd.is_live("bbbbbb") is False, "a symlink to someone's lock proves nothing"
    finally:
        os.close(fd)


def test_liveness_that_cannot_be_told_is_never_taken_for_death(sd, root, monkeypatch):
    """Gone (no lock file, or nobody holds it) is False; an error that says nothing about the
    instance (EMFILE at open, ENOLCK at flock) is CannotTell, so no sweep removes a live
    instance's leftovers because this process ran out of descriptors."""
    import errno
    import fcntl

    state = State(sd)
    state.save(record())
    assert sd.is_live("abcdef") is False, "no lock file: gone"
    fd = hold(state, "abcdef")
    try:
        real_open = os.open

        def open_emfile(path, *args, **kwargs):
            if str(path).endswith(".live"):
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real_open(path, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(os, "open", open_emfile)
            with pytest.raises(CannotTell, match=r"cannot tell whether instance abcdef is live: .*abcdef\.live: Too many"):
                sd.is_live("abcdef")
            with pytest.raises(CannotTell):
                state.live()
            dead = StateDir("c2", root=root)  # a vanished namespace's directory, its instance unknown
            dead.write("netns", b"0 1\n")
            dead.write("abcdef.live", b"")
            dead.close()
            assert "c2" not in vanished(root), "cannot tell: the directory stays"

        def flock_enolck(fd, operation):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

        with monkeypatch.context() as m:
            m.setattr(fcntl, "flock", flock_enolck)
            with pytest.raises(CannotTell):
                sd.is_live("abcdef")
        assert sd.is_live("abcdef") is True
    finally:
        os.close(fd)
    assert sd.is_live("abcdef") is False, "the lock released: gone"
    assert "c2" in vanished(root)
    os.mkfifo(f"{sd.path}/aaaaaa.live")
    os.symlink(f"{sd.path}/abcdef.live", f"{sd.path}/bbbbbb.live")
    assert (sd.is_live("aaaaaa"), sd.is_live("bbbbbb")) == (False, False), "not a lock file of ours: gone"


def test_the_setup_lock_and_try_lock(sd):
    with sd.lock():
        assert sd.try_lock("lock") is None
    fd = sd.try_lock("lock")
    assert fd is not None
    os.close(fd)


def test_waiting_for_the_lock_is_said_once(sd):
    held = sd.acquire("lock")
    said: list[str] = []
    got: list[int] = []
    worker = threading.Thread(target=lambda: got.append(sd.acquire("lock", lambda: said.append("waiting"))), daemon=True)
    worker.start()
    try:
        for _ in range(500):
            if said:
                break
            worker.join(0.01)
        assert said == ["waiting"] and not got
    finally:
        os.close(held)
    worker.join(5)
    assert got and said == ["waiting"]
    os.close(got[0])


def test_new_ids_are_fresh(sd):
    state = State(sd)
    state.save(record())
    for _ in range(20):
        candidate = new_id(state, {"000000"})
        assert len(candidate) == 6 and candidate not in ("abcdef", "000000") and int(candidate, 16) >= 0


# --- directories of namespaces that are gone -------------------------------------------------------


def test_retire_removes_the_directory(sd, root):
    state = State(sd)
    state.save(record())
    sd.write(ALLOCATION, b"{}")
    with sd.lock():
        sd.retire()
    assert not os.path.exists(f"{root}/{NETNS}")


def test_vanished_namespaces(root):
    ours = StateDir("c1", root=root)  # records this namespace: in use by this very process
    ours.close()
    gone = StateDir("c2", root=root)
    gone.write("netns", b"0 1\n")  # inode 1 is no network namespace
    gone.close()
    live = StateDir("c3", root=root)
    live.write("netns", b"0 1\n")
    fd = live.try_lock("abcdef.live")
    try:
        odd = StateDir("not-a-netns", root=root, ours=False)
        odd.close()
        assert vanished(root) == ["c2"], "c3 holds a live instance, c1 is ours"
        assert vanished(root, current="c2") == []
    finally:
        os.close(fd)
        live.close()
    remove_dir("c2", root)
    assert sorted(os.listdir(root)) == ["c1", "c3", "not-a-netns"]


def test_list_aligns_its_columns_to_the_widest_cell():
    from nswrap.commands import _table

    def uplink(name, addresses, gateways, started, live):
        return {"name": name, "addresses": addresses, "gateways": gateways, "flows_started": started, "flows": live}

    rows = [
        {"id": "aaaaaa", "pid": 7, "started": "2025-01-01T00:00:00+00:00", "ports": ["53/udp", "53/tcp"],
         "command": ["unbound", "-d"], "flows_counted": True, "forged": 0,
         "uplinks": [uplink("eth0", ["192.0.2.10", "2001:db8:1::10"], ["192.0.2.1"], 12345, 3),
                     uplink("a-long-name0", ["198.51.100.10"], [], 0, 0)]},
        {"id": "bbbbbb", "pid": 1234567, "started": "2025-01-01T00:00:00+00:00", "ports": ["10000-10100/udp"],
         "command": ["sip"], "flows_counted": False, "forged": 2, "uplinks": [uplink("eth1", ["198.51.100.10"], [], 1, 1)]},
    ]
    out = _table(rows)
    assert out[0].split() == ["ID", "PID", "SINCE", "PORTS", "COMMAND"]
    heads = [out[0], out[1], out[4]]
    assert len({h.index("SINCE") if i == 0 else h.index("2025") for i, h in enumerate(heads)}) == 1, out
    commands = ("", "unbound", "sip")
    assert len({h.index("COMMAND") if i == 0 else h.index(c) for i, (h, c) in enumerate(zip(heads, commands, strict=True))}) == 1
    uplinks = [out[2], out[3], out[5]]
    assert len({line.index("flows:") for line in uplinks}) == 1 and len({line.index("live") for line in uplinks}) == 1, out
    assert out[6] == "    dropped 2 packets the server sent from an address not its own"
