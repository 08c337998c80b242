"""The Debian package, built and installed as README says, from a clean clone.

The clone is test_install.py's (``git clone`` of HEAD plus the working tree's uncommitted
changes). README's ``sudo ./scripts/build-deb`` runs there (sudo dropped: the tests run as root),
with ``--lintian`` added so lintian's findings are checked and shown in the test log; README's
``apt-get install ./dist/nswrap_*_all.deb`` installs the result, with ``-y`` added (no one is there
to answer apt's question) and the glob expanded by bash as a reader's shell would. Then, with
that installed ``/usr/bin/nswrap`` (run by path from a bare environment: not the checkout, not a
virtualenv):

- it is this checkout's version, and it imports nswrap and click from Debian's
  /usr/lib/python3/dist-packages (Debian's python3-click, not PyPI's);
- README's headline serves every path of the lab, IPv4 and IPv6, UDP and TCP;
- while it runs, README's ``apt-get remove nswrap`` is refused (the maintainer script names the
  instance's pid) and the package stays installed and serving; after SIGTERM nswrap exits 0;
- ``systemd-analyze verify`` accepts the installed /lib/systemd/system/nswrap@.service, which is
  examples/nswrap@.service running /usr/bin/nswrap, with its manual page as Documentation;
- ``man -w nswrap`` finds nswrap(8); bash completion is installed and registers ``nswrap``;
- README's remove and purge succeed and leave no file of the package (``dpkg -L`` before, the
  filesystem after), and the ``lab`` fixture finds the lab's host as it was.

The apt-get commands that run maintainer scripts acting on nswrap instances (remove, purge) run
in the lab's host namespace, so their ``nswrap list`` and ``nswrap cleanup`` see the lab, never
this machine's own namespace. The package is purged whatever happens (a finally), and the test
refuses to run where an ``nswrap`` package is installed already (it would replace someone's).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import in_ci
from tests.lab import dig, wait_until
from tests.system import readme
from tests.system.test_install import clean_clone, world_readable_tmpdir

REPO = readme.REPO
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's tools only: no pyenv, no /usr/local/bin
APT_ENV = ["env", "-i", f"PATH={PATH}", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8"]
APT_LOCK = ["-o", "DPkg::Lock::Timeout=300"]  # another apt on this machine: wait, do not fail
BUILD_TIMEOUT = 900  # the build dependencies may have to be installed first
SERVE_TIMEOUT = 20


def package_status() -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "nswrap"], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip() if done.returncode == 0 else "not-installed"


def readme_package_commands() -> dict[str, list[str]]:
    """README's build, install, remove and purge commands (sudo dropped)."""
    [build] = readme.commands("./scripts/build-deb")
    found = {"build": list(build.argv)}
    for command in readme.commands("apt-get"):
        found[command.argv[1]] = list(command.argv)
    assert {"install", "remove", "purge"} <= set(found), f"README shows no apt-get {set(found)}"
    assert found["install"][2:] == ["./dist/nswrap_*_all.deb"], found["install"]
    return found


def with_yes(argv: list[str]) -> list[str]:
    """apt-get SUBCOMMAND -y ...: nobody is there to answer apt's question."""
    return [*argv[:2], "-y", *APT_LOCK, *argv[2:]]


