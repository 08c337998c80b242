"""nswrap.bpf.elf against a real object: tests/unit/fixtures/bpf/fixture.bpf.o, compiled by clang
from fixture.bpf.c (recompiled here when clang is installed, so the two cannot drift apart),
objects it must refuse (made by clang from small sources, or by editing the fixture's bytes), and
bytes cut short or garbled, which must fail with ElfError and nothing else.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess

import pytest

from nswrap.bpf import elf
from nswrap.errors import NswrapError
from tests.unit.fixtures.bpf import COMPILE, OBJECT, SOURCE, sections

DATA = OBJECT.read_bytes()
needs_clang = pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed")


def compiled(tmp_path, source: str) -> bytes:
    (tmp_path / "x.c").write_text(source)
    subprocess.run([*COMPILE, str(tmp_path / "x.c"), "-o", str(tmp_path / "x.o")], check=True, timeout=60)
    return (tmp_path / "x.o").read_bytes()


def test_the_fixture_parses_into_its_programs_maps_and_license():
    obj = elf.parse(DATA)
    assert obj.license == "GPL"
    assert obj.maps == {"counts": elf.MapDef(type=2, key_size=4, value_size=8, max_entries=4, flags=0),
                        "settings": elf.MapDef(type=1, key_size=4, value_size=4, max_entries=8, flags=1)}
    assert sorted(obj.programs) == ["tc/egress", "tc/ingress"]  # .text is empty and no program
    ingress, egress = obj.programs["tc/ingress"], obj.programs["tc/egress"]
    assert ingress.relocations == ((8, "counts"), (18, "counts"), (26, "settings"))
    assert egress.relocations == ((4, "counts"),)
    assert len(ingress.insns) == 38 * 8 and len(egress.insns) == 12 * 8
    for program in obj.programs.values():
        for index, _ in program.relocations:
            assert program.insns[index * 8] == elf.LD_IMM64
        assert program.insns[-8] == 0x95  # exit


def test_link_makes_each_map_reference_load_the_maps_fd():
    program = elf.parse(DATA).programs["tc/ingress"]
    linked = elf.link(program, {"counts": 7, "settings": 1234})
    assert len(linked) == len(program.insns)
    for index, name in program.relocations:
        code, regs, _off, imm = struct.unpack_from("<BBhi", linked, index * 8)
        assert (code, regs & 0x0F, regs >> 4, imm) == (elf.LD_IMM64, 1, elf.BPF_PSEUDO_MAP_FD, 7 if name == "counts" else 1234)
    patched = {index * 8 + i for index, _ in program.relocations for i in range(8)}
    assert all(linked[i] == program.insns[i] for i in range(len(linked)) if i not in patched)


def test_link_without_a_maps_fd_names_the_map():
    with pytest.raises(elf.ElfError, match="no fd for map settings$"):
        elf.link(elf.parse(DATA).programs["tc/ingress"], {"counts": 3})


@needs_clang
def test_the_committed_object_is_what_its_source_compiles_to(tmp_path):
    fresh = elf.parse(compiled(tmp_path, SOURCE.read_text()))
    committed = elf.parse(DATA)
    assert fresh.maps == committed.maps and fresh.license == committed.license
    assert fresh.programs == committed.programs, f"rebuild {OBJECT.name}: {' '.join(COMPILE)} {SOURCE.name} -o {OBJECT.name}"


@needs_clang
@pytest.mark.parametrize(("declared", "generation"), [
    ('unsigned int g __attribute__((section("generation"), used)) = 7;', 7),
    ("", 0),  # an object from before generations: the oldest
])
def test_the_generation_is_the_objects_u32_or_0(tmp_path, declared, generation):
    body = "__attribute__((section(\"tc/x\"), used)) int f(void *ctx) { __u32 k = 0; return lookup(&m, &k) != 0; }"
    license = 'char l[] __attribute__((section("license"), used)) = "GPL";'
    assert elf.parse(compiled(tmp_path, "\n".join((PRELUDE, body, license, declared)))).generation == generation


@needs_clang
def test_a_generation_that_is_no_u32_is_refused(tmp_path):
    body = "__attribute__((section(\"tc/x\"), used)) int f(void *ctx) { __u32 k = 0; return lookup(&m, &k) != 0; }"
    source = "\n".join((PRELUDE, body, 'char l[] __attribute__((section("license"), used)) = "GPL";',
                        'unsigned long long g __attribute__((section("generation"), used)) = 7;'))
    with pytest.raises(elf.ElfError, match=r"^BPF object: a generation of 8 bytes, not a __u32$"):
        elf.parse(compiled(tmp_path, source))


# --- refused: what the loader does not do ----------------------------------------------------

PRELUDE = """
typedef unsigned int __u32;
struct legacy_map { __u32 type, key_size, value_size, max_entries, map_flags; };
struct legacy_map m __attribute__((section("maps"), used)) = { 2, 4, 4, 1, 0 };
static void *(*lookup)(void *map, const void *key) = (void *)1;
"""
REFUSED = {
    "global data": ("__u32 counter; __attribute__((section(\"tc/x\"), used)) int f(void *ctx) { return counter++; }",
                    r"refers to counter in \.bss \(global data: only maps of SEC\(\"maps\"\) are supported\)"),
    "read-only data": ("const volatile __u32 limit = 3; __attribute__((section(\"tc/x\"), used)) int f(void *c) "
                       "{ return limit; }", r"in \.rodata \(global data"),
    "calls": ("__attribute__((noinline)) static int g(int x) { return x * 3; }\n"
              "__attribute__((section(\"tc/x\"), used)) int f(void *ctx) { return g((long)ctx & 7); }",
              r"program tc/x calls a BPF function at instruction \d+ \(BPF-to-BPF calls are not supported"),
    "BTF maps": ("struct { int type; } n __attribute__((section(\".maps\"), used));\n"
                 "__attribute__((section(\"tc/x\"), used)) int f(void *ctx) { __u32 k = 0; return lookup(&n, &k) != 0; }",
                 r"refers to n in \.maps \(global data"),
    "no license": (None, r"^BPF object without a license"),
}


@needs_clang
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_is_not_supported_is_refused_in_one_line(tmp_path, case):
    body, message = REFUSED[case]
    license = "" if case == "no license" else 'char l[] __attribute__((section("license"), used)) = "GPL";'
    if body is None:
        body = "__attribute__((section(\"tc/x\"), used)) int f(void *ctx) { __u32 k = 0; return lookup(&m, &k) != 0; }"
    with pytest.raises(elf.ElfError, match=message) as caught:
        elf.parse(compiled(tmp_path, PRELUDE + body + "\n" + license + "\n"))
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, NswrapError)


def test_another_relocation_type_is_refused():
    data = bytearray(DATA)
    _h, offset, _size = sections(DATA)[".reltc/egress"]
    struct.pack_into("<I", data, offset + 8, 10)  # R_BPF_64_32, what a call to a function gets
    with pytest.raises(elf.ElfError, match=r"tc/egress instruction 4: relocation type 10 \(only R_BPF_64_64"):
        elf.parse(bytes(data))


def test_a_map_reference_on_another_instruction_is_refused():
    data = bytearray(DATA)
    _h, offset, _size = sections(DATA)[".reltc/egress"]
    struct.pack_into("<Q", data, offset, 8)  # instruction 1, a store
    with pytest.raises(elf.ElfError, match="instruction 1: a map relocation on something other than an ld_imm64"):
        elf.parse(bytes(data))


def test_a_map_of_another_layout_is_refused():
    data = bytearray(DATA)
    h, offset, size = sections(DATA)[".symtab"]
    for at in range(offset, offset + size, 24):  # the symbol `settings` said to be 28 bytes
        if struct.unpack_from("<Q", data, at + 16)[0] == 20 and struct.unpack_from("<Q", data, at + 8)[0] == 20:
            struct.pack_into("<Q", data, at + 16, 28)
    with pytest.raises(elf.ElfError, match=r"map settings is 28 bytes where struct \{type, key_size"):
        elf.parse(bytes(data))


# --- bytes that are not a BPF object ---------------------------------------------------------


@pytest.mark.parametrize("data, message", [
    (b"", "cut short: the ELF header"),
    (b"\x7fELF", "cut short: the ELF header"),
    (b"#!/bin/sh\n" + b"\0" * 64, r"not an ELF file"),
    (DATA[:4] + b"\x01" + DATA[5:], "not a 64-bit little-endian ELF file"),
    (DATA[:18] + struct.pack("<H", 62) + DATA[20:], r"not a relocatable BPF object \(ELF type 1, machine 62\)"),
])
def test_what_is_no_bpf_object_says_so(data, message):
    with pytest.raises(elf.ElfError, match=message):
        elf.parse(data)


def test_every_truncation_fails_cleanly():
    for length in range(len(DATA)):
        try:
            elf.parse(DATA[:length])
        except elf.ElfError as e:
            assert "\n" not in str(e)


def test_garbled_bytes_fail_cleanly_or_parse():
    rng = random.Random(27)
    outcomes = set()
    for _ in range(3000):
        data = bytearray(DATA)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            elf.parse(bytes(data))
            outcomes.add("parsed")
        except elf.ElfError:
            outcomes.add("refused")
    assert outcomes == {"parsed", "refused"}
