"""nswrap.bpf.syscall without root: union bpf_attr and the info structs packed where the kernel's
header puts each field (the offsets read from <linux/bpf.h> by a C program clang compiles here,
when it can), the calls' logic over a fake system call, and the verifier's reason picked from
real logs (Linux 6.18). The system test tests/system/test_bpf_plumbing.py runs the real thing.
"""

from __future__ import annotations

import ctypes
import errno
import re
import shutil
import struct
import subprocess

import pytest

from nswrap.bpf import syscall
from nswrap.errors import NswrapError

# (struct, fields it packs in order, with their C names): the values packed are 1, 2, 3, ...
LAYOUTS = {
    "MAP_CREATE": (syscall.MAP_CREATE, "union bpf_attr",
                   ["map_type", "key_size", "value_size", "max_entries", "map_flags", "inner_map_fd", "numa_node",
                    "map_name"]),
    "ELEM": (syscall.ELEM, "union bpf_attr", ["map_fd", "key", "value", "flags"]),
    "PROG_LOAD": (syscall.PROG_LOAD, "union bpf_attr",
                  ["prog_type", "insn_cnt", "insns", "license", "log_level", "log_size", "log_buf", "kern_version",
                   "prog_flags", "prog_name"]),
    "BY_ID": (syscall.BY_ID, "union bpf_attr", ["prog_id", "next_id", "open_flags"]),
    "INFO": (syscall.INFO, "union bpf_attr", ["info.bpf_fd", "info.info_len", "info.info"]),
    "PROG_INFO": (syscall.PROG_INFO, "struct bpf_prog_info",
                  ["type", "id", "tag", "jited_prog_len", "xlated_prog_len", "jited_prog_insns", "xlated_prog_insns",
                   "load_time", "created_by_uid", "nr_map_ids", "map_ids", "name"]),
    "MAP_INFO": (syscall.MAP_INFO, "struct bpf_map_info",
                 ["type", "id", "key_size", "value_size", "max_entries", "map_flags", "name"]),
}


def offsets(layout: struct.Struct) -> list[int]:
    """Where each field of a `struct` layout starts (padding bytes "x" are no field)."""
    out, at = [], 0
    for count, code in ((int(n or 1), c) for n, c in re.findall(r"(\d*)([a-zA-Z])", layout.format[1:])):
        if code == "x":
            at += count
            continue
        out.append(at)
        at += struct.calcsize(f"={count}{code}")
    return out


def test_the_layouts_are_the_headers(tmp_path):
    """Field offsets as <linux/bpf.h> has them, asked from the C compiler."""
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed")
    lines = [f'printf("{key} {field} %zu\\n", offsetof({ctype}, {field}));'
             for key, (_, ctype, fields) in LAYOUTS.items() for field in fields]
    (tmp_path / "o.c").write_text("#include <stddef.h>\n#include <stdio.h>\n#include <linux/bpf.h>\nint main(void) {\n"
                                  + "\n".join(lines) + "\nreturn 0;\n}\n")
    built = subprocess.run(["clang", "-o", str(tmp_path / "o"), str(tmp_path / "o.c")], capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"cannot build against <linux/bpf.h>: {built.stderr.strip()}")
    c = {}
    for line in subprocess.run([str(tmp_path / "o")], capture_output=True, text=True, check=True).stdout.splitlines():
        key, field, offset = line.split()
        c.setdefault(key, []).append(int(offset))
    ours = {key: offsets(layout) for key, (layout, _, _) in LAYOUTS.items()}
    assert ours == c


def test_offsets_reads_a_layout():
    assert offsets(struct.Struct("=I4xQ16s")) == [0, 8, 16]


def test_the_attr_is_packed_into_a_zeroed_buffer_of_attr_size(monkeypatch):
    seen = []

    class FakeLibc:
        class syscall:  # noqa: N801
            restype = None

            def __new__(cls, number, cmd, buffer, size):
                seen.append((number.value, cmd.value, bytes(buffer), size.value))
                return 5

    monkeypatch.setattr(syscall, "_libc", FakeLibc)
    monkeypatch.setattr(syscall.platform, "machine", lambda: "aarch64")
    assert syscall.map_create(syscall.BPF_MAP_TYPE_LRU_HASH, 12, 24, 1000, syscall.BPF_F_NO_PREALLOC, "flows") == 5
    number, cmd, attr, size = seen[0]
    assert (number, cmd, size, len(attr)) == (280, syscall.BPF_MAP_CREATE, syscall.ATTR_SIZE, syscall.ATTR_SIZE)
    assert struct.unpack_from("=5I", attr) == (9, 12, 24, 1000, 1)
    assert attr[28:44] == b"flows".ljust(16, b"\0") and attr[44:] == bytes(syscall.ATTR_SIZE - 44)


