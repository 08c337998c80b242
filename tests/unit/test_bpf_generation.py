"""The fast path's generation (docs/fastpath.md, *Upgrades*): which loaded programs an nswrap uses
as they are and which it replaces (nswrap/bpf/fast.py, `usable`), and the rule that keeps it true:
every change to fastpath.bpf.c's code raises GENERATION, and `published` and `sources` keep their
layout from one generation to the next. Pure: the source is read, nothing is loaded."""

from __future__ import annotations

import hashlib
import re

import pytest

from nswrap.bpf import elf
from nswrap.bpf.fast import usable
from nswrap.fastpath import MAX_ENDPOINTS
from tests.unit.test_fastpath import SOURCE

# generation -> digest of fastpath.bpf.c's code (comments and spacing left out: `code`). A change
# to the code fails here until GENERATION is raised and its digest recorded: otherwise an upgrade
# would keep running the older programs wherever another nswrap loaded them.
RECORDED = {
    1: "1c1a6b542eaf40000e3fe57d4a83e07a4dcf052db9aa50d3299e8e1554006b50",
}
DECLARED = re.compile(r'__u32 GENERATION SEC\("generation"\) = (\d+);')


def code(source: str) -> str:
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    source = re.sub(r"//[^\n]*", "", source)
    return " ".join(DECLARED.sub("", source).split())


def test_every_change_to_the_programs_raises_the_generation():
    source = SOURCE.read_text()
    (generation,) = map(int, DECLARED.findall(source))
    digest = hashlib.sha256(code(source).encode()).hexdigest()
    if digest not in RECORDED.values():
        pytest.fail(f"fastpath.bpf.c's code changed: raise GENERATION to {max(RECORDED) + 1} and record "
                    f"{max(RECORDED) + 1}: \"{digest}\" in RECORDED ({__file__})")
    assert RECORDED.get(generation) == digest, f"GENERATION {generation} is not the one recorded for this code"
    assert generation == max(RECORDED), "a generation only grows"


def test_the_maps_an_older_nswrap_writes_keep_their_layout():
    """Key and value sizes are held by test_fastpath's layout test; the entries here."""
    source = SOURCE.read_text()
    for name, entries in {"published": MAX_ENDPOINTS, "sources": 16384}.items():
        body = re.search(rf"struct map_def {name} SEC\(\"maps\"\) = \{{(.*?)\}};", source, re.S)
        assert body is not None and f".max_entries = {entries}," in body.group(1), (
            f"`{name}` changed its layout: an older nswrap could no longer write it through these programs; "
            "a new layout needs a new map's name (docs/fastpath.md, Upgrades)")


PUBLISHED, SOURCES, FLOWS = (24, 32, 262144), (24, 1, 16384), (40, 36, 65536)


def own(generation: int, flows: tuple[int, int, int] = FLOWS) -> elf.Object:
    layouts = {"published": PUBLISHED, "sources": SOURCES, "flows": flows}
    return elf.Object({}, {name: elf.MapDef(1, *layout, 0) for name, layout in layouts.items()}, "GPL", generation)


MINE = {"published": PUBLISHED, "sources": SOURCES, "flows": FLOWS}
USABLE = [
    # (loaded generation, their layouts, our object) -> used as they are?
    ("ours", 3, MINE, own(3), True),
    ("ours, another private map", 3, {**MINE, "flows": (40, 36, 1024)}, own(3), False),
    ("ours, a map more", 3, {**MINE, "extra": (4, 4, 1)}, own(3), False),
    ("older", 2, MINE, own(3), False),
    ("from before generations", 0, MINE, own(1), False),
    ("newer", 4, MINE, own(3), True),
    ("newer, other private maps", 4, {"published": PUBLISHED, "sources": SOURCES, "flows2": (8, 8, 8)}, own(3), True),
    ("newer, another published", 4, {**MINE, "published": (24, 32, 1024)}, own(3), False),
    ("newer, no sources", 4, {"published": PUBLISHED}, own(3), False),
    ("our object unreadable", 3, MINE, None, False),
]


@pytest.mark.parametrize(("generation", "layouts", "ours", "expected"), [case[1:] for case in USABLE],
                         ids=[case[0] for case in USABLE])
def test_which_loaded_programs_are_used_as_they_are(generation, layouts, ours, expected):
    assert usable(generation, layouts, ours) is expected

