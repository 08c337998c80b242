"""The fast path's adapter (docs/fastpath.md): reads what the kernel holds and makes it hold
what nswrap/fastpath.py wants.

Nothing is pinned (bpffs is often not mounted, and `ip netns exec` gives each process its own
/sys): the maps live as long as the programs that tc filters hold, and a later process finds them
again through those filters (filter -> program -> its maps). The programs are loaded once per
network namespace, from the object built from fastpath.bpf.c, and attached to the ingress of
each uplink and of each `bpf` instance's veth (host end) with one tc priority of nswrap's own.
Programs an older nswrap loaded are replaced by this one's; a newer one's are used as they are
(`judge`, docs/fastpath.md *Upgrades*).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable

from nswrap.bpf import elf, syscall
from nswrap.errors import EXIT_USAGE, NswrapError
from nswrap.facts import Facts
from nswrap.fastpath import FAST_OBJECT, FAST_PRIORITY, UPLINK_PROGRAM, VETH_PROGRAM, Endpoint, Fast, Source
from nswrap.netlink import tc
from nswrap.netlink.tc import Tc
from nswrap.objects import IPAddress, IPNetwork, Protocol

PRIORITY, HANDLE = FAST_PRIORITY, 1
log = logging.getLogger("nswrap")

SECTIONS = {UPLINK_PROGRAM: "tc/uplink", VETH_PROGRAM: "tc/veth"}
MAPS = ("published", "flows")
# What every nswrap reads and writes through any generation's programs: permanent (fastpath.bpf.c;
# tests/unit/test_bpf_generation.py pins them).
SHARED_MAPS = ("published", "sources")
Layout = tuple[int, int, int]  # a map's key size, value size, entries (fastpath.fit cuts to MAX_ENDPOINTS)
# What this nswrap does with the programs it finds attached (`judge`; docs/fastpath.md, *Upgrades*)
USE, REPLACE, FOREIGN = "use", "replace", "foreign"
PROTOCOLS: dict[Protocol, int] = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}
NAMES: dict[int, Protocol] = {number: name for name, number in PROTOCOLS.items()}
_KEY = struct.Struct("=IBB2s16s")  # struct endpoint_key: the port in network order
_VALUE = struct.Struct("=II16s2s2xI")  # struct endpoint
_SOURCE = struct.Struct("=II16s")  # struct source_key: prefix length (32 + the address's), ifindex, address
V4_MAPPED = bytes(10) + b"\xff\xff"


# A test seam, not an option: the system tests give nswrap an object the verifier refuses.
OBJECT_SEAM = "NSWRAP_TEST_BPF_OBJECT"


class FastPathError(NswrapError):
    """--datapath bpf cannot be honoured here (one line, exit 2, before any host change)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


def _addr16(address: IPAddress) -> bytes:
    return bytes(address.packed).ljust(16, b"\0")


def encode(e: Endpoint, index: dict[str, int]) -> tuple[bytes, bytes]:
    key = _KEY.pack(index[e.uplink], e.address.version, PROTOCOLS[e.proto], e.port.to_bytes(2, "big"), _addr16(e.address))
    value = _VALUE.pack(index[e.veth], e.mark, _addr16(e.server), e.server_port.to_bytes(2, "big"), e.timeout)
    return key, value


def encode_source(s: Source, index: dict[str, int]) -> tuple[bytes, bytes]:
    """An LPM trie key: IPv4 as ::ffff:a.b.c.d, so both families share one trie per uplink."""
    net = s.network
    addr = V4_MAPPED + net.network_address.packed if net.version == 4 else net.network_address.packed
    bits = 96 + net.prefixlen if net.version == 4 else net.prefixlen
    return _SOURCE.pack(32 + bits, index[s.uplink], addr), bytes([s.allowed])


def decode_source(key: bytes, value: bytes, names: dict[int, str]) -> Source | None:
    prefixlen, ifindex, addr = _SOURCE.unpack(key)
    if ifindex not in names or not 32 <= prefixlen <= 160:
        return None
    bits = prefixlen - 32
    if addr.startswith(V4_MAPPED) and bits >= 96:
        network: IPNetwork = ipaddress.IPv4Network((addr[12:], bits - 96))
    else:
        network = ipaddress.IPv6Network((addr, bits))
    return Source(names[ifindex], network, bool(value[0]))


