"""Helpers shared by the system tests: how nswrap and the fixture servers are started in the lab."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.lab import wait_until

HERE = Path(__file__).parent
NSWRAP = [sys.executable, "-m", "nswrap"]
SIGECHO = [sys.executable, str(HERE / "sigecho.py")]  # prints "ready", echoes signals, exits 3 on SIGTERM
UDPECHO = [sys.executable, str(HERE / "udpecho.py")]


def nswrap(lab, *args, timeout=60):
    """Run nswrap to completion in the lab's host namespace."""
    return lab.exec(lab.host, [*NSWRAP, *args], check=False, timeout=timeout)


def start(lab, directory: Path, *args, name="nswrap", **popen_kwargs):
    """Start nswrap in the background; stdout/stderr go to directory/<name>.out|.err."""
    out, err = (directory / f"{name}.out").open("w"), (directory / f"{name}.err").open("w")
    return lab.spawn(lab.host, [*NSWRAP, *args], stdout=out, stderr=err, **popen_kwargs)


def output(directory: Path, name="nswrap", stream="out") -> str:
    return (directory / f"{name}.{stream}").read_text()


def wait_ready(directory: Path, name="nswrap", timeout=20) -> None:
    """Wait for a fixture server's "ready" line (printed once it is bound, inside the namespace)."""
    wait_until(lambda: "ready" in output(directory, name), timeout, what=f"{name}: server ready")


def echo_answered(lab, client: str, address: str, port: int, sport: int = 0) -> bool:
    argv = [*UDPECHO, "ask", address, str(port)] + ([str(sport)] if sport else [])
    return lab.exec(client, argv, check=False, timeout=30).returncode == 0
