"""The fast path's generation (docs/fastpath.md, *Upgrades*): what an nswrap does with the programs
it finds attached (nswrap/bpf/fast.py, `judge`), and the two rules that keep it true: every change
to fastpath.bpf.c's code (or to how it is compiled) raises GENERATION, and what every generation
reads and writes (`published`, `sources`, `meta`) never changes. Pure: sources are read, nothing
is loaded."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from nswrap.bpf import elf
from nswrap.bpf.fast import FOREIGN, REPLACE, USE, judge
from tests.unit.test_fastpath import SOURCE

BUILD = Path(__file__).resolve().parents[2] / "scripts" / "build-bpf"

# generation -> digest of fastpath.bpf.c's code and of the compiler's command line in
# scripts/build-bpf (comments and white space left out: `code`). A change fails here until
# GENERATION is raised and its digest recorded; otherwise an upgrade would keep running the older
# programs wherever another nswrap loaded them. (A rename counts as a change: when unsure, raise;
# a raise costs the flows remembered when the next version first starts.)
RECORDED = {
    1: "35cc329046e720fdc871b43343a74f6288b1ed484be0047b3c86ffb1a87a33f2",
}
DECLARED = re.compile(r'__u32 GENERATION SEC\("generation"\) = (\d+);')

# What an nswrap of any generation reads and writes through another's programs, as the source
# says it (white space left out). Never changed: a newer layout needs new maps beside these.
PERMANENT = [
    "structendpoint_key{__u32ifindex;__u8family;__u8proto;__be16port;__u8addr[16];};",
    "structendpoint{__u32veth;__u32mark;__u8server[16];__be16port;__u16pad;__u32timeout;};",
    "structsource_key{__u32prefixlen;__u32ifindex;__u8addr[16];};",
    'structmap_defpublishedSEC("maps")={.type=BPF_MAP_TYPE_HASH,.key_size=sizeof(structendpoint_key),'
    ".value_size=sizeof(structendpoint),.max_entries=262144,.map_flags=BPF_F_NO_PREALLOC,};",
    'structmap_defsourcesSEC("maps")={.type=BPF_MAP_TYPE_LPM_TRIE,.key_size=sizeof(structsource_key),'
    ".value_size=1,.max_entries=16384,.map_flags=BPF_F_NO_PREALLOC,};",
    'structmap_defmetaSEC("maps")={.type=BPF_MAP_TYPE_ARRAY,.key_size=sizeof(__u32),.value_size=sizeof(__u32),'
    ".max_entries=2,};",
]


def uncommented(source: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", source, flags=re.S))


def code(source: str, build: str) -> str:
    (compile_line,) = [line for line in build.splitlines() if line.startswith('"$clang"')]
    return "".join(DECLARED.sub("", uncommented(source)).split()) + "".join(compile_line.split())


def test_every_change_to_the_programs_raises_the_generation():
    source = SOURCE.read_text()
    (generation,) = map(int, DECLARED.findall(source))
    digest = hashlib.sha256(code(source, BUILD.read_text()).encode()).hexdigest()
    if digest not in RECORDED.values():
        pytest.fail(f"fastpath.bpf.c's code changed: raise GENERATION to {max(RECORDED) + 1} and record "
                    f"{max(RECORDED) + 1}: \"{digest}\" in RECORDED ({__file__})")
    assert RECORDED.get(generation) == digest, f"GENERATION {generation} is not the one recorded for this code"
    assert generation == max(RECORDED), "a generation only grows"


def test_what_every_generation_shares_never_changes():
    source = "".join(uncommented(SOURCE.read_text()).split())
    for definition in PERMANENT:
        assert definition in source, (
            f"{definition}: changed or gone; an older nswrap reads and writes it through newer programs "
            "(docs/fastpath.md, Upgrades): put a new layout in new maps beside it")


PUBLISHED, SOURCES, META, FLOWS = (24, 32, 262144), (24, 1, 16384), (4, 4, 2), (40, 36, 65536)
MINE = {"published": PUBLISHED, "sources": SOURCES, "meta": META, "flows": FLOWS}


def own(generation: int) -> elf.Object:
    return elf.Object({}, {name: elf.MapDef(1, *layout, 0) for name, layout in MINE.items()}, "GPL", generation)


JUDGED = [
    # (loaded generation, their maps' layouts, our object) -> verdict
    ("ours", 3, MINE, own(3), USE),
    ("ours, another private map", 3, {**MINE, "flows": (40, 36, 1024)}, own(3), REPLACE),
    ("ours, a map more", 3, {**MINE, "extra": (4, 4, 1)}, own(3), REPLACE),
    ("older", 2, MINE, own(3), REPLACE),
    ("older, other private maps", 2, {**MINE, "flows": (8, 8, 8)}, own(3), REPLACE),
    ("from before generations", 0, MINE, own(1), REPLACE),
    ("newer", 4, MINE, own(3), USE),
    ("newer, other private maps", 4, {"published": PUBLISHED, "sources": SOURCES, "meta": META, "flows2": (8, 8, 8)},
     own(3), USE),
    ("newer, another published", 4, {**MINE, "published": (24, 32, 1024)}, own(3), FOREIGN),
    ("newer, no sources", 4, {"published": PUBLISHED, "meta": META}, own(3), FOREIGN),
    ("our object unreadable", 3, MINE, None, REPLACE),
]


@pytest.mark.parametrize(("generation", "layouts", "ours", "expected"), [case[1:] for case in JUDGED],
                         ids=[case[0] for case in JUDGED])
def test_what_is_done_with_attached_programs(generation, layouts, ours, expected):
    assert judge(generation, layouts, ours) == expected