def decode(key: bytes, value: bytes, names: dict[int, str]) -> Endpoint | None:
    """An entry as an Endpoint; None if it names an interface that is gone or is not nswrap's."""
    ifindex, family, proto, port, addr = _KEY.unpack(key)
    veth, mark, server, server_port, timeout = _VALUE.unpack(value)
    if ifindex not in names or veth not in names or proto not in NAMES or family not in (4, 6):
        return None
    size = 4 if family == 4 else 16
    return Endpoint(names[ifindex], _address(addr[:size]), NAMES[proto], int.from_bytes(port, "big"),
                    names[veth], mark, _address(server[:size]), int.from_bytes(server_port, "big"), timeout)


@functools.lru_cache(maxsize=4096)
def _address(packed: bytes) -> IPAddress:
    """An address from its bytes, made once: a map holds many endpoints of few addresses."""
    return ipaddress.ip_address(packed)


class Loaded:
    """The programs and maps of this namespace's fast path, found or loaded (file descriptors): the
    generation of the object they came from (`meta`[1]; 0 for programs from before generations)
    and what this nswrap does with them (`judge`)."""

    def __init__(self, programs: dict[str, int], maps: dict[str, int], generation: int = 0, verdict: str = USE):
        self.programs, self.maps, self.generation, self.verdict = programs, maps, generation, verdict
        self.layouts: dict[str, Layout] = {}
        self.two_loads = False  # its filters hold programs of two loads (find)
        self.readable = True  # its `published` and `sources` have this nswrap's layout (find)

    def close(self) -> None:
        for fd in (*self.programs.values(), *self.maps.values()):
            os.close(fd)


def attached(t: Tc, links: dict[str, int]) -> dict[str, tc.Filter]:
    """Interface name -> nswrap's filter on its ingress, for every link that has one."""
    found = {}
    for name, ifindex in links.items():
        try:
            listed = t.filters(ifindex, "ingress")
        except OSError as e:
            if e.errno != errno.ENODEV:
                raise
            continue  # gone since the links were listed
        ours = [f for f in listed if f.priority == PRIORITY and f.name in SECTIONS]
        if ours:
            found[name] = ours[0]
    return found


def find(filters: Iterable[tc.Filter]) -> Loaded | None:
    """The programs and maps behind filters already attached (another instance, or an older or
    newer nswrap, loaded them), judged. None when a program has no filter (detached meanwhile, or
    none wanted): what is wanted is then loaded anew. Filters of two loads (a replacement cut short
    by a kill) give the uplink program's load, judged REPLACE at best: every filter is made anew."""
    ids: dict[str, set[int]] = {}
    for f in filters:
        ids.setdefault(f.name, set()).add(f.prog_id)
    if set(ids) != set(SECTIONS):
        return None
    two_loads = any(len(found) > 1 for found in ids.values())
    loaded = Loaded({}, {})
    spare: list[int] = []  # a second program's fds of maps the first one's already gave
    try:
        for name in SECTIONS:  # the uplink program first: its maps are the ones read and written
            prog_id = min(ids[name])
            loaded.programs[name] = syscall.prog_fd_by_id(prog_id)
            again = []
            for map_name, fd in syscall.maps_of(prog_id).items():  # each program uses some of them
                if map_name in loaded.maps:
                    spare.append(fd)
                    again.append((map_name, fd))
                else:
                    loaded.maps[map_name] = fd
            two_loads |= any(syscall.map_info(fd).id != syscall.map_info(loaded.maps[n]).id for n, fd in again)
        loaded.generation = _generation(loaded.maps)
        loaded.layouts = _layouts(loaded.maps)
        own = _own()
        loaded.verdict = judge(loaded.generation, loaded.layouts, own)
        loaded.readable = fits(loaded.layouts, own, SHARED_MAPS)
    except OSError:  # detached meanwhile
        loaded.close()
        return None
    except BaseException:
        loaded.close()
        raise
    finally:
        for fd in spare:
            os.close(fd)
    loaded.two_loads = two_loads
    if two_loads and loaded.verdict == USE:
        loaded.verdict = REPLACE
    return loaded