def test_an_unknown_architecture_is_refused(monkeypatch):
    monkeypatch.setattr(syscall.platform, "machine", lambda: "riscv64")
    with pytest.raises(NswrapError, match=r"bpf\(\): no system call number known for riscv64 \(x86_64 and aarch64 only\)"):
        syscall.map_fd_by_id(1)


@pytest.mark.parametrize("name", ["x" * 16, "a-b", "é", "tc/uplink"])
def test_a_name_the_kernel_would_refuse_is_refused_first(name):
    with pytest.raises(ValueError, match="at most 15 ASCII letters, digits, '_' or '.'"):
        syscall.map_create(syscall.BPF_MAP_TYPE_HASH, 4, 4, 1, name=name)


class Kernel:
    """A fake bpf(): each call answers with the next of `answers` (result, errno, log to write)."""

    def __init__(self, monkeypatch, answers):
        self.answers, self.calls = list(answers), []
        monkeypatch.setattr(syscall, "_syscall", self)

    def __call__(self, cmd, attr):
        self.calls.append((cmd, attr))
        result, code, log = self.answers.pop(0)
        if log:
            fields = syscall.PROG_LOAD.unpack_from(attr)
            assert fields[4:6] == (syscall.LOG_LEVEL, syscall.LOG_SIZE)
            ctypes.memmove(fields[6], log.encode() + b"\0", len(log) + 1)
        return result, code, None


LOG_SCALAR = """0: R1=ctx() R10=fp0
0: (b7) r1 = 0                        ; R1=0
1: (61) r0 = *(u32 *)(r1 +0)
R1 invalid mem access 'scalar'
processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
"""
LOG_UNINIT = """0: R1=ctx() R10=fp0
0: (79) r0 = *(u64 *)(r2 +0)
R2 !read_ok
processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
"""
LOG_BRANCHES = """func#0 @0
0: R1=ctx() R10=fp0
; int f(struct __sk_buff *skb)
0: (61) r2 = *(u32 *)(r1 +16)         ; R1=ctx() R2_w=scalar(smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff))
1: (15) if r2 == 0x8 goto pc+1        ; R2_w=scalar(...)
2: (95) exit
R0 !read_ok
mark_precise: frame0: last_idx 1 first_idx 0 subseq_idx -1
from 1 to 3: R1=ctx() R2_w=8 R10=fp0
3: (b7) r0 = 0
processed 4 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
verification time 27 usec
stack depth 0
"""


@pytest.mark.parametrize("log, reason", [
    (LOG_SCALAR, "R1 invalid mem access 'scalar'"),
    (LOG_UNINIT, "R2 !read_ok"),
    (LOG_BRANCHES, "R0 !read_ok"),
    ("unknown opcode 8d\nprocessed 0 insns (limit 1000000)\n", "unknown opcode 8d"),
    ("last insn is not an exit or jmp\n", "last insn is not an exit or jmp"),  # no statistics: the last line
    ("", ""),
])
def test_the_verifiers_reason_is_the_last_meaningful_line_before_its_statistics(log, reason):
    assert syscall.verifier_reason(log) == reason


def test_a_refused_program_is_loaded_again_with_a_log_and_reported_in_one_line(monkeypatch):
    kernel = Kernel(monkeypatch, [(-1, errno.EACCES, ""), (-1, errno.EACCES, LOG_SCALAR)])
    with pytest.raises(syscall.LoadError) as caught:
        syscall.prog_load(syscall.BPF_PROG_TYPE_SCHED_CLS, bytes(16), "GPL", "count")
    assert str(caught.value) == "BPF program count: R1 invalid mem access 'scalar' (EACCES)"
    assert caught.value.errno == errno.EACCES and caught.value.log == LOG_SCALAR
    first, second = (syscall.PROG_LOAD.unpack_from(attr) for _, attr in kernel.calls)
    assert first[:2] == (syscall.BPF_PROG_TYPE_SCHED_CLS, 2) and first[4:7] == (0, 0, 0)  # no log the first time
    assert first[9] == second[9] == b"count".ljust(16, b"\0")


