"""The Debian package's sources agree with nswrap (no root, nothing built or installed here;
tests/system/test_package.py builds and installs the package).

- One version: debian/changelog's newest entry is nswrap.__version__ (which pyproject.toml and
  ``nswrap --version`` read), and CHANGELOG.md's newest section names it.
- debian/control: a native 3.0 source, debhelper-compat 13 and pybuild's pyproject plugin with
  Debian's setuptools and click only; one binary package for all architectures whose Depends
  hold python3 (>= 3.11), python3-click and nftables (nft: the one program nswrap runs that it
  cannot do without); iptables, the other program it runs, only on hosts that have iptables
  rules, is suggested.
- The manual page scripts/manpage.py writes names every option of every command as --help
  does, every NSWRAP_* variable, every exit code of nswrap.errors, and renders without a groff
  warning.
- The maintainer scripts parse (``sh -n``) and keep debhelper's ``#DEBHELPER#``; the scripts
  are executable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from nswrap import __version__, errors
from nswrap.cli import cli

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"


def control_fields() -> list[dict[str, str]]:
    """debian/control's paragraphs as {field: value}, comment lines dropped, continuations joined."""
    paragraphs: list[dict[str, str]] = [{}]
    field = None
    for line in (DEBIAN / "control").read_text().splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if paragraphs[-1]:
                paragraphs.append({})
            continue
        if line[0] in " \t":
            assert field, line
            paragraphs[-1][field] += "\n" + line.strip()
        else:
            field, _, value = line.partition(":")
            paragraphs[-1][field] = value.strip()
    return [p for p in paragraphs if p]


def relations(value: str) -> dict[str, str]:
    """{package: version constraint or ""} of a relation field (alternatives not used here)."""
    found = {}
    for item in filter(None, (i.strip() for i in value.replace("\n", " ").split(","))):
        match = re.fullmatch(r"([a-zA-Z0-9.+${}:-]+)\s*(?:\((.*)\))?", item)
        assert match, item
        found[match.group(1)] = match.group(2) or ""
    return found


def test_the_package_version_is_nswrap_s():
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"nswrap \(([^)]+)\) [a-z-]+; urgency=\w+", first)
    assert match, first
    assert match.group(1) == __version__, f"debian/changelog says {match.group(1)}, nswrap {__version__}"
    # an "Unreleased" section on top collects what the next version will bring
    [newest] = [v for v in re.findall(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M) if v != "Unreleased"][:1]
    assert newest == __version__, f"CHANGELOG.md's newest section is {newest}, nswrap is {__version__}"
    assert "--ipv6-forwarding" in (REPO / "CHANGELOG.md").read_text()


def test_source_and_binary_package():
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (native)"
    source, *binaries = control_fields()
    build = relations(source["Build-Depends"])
    assert build.pop("debhelper-compat") == "= 13"
    assert {"dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools", "python3-click"} <= set(build)
    [binary] = binaries
    assert binary["Package"] == "nswrap" and binary["Architecture"] == "all"
    depends = relations(binary["Depends"])
    assert depends["python3"] == ">= 3.11" and "python3-click" in depends and "nftables" in depends, depends
    assert "${python3:Depends}" in depends and "${misc:Depends}" in depends
    assert "iptables" in relations(binary.get("Suggests", "")) | relations(binary.get("Recommends", ""))
    assert re.search(r"^export PYBUILD_SYSTEM = pyproject$", (DEBIAN / "rules").read_text(), re.M)


def test_the_programs_nswrap_runs_are_declared():
    """nswrap runs nft (nft.py) and iptables (iptables.py: iptables-nft, iptables-legacy and
    their ip6tables and -save siblings) and nothing else but the user's own commands (commands.py:
    nswrap exec); links, routes, rules, sysctls and conntrack are netlink and /proc. A module that
    starts running another program must be declared in debian/control and added here."""
    runners = {p.name for p in (REPO / "nswrap").glob("*.py")
               if re.search(r"^import subprocess$|^from subprocess import|os\.exec[lv]p", p.read_text(), re.M)}
    assert runners == {"nft.py", "iptables.py", "commands.py", "supervise.py"}, runners
    assert 'subprocess.run(["nft", ' in (REPO / "nswrap" / "nft.py").read_text()


def test_the_scripts_parse():
    for name in ("prerm", "postinst", "postrm"):
        script = DEBIAN / f"nswrap.{name}"
        text = script.read_text()
        assert text.startswith("#!/bin/sh\n") and "\n#DEBHELPER#\n" in text and "set -e" in text, name
        done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    for path in (DEBIAN / "rules", REPO / "scripts" / "build-deb", REPO / "scripts" / "manpage.py"):
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
    done = subprocess.run(["bash", "-n", str(REPO / "scripts" / "build-deb")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def manpage() -> str:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "manpage.py")], capture_output=True, text=True,
                          timeout=60, env={"SOURCE_DATE_EPOCH": "0", "PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_manual_page_is_the_help():
    page = manpage()
    plain = page.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")
    assert page.startswith(f'.TH NSWRAP 8 "1970-01-01" "nswrap {__version__}"')
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS", "ENVIRONMENT",
                    "FILES", "SEE ALSO"):
        assert f"\n.SH {section}\n" in page, section
    for name, command in cli.commands.items():
        assert f".SS nswrap {name}" in page, name
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    assert opt in plain, f"{name} {opt} is not in the manual page"
                if isinstance(param.envvar, str):
                    assert f"\n{param.envvar}\n" in plain, param.envvar
                if param.help:
                    assert " ".join(param.help.split()) in " ".join(plain.split()), param.help
    for code in (errors.EXIT_USAGE, errors.EXIT_FAILED, errors.EXIT_NOT_EXECUTABLE, errors.EXIT_NOT_FOUND):
        assert f"\n{code}\n" in plain, code


def test_the_manual_page_renders_without_warnings(tmp_path):
    if not shutil.which("man") or not shutil.which("groff"):
        pytest.skip("man-db and groff not installed (run scripts/setup)")
    page = tmp_path / "nswrap.8"
    page.write_text(manpage())
    done = subprocess.run(["man", "--warnings=all", "-l", str(page)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    assert "nswrap run" in done.stdout
