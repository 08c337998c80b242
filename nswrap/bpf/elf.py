"""A relocatable BPF object (`clang -O2 -target bpf -c x.c`, no BTF needed) parsed and linked, pure.

What is understood, and nothing more: programs are the executable sections with code
(`SEC("tc/uplink")`; `.text`, where a static function that was not inlined would go, is not a
program), maps are the legacy definitions of a section named `maps` (each symbol there is a
`struct { __u32 type, key_size, value_size, max_entries, map_flags; }`), the license is the string
of the `license` section, the generation the __u32 of a `generation` section (0 without one). A
program's relocations (`.rel<section>`) may only be R_BPF_64_64 against a map, on an ld_imm64
instruction: `link` makes it load the map's fd (src_reg BPF_PSEUDO_MAP_FD).

Anything else is refused by `parse` with one line (`ElfError`): global data (.data, .rodata,
.bss), BPF-to-BPF calls, BTF-defined maps (`.maps`), other relocation types, a missing license,
big-endian or 32-bit objects, and bytes that are not an ELF file at all or are cut short: every
offset read is checked first, so garbage never escapes as IndexError or struct.error.
"""

from __future__ import annotations

import struct
from typing import Any

from nswrap.datatypes import datatype
from nswrap.errors import NswrapError

EM_BPF = 247
ET_REL = 1
SHT_SYMTAB, SHT_REL, SHT_NOBITS = 2, 9, 8
SHF_EXECINSTR = 0x4
STT_SECTION = 3
SHN_UNDEF, SHN_LORESERVE = 0, 0xFF00
R_BPF_64_64 = 1
BPF_PSEUDO_MAP_FD = 1
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_CALL = 1
INSN = 8

HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, align, entsize
SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
REL = struct.Struct("<QQ")  # Elf64_Rel: offset, info (symbol << 32 | type)
MAP_DEF = struct.Struct("<IIIII")  # type, key_size, value_size, max_entries, map_flags


class ElfError(NswrapError):
    """A BPF object nswrap cannot load, in one line."""


@datatype
class MapDef:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@datatype
class Program:
    section: str
    insns: bytes
    relocations: tuple[tuple[int, str], ...]  # (index of the ld_imm64 instruction, map name)


@datatype
class Object:
    programs: dict[str, Program]  # by section name
    maps: dict[str, MapDef]
    license: str
    generation: int  # the `generation` section's __u32; 0 for an object without one


@datatype
class _Section:
    index: int
    name: str
    type: int
    flags: int
    data: bytes
    link: int
    info: int


@datatype
class _Symbol:
    name: str
    type: int
    section: int
    value: int
    size: int


def _unpack(layout: struct.Struct, data: bytes, offset: int, what: str) -> tuple[Any, ...]:
    if offset < 0 or offset + layout.size > len(data):
        raise ElfError(f"BPF object cut short: {what} at {offset} runs past its {len(data)} bytes")
    return layout.unpack_from(data, offset)


def _string(table: bytes, offset: int) -> str:
    if offset >= len(table) and offset:
        raise ElfError(f"BPF object: a name at {offset} past its string table of {len(table)} bytes")
    return table[offset:].split(b"\0", 1)[0].decode(errors="replace")