def test_a_refusal_without_a_log_names_the_errno(monkeypatch):
    Kernel(monkeypatch, [(-1, errno.EPERM, ""), (-1, errno.EPERM, "")])
    with pytest.raises(syscall.LoadError, match=r"^BPF program count: Operation not permitted \(EPERM\)$"):
        syscall.prog_load(syscall.BPF_PROG_TYPE_SCHED_CLS, bytes(8), "GPL", "count")


def test_a_program_loaded_the_second_time_is_kept(monkeypatch):
    Kernel(monkeypatch, [(-1, errno.ENOMEM, ""), (9, 0, "")])
    assert syscall.prog_load(syscall.BPF_PROG_TYPE_SCHED_CLS, bytes(8), "GPL", "count") == 9


def test_kernel_errors_are_oserrors_naming_the_command(monkeypatch):
    Kernel(monkeypatch, [(-1, errno.E2BIG, "")])
    with pytest.raises(OSError, match=r"^\[Errno 7\] bpf BPF_MAP_UPDATE_ELEM: Argument list too long$") as caught:
        syscall.map_update(3, bytes(4), bytes(4))
    assert caught.value.errno == errno.E2BIG


def test_absent_keys_are_none_and_false_and_end_the_iteration(monkeypatch):
    Kernel(monkeypatch, [(-1, errno.ENOENT, ""), (-1, errno.ENOENT, ""), (0, 0, ""), (-1, errno.ENOENT, "")])
    assert syscall.map_lookup(3, bytes(4), value_size=8) is None
    assert syscall.map_delete(3, bytes(4)) is False
    assert list(syscall.map_keys(3, key_size=4)) == [bytes(4)]


def test_other_errors_of_lookups_are_raised(monkeypatch):
    Kernel(monkeypatch, [(-1, errno.EBADF, "")])
    with pytest.raises(OSError, match="BPF_MAP_LOOKUP_ELEM"):
        syscall.map_lookup(3, bytes(4), value_size=8)


# --- batches ---------------------------------------------------------------------------------


class FakeMap:
    """A fake bpf() over one map held in a dict, with the batch commands' rules as
    kernel/bpf/syscall.c and hashtab.c keep them: a lookup batch fills up to `count` entries
    (here at most `per_call`: a hash map answers bucket by bucket), writes its position to
    out_batch, and says ENOENT with the last; a delete batch stops at a key that is gone (ENOENT,
    count = those deleted before it). batch=False: a map type without them (an LPM trie: 524)."""

    def __init__(self, monkeypatch, entries: dict[bytes, bytes], batch: bool = True, per_call: int = 3):
        self.map, self.batch, self.per_call, self.calls = dict(entries), batch, per_call, []
        monkeypatch.setattr(syscall, "_syscall", self)

    def __call__(self, cmd, attr):
        self.calls.append(cmd)
        buffer = ctypes.create_string_buffer(attr, syscall.ATTR_SIZE)
        if cmd in (syscall.BPF_MAP_LOOKUP_BATCH, syscall.BPF_MAP_UPDATE_BATCH, syscall.BPF_MAP_DELETE_BATCH):
            if not self.batch:
                return -1, 524, buffer
            in_batch, out_batch, keys, values, count, _fd, _, _ = syscall.BATCH.unpack_from(attr)
            done, code = getattr(self, f"_{cmd}")(in_batch, out_batch, keys, values, count)
            struct.pack_into("=I", buffer, syscall.BATCH_COUNT_OFFSET, done)
            return (-1 if code else 0), code, buffer
        _fd, key, value, _ = syscall.ELEM.unpack_from(attr)
        ordered = sorted(self.map)
        k = ctypes.string_at(key, KEY) if key else None
        if cmd == syscall.BPF_MAP_GET_NEXT_KEY:
            following = [x for x in ordered if k is None or x > k]
            if not following:
                return -1, errno.ENOENT, buffer
            ctypes.memmove(value, following[0], KEY)
        elif cmd == syscall.BPF_MAP_LOOKUP_ELEM:
            if k not in self.map:
                return -1, errno.ENOENT, buffer
            ctypes.memmove(value, self.map[k], VALUE)
        elif cmd == syscall.BPF_MAP_UPDATE_ELEM:
            self.map[k] = ctypes.string_at(value, VALUE)
        elif cmd == syscall.BPF_MAP_DELETE_ELEM:
            if self.map.pop(k, None) is None:
                return -1, errno.ENOENT, buffer
        return 0, 0, buffer

    def _24(self, in_batch, out_batch, keys, values, count):  # BPF_MAP_LOOKUP_BATCH
        start = struct.unpack("=I", ctypes.string_at(in_batch, 4))[0] if in_batch else 0
        taken = sorted(self.map)[start:start + min(count, self.per_call)]
        for i, k in enumerate(taken):
            ctypes.memmove(keys + i * KEY, k, KEY)
            ctypes.memmove(values + i * VALUE, self.map[k], VALUE)
        ctypes.memmove(out_batch, struct.pack("=I", start + len(taken)), 4)
        return len(taken), errno.ENOENT if start + len(taken) >= len(self.map) else 0

    def _26(self, in_batch, out_batch, keys, values, count):  # BPF_MAP_UPDATE_BATCH
        for i in range(count):
            self.map[ctypes.string_at(keys + i * KEY, KEY)] = ctypes.string_at(values + i * VALUE, VALUE)
        return count, 0

    def _27(self, in_batch, out_batch, keys, values, count):  # BPF_MAP_DELETE_BATCH
        for i in range(count):
            if self.map.pop(ctypes.string_at(keys + i * KEY, KEY), None) is None:
                return i, errno.ENOENT
        return count, 0