def _generation(maps: dict[str, int]) -> int:
    """What the loader wrote to `meta`[1]; 0 where there is none (an object from before generations)."""
    value = syscall.map_lookup(maps["meta"], struct.pack("=I", 1)) if "meta" in maps else None
    return struct.unpack("=I", value)[0] if value is not None and len(value) == 4 else 0


def _layouts(maps: dict[str, int]) -> dict[str, Layout]:
    infos = {name: syscall.map_info(fd) for name, fd in maps.items()}
    return {name: (i.key_size, i.value_size, i.max_entries) for name, i in infos.items()}


def _own() -> elf.Object | None:
    """This nswrap's object, parsed (None if it cannot be read: loading it says why)."""
    try:
        with open(os.environ.get(OBJECT_SEAM) or FAST_OBJECT, "rb") as f:
            return elf.parse(f.read())
    except (OSError, NswrapError):
        return None


def judge(generation: int, layouts: dict[str, Layout], own: elf.Object | None) -> str:
    """What an nswrap whose object is `own` does with attached programs of `generation` whose maps
    have `layouts` (docs/fastpath.md, *Upgrades*):
      USE      its own generation with its own maps, or a newer one (an older nswrap never
               replaces newer programs: two versions never take turns) whose `published` and
               `sources` it writes, permanent as they are;
      REPLACE  an older generation: its own programs are loaded and attached on every filter,
               so that an upgrade's fix serves at once (or its object cannot be read: loading it
               says why);
      FOREIGN  a newer one whose shared maps it cannot write (the permanence broken): neither
               replaced nor written; the newer nswrap's instances write them."""
    if own is None or generation < own.generation:
        return REPLACE
    if generation == own.generation:
        return USE if set(layouts) == set(own.maps) and fits(layouts, own, own.maps) else REPLACE
    return USE if fits(layouts, own, SHARED_MAPS) else FOREIGN


def fits(layouts: dict[str, Layout], own: elf.Object | None, names: Iterable[str]) -> bool:
    """Do the maps `names` have the layouts `own` gives them?"""
    return own is not None and all(
        (d := own.maps.get(name)) is not None and layouts.get(name) == (d.key_size, d.value_size, d.max_entries)
        for name in names)


def load(path: str | None = None) -> Loaded:
    """Create the maps and load both programs (the verifier's first complaint, if any, is the
    one-line error)."""
    path = path or os.environ.get(OBJECT_SEAM) or FAST_OBJECT
    if sys.byteorder != "little":
        raise FastPathError("--datapath bpf: the fast path's object is built for little-endian machines; "
                            "use --datapath nft")
    try:
        with open(path, "rb") as f:
            obj = elf.parse(f.read())
    except OSError as e:
        raise FastPathError(f"--datapath bpf: cannot read {path}: {e.strerror} "
                            "(nswrap was built without clang: scripts/build-bpf)") from None
    except NswrapError as e:
        raise FastPathError(f"--datapath bpf: {path}: {e}") from None
    missing = [s for s in SECTIONS.values() if s not in obj.programs] + [m for m in MAPS if m not in obj.maps]
    if missing:
        raise FastPathError(f"--datapath bpf: {path} has no {', '.join(missing)}")
    maps: dict[str, int] = {}
    programs: dict[str, int] = {}
    try:
        for name, d in obj.maps.items():
            maps[name] = syscall.map_create(d.type, d.key_size, d.value_size, d.max_entries, d.flags, name)
        if "meta" in maps:  # [0]: what the other ports a flow may get are drawn with (OTHER_PORTS); [1]: find
            syscall.map_update(maps["meta"], struct.pack("=I", 0), os.urandom(4))
            syscall.map_update(maps["meta"], struct.pack("=I", 1), struct.pack("=I", obj.generation))
        for name, section in SECTIONS.items():
            programs[name] = syscall.prog_load(syscall.BPF_PROG_TYPE_SCHED_CLS, elf.link(obj.programs[section], maps),
                                               obj.license, name)
    except NswrapError as e:  # the verifier's reason (syscall.LoadError), or an object nswrap cannot link
        Loaded(programs, maps).close()
        raise FastPathError(f"--datapath bpf: {e} (from {path}); use --datapath nft") from None
    except OSError as e:
        Loaded(programs, maps).close()
        raise FastPathError(f"--datapath bpf: the kernel refused the fast path's maps or programs: "
                            f"{e.strerror or e} (needs CAP_BPF and CAP_NET_ADMIN; a container's seccomp "
                            f"profile may forbid bpf())") from None
    except BaseException:
        Loaded(programs, maps).close()
        raise
    return Loaded(programs, maps, obj.generation)


