"""Review (issue 12): a firewall reload at the wrong moment, and a repair that meets a passing error.

- A reload (`nft flush ruleset`) after nswrap created its table but before the instance listens
  to nftables events (the rest of the setup, the server's start, forgetting stale flows) is
  never seen: the table stays gone, forwarding stays on the uplinks, nothing is said.
- A reload that coincides with a passing routing problem (here the `main` rule missing for a
  moment, as during a hand-made `ip rule flush`) makes the follower's repair fail on a route,
  not on the table, and nswrap kills its server and exits 125 (which `examples/nswrap@.service`
  never restarts), instead of trying again once the host has settled.
"""

from __future__ import annotations

import json
import os
import signal
import time

from tests.lab import wait_until
from tests.system.common import Held, output, setup_steps, start
from tests.system.udpmany import COMMAND as UDPMANY, unanswered

PORT = 7311


def has_table(lab) -> bool:
    return lab.exec(lab.host, ["nft", "list", "table", "inet", "nswrap"], check=False).returncode == 0


def forwarding(lab, ifname: str) -> str:
    return lab.exec(lab.host, ["cat", f"/proc/sys/net/ipv4/conf/{ifname}/forwarding"]).stdout.strip()


def test_a_reload_before_the_instance_follows_is_put_back(lab, tmp_path):
    server = ("--ports", str(PORT), "--", *UDPMANY, "serve", "--tag", str(tmp_path), str(PORT))
    first = start(lab, tmp_path, "-v", *server)
    wait_until(lambda: f"serving {PORT}/" in output(tmp_path, stream="err") or first.poll() is not None, 30,
               what="serving")
    total = setup_steps(output(tmp_path, stream="err"))
    assert lab.stop(first) == 128 + signal.SIGTERM

    held = Held(lab, tmp_path, total, *server)  # every host change made; held at the "serving" line
    assert "serving" in held.where, held.where
    try:
        lab.exec(lab.host, ["nft", "flush", "ruleset"])
        os.close(held.go_w)
        wait_until(lambda: "ready" in output(tmp_path) or held.proc.poll() is not None, 30, what="the server is ready")
        began = time.monotonic()
        while time.monotonic() - began < 5 and held.proc.poll() is None and not has_table(lab):
            time.sleep(0.05)
        if held.proc.poll() is None:
            assert has_table(lab), (f"5 s after the reload the table is still gone, eth1 forwarding="
                                    f"{forwarding(lab, 'eth1')}:\n{output(tmp_path, stream='err')[-600:]}")
            assert unanswered(lab, (lab.paths[2],), [PORT]) == []
        else:  # or it gave up, failing closed
            assert forwarding(lab, "eth1") == "0", "nswrap exited and left forwarding on"
    finally:
        lab.stop(held.proc)


def nswrap_table_of(lab, ifname: str) -> int:
    routes = json.loads(lab.exec(lab.host, ["ip", "-json", "route", "show", "table", "all", "proto", "110"]).stdout)
    (table,) = {r["table"] for r in routes if r.get("dev") == ifname and r["dst"] == "default"}
    return int(table)


def test_a_passing_route_error_during_a_repair_does_not_kill_the_server(lab, tmp_path):
    proc = start(lab, tmp_path, "--ports", str(PORT), "--", *UDPMANY, "serve", "--tag", str(tmp_path), str(PORT))
    wait_until(lambda: "ready" in output(tmp_path) or proc.poll() is not None, 30, what="the server is ready")
    assert unanswered(lab, (lab.paths[0], lab.paths[2]), [PORT]) == []
    table = nswrap_table_of(lab, "eth0")
    try:
        # A reload, eth0's table emptied, and for a moment no `main` rule: nswrap's route with a
        # gateway cannot be added back until that rule returns.
        lab.exec(lab.host, ["sh", "-c", f"nft flush ruleset; ip route flush table {table}; ip rule del priority 32766"])
        wait_until(lambda: "putting it back" in output(tmp_path, stream="err") or proc.poll() is not None, 10,
                   what="nswrap sees the reload")
        time.sleep(1.5)  # its repair has met the missing rule
    finally:
        lab.exec(lab.host, ["ip", "rule", "add", "priority", "32766", "lookup", "main"])
    try:
        time.sleep(2)
        assert proc.poll() is None, f"nswrap exited {proc.returncode}:\n{output(tmp_path, stream='err')[-800:]}"
        wait_until(lambda: has_table(lab), 5, what="the table is back")
        assert unanswered(lab, (lab.paths[0], lab.paths[2]), [PORT]) == []
    finally:
        lab.stop(proc)
