"""nswrap speaks when it should, in one line, and only then (issues 12 and 13).

- The server's end: a non-zero status or a fatal signal is one line on stderr, always, and
  nswrap's own status is the shell's (N, or 128+signal).
- A server slow to stop (one that ignores SIGINT and SIGTERM): nswrap says once that it waits, and
  when it will SIGKILL.
- `doctor` and `list` as any user: a verdict, never an internal error or a traceback.
- Odd input (issue 12's "Low" list): exit 2 with one line naming the culprit, no traceback, the
  host unchanged (the `lab` fixture compares the whole host state).

Runs pinned to eth0 and eth1 (`-u`), the uplinks that have gateways of both families, so that
nswrap has nothing else to say (eth2 would add "has no gateway" notes).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from tests.lab import wait_until
from tests.system.common import NSWRAP, nswrap, output, start, wait_ready
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

PINNED = ("-u", "eth0", "-u", "eth1")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_server_that_exits_1_at_once_is_said_in_one_line(lab):
    done = nswrap(lab, *PINNED, "-p", "5353", "--", "sh", "-c", "exit 1")
    assert (done.returncode, lines(done.stderr)) == (1, ["nswrap: the server exited with status 1"])


def test_a_server_killed_by_a_signal_is_named(lab):
    done = nswrap(lab, *PINNED, "-p", "5353", "--", "sh", "-c", "kill -SEGV $$")
    assert (done.returncode, lines(done.stderr)) == (128 + signal.SIGSEGV, ["nswrap: the server was killed by SIGSEGV"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_server_that_catches_the_stop_signal_and_exits_128_plus_n_says_nothing(lab, tmp_path, sig):
    """socat and many servers catch SIGINT/SIGTERM and exit 128+N: a normal stop, no line; the
    status is still the server's."""
    proc = start(lab, tmp_path, *PINNED, "-p", "5353", "--",
                 "sh", "-c", f"trap 'exit {128 + sig}' INT TERM; echo ready; while :; do sleep 0.1; done")
    wait_ready(tmp_path)
    proc.send_signal(sig)
    assert proc.wait(15) == 128 + sig
    lab.stop(proc)
    assert lines(output(tmp_path, stream="err")) == []


def test_waiting_out_the_stop_timeout_is_said_once_with_the_time_left(lab, tmp_path):
    proc = start(lab, tmp_path, *PINNED, "--stop-timeout", "3", "-p", "5353", "--",
                 "sh", "-c", "trap '' INT TERM; echo ready; exec sleep 60")  # ignored signals stay ignored across exec
    wait_ready(tmp_path)
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    said = wait_until(lambda: re.search(r"SIGKILL in (\d+) ?s", output(tmp_path, stream="err")), 10,
                      what="nswrap says that it waits for the server, and when it will SIGKILL it")
    assert proc.poll() is None, "said while waiting, not afterwards"
    assert 1 <= int(said[1]) <= 3, said[0]
    assert proc.wait(15) == 128 + signal.SIGKILL
    assert time.monotonic() - asked >= 2.5, "SIGKILLed before --stop-timeout 3"  # load only makes it later
    lab.stop(proc)  # nothing of it is left
    err = lines(output(tmp_path, stream="err"))
    assert sum("SIGKILL in" in line for line in err) == 1, err
    assert all(line.startswith("nswrap: ") for line in err), err


def test_a_repeated_stop_signal_still_ends_with_the_servers_status(lab, tmp_path):
    """Ctrl-C pressed again and again, or a supervisor that signals the whole group twice: the
    server's status, every time (teardown ignores further signals)."""
    proc = start(lab, tmp_path, *PINNED, "-p", "5353", "--", *UDPMANY, "serve", "5353")
    wait_ready(tmp_path)
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    assert proc.wait(5) == 128 + signal.SIGTERM, "nswrap itself was killed by the signal"
    lab.stop(proc)


