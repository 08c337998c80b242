"""Running the command line in-process (fast) or as a real process (black-box), for the unit tests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from nswrap import cli


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> Done:
    """`nswrap *args` through cli.main in this process; the environment is the caller's."""
    capsys.readouterr()
    code: object = 0  # cli.main returns normally after --help and --version (click's Exit(0))
    try:
        cli.main(list(args))
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return Done(code if isinstance(code, int) else (0 if code is None else 1), out, err)


def python() -> str:
    """This interpreter, to run again as a process; skips when this user may not execute it (a venv
    made by root from an interpreter under /root, with the tests run as nobody)."""
    if not os.access(sys.executable, os.X_OK):
        pytest.skip(f"{sys.executable} is not executable by uid {os.getuid()}")
    return sys.executable


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NSWRAP_")}, **extra}


def nswrap(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Done:
    """`python -m nswrap *args` as a process, without the caller's NSWRAP_* variables."""
    done = subprocess.run([python(), "-m", "nswrap", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**(env or {})))
    return Done(done.returncode, done.stdout, done.stderr)


def one_line_usage_error(done: Done, *culprits: str) -> None:
    """Exit 2, nothing on stdout, exactly one line on stderr naming every culprit, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("nswrap: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == "", done
    for culprit in culprits:
        assert culprit in done.stderr, (culprit, done.stderr)
