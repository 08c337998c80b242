"""`-v` logs every host change as the shell line a person would type: pasting them into a shell
must build the same host, and pasting the undo lines must take it down again.

nswrap runs with -v in one lab and serves; its log, pasted into `sh -e` in a second, identical
lab, must give the same host state (links, addresses, rules, routes, nftables, sysctls) and a
server started in the pasted namespace must answer every path; the lines logged at stop, pasted
there, must restore that lab exactly.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from tests.lab import Lab, diff_states, wait_until
from tests.system.common import UDPECHO, echo_answered, output, records, start, wait_ready

PORT = 5353
COMMANDS = ("ip ", "sysctl ", "nft ", "iptables", "conntrack ")


def commands(log: str) -> tuple[str, str]:
    """(setup, teardown) shell scripts from nswrap's -v log: the records that are commands,
    multi-line ones (nft batches) included; the setup ends where the server is started."""
    setup, teardown, serving = [], [], False
    for record in (r.removeprefix("nswrap: ") for r in records(log)):
        if record.startswith("instance ") and ": serving" in record:
            serving = True
        elif record.startswith(COMMANDS):
            (teardown if serving else setup).append(record)
    return "\n".join(setup) + "\n", "\n".join(teardown) + "\n"


def normalized(state: dict) -> dict:
    """A host state without what differs between two labs for reasons that do not matter:
    interface indexes, the lab's own random MAC and link-local addresses, and the named
    namespace a pasted script uses (nswrap's is anonymous)."""
    text = json.dumps(state, sort_keys=True)
    text = re.sub(r'"(ifindex|link_index|link_netnsid|handle|preferred_life_time|valid_life_time)": [0-9]+', r'"\1": 0', text)
    text = re.sub(r'"link": "[a-z0-9]+"', '"link": ""', text)  # the veth's peer, shown by index or name
    text = re.sub(r'"(?!02:6e:7)[0-9a-f]{2}(:[0-9a-f]{2}){5}"', '"mac"', text)  # nswrap's own MACs are not random
    text = re.sub(r'"fe80::[0-9a-f:]+"', '"fe80::"', text)
    state = json.loads(text)
    return {key: sorted(value, key=json.dumps) if isinstance(value, list) else value for key, value in state.items()}


def paste(lab: Lab, script: str) -> None:
    """Run a script in the lab's host namespace the way a person would paste it into a root shell
    there: `nsenter`, not `ip netns exec`, whose private mount namespace would take the pasted
    `ip netns add` mount (and with it the namespace) away when the script ends."""
    subprocess.run(["nsenter", f"--net=/run/netns/{lab.host}", "sh", "-ec", script], check=True, timeout=60,
                   capture_output=True, text=True)


@pytest.mark.nft_only(
    "-v shows the fast path as tc's equivalent lines: pasted, tc would load programs with maps of their "
    "own (docs/fastpath.md)"
)
def test_pasting_the_verbose_log_builds_the_same_host_and_takes_it_down(lab, tmp_path):
    proc = start(lab, tmp_path, "-v", "--ports", str(PORT), "--", *UDPECHO, "serve", str(PORT))
    wait_ready(tmp_path)
    serving = lab.state()
    assert lab.stop(proc) == 128 + signal.SIGTERM
    setup, teardown = commands(output(tmp_path, stream="err"))
    assert "nft -f -" in setup and "ip rule add" in setup and "ip link add nsw-" in setup, setup

    with Lab() as twin:
        before = twin.state()
        netns = re.search(r"ip netns add (nswrap-[0-9a-f]{6})", setup).group(1)
        try:
            paste(twin, setup)
            pasted = twin.state()
            assert not diff_states(normalized(serving), normalized(pasted)), diff_states(normalized(serving), normalized(pasted))
            server = subprocess.Popen(["ip", "netns", "exec", netns, *UDPECHO, "serve", str(PORT)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                assert server.stdout.readline() == b"ready\n"
                for path in twin.paths:
                    wait_until(lambda path=path: echo_answered(twin, path.client, path.address, PORT), 10, what=path.name)
            finally:
                server.kill()
                server.wait(10)
            paste(twin, teardown)
            twin.exec(twin.host, ["ip", "link", "del", f"nsw-{netns[len('nswrap-'):]}"], check=False)
            assert not diff_states(before, twin.state()), diff_states(before, twin.state())
        finally:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
