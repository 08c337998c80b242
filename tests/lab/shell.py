"""Running commands: the one place the lab calls :func:`subprocess.run`."""

from __future__ import annotations

import subprocess


class LabError(RuntimeError):
    """A lab command failed or the lab could not be cleaned up."""


def run(cmd: list[str], *, timeout: float = 30, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run *cmd* (text mode, output captured); :class:`LabError` quoting stderr on failure.

    A timeout raises :class:`subprocess.TimeoutExpired` (the command is killed).
    """
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr.strip()}")
    return res


def netns_names() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