def _sections(data: bytes) -> list[_Section]:
    ident, kind, machine, _v, _e, _ph, shoff, _f, _eh, _phs, _phn, shentsize, shnum, shstrndx = \
        _unpack(HEADER, data, 0, "the ELF header")
    if ident[:4] != b"\x7fELF":
        raise ElfError("not an ELF file (no \\x7fELF at its start)")
    if ident[4] != 2 or ident[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file (build with clang -target bpf on a little-endian host)")
    if machine != EM_BPF or kind != ET_REL:
        raise ElfError(f"not a relocatable BPF object (ELF type {kind}, machine {machine})")
    if shentsize != SECTION.size or shstrndx >= shnum:
        raise ElfError(f"BPF object: section headers of {shentsize} bytes, names in section {shstrndx} of {shnum}")
    raw = []
    for index in range(shnum):
        _n, stype, flags, _a, offset, size, link, info, _al, _es = \
            _unpack(SECTION, data, shoff + index * SECTION.size, f"section header {index}")
        if stype != SHT_NOBITS and offset + size > len(data):
            raise ElfError(f"BPF object cut short: section {index} runs past its {len(data)} bytes")
        body = b"" if stype == SHT_NOBITS else data[offset : offset + size]
        raw.append((_n, stype, flags, body, link, info))
    names = raw[shstrndx][3]
    return [_Section(i, _string(names, n), t, f, body, link, info) for i, (n, t, f, body, link, info) in enumerate(raw)]


def _symbols(sections: list[_Section]) -> list[_Symbol]:
    tables = [s for s in sections if s.type == SHT_SYMTAB]
    if len(tables) != 1 or tables[0].link >= len(sections):
        raise ElfError(f"BPF object: {len(tables)} symbol tables where one is due")
    table, names = tables[0].data, sections[tables[0].link].data
    found = []
    for offset in range(0, len(table) - SYMBOL.size + 1, SYMBOL.size):
        name, info, _other, shndx, value, size = SYMBOL.unpack_from(table, offset)
        found.append(_Symbol(_string(names, name), info & 0xF, shndx, value, size))
    return found


def parse(data: bytes) -> Object:
    """The programs, maps and license of a BPF object, or ElfError saying why it cannot be loaded."""
    sections = _sections(data)
    symbols = _symbols(sections)
    by_name = {s.name: s for s in sections}
    if "license" not in by_name or not by_name["license"].data.rstrip(b"\0"):
        raise ElfError("BPF object without a license (a SEC(\"license\") string)")
    license = _string(by_name["license"].data, 0)
    generation = 0
    if "generation" in by_name:
        if len(by_name["generation"].data) != 4:
            raise ElfError(f"BPF object: a generation of {len(by_name['generation'].data)} bytes, not a __u32")
        (generation,) = struct.unpack("<I", by_name["generation"].data)
    maps_section = by_name.get("maps")
    maps, at = _maps(maps_section, symbols) if maps_section else ({}, {})
    programs = {}
    for section in sections:
        if section.flags & SHF_EXECINSTR and section.data and section.name != ".text":
            if len(section.data) % INSN:
                raise ElfError(f"BPF object: program {section.name} of {len(section.data)} bytes, not whole instructions")
            _no_calls(section)
            programs[section.name] = Program(section.name, section.data, ())
    for rel in sections:
        if rel.type != SHT_REL or rel.info >= len(sections):
            continue
        target = sections[rel.info]
        if target.name in programs:
            relocations = _relocations(rel, target, symbols, sections, maps_section, at)
            programs[target.name] = Program(target.name, target.data, relocations)
        elif target.flags & SHF_EXECINSTR and target.data:
            raise ElfError(f"BPF object: relocations in {target.name} (BPF-to-BPF calls are not supported)")
    if not programs:
        raise ElfError("BPF object without a program (an executable SEC(\"...\") section)")
    return Object(programs, maps, license, generation)


def _maps(section: _Section, symbols: list[_Symbol]) -> tuple[dict[str, MapDef], dict[int, str]]:
    maps, at = {}, {}
    for symbol in symbols:
        if symbol.section != section.index or symbol.type == STT_SECTION or not symbol.name:
            continue
        if symbol.size not in (0, MAP_DEF.size):
            raise ElfError(f"BPF object: map {symbol.name} is {symbol.size} bytes where "
                           f"struct {{type, key_size, value_size, max_entries, map_flags}} is {MAP_DEF.size}")
        fields = _unpack(MAP_DEF, section.data, symbol.value, f"map {symbol.name}")
        maps[symbol.name] = MapDef(*fields)
        at[symbol.value] = symbol.name
    return maps, at


def _no_calls(section: _Section) -> None:
    for offset in range(0, len(section.data), INSN):
        code, regs = section.data[offset], section.data[offset + 1]
        if code == CALL and regs >> 4 == BPF_PSEUDO_CALL:
            raise ElfError(f"BPF object: program {section.name} calls a BPF function at instruction {offset // INSN} "
                           "(BPF-to-BPF calls are not supported: make it __always_inline)")


def _relocations(rel: _Section, target: _Section, symbols: list[_Symbol], sections: list[_Section],
                 maps_section: _Section | None, at: dict[int, str]) -> tuple[tuple[int, str], ...]:
    out = []
    for offset in range(0, len(rel.data) - REL.size + 1, REL.size):
        where, info = REL.unpack_from(rel.data, offset)
        kind, number = info & 0xFFFFFFFF, info >> 32
        if number >= len(symbols):
            raise ElfError(f"BPF object: relocation in {target.name} against symbol {number} of {len(symbols)}")
        symbol = symbols[number]
        index = where // INSN
        into = f"{target.name} instruction {index}"
        if symbol.section == SHN_UNDEF or symbol.section >= SHN_LORESERVE or symbol.section >= len(sections):
            raise ElfError(f"BPF object: {into} refers to {symbol.name or 'an undefined symbol'}, defined nowhere")
        home = sections[symbol.section]
        if maps_section is None or home.index != maps_section.index:
            what = "a BPF-to-BPF call" if home.flags & SHF_EXECINSTR else "global data"
            raise ElfError(f"BPF object: {into} refers to {symbol.name or home.name} in {home.name} "
                           f"({what}: only maps of SEC(\"maps\") are supported)")
        if kind != R_BPF_64_64:
            raise ElfError(f"BPF object: {into}: relocation type {kind} (only R_BPF_64_64 against a map is supported)")
        if where % INSN or where + 2 * INSN > len(target.data) or target.data[where] != LD_IMM64:
            raise ElfError(f"BPF object: {into}: a map relocation on something other than an ld_imm64 instruction")
        # a map symbol's own offset, or (for a section symbol) the addend clang put in imm
        addend = 0 if symbol.type != STT_SECTION else struct.unpack_from("<i", target.data, where + 4)[0]
        name = at.get(symbol.value + addend)
        if name is None:
            raise ElfError(f"BPF object: {into} refers to offset {symbol.value + addend} of maps, where no map starts")
        out.append((index, name))
    return tuple(out)


def link(program: Program, fds: dict[str, int]) -> bytes:
    """The program's instructions with each map reference made to load that map's fd."""
    missing = sorted({name for _, name in program.relocations} - set(fds))
    if missing:
        raise ElfError(f"BPF program {program.section}: no fd for map {', '.join(missing)}")
    insns = bytearray(program.insns)
    for index, name in program.relocations:
        offset = index * INSN
        insns[offset + 1] = (insns[offset + 1] & 0x0F) | (BPF_PSEUDO_MAP_FD << 4)  # dst_reg kept, src_reg set
        struct.pack_into("<i", insns, offset + 4, fds[name])
    return bytes(insns)
