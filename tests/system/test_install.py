"""scripts/install, run as README says, from a clean clone; and the systemd unit against it.

The clone is ``git clone`` of this repository's HEAD with the working tree's uncommitted changes
copied over (modified and new files, deletions), so what is tested is what is checked out here,
and nothing outside the package's own files (.venv, caches, build/) comes along. The install
command (and its --uninstall) is read from README.md (tests/system/readme.py) and run as root
with sudo's PATH; only the target is moved, by variables README does not need to mention
(NSWRAP_PREFIX, NSWRAP_BINDIR for /opt/nswrap and /usr/local/bin), and NSWRAP_NO_APT keeps the
script from installing packages on this machine (the lab already needs them all). So this
machine's /opt and /usr/local stay untouched.

It then shows:

- the link is a symlink to the virtualenv's command, and ``nswrap --version`` through it, with
  nothing but sudo's PATH plus the link's directory, reports this checkout's version; any user
  can run it (the files are world-readable: ``nswrap doctor`` as non-root gets that far);
- the package was installed, not linked: it imports from the virtualenv, and still runs with the
  clone moved away; the source tree was not written to (no build/, no *.egg-info);
- a second run changes nothing but reinstalls the package, and says so;
- the installed command serves README's headline in the lab (examples/unbound.conf, a client
  behind the second uplink) and exits 0 on SIGTERM, leaving the host as it was;
- ``systemd-analyze verify`` accepts examples/nswrap@.service as it is, its /usr/local/bin/nswrap
  pointed at the installed link (verify checks that the binary exists and is executable);
- --uninstall removes the virtualenv and the link and nothing else; a second one has nothing to do;
- the script refuses to overwrite what it did not make (a regular file where the link goes, a
  non-empty directory where the virtualenv goes), changing nothing.

(examples/Dockerfile installs the Debian package instead: tests/unit/test_install_files.py, and
tests/system/test_package.py for the package itself.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import dig, wait_until
from tests.system import common, readme

REPO = readme.REPO
UNIT = REPO / "examples" / "nswrap@.service"
UNIT_BINARY = "/usr/local/bin/nswrap"  # where the unit (and README) expect the command
SUDO_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's secure_path
INSTALL_TIMEOUT = 300  # pip may fetch click and the build backend


@contextlib.contextmanager
def world_readable_tmpdir() -> Iterator[Path]:
    """A directory any user may enter (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="nswrap-install-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=60).stdout


def clean_clone(destination: Path) -> Path:
    """HEAD, cloned, plus the working tree's uncommitted changes (tracked and untracked files not
    ignored by .gitignore); deleted files deleted."""
    git("clone", "--quiet", "--no-local", str(REPO), str(destination), cwd=destination.parent)
    for name in filter(None, git("ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")):
        source, target = REPO / name, destination / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for name in filter(None, git("ls-files", "-z", "--deleted").split("\0")):
        (destination / name).unlink(missing_ok=True)
    return destination


def readme_install_commands() -> tuple[list[str], list[str]]:
    """README's install and uninstall commands (sudo dropped: the tests run as root)."""
    found = readme.commands("./scripts/install")
    install = [c for c in found if "--uninstall" not in c.argv]
    uninstall = [c for c in found if "--uninstall" in c.argv]
    assert install, "README.md shows no `sudo ./scripts/install` in a code block"
    assert uninstall, "README.md shows no `sudo ./scripts/install --uninstall` in a code block"
    return list(install[0].argv), list(uninstall[0].argv)


class Target:
    """Where the install goes in this test: a stand-in for /opt/nswrap and /usr/local/bin."""

    def __init__(self, root: Path) -> None:
        self.prefix = root / "opt" / "nswrap"
        self.bindir = root / "bin"
        self.link = self.bindir / "nswrap"
        self.command = self.prefix / "bin" / "nswrap"

    def env(self) -> dict[str, str]:
        """sudo's environment, more or less: its PATH, no virtualenv of the test's leaking in."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        return {**env, "PATH": SUDO_PATH, "NSWRAP_PREFIX": str(self.prefix),
                "NSWRAP_BINDIR": str(self.bindir), "NSWRAP_NO_APT": "1"}

    def run(self, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env=self.env(), capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT)


def installed_version(target: Target, user: str | None = None) -> str:
    """``nswrap --version`` found on PATH through the link, from /, with a bare environment."""
    argv = ["env", "-i", f"PATH={target.bindir}:{SUDO_PATH}", "nswrap", "--version"]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    done = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    return done.stdout.strip()


def test_install_as_readme_says(lab, tmp_path):
    install, uninstall = readme_install_commands()
    expected = subprocess.run([*common.NSWRAP, "--version"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip()
    with world_readable_tmpdir() as root:
        clone = clean_clone(root / "nswrap")
        target = Target(root)

        done = target.run(install, clone)
        said = done.stdout + done.stderr
        assert done.returncode == 0, said
        assert f"linked {target.link} -> {target.command}" in said, said
        assert target.link.is_symlink() and os.readlink(target.link) == str(target.command)
        assert installed_version(target) == expected
        assert installed_version(target, user="nobody") == expected, "not usable by other users"
        where = subprocess.run(["env", "-i", str(target.prefix / "bin" / "python"), "-c",
                                "import nswrap, click; print(nswrap.__file__)"],
                               cwd="/", capture_output=True, text=True, check=True, timeout=60).stdout
        assert where.startswith(f"{target.prefix}/"), f"nswrap imports from {where} (editable?)"
        assert not (clone / "build").exists() and not list(clone.glob("*.egg-info")), \
            "pip wrote into the checkout"

        again = target.run(install, clone)
        said = again.stdout + again.stderr
        assert again.returncode == 0, said
        assert "created the virtualenv" not in said and "(already)" in said, said
        assert installed_version(target) == expected

        serve_the_headline(lab, tmp_path, target, clone)
        verify_unit(tmp_path, target)

        moved = clone.rename(root / "elsewhere")  # the install does not depend on its checkout
        assert installed_version(target) == expected
        moved.rename(clone)

        done = target.run(uninstall, clone)
        said = done.stdout + done.stderr
        assert done.returncode == 0, said
        assert not target.link.exists() and not target.link.is_symlink(), said
        assert not target.prefix.exists(), said
        assert target.bindir.is_dir() and target.prefix.parent.is_dir(), "removed more than its own"
        done = target.run(uninstall, clone)
        assert done.returncode == 0 and "nothing to remove" in done.stdout, done


def serve_the_headline(lab, tmp_path: Path, target: Target, clone: Path) -> None:
    """README's headline, run by the installed command from the checkout (examples/unbound.conf)."""
    headline = readme.commands("nswrap")[0]
    assert "unbound" in headline.argv, f"README's first nswrap command is not the headline: {headline}"
    out, err = (tmp_path / "installed.out").open("w"), (tmp_path / "installed.err").open("w")
    proc = lab.spawn(lab.host, ["env", "-i", f"PATH={target.bindir}:{SUDO_PATH}", *headline.argv],
                     stdout=out, stderr=err, cwd=clone)

    def output() -> str:
        return (tmp_path / "installed.out").read_text() + (tmp_path / "installed.err").read_text()

    path = next(p for p in lab.paths if p.uplink == "eth1")  # routed, through the second uplink

    def answered() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the installed nswrap exited with {proc.returncode}:\n{output()}")
        return dig(lab, path, name="localhost", timeout=1) == "127.0.0.1"

    wait_until(answered, 20, interval=0.2, what=f"{headline}: no answer on {path.name}")
    assert lab.stop(proc, sig=signal.SIGTERM) == 0, output()


def verify_unit(tmp_path: Path, target: Target) -> None:
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed (Debian package systemd; run scripts/setup)")
    text = UNIT.read_text()
    assert UNIT_BINARY in text, f"{UNIT.name} does not run {UNIT_BINARY}"
    units = tmp_path / "units"
    units.mkdir()
    (units / UNIT.name).write_text(text.replace(UNIT_BINARY, str(target.link)))
    done = subprocess.run([analyze, "verify", str(units / "nswrap@dns.service")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done


@pytest.mark.parametrize("occupied", ["link", "prefix"])
def test_install_refuses_what_it_did_not_make(tmp_path, occupied):
    """A regular file where the link goes (an earlier `pip install`), or someone else's non-empty
    directory where the virtualenv goes: refused before anything is changed."""
    target = Target(tmp_path)
    target.bindir.mkdir(parents=True)
    if occupied == "link":
        target.link.write_text("#!/bin/sh\necho not ours\n")
        target.link.chmod(0o755)
    else:
        target.prefix.mkdir(parents=True)
        (target.prefix / "data").write_text("not ours\n")
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    done = target.run([str(REPO / "scripts" / "install")], tmp_path)
    assert done.returncode == 1, done
    assert "scripts/install: " in done.stderr and "not" in done.stderr, done
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before

    done = target.run([str(REPO / "scripts" / "install"), "--uninstall"], tmp_path)
    assert done.returncode == 0, done
    assert "left" in done.stdout and "alone" in done.stdout, done
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before

