"""What `pip install .` builds, read from pyproject.toml offline (nothing is built or downloaded)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def imported_top_level(sources: list[pathlib.Path]) -> set[str]:
    names: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_script_is_the_same_main_as_python_m_nswrap():
    assert PROJECT["project"]["scripts"] == {"nswrap": "nswrap.cli:main"}
    assert callable(importlib.import_module("nswrap.cli").main)
    assert "from nswrap.cli import main" in (REPO / "nswrap" / "__main__.py").read_text()


def test_every_package_is_listed():
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nswrap").rglob("__init__.py")}
    assert packages == set(PROJECT["tool"]["setuptools"]["packages"])


def test_click_is_the_only_runtime_dependency():
    assert requirement_names(PROJECT["project"]["dependencies"]) == {"click"}
    third_party = imported_top_level(sorted((REPO / "nswrap").rglob("*.py"))) - {"nswrap"}
    assert third_party == {"click"}, f"nswrap imports {third_party}: only click is declared"


def test_what_the_tests_import_is_in_the_test_extra():
    declared = requirement_names(PROJECT["project"]["optional-dependencies"]["test"] + PROJECT["project"]["dependencies"])
    third_party = imported_top_level(sorted((REPO / "tests").rglob("*.py"))) - {"nswrap", "tests"}
    third_party = {"pyyaml" if name == "yaml" else name for name in third_party}
    assert third_party <= declared, f"imported by tests but not in the test extra: {third_party - declared}"
    assert {"ruff", "mypy", "pytest"} <= declared


def test_the_version_is_the_package_s():
    assert PROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nswrap.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", importlib.import_module("nswrap").__version__)


def test_lint_and_type_check_are_configured():
    ruff, mypy = PROJECT["tool"]["ruff"], PROJECT["tool"]["mypy"]
    assert ruff["line-length"] == 130 and {"F", "E", "W", "B", "I"} <= set(ruff["lint"]["select"])
    assert mypy["files"] == ["nswrap"], "mypy checks the whole package"
    strict = next(o for o in mypy["overrides"] if o.get("disallow_untyped_defs"))["module"]
    assert {f"nswrap.{m}" for m in ("config", "configfile", "objects", "datapath", "ruleset", "firewall", "sync", "facts",
                                    "errors")} <= set(strict)
    lint = REPO / "scripts" / "lint"
    assert lint.exists() and lint.stat().st_mode & 0o111, "scripts/lint is executable"