def probe() -> None:
    """At start, before any host change: can this kernel, with these capabilities, load the fast
    path? (The loaded objects are freed again: nothing is attached.)"""
    load().close()


def read(links: dict[str, int]) -> Fast:
    """What the kernel holds now: where nswrap's filters are, and the published endpoints."""
    with Tc() as t:
        filters = attached(t, links)
    if not filters:
        return Fast()
    names = {index: name for name, index in links.items()}
    uplinks = frozenset(n for n, f in filters.items() if f.name == UPLINK_PROGRAM)
    veths = frozenset(n for n, f in filters.items() if f.name == VETH_PROGRAM)
    loaded = find(filters.values())
    if loaded is None or not loaded.readable:
        # none to read (then what is wanted is loaded anew), or maps this nswrap cannot read: a
        # newer one's (FOREIGN: only the filters are this one's to change, fastpath.fit) or from a
        # development tree of before the permanent layout (REPLACE)
        if loaded is not None:
            loaded.close()
        return Fast(uplinks, veths, outdated=loaded is not None and loaded.verdict == REPLACE,
                    foreign=loaded is not None and loaded.verdict == FOREIGN)
    try:
        found = {s for s in (decode_source(k, v, names) for k, v in _entries(loaded.maps["sources"])) if s is not None}
        endpoints = set()
        stale = 0  # a dead instance's entries (its veth is gone): counted, so that they differ from
        # what is wanted and the next apply deletes them; otherwise its port stays taken, into nowhere
        for key, value in _entries(loaded.maps["published"]):
            e = decode(key, value, names)
            if e is None:
                stale += 1
            else:
                endpoints.add(e)
    finally:
        loaded.close()
    return Fast(uplinks, veths, frozenset(endpoints), frozenset(found), stale, outdated=loaded.verdict == REPLACE)


def _entries(fd: int) -> list[tuple[bytes, bytes]]:
    info = syscall.map_info(fd)
    return syscall.map_items(fd, info.key_size, info.value_size)


def remembered(facts: Facts) -> int | None:
    """How many flows the fast path remembers now (`nswrap list`): the keys of its LRU map (None:
    a newer nswrap's programs, which may keep them otherwise)."""
    with Tc() as t:
        filters = attached(t, {link.ifname: link.index for link in facts.links})
    loaded = find(filters.values())
    if loaded is None:
        return 0
    try:
        return len(_entries(loaded.maps["flows"])) if "flows" in loaded.maps else None
    finally:
        loaded.close()


def loaded_here() -> str | None:
    """What `doctor` says about the programs attached in this namespace, if both are: whose they
    are and what a start of this nswrap does with them (`judge`)."""
    own = _own()
    with Tc() as t:
        filters = attached(t, {name: index for index, name in socket.if_nameindex()})
    loaded = find(filters.values()) if filters else None
    if loaded is None:
        return ("nswrap's filters here hold one of its two programs (no instance has an Ethernet uplink): a start "
                "that needs the other loads both anew") if filters else None
    loaded.close()
    ours = own.generation if own is not None else "?"
    if loaded.two_loads and loaded.verdict != FOREIGN:
        return "nswrap's filters here hold programs of two loads (a replacement cut short): the next start makes them anew"
    return {USE: f"programs of generation {loaded.generation} are attached here (this nswrap's: {ours}): used as they are",
            REPLACE: f"programs of generation {loaded.generation} are attached here, an older nswrap's (this one's: "
                     f"{ours}): the next start replaces them, and the flows they remember take the nft datapath once",
            FOREIGN: f"programs of generation {loaded.generation} are attached here, a newer nswrap's whose maps this one "
                     f"(generation {ours}) cannot write: its instances would not write them"}[loaded.verdict]


