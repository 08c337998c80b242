"""Migration: what the nswrap before the shared datapath (commit a839e00) left behind is swept.

That version is run for real, from the repository's history, in its own virtualenv (it needs
pyroute2 and psutil; pip caches them): its instances are SIGKILLed (or SIGTERMed halfway) so
that their per-instance tables, rules, routes, iptables accepts, sysctls and records remain;
then today's nswrap, by `cleanup` or by simply starting, must leave the host exactly as it was.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import diff_states, wait_until
from tests.system.common import UDPECHO, echo_answered, nswrap, start

ROOT = Path(__file__).resolve().parents[2]
OLD = "a839e00"  # the last commit with per-instance tables
CACHE = ROOT / ".cache" / f"nswrap-{OLD}"


@pytest.fixture(scope="module")
def old_nswrap() -> list[str]:
    """The old version's command line (built once: git archive + a virtualenv of its own)."""
    python = CACHE / "venv" / "bin" / "python"
    if not python.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD, "nswrap"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(CACHE)], input=archive.stdout, check=True)
        subprocess.run([sys.executable, "-m", "venv", str(CACHE / "venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "click>=8.1", "pyroute2>=0.9.2,<0.10", "psutil>=5.9"], check=True, timeout=600)
    return ["env", "-C", str(CACHE), f"PYTHONPATH={CACHE}", str(python), "-m", "nswrap"]  # its own, not ours in cwd


def run_old(lab, tmp_path, old_nswrap, port: int, name: str):
    err = (tmp_path / f"{name}.err").open("w")
    return lab.spawn(lab.host, [*old_nswrap, "--ports", str(port), "--", *UDPECHO, "serve", str(port)],
                     stdout=(tmp_path / f"{name}.out").open("w"), stderr=err)


def crash_old_instances(lab, tmp_path, old_nswrap) -> None:
    """Two old instances serve, then die without cleaning up (SIGKILL)."""
    procs = [run_old(lab, tmp_path, old_nswrap, port, f"old{port}") for port in (6101, 6102)]
    for port in (6101, 6102):
        wait_until(lambda port=port: echo_answered(lab, lab.paths[2].client, lab.paths[2].address, port), 60,
                   what=f"the old nswrap serves {port}")
    left = lab.exec(lab.host, ["nft", "list", "tables"]).stdout
    assert left.count("nswrap-") == 2, left  # the old layout: one table per instance
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert "nswrap-" in lab.exec(lab.host, ["nft", "list", "tables"]).stdout, "the old instances left their tables"


def test_cleanup_sweeps_what_an_older_nswrap_left(lab, tmp_path, old_nswrap):
    before = lab.state()
    crash_old_instances(lab, tmp_path, old_nswrap)
    done = nswrap(lab, "cleanup")
    assert done.returncode == 0, done.stderr
    assert "delete table inet nswrap-" in done.stdout
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())


def test_a_start_sweeps_what_an_older_nswrap_left_and_serves(lab, tmp_path, old_nswrap):
    before = lab.state()
    crash_old_instances(lab, tmp_path, old_nswrap)
    proc = start(lab, tmp_path, "--ports", "6101", "--", *UDPECHO, "serve", "6101")
    for path in lab.paths:
        wait_until(lambda path=path: echo_answered(lab, path.client, path.address, 6101), 30, what=path.name)
    assert lab.stop(proc) == 128 + signal.SIGTERM
    # the start swept the records and sysctls of the dead old instances; what only tags prove is cleanup's
    nswrap(lab, "cleanup")
    assert not diff_states(before, lab.state()), diff_states(before, lab.state())