KEY, VALUE = 4, 8
ENTRIES = {struct.pack(">I", i): struct.pack("=Q", i * 10) for i in range(10)}


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "one-by-one"])
def test_every_entry_is_read_across_batches_or_one_by_one(monkeypatch, batch):
    kernel = FakeMap(monkeypatch, ENTRIES, batch=batch)
    assert syscall.map_items(3, KEY, VALUE) == sorted(ENTRIES.items())
    if batch:  # 3 + 3 + 3 + the last one with ENOENT
        assert kernel.calls == [syscall.BPF_MAP_LOOKUP_BATCH] * 4
    else:  # refused once, then key by key
        assert kernel.calls[0] == syscall.BPF_MAP_LOOKUP_BATCH and len(kernel.calls) == 1 + 10 * 2 + 1


def test_an_empty_map_is_one_call(monkeypatch):
    kernel = FakeMap(monkeypatch, {})
    assert syscall.map_items(3, KEY, VALUE) == [] and kernel.calls == [syscall.BPF_MAP_LOOKUP_BATCH]


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "one-by-one"])
def test_writes_and_deletes_in_batches_or_one_by_one(monkeypatch, batch):
    monkeypatch.setattr(syscall, "BATCH_SIZE", 4)
    kernel = FakeMap(monkeypatch, {})
    kernel.batch = batch
    syscall.map_update_batch(3, sorted(ENTRIES.items()))
    assert kernel.map == ENTRIES
    if batch:
        assert kernel.calls == [syscall.BPF_MAP_UPDATE_BATCH] * 3  # 4 + 4 + 2
    gone = struct.pack(">I", 99)
    kernel.calls.clear()
    syscall.map_delete_batch(3, [struct.pack(">I", 1), gone, struct.pack(">I", 2), gone, gone, struct.pack(">I", 9)])
    assert sorted(kernel.map) == [struct.pack(">I", i) for i in (0, 3, 4, 5, 6, 7, 8)]
    syscall.map_update_batch(3, [])
    syscall.map_delete_batch(3, [])


def test_other_errors_of_batches_are_raised(monkeypatch):
    for call, args in ((syscall.map_items, (3, KEY, VALUE)), (syscall.map_update_batch, (3, [(bytes(4), bytes(8))])),
                       (syscall.map_delete_batch, (3, [bytes(4)]))):
        monkeypatch.setattr(syscall, "_syscall", lambda cmd, attr: (-1, errno.EPERM, ctypes.create_string_buffer(128)))
        with pytest.raises(OSError, match=r"bpf BPF_MAP_(LOOKUP|UPDATE|DELETE)_BATCH: Operation not permitted"):
            call(*args)