def run(argv: list[str], cwd: Path | str = "/", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*APT_ENV, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ask_dns(lab, path) -> bool:
    return all(dig(lab, path, name="localhost", tcp=tcp, timeout=1) == "127.0.0.1" for tcp in (False, True))


def test_package_as_readme_says(lab, tmp_path, capsys):
    if package_status() != "not-installed":
        message = f"an nswrap package is already installed here ({package_status()}): not replacing it"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    commands = readme_package_commands()
    expected = subprocess.run(["/usr/bin/python3", "-P", "-c", "import nswrap; print(nswrap.__version__)"],
                              cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip()
    with world_readable_tmpdir() as root:
        clone = clean_clone(root / "nswrap")
        started = time.monotonic()
        built = run([*commands["build"], "--lintian"], cwd=clone, timeout=BUILD_TIMEOUT)
        build_seconds = time.monotonic() - started
        with capsys.disabled():  # in the test log whatever the outcome: lintian's findings and the times
            print(f"\n--- scripts/build-deb --lintian ({build_seconds:.0f} s):\n{built.stdout}{built.stderr}---")
        assert built.returncode == 0, built.stdout + built.stderr
        assert "lintian: no errors, no warnings" in built.stdout
        [deb] = glob.glob(str(clone / "dist" / "nswrap_*_all.deb"))
        assert Path(deb).name == f"nswrap_{expected}_all.deb"
        assert not list(root.glob("nswrap_*")), "dpkg-buildpackage wrote next to the checkout"

        proc = None
        try:
            started = time.monotonic()
            install = with_yes(commands["install"])
            done = run(["bash", "-c", " ".join(install)], cwd=clone)
            assert done.returncode == 0, done.stdout + done.stderr
            assert package_status() == "installed"
            files = subprocess.run(["dpkg", "-L", "nswrap"], capture_output=True, text=True, check=True,
                                   timeout=30).stdout.split()
            check_installed(files, expected)
            proc = serve_the_headline(lab, tmp_path, clone)
            refuse_removal_while_it_serves(lab, commands["remove"], proc)
            assert lab.stop(proc, sig=signal.SIGTERM) == 0, (tmp_path / "package.err").read_text()
            proc = None
            verify_unit()
            check_man_and_completion()

            for action in ("remove", "purge"):
                done = lab.exec(lab.host, [*APT_ENV, *with_yes(commands[action])], check=False, timeout=300)
                assert done.returncode == 0, done.stdout + done.stderr
            assert package_status() == "not-installed"
            left = [f for f in files if os.path.lexists(f) and not os.path.isdir(f)]
            assert not left, f"purge left files of the package: {left}"
            own_dirs = [f for f in files if "nswrap" in f and os.path.isdir(f)]
            assert not own_dirs, f"purge left the package's directories: {own_dirs}"
            with capsys.disabled():
                print(f"--- the package: installed, checked and purged in {time.monotonic() - started:.0f} s")
        finally:
            if proc is not None and proc.poll() is None:
                lab.stop(proc, sig=signal.SIGTERM, timeout=30)
            if package_status() != "not-installed":
                # in the lab's namespace, whose instances were stopped above: the prerm lets it go
                lab.exec(lab.host, [*APT_ENV, "apt-get", "purge", "-y", *APT_LOCK, "nswrap"], check=False, timeout=300)


def check_installed(files: list[str], expected: str) -> None:
    assert "/usr/bin/nswrap" in files
    for wanted in ("/usr/share/man/man8/nswrap.8.gz", "/usr/share/bash-completion/completions/nswrap",
                   "/lib/systemd/system/nswrap@.service", "/usr/share/doc/nswrap/README.md.gz",
                   "/usr/share/doc/nswrap/CHANGELOG.md.gz", "/usr/share/doc/nswrap/changelog.gz",
                   "/usr/share/doc/nswrap/copyright"):
        assert wanted in files, f"{wanted} is not in the package"
    version = run(["/usr/bin/nswrap", "--version"])
    assert version.returncode == 0 and version.stdout.strip() == f"nswrap, version {expected}", version
    as_user = subprocess.run(["runuser", "-u", "nobody", "--", "env", "-i", f"PATH={PATH}", "nswrap", "--version"],
                             cwd="/", capture_output=True, text=True, timeout=60)
    assert as_user.stdout.strip() == f"nswrap, version {expected}", as_user
    shebang = Path("/usr/bin/nswrap").read_text().splitlines()[0]
    assert shebang == "#!/usr/bin/python3", shebang
    where = run(["/usr/bin/python3", "-P", "-c", "import nswrap, click; print(nswrap.__file__, click.__file__)"])
    assert all(f.startswith("/usr/lib/python3/dist-packages/") for f in where.stdout.split()), where.stdout


def serve_the_headline(lab, tmp_path: Path, clone: Path):
    """README's headline with the installed /usr/bin/nswrap, answered on every path."""
    headline = readme.commands("nswrap")[0]
    assert "unbound" in headline.argv, headline
    out, err = (tmp_path / "package.out").open("w"), (tmp_path / "package.err").open("w")
    proc = lab.spawn(lab.host, ["env", "-i", f"PATH={PATH}", "/usr/bin/nswrap", *headline.argv[1:]],
                     stdout=out, stderr=err, cwd=clone)
    for path in [*lab.paths, *lab.paths6]:
        def answered(path=path) -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the packaged nswrap exited with {proc.returncode}:\n"
                            f"{(tmp_path / 'package.err').read_text()}")
            return ask_dns(lab, path)
        wait_until(answered, SERVE_TIMEOUT, interval=0.2, what=f"{headline}: no answer on {path.name}")
    return proc


def refuse_removal_while_it_serves(lab, remove: list[str], proc) -> None:
    done = lab.exec(lab.host, [*APT_ENV, *with_yes(remove)], check=False, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode != 0, f"apt-get remove went through while an instance ran:\n{said}"
    assert "refusing to remove the package" in said and f"pid {proc.pid}:" in said, said
    assert package_status() == "installed", said
    assert proc.poll() is None and ask_dns(lab, lab.paths[0]), "the server was disturbed by the refused removal"


def verify_unit() -> None:
    installed = Path("/lib/systemd/system/nswrap@.service").read_text()
    example = (REPO / "examples" / "nswrap@.service").read_text().replace("/usr/local/bin/nswrap", "/usr/bin/nswrap")
    assert installed.replace("Documentation=man:nswrap(8)\n", "") == example
    done = run(["systemd-analyze", "verify", "/lib/systemd/system/nswrap@dns.service"], timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done


def check_man_and_completion() -> None:
    done = run(["man", "-w", "nswrap"])
    assert done.returncode == 0 and done.stdout.strip() == "/usr/share/man/man8/nswrap.8.gz", done
    rendered = subprocess.run(["man", "--warnings", "8", "nswrap"], capture_output=True, text=True, timeout=60,
                              env={"PATH": PATH, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANPAGER": "cat"})
    assert rendered.returncode == 0 and "--ipv6-forwarding" in rendered.stdout and not rendered.stderr.strip(), rendered
    completion = run(["bash", "-c", "source /usr/share/bash-completion/completions/nswrap && complete -p nswrap"])
    assert completion.returncode == 0 and "nswrap" in completion.stdout, completion
