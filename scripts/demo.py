"""Demonstrate the problem nswrap solves, and that it solves it.

Builds the lab of tests/lab/ (a multihomed host with two uplinks, a
secondary address and a directly connected client subnet, IPv4 and IPv6),
then:

1. runs unbound (listening on 0.0.0.0 and ::) directly on the host and asks
   it over UDP along every path, IPv4 and IPv6;
2. runs it under ``nswrap --ports 53,53/tcp`` and asks along every path over
   UDP and TCP; then stops nswrap with SIGTERM;
3. prints a table of the results and whether the host namespace state was
   restored exactly.

IPv6 paths need per-interface IPv6 forwarding (``force_forwarding``, Linux
>= 6.17); on an older kernel the demo runs nswrap with ``--ipv6-forwarding
global`` (the lab's host is a throwaway namespace, so its global switch is
the lab's, not this machine's) and says so. Without IPv6 in the kernel the
IPv6 paths are left out, and the demo says why.

Exit status 0 when every path shown was answered over UDP and TCP with
nswrap, 1 otherwise. Needs root; run it via ``scripts/demo`` (which prepares
the machine and the venv first).
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab import (  # noqa: E402
    Lab,
    LabError,
    Path,
    diff_states,
    dig,
    dig_from,
    missing_requirements,
    unbound_conf,
    wait_until,
)

NSWRAP = ROOT / ".venv" / "bin" / "nswrap"
START_TIMEOUT = 20  # seconds for a server to start answering
STOP_TIMEOUT = 15  # seconds for a server to exit after SIGTERM


def run_server(lab: Lab, argv: list[str], ready: Path | None, log: pathlib.Path):
    """Start *argv* in the host namespace, logging to *log*.

    Waits until it answers along *ready* (or on 127.0.0.1 inside the host
    when *ready* is None). Returns the process, or None if it exited or did
    not answer in time (its log is printed and it is stopped).
    """
    with log.open("w") as out:
        proc = lab.spawn(lab.host, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def outcome() -> str | None:
        if proc.poll() is not None:
            return "exited"
        if ready is None:
            answer = dig_from(lab, lab.host, "127.0.0.1", timeout=1)
        else:
            answer = dig(lab, ready, timeout=1)
        return "answered" if answer else None

    what = " ".join(argv)
    try:
        result = wait_until(outcome, START_TIMEOUT, interval=0.1)
    except TimeoutError:
        result = "timeout"
    if result == "answered":
        return proc
    if result == "exited":
        print(f"!! {what}: exited with status {proc.wait()}")
    else:
        print(f"!! {what}: no answer within {START_TIMEOUT}s")
        stop_server(lab, proc, what)
    print_log(log)
    return None


def stop_server(lab: Lab, proc: subprocess.Popen, what: str) -> bool:
    """SIGTERM *proc*, wait (bounded) for it; True if it exited cleanly."""
    try:
        status = lab.stop(proc, sig=signal.SIGTERM, timeout=STOP_TIMEOUT)
    except (TimeoutError, LabError) as e:
        print(f"!! {what}: {e}")
        return False
    if status != 0:
        print(f"!! {what}: exited with status {status} after SIGTERM")
    return status == 0


def print_log(log: pathlib.Path) -> None:
    text = log.read_text().strip()
    if text:
        print(f"--- {log.name} ---\n{text}\n---")


def ask_all(lab: Lab, paths: list[Path], tcp: bool) -> dict[Path, bool]:
    return {path: dig(lab, path, tcp=tcp) is not None for path in paths}


def ipv6_mode(lab: Lab) -> tuple[bool, list[str], str | None]:
    """Whether the IPv6 paths are asked, nswrap's IPv6 option for this kernel, and a note for
    the reader (None: nothing to say).

    Asked inside the lab's host namespace: /proc/sys/net shows the namespace of the reader."""
    def exists(key: str) -> bool:
        return lab.exec(lab.host, ["test", "-e", f"/proc/sys/net/ipv6/conf/{key}"], check=False).returncode == 0

    if not exists("all"):
        return False, [], "IPv6 paths left out: this kernel has no IPv6 (ipv6.disable=1 or no module)"
    if exists("all/force_forwarding"):
        return True, [], None  # per-interface forwarding (Linux >= 6.17): nswrap's default does it
    return (True, ["--ipv6-forwarding", "global"],
            "this kernel has no per-interface IPv6 forwarding (Linux < 6.17): nswrap runs with "
            "--ipv6-forwarding global, which turns on the lab host's global switch (a throwaway "
            "namespace's, not this machine's) while it runs")


def print_table(paths, without, with_udp, with_tcp) -> None:
    def cell(ok: bool) -> str:
        return "answered" if ok else "NO ANSWER"

    width = max(len(p.name) for p in paths) + 3
    print(f"\n{'path':<{width}}{'without nswrap':<17}{'with nswrap UDP':<18}with nswrap TCP")
    for path in paths:
        print(f"{path.name:<{width}}{cell(without[path]):<17}"
              f"{cell(with_udp[path]):<18}{cell(with_tcp[path])}")


def main() -> int:
    reason = missing_requirements()
    if reason:
        print(f"demo cannot run: {reason}", file=sys.stderr)
        return 1
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="nswrap-demo-") as tmp:
        tmpdir = pathlib.Path(tmp)
        ipv6, ipv6_option, ipv6_note = ipv6_mode(lab)
        paths = [*lab.paths, *(lab.paths6 if ipv6 else ())]
        unbound = ["unbound", "-d", "-c", unbound_conf(tmpdir, ipv6=ipv6)]
        failed = dict.fromkeys(paths, False)
        before = lab.state()
        if ipv6_note:
            print(f"note: {ipv6_note}")

        print("== unbound directly on the host")
        without = failed
        proc = run_server(lab, unbound, None, tmpdir / "unbound.log")
        if proc:
            without = ask_all(lab, paths, tcp=False)
            stop_server(lab, proc, "unbound")

        print(f"== {' '.join([str(NSWRAP.relative_to(ROOT)), '--ports', '53,53/tcp', *ipv6_option])} -- unbound ...")
        with_udp = with_tcp = failed
        nswrap = [str(NSWRAP), "--ports", "53,53/tcp", *ipv6_option, "--", *unbound]
        proc = run_server(lab, nswrap, lab.paths[0], tmpdir / "nswrap.log")
        if proc:
            with_udp = ask_all(lab, paths, tcp=False)
            with_tcp = ask_all(lab, paths, tcp=True)
            if not stop_server(lab, proc, "nswrap"):
                print_log(tmpdir / "nswrap.log")

        lab.stop_all()
        changes = diff_states(before, lab.state())
        print_table(paths, without, with_udp, with_tcp)

    if changes:
        print(f"\nhost state NOT restored exactly after nswrap exited:\n{changes}")
    else:
        print("\nhost state restored exactly after nswrap exited")
    return 0 if all(with_udp.values()) and all(with_tcp.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
