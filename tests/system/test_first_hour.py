"""The first hour, second pass (issue 25): no silent misconfiguration.

Each case runs nswrap in the lab's host namespace and checks its exit status and the exact line
it says; the `lab` fixture then checks that the host namespace is exactly as before. Waits poll
(tests/lab/wait.py), never sleep blindly.
"""

from __future__ import annotations

import pytest

from tests.system.common import nswrap


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- a gateway that is not on its uplink's link --------------------------------------------------

REFUSED_GATEWAYS = {
    # a container runtime that named its networks in another order: the gateway is eth0's
    "another-interfaces-subnet": (
        ["--uplink", "eth1=192.0.2.1"],
        "nswrap: uplink eth1=192.0.2.1: 192.0.2.1 is on eth0's subnet, not eth1's: --uplink eth0=192.0.2.1?"),
    "ipv6-another-interfaces-subnet": (
        ["--uplink", "eth0", "--uplink", "eth1=2001:db8:1::1"],
        "nswrap: uplink eth1=2001:db8:1::1: 2001:db8:1::1 is on eth0's subnet, not eth1's: --uplink eth0=2001:db8:1::1?"),
    "nowhere": (
        ["--uplink", "eth2=10.9.9.1"],
        "nswrap: uplink eth2=10.9.9.1: 10.9.9.1 is not on eth2's link (no subnet of its addresses holds it and no route "
        "in the main table says it is on-link): give a gateway on eth2's subnet"),
}


@pytest.mark.parametrize("case", list(REFUSED_GATEWAYS))
def test_a_gateway_off_the_uplinks_link_is_refused_in_one_line(lab, case):
    args, line = REFUSED_GATEWAYS[case]
    done = nswrap(lab, "--ports", "5353", *args, "--", "true")
    assert (done.returncode, lines(done.stderr), done.stdout) == (2, [line], "")


def test_a_gateway_on_the_link_is_accepted(lab):
    """eth2 has no gateway in the lab: one on its subnet is taken (IPv4), and so is a link-local
    IPv6 one (on-link by definition)."""
    done = nswrap(lab, "--ports", "5353", "--uplink", "eth2=203.0.113.66", "--uplink", "eth0=fe80::1", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "ip route add default via 203.0.113.66 dev eth2 table" in done.stdout
    assert "onlink" not in done.stdout


def test_an_unknown_uplink_names_the_candidates(lab):
    done = nswrap(lab, "--ports", "5353", "--uplink", "eth9", "--", "true")
    assert (done.returncode, lines(done.stderr)) == (
        125, ["nswrap: no such uplink: eth9 (interfaces with a global address here: eth0, eth1, eth2)"])
