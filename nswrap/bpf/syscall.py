"""The bpf(2) system call over ctypes: maps created, read and written, programs loaded, objects
found again by id. It touches only BPF objects (global to the kernel, not to a namespace).

Each command's part of `union bpf_attr` is packed with `struct` into a zeroed buffer of ATTR_SIZE
bytes (the kernel takes a shorter or longer union as long as what it does not know is zero).
Pointers inside it are addresses of ctypes buffers kept alive for the call. Every fd returned is
the caller's to close (the kernel makes them close-on-exec). Kernel errors are `OSError` with the
errno and the command named; a program the verifier refuses is `LoadError`, one line.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from collections.abc import Iterator

from nswrap.datatypes import datatype
from nswrap.errors import NswrapError

# syscall numbers (asm-generic for aarch64); other architectures are refused by `_syscall`
SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280}
ATTR_SIZE = 128  # bytes of union bpf_attr passed: every field used here lies in the first 80

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
BPF_PROG_LOAD = 5
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 13, 14, 15
BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 24, 26, 27
COMMANDS = {BPF_MAP_CREATE: "BPF_MAP_CREATE", BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
            BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM", BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
            BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY", BPF_PROG_LOAD: "BPF_PROG_LOAD",
            BPF_PROG_GET_FD_BY_ID: "BPF_PROG_GET_FD_BY_ID", BPF_MAP_GET_FD_BY_ID: "BPF_MAP_GET_FD_BY_ID",
            BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD", BPF_MAP_LOOKUP_BATCH: "BPF_MAP_LOOKUP_BATCH",
            BPF_MAP_UPDATE_BATCH: "BPF_MAP_UPDATE_BATCH", BPF_MAP_DELETE_BATCH: "BPF_MAP_DELETE_BATCH"}

BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 1, 2, 5, 6
BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH = 9, 10
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_F_NO_PREALLOC = 0x1
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
OBJ_NAME_LEN = 16  # with its NUL

LOG_SIZE = 4 << 20  # the verifier's log of a refused program: the tail is kept when it is longer
LOG_LEVEL = 1

# the parts of union bpf_attr used here (include/uapi/linux/bpf.h)
# map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node, map_name
MAP_CREATE = struct.Struct("=IIIIIII16s")
ELEM = struct.Struct("=I4xQQQ")  # map_fd, key, value (or next_key), flags
# prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version, prog_flags, prog_name
PROG_LOAD = struct.Struct("=IIQQIIQII16s")
# in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags (the batch commands, Linux 5.6)
BATCH = struct.Struct("=QQQQIIQQ")
BATCH_COUNT_OFFSET = 32  # where the kernel writes back how many entries it did
BATCH_SIZE = 4096  # entries per call: more than a hash map's bucket holds (ENOSPC otherwise)
# a map type without batch commands (an LPM trie): the kernel's ENOTSUPP (524) or EINVAL
NO_BATCH = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})
BY_ID = struct.Struct("=III")  # prog_id or map_id, next_id, open_flags
INFO = struct.Struct("=IIQ")  # bpf_fd, info_len, info
# struct bpf_prog_info up to its name: type, id, tag, jited and xlated lengths and insns, load_time,
# created_by_uid, nr_map_ids, map_ids, name
PROG_INFO = struct.Struct("=II8sIIQQQIIQ16s")
# struct bpf_map_info up to its name: type, id, key_size, value_size, max_entries, map_flags, name
MAP_INFO = struct.Struct("=IIIIII16s")
INFO_SIZE = 256  # bytes offered for either info struct (zero past what we read)


class LoadError(NswrapError):
    """The kernel refused a program: the verifier's reason and the errno, in one line; the whole
    log in `log`."""

    def __init__(self, message: str, code: int, log: str):
        super().__init__(message)
        self.errno = code
        self.log = log


@datatype
class ProgInfo:
    id: int
    name: str
    tag: str  # hex, as bpftool shows it
    map_ids: tuple[int, ...]


@datatype
class MapInfo:
    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall(cmd: int, attr: bytes) -> tuple[int, int, ctypes.Array[ctypes.c_char]]:
    """(result, errno, the attr buffer as the kernel left it): result -1 on failure."""
    number = SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise NswrapError(f"bpf(): no system call number known for {platform.machine()} (x86_64 and aarch64 only)")
    buffer = ctypes.create_string_buffer(attr.ljust(ATTR_SIZE, b"\0"), ATTR_SIZE)
    result = _libc().syscall(ctypes.c_long(number), ctypes.c_int(cmd), buffer, ctypes.c_uint(ATTR_SIZE))
    return result, ctypes.get_errno() if result < 0 else 0, buffer


def bpf(cmd: int, attr: bytes) -> int:
    """The bpf() system call; its result, or OSError naming the command."""
    result, code, _ = _syscall(cmd, attr)
    if result < 0:
        raise OSError(code, f"bpf {COMMANDS.get(cmd, cmd)}: {os.strerror(code)}")
    return result


def _name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= OBJ_NAME_LEN or not all(c.isalnum() or c in "_." for c in name) or not name.isascii():
        raise ValueError(f"BPF object name {name!r}: at most {OBJ_NAME_LEN - 1} ASCII letters, digits, '_' or '.'")
    return raw


def _address(buffer: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buffer) if buffer is not None else 0


# --- maps ------------------------------------------------------------------------------------


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = "") -> int:
    return bpf(BPF_MAP_CREATE, MAP_CREATE.pack(map_type, key_size, value_size, max_entries, flags, 0, 0, _name(name)))


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, ELEM.pack(fd, _address(k), _address(v), flags))


def map_lookup(fd: int, key: bytes, value_size: int | None = None) -> bytes | None:
    """The value at key, None when there is none (`value_size` saves asking the kernel)."""
    size = value_size if value_size is not None else map_info(fd).value_size
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(size)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, ELEM.pack(fd, _address(k), _address(v), 0))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Whether there was an entry to delete."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(BPF_MAP_DELETE_ELEM, ELEM.pack(fd, _address(k), 0, 0))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int | None = None) -> Iterator[bytes]:
    """The keys, in the kernel's order. A key deleted meanwhile makes a hash map start over
    from its first key (the kernel's rule): callers that delete while iterating see repeats."""
    size = key_size if key_size is not None else map_info(fd).key_size
    key: ctypes.Array[ctypes.c_char] | None = None  # NULL: the first key
    while True:
        following = ctypes.create_string_buffer(size)
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, ELEM.pack(fd, _address(key), _address(following), 0))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield following.raw
        key = following


