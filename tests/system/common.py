"""Helpers shared by the system tests: how nswrap and the fixture servers are started in the lab."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil

from tests.lab import unbound_conf, wait_until

HERE = Path(__file__).parent
NSWRAP = [sys.executable, "-m", "nswrap"]
SIGECHO = [sys.executable, str(HERE / "sigecho.py")]  # prints "ready", echoes signals, exits 3 on SIGTERM
UDPECHO = [sys.executable, str(HERE / "udpecho.py")]


def processes_running(marker: str, name: str | None = None) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line mentions `marker` (a unique tmp path, say),
    optionally only those called `name`. Unlike `pgrep -x NAME`, never someone else's server."""
    found = []
    for p in psutil.process_iter(["cmdline", "status", "name"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or (name and p.info["name"] != name):
            continue
        if any(marker in arg for arg in p.info["cmdline"] or ()):
            found.append(p)
    return found


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


def echo_answered(lab, client: str, address: str, port: int, sport: int = 0, source: str | None = None) -> bool:
    argv = [*UDPECHO, "ask", address, str(port)] + ([str(sport)] if sport or source else []) + ([source] if source else [])
    return lab.exec(client, argv, check=False, timeout=30).returncode == 0


BIG = [f"big.example. TXT \"{i:02d}{'x' * 198}\"" for i in range(18)]  # ~3.7 KB, under EDNS 4096: fragments on a 1500 MTU


def dual_stack_unbound(tmp_path, port: int) -> list[str]:
    with open(unbound_conf(tmp_path)) as f:
        text = f.read()
    text = text.replace("interface: 0.0.0.0", "interface: 0.0.0.0\n    interface: ::0").replace("do-ip6: no", "do-ip6: yes")
    text = text.replace("port: 53", f"port: {port}").replace("access-control: 0.0.0.0/0 allow", "access-control: 0.0.0.0/0 allow\n    access-control: ::/0 allow")
    extra = "    max-udp-size: 4096\n    edns-buffer-size: 4096\n" + "".join(f"    local-data: '{record}'\n" for record in BIG)
    text = text.replace("remote-control:", extra + "\nremote-control:")
    conf = tmp_path / "dual.conf"
    conf.write_text(text)
    return ["unbound", "-d", "-c", str(conf)]
