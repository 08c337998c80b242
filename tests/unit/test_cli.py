"""The command line, black-box: exit codes and one-line errors. Nothing here changes the host."""

import ast
import importlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest


def nswrap(*args, user=None):
    argv = [sys.executable, "-m", "nswrap", *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--ports", "53,70000", "--", "true"], "70000"),
        (["--ports", "5-3", "--", "true"], "5-3"),
        (["--ports", "53/sctp", "--", "true"], "53/sctp"),
        (["--ports", "53"], "no command"),
        (["--", "true"], "no ports"),
        (["--bogus", "--", "true"], "--bogus"),
        (["-p", "53", "--uplink", "this-name-is-too-long", "--", "true"], "this-name-is-too-long"),
        (["-p", "53", "--subnet", "198.18.0.1/30", "--", "true"], "198.18.0.1/30"),
        (["-p", "53", "--mark-mask", "0x5", "--", "true"], "0x5"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, culprit):
    done = nswrap(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("nswrap: "), done.stderr
    assert culprit in done.stderr
    assert done.stdout == ""


def test_run_subcommand_is_the_default():
    assert nswrap("run", "--ports", "53,70000", "--", "true").returncode == 2
    assert nswrap("--version").stdout.startswith("nswrap, version ")
    assert "--ports" in nswrap("run", "--help").stdout


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unprivileged_run_fails_with_125_and_no_traceback():
    done = nswrap("--ports", "53", "--", "true", user="65534")
    assert done.returncode == 125, done.stderr
    assert done.stderr.strip().startswith("nswrap: not permitted") and "Traceback" not in done.stderr


def complete(words: str, env=None) -> list[str]:
    """What bash completion offers for the last word of *words* (click's bash_complete protocol)."""
    split = words.split(" ")
    done = subprocess.run(
        [sys.executable, "-m", "nswrap"], capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {}), "_NSWRAP_COMPLETE": "bash_complete", "COMP_WORDS": words,
             "COMP_CWORD": str(len(split) - 1)},
    )
    assert done.returncode == 0 and not done.stderr, done
    return done.stdout.splitlines()


@pytest.mark.parametrize(
    "words, expected",
    [
        ("nswrap --po", ["plain,--ports"]),  # no `run` yet: the default command's options still complete
        ("nswrap --no", ["plain,--no-outbound"]),
        ("nswrap --ver", ["plain,--version", "plain,--verbose"]),
        ("nswrap l", ["plain,list"]),
        ("nswrap c", ["plain,cleanup"]),
        ("nswrap -p 53 --up", ["plain,--uplink"]),
        ("nswrap run --sto", ["plain,--stop-timeout"]),
        ("nswrap --firewall ", ["plain,auto", "plain,off"]),
        ("nswrap -p 53 --helper ", ["plain,tftp"]),
        ("nswrap doctor --fi", ["plain,--firewall"]),
        ("nswrap --config ", ["file,"]),
    ],
)
def test_shell_completion(words, expected):
    assert complete(words) == expected
    assert complete(words, env={"NSWRAP_CONFIG": "/nonexistent.toml"}) == expected


def test_shell_completion_scripts():
    for shell, marker in (("bash", "complete -o nosort -F _nswrap_completion nswrap"), ("zsh", "#compdef nswrap"),
                          ("fish", "complete --no-files --command nswrap")):
        done = subprocess.run([sys.executable, "-m", "nswrap"], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "_NSWRAP_COMPLETE": f"{shell}_source"})
        assert done.returncode == 0 and marker in done.stdout, (shell, done)


REPO = pathlib.Path(__file__).resolve().parents[2]


def test_packaging_metadata():
    """What `pip install .` / `pipx install .` build: the `nswrap` script entry point resolves to the
    same main() `python -m nswrap` runs, every package is listed, every third-party module nswrap
    imports is a declared dependency (offline: reads pyproject.toml, builds nothing)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"nswrap": "nswrap.cli:main"}
    assert callable(importlib.import_module("nswrap.cli").main)
    assert "from nswrap.cli import main" in (REPO / "nswrap" / "__main__.py").read_text()

    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nswrap").rglob("__init__.py")}
    assert packages == set(project["tool"]["setuptools"]["packages"])

    declared = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in project["project"]["dependencies"]}
    imported = set()
    for source in (REPO / "nswrap").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"nswrap", "__future__"}
    assert third_party <= declared, f"imported but not declared in pyproject.toml: {third_party - declared}"