def map_items(fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value): BATCH_SIZE entries per system call (BPF_MAP_LOOKUP_BATCH: hash maps),
    key by key where the map type has no batch commands. A reader of 144,000 endpoints made
    half a million system calls before (a start, `list` and a stop took seconds each)."""
    items: list[tuple[bytes, bytes]] = []
    keys = ctypes.create_string_buffer(key_size * BATCH_SIZE)
    values = ctypes.create_string_buffer(value_size * BATCH_SIZE)
    token_in: ctypes.Array[ctypes.c_char] | None = None  # NULL: from the start
    while True:
        token_out = ctypes.create_string_buffer(max(key_size, 8))  # the kernel's position: opaque
        attr = BATCH.pack(_address(token_in), _address(token_out), _address(keys), _address(values), BATCH_SIZE,
                          fd, 0, 0)
        result, code, buffer = _syscall(BPF_MAP_LOOKUP_BATCH, attr)
        if result < 0 and code != errno.ENOENT:  # ENOENT: this batch is the last (maybe empty)
            if code in NO_BATCH and token_in is None:
                return _items_one_by_one(fd, key_size, value_size)
            raise OSError(code, f"bpf BPF_MAP_LOOKUP_BATCH: {os.strerror(code)}")
        count = struct.unpack_from("=I", buffer, BATCH_COUNT_OFFSET)[0]
        k, v = keys.raw, values.raw
        items += [(k[i * key_size:(i + 1) * key_size], v[i * value_size:(i + 1) * value_size]) for i in range(count)]
        if result < 0:
            return items
        token_in = token_out


def _items_one_by_one(fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    items = []
    for key in map_keys(fd, key_size):
        value = map_lookup(fd, key, value_size)
        if value is not None:  # deleted meanwhile
            items.append((key, value))
    return items


def map_update_batch(fd: int, items: list[tuple[bytes, bytes]]) -> None:
    """Write every (key, value) (BPF_ANY): BATCH_SIZE per system call, one by one where the map
    type has no batch commands."""
    done = 0
    while done < len(items):
        chunk = items[done:done + BATCH_SIZE]
        keys = ctypes.create_string_buffer(b"".join(k for k, _ in chunk), sum(len(k) for k, _ in chunk))
        values = ctypes.create_string_buffer(b"".join(v for _, v in chunk), sum(len(v) for _, v in chunk))
        result, code, _ = _syscall(BPF_MAP_UPDATE_BATCH,
                                   BATCH.pack(0, 0, _address(keys), _address(values), len(chunk), fd, 0, 0))
        if result < 0:
            if code in NO_BATCH and done == 0:
                for key, value in items:
                    map_update(fd, key, value)
                return
            raise OSError(code, f"bpf BPF_MAP_UPDATE_BATCH: {os.strerror(code)}")
        done += len(chunk)


def map_delete_batch(fd: int, keys: list[bytes]) -> None:
    """Delete every key (one already gone is fine): BATCH_SIZE per system call, one by one where
    the map type has no batch commands."""
    done = 0
    while done < len(keys):
        chunk = keys[done:done + BATCH_SIZE]
        raw = ctypes.create_string_buffer(b"".join(chunk), sum(len(k) for k in chunk))
        result, code, buffer = _syscall(BPF_MAP_DELETE_BATCH, BATCH.pack(0, 0, _address(raw), 0, len(chunk), fd, 0, 0))
        if result >= 0:
            done += len(chunk)
        elif code == errno.ENOENT:  # the kernel stops at a key that is gone: skip it, go on
            done += struct.unpack_from("=I", buffer, BATCH_COUNT_OFFSET)[0] + 1
        elif code in NO_BATCH and done == 0:
            for key in keys:
                map_delete(fd, key)
            return
        else:
            raise OSError(code, f"bpf BPF_MAP_DELETE_BATCH: {os.strerror(code)}")


# --- programs --------------------------------------------------------------------------------


def prog_load(prog_type: int, insns: bytes, license: str, name: str) -> int:
    """A loaded program's fd; LoadError with the verifier's reason when the kernel refuses it.
    The first try goes without a log (the verifier runs faster); a refusal is loaded again
    with one to say why."""
    if not insns or len(insns) % 8:
        raise ValueError(f"BPF program {name!r}: {len(insns)} bytes, not whole instructions")
    code_buffer = ctypes.create_string_buffer(insns, len(insns))
    license_buffer = ctypes.create_string_buffer(license.encode())
    raw_name = _name(name)

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> tuple[int, int]:
        attr = PROG_LOAD.pack(prog_type, len(insns) // 8, _address(code_buffer), _address(license_buffer),
                              LOG_LEVEL if log is not None else 0, len(log) if log is not None else 0, _address(log),
                              0, 0, raw_name)
        result, code, _ = _syscall(BPF_PROG_LOAD, attr)
        return result, code

    fd, first = attempt(None)
    if fd >= 0:
        return fd
    log = ctypes.create_string_buffer(LOG_SIZE)
    fd, _ = attempt(log)
    if fd >= 0:  # loaded the second time (a transient failure, e.g. memory): keep it
        return fd
    text = log.value.decode(errors="replace")
    return _raise_load_error(name, first, text)


def _raise_load_error(name: str, code: int, log: str) -> int:
    reason = verifier_reason(log)
    label = errno.errorcode.get(code, str(code))
    message = f"BPF program {name}: {reason} ({label})" if reason else f"BPF program {name}: {os.strerror(code)} ({label})"
    raise LoadError(message, code, log)


def verifier_reason(log: str) -> str:
    """The line of a verifier log that says why a program was refused, or "".

    The heuristic: the verifier prints the instructions it walks and the registers' states, stops
    at the first error with a line saying why ("R1 invalid mem access 'scalar'", "invalid
    read from stack R10 off=-8 size=8"), then the statistics ("processed N insns ...", and on some
    kernels "verification time ...", "stack depth ..."). So: the lines before the first
    "processed " line (the whole log if there is none), without those that trace the walk (an
    instruction "12: (61) r0 = ...", a state "R1=ctx() R10=fp0" or "; R1_w=0", a source line
    "; x = y", a branch "from 4 to 6: ...", the backtracking "mark_precise: ..." lines), and of
    what is left the last one."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("processed "):
            lines = lines[:i]
            break
    meaningful = [line.strip() for line in lines if line.strip() and not _trace(line.strip())]
    return meaningful[-1] if meaningful else ""