@pytest.mark.parametrize("command", ["doctor", "list"])
def test_doctor_and_list_as_a_user_say_they_need_root(lab, command):
    done = lab.exec(lab.host, [*NOBODY, *NSWRAP, command], check=False, timeout=60)
    everything = done.stdout + done.stderr
    assert done.returncode == 1, everything
    assert "needs root" in everything
    assert "Traceback" not in everything and "internal error" not in everything
    if command == "list":
        assert done.stdout == "" and len(lines(done.stderr)) == 1, everything
    else:  # one verdict per line, the last one the summary
        assert all(re.match(r"(ok|note|FAIL) |\d+ check", line) for line in lines(done.stdout)), done.stdout
        assert "nswrap would not work here" in lines(done.stdout)[-1]


def test_list_without_instances_says_so(lab):
    done = nswrap(lab, "list")
    assert (done.returncode, done.stdout, done.stderr) == (0, "no nswrap instances in this network namespace\n", "")


@pytest.mark.parametrize("command", ["doctor", "list"])
def test_doctor_and_list_piped_into_head_end_silently(lab, command):
    """README: `nswrap doctor | head -1` ends like any Unix tool, killed by SIGPIPE (141 in a
    shell). Here the reader is gone before nswrap writes a byte: no race with head."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(["ip", "netns", "exec", lab.host, *NSWRAP, command], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (-signal.SIGPIPE, "")


# (arguments, a word the one line must contain: the culprit)
ODD = {
    "stop-timeout-inf": (["--stop-timeout", "inf"], "--stop-timeout"),
    "stop-timeout-nan": (["--stop-timeout", "nan"], "--stop-timeout"),
    "ready-fd-not-open": (["--ready-fd", "99"], "--ready-fd 99"),
    "uplink-with-a-quote": (["--uplink", 'eth"0'], 'eth"0'),
    "port-99999": (["-p", "99999"], "99999"),
    "port-of-5000-digits": (["-p", "9" * 5000], "port"),
    "group-id-2**32": (["--user", "0:4294967296"], "4294967296"),
    "empty-user": (["--user", ""], "--user"),
    "empty-NSWRAP_USER": (["env", "NSWRAP_USER="], "NSWRAP_USER"),
    "arabic-indic-port": (["-p", "\u0665\u0663"], "\u0665\u0663"),
    "config-dev-zero": (["--config", "/dev/zero"], "/dev/zero"),
}


@pytest.mark.parametrize("case", list(ODD))
def test_odd_input_is_refused_in_one_line(lab, case):
    args, culprit = ODD[case]
    if args[0] == "env":
        argv = [*args, *NSWRAP, *PINNED, "-p", "5353", "--", "true"]
    else:
        argv = [*NSWRAP, *PINNED, *(["-p", "5353"] if "-p" not in args else []), *args, "--", "true"]
    done = lab.exec(lab.host, argv, check=False, timeout=60)  # a hang guard, not a speed goal
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    (line,) = lines(done.stderr)
    assert line.startswith("nswrap: ") and culprit in line, line
    assert "Traceback" not in line and "internal error" not in line


def test_the_widest_mark_mask_works_in_bounded_memory(lab, tmp_path):
    """0xffffffff is a valid mask: marks are computed from it, never listed (4e9 of them would
    not fit in the 1 GiB of address space nswrap gets here)."""
    port = 5353
    proc = lab.spawn(lab.host, ["prlimit", f"--as={1 << 30}", "--", *NSWRAP, "--mark-mask", "0xffffffff", "-p", str(port), "--",
                                *UDPMANY, "serve", str(port)],
                     stdout=(tmp_path / "nswrap.out").open("w"), stderr=(tmp_path / "nswrap.err").open("w"))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="started within 30 s")
    assert proc.poll() is None, output(tmp_path, stream="err")
    assert unanswered(lab, (*lab.paths, *lab.paths6), [port]) == []
    assert lab.stop(proc) == 128 + signal.SIGTERM
    assert "Traceback" not in output(tmp_path, stream="err")
