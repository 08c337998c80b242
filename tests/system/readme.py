"""The shell commands README.md shows, read from README.md itself, so the tests that run them
(test_readme.py, test_install.py) cannot drift from what a reader copies.

A command is a line of a code block -- a fenced one (```) or one indented by four spaces -- whose
first word, after an optional ``sudo``, is the program asked for. A trailing ``# comment`` is not
part of it. A synopsis block (``nswrap [OPTIONS] -- COMMAND [ARG...]``, recognised by the
brackets or ellipsis of any of its lines) is left out as a whole: it is not meant to be run.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

# What marks a synopsis: optional parts in brackets, repetition by an ellipsis.
_SYNOPSIS = re.compile(r"\[|\]|\.\.\.|…")


@dataclasses.dataclass(frozen=True)
class Command:
    line: str  # as README shows it, comment and sudo included
    argv: tuple[str, ...]  # the command itself: no sudo, no comment

    def __str__(self) -> str:
        return shlex.join(self.argv)


def code_blocks(text: str) -> list[list[str]]:
    """The code blocks of a Markdown *text*, each as its non-blank lines (stripped)."""
    blocks: list[list[str]] = []
    current: list[str] | None = None  # the block being read, if any
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            current = [] if fenced else None
            if fenced:
                blocks.append(current)
        elif fenced or line.startswith("    "):
            if current is None:
                current = []
                blocks.append(current)
            current.append(line.strip())
        elif line.strip():  # prose ends an indented block; a blank line does not
            current = None
    return [block for block in blocks if block]


def commands(program: str, text: str | None = None) -> list[Command]:
    """The runnable commands of *program* (e.g. "nswrap", "./scripts/install") that README shows,
    once each, in README's order."""
    if text is None:
        text = README.read_text()
    found: dict[tuple[str, ...], Command] = {}
    for block in code_blocks(text):
        if any(_SYNOPSIS.search(line.split(" #", 1)[0]) for line in block):
            continue
        for line in block:
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:  # not shell (an unbalanced quote in a diagram, say)
                continue
            if argv[:1] == ["sudo"]:
                argv = argv[1:]
            if argv[:1] == [program]:
                found.setdefault(tuple(argv), Command(line, tuple(argv)))
    return list(found.values())