def _trace(line: str) -> bool:
    head = line.split(":", 1)[0]
    return (head.isdigit()  # "12: (61) r0 = *(u32 *)(r1 +0)" or "0: R1=ctx() R10=fp0"
            or line.startswith((";", "from ", "mark_precise", "last_idx", "regs=", "parent ", "frame", "func#"))
            or (line[:1] == "R" and line[1:2].isdigit() and "=" in line.split(" ", 1)[0]))  # "R1_w=0 R10=fp0"


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(BPF_PROG_GET_FD_BY_ID, BY_ID.pack(prog_id, 0, 0))


def map_fd_by_id(map_id: int) -> int:
    return bpf(BPF_MAP_GET_FD_BY_ID, BY_ID.pack(map_id, 0, 0))


def _info(fd: int, info: bytes) -> bytes:
    buffer = ctypes.create_string_buffer(info.ljust(INFO_SIZE, b"\0"), INFO_SIZE)
    bpf(BPF_OBJ_GET_INFO_BY_FD, INFO.pack(fd, INFO_SIZE, _address(buffer)))
    return buffer.raw


def prog_info(fd: int) -> ProgInfo:
    """Its id, name, tag and the ids of the maps it uses (asked twice when it uses more than 16)."""
    room = 16
    while True:
        ids = ctypes.create_string_buffer(4 * room)
        raw = _info(fd, PROG_INFO.pack(0, 0, b"", 0, 0, 0, 0, 0, 0, room, _address(ids), b""))
        _type, prog_id, tag, _jl, _xl, _ji, _xi, _t, _uid, count, _ids, name = PROG_INFO.unpack_from(raw)
        if count <= room:
            return ProgInfo(prog_id, _text(name), tag.hex(), struct.unpack_from(f"={count}I", ids.raw))
        room = count


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, b"")
    map_type, map_id, key_size, value_size, max_entries, flags, name = MAP_INFO.unpack_from(raw)
    return MapInfo(map_id, _text(name), map_type, key_size, value_size, max_entries, flags)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def maps_of(prog_id: int) -> dict[str, int]:
    """{name: fd} of the maps a loaded program uses, found from its id alone (a process that did
    not load it finds them this way: tc filter -> program id -> maps). Two maps of one name:
    the first is kept. Every fd not returned is closed; those returned are the caller's."""
    prog = prog_fd_by_id(prog_id)
    found: dict[str, int] = {}
    try:
        for map_id in prog_info(prog).map_ids:
            fd = map_fd_by_id(map_id)
            try:
                name = map_info(fd).name
            except BaseException:
                os.close(fd)
                raise
            if name in found:
                os.close(fd)
            else:
                found[name] = fd
    except BaseException:
        for fd in found.values():
            os.close(fd)
        raise
    finally:
        os.close(prog)
    return found
