"""Review (issue 12): records nswrap writes but will not read, and a mark mask that is not used.

- A record is refused when a command argument has 4096 characters or more, or when the file is
  larger than 64 KiB (3000 listed ports). nswrap writes such records itself: the instance runs,
  but `list` does not show it and the next start of any other instance sweeps its map elements
  as a dead instance's (it silently stops being served, and its port can be published again).
- After a crash, a new instance's `--mark-mask` is ignored: the dead instance's allocation keeps
  its mask, so the rules use bits the user asked nswrap not to use.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.lab import wait_until
from tests.system.common import nswrap, output, start
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

PORT = 7331


def serving(lab, tmp_path, *args, name: str, port: int):
    proc = start(lab, tmp_path, *args, "--", *UDPMANY, "serve", "--tag", str(tmp_path), str(port), name=name)
    wait_until(lambda: "ready" in output(tmp_path, name) or proc.poll() is not None, 60, what=f"{name} is ready")
    assert proc.poll() is None, output(tmp_path, name, "err")
    return proc


def listed_pids(lab) -> set[int]:
    return {row["pid"] for row in json.loads(nswrap(lab, "list", "--json").stdout)["instances"]}


@pytest.mark.parametrize("big", ["long-argument", "many-ports"])
def test_an_instance_with_a_big_record_stays_listed_and_served(lab, tmp_path, big):
    if big == "long-argument":
        args = ["--ports", str(PORT), "--", *UDPMANY, "serve", "--tag", "x" * 5000, str(PORT)]
    else:  # the server listens on the first only: enough to be answered there
        args = ["--ports", ",".join(str(20000 + 2 * i) for i in range(3000)), "--", *UDPMANY, "serve", "20000"]
    first = start(lab, tmp_path, *args, name="first")
    port = PORT if big == "long-argument" else 20000
    wait_until(lambda: "ready" in output(tmp_path, "first") or first.poll() is not None, 60, what="first is ready")
    other = None
    try:
        assert first.poll() is None, output(tmp_path, "first", "err")
        assert unanswered(lab, (lab.paths[2],), [port]) == []
        other = serving(lab, tmp_path, "--ports", str(PORT + 1), name="other", port=PORT + 1)
        assert first.pid in listed_pids(lab), "nswrap list does not show the first instance"
        assert unanswered(lab, (lab.paths[0], lab.paths[2]), [port]) == [], "the other start swept the first instance"
    finally:
        for proc in (other, first):
            if proc is not None:
                lab.stop(proc, timeout=60)


def test_the_mark_mask_given_after_a_crash_is_the_one_used(lab, tmp_path):
    crashed = serving(lab, tmp_path, "--ports", str(PORT), name="crashed", port=PORT)  # default 0xf0000000
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(10)
    proc = serving(lab, tmp_path, "--mark-mask", "0x0f000000", "--ports", str(PORT), name="new", port=PORT)
    try:
        rules = json.loads(lab.exec(lab.host, ["ip", "-json", "rule", "show", "proto", "110"]).stdout)
        masks = {r["fwmask"] for r in rules if "fwmask" in r}
        assert masks == {"0xf000000"}, f"fwmark rules use {masks}, not the --mark-mask given"
    finally:
        assert lab.stop(proc) == 128 + signal.SIGTERM
        assert nswrap(lab, "cleanup").returncode == 0


def test_a_command_too_long_to_record_is_refused_before_any_change(lab):
    """Nine arguments of 128 KiB (the kernel's limit for one) pass exec, not the 1 MiB record:
    refused as bad input, exit 2, one error line, the host untouched (the lab fixture compares it)."""
    args = ["x" * (128 * 1024 - 1)] * 9
    result = nswrap(lab, "--ports", str(PORT), "--", "true", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "serves only" not in line]  # eth2's warnings
    assert len(errors) == 1 and errors[0].startswith("nswrap: too much to record"), errors[:3]