def apply(want: Fast) -> None:
    """Make the kernel hold `want`: load the programs if no filter holds them (then every filter
    is made anew, on the new maps), attach and detach, then write and delete endpoints. What is
    already as wanted is left alone."""
    links = {name: index for index, name in socket.if_nameindex()}
    wanted = {**{n: UPLINK_PROGRAM for n in want.uplinks}, **{n: VETH_PROGRAM for n in want.veths}}
    with Tc() as t:
        have = attached(t, links)
        loaded = find(have.values()) if have else None
        fresh = bool(wanted) and (loaded is None or loaded.verdict == REPLACE)
        if fresh:
            if loaded is not None:
                loaded.close()
            loaded = load()
            if have:  # the flows the old maps remembered are lost: their next packets are remembered anew
                log.info("fast path: programs of generation %d loaded, replacing those attached "
                         "(an older nswrap's, or cut short)", loaded.generation)
        elif loaded is not None and loaded.verdict == FOREIGN:
            _foreign(loaded.generation)
        try:
            for name, program in sorted(wanted.items()):
                if name not in links:
                    # gone since the facts were read (a dying instance's veth, an uplink deleted):
                    # its endpoints are not written either, and the event of its going brings the
                    # next sync. Stopping here would leave every other interface's change undone.
                    log.debug("fast path: %s is gone, skipped", name)
                    continue
                current = have.get(name)
                if fresh or current is None or current.name != program:
                    assert loaded is not None
                    try:
                        t.ensure_clsact(links[name])
                        t.attach(links[name], "ingress", loaded.programs[program], program, PRIORITY, HANDLE)
                    except OSError as e:
                        if e.errno != errno.ENODEV:
                            raise
                        log.debug("fast path: %s went while it was attached to, skipped", name)
            # endpoints through a filter about to go are deleted first; a newer nswrap's maps, never
            # (as judged now, or when `want` was planned: the object on disk may change between)
            if loaded is not None and loaded.verdict != FOREIGN and not want.foreign:
                _write(loaded.maps["sources"], dict(encode_source(s, links) for s in want.sources if s.uplink in links))
                _write(loaded.maps["published"], dict(encode(e, links) for e in want.endpoints
                                                      if e.uplink in links and e.veth in links))
        finally:
            if loaded is not None:
                loaded.close()
        for name in sorted(set(have) - set(wanted)):
            try:
                t.detach(links[name], "ingress", PRIORITY, HANDLE)
                t.remove_clsact(links[name])
            except OSError as e:
                if e.errno != errno.ENODEV:
                    raise  # gone meanwhile (a dead instance's veth): its filter went with it


@functools.cache
def _foreign(generation: int) -> None:
    """Said once per process: the fast path is a newer nswrap's that this one cannot write."""
    log.warning("the fast path's programs here are a newer nswrap's (generation %d), whose maps this one cannot "
                "write: that nswrap's instances write them; run this one's instances with the newer nswrap too",
                generation)


def _write(fd: int, wanted: dict[bytes, bytes]) -> None:
    """Make a map hold exactly `wanted`: what is not wanted deleted, what differs written. What it
    holds is listed, not looked up (a lookup in the LPM trie of `sources` is a longest-prefix
    match: an entry it does not hold can look present through a shorter one)."""
    have = dict(_entries(fd))
    syscall.map_delete_batch(fd, [key for key in have if key not in wanted])
    syscall.map_update_batch(fd, [(key, value) for key, value in wanted.items() if have.get(key) != value])
