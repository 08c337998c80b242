"""Benchmark-only additions to the lab of tests/lab.py (which stays the single source of the
namespace plumbing: creation, exec, spawn, stop, state, cleanup).

- :class:`UplinkLab`: a host with N uplinks (N <= 16), for start-up scaling::

      host eth<i> 198.51.100.<16i+1>/28, default via 198.51.100.<16i+2> metric 100+i
        ══ veth ══ peers p<i> 198.51.100.<16i+2>/28          (one peer namespace for all)

- :func:`recipe_2014`: the original veth-loop recipe (see the 2014 seed text) on the lab host:
  veth pair serverintf/distributeintf in the *host* namespace, the server bound to serverintf's
  private address, DNAT to it, `ip rule from <private address>` to loop replies through the veth,
  notrack on distributeintf, `ip rule from <uplink address>` per uplink, loosened rp_filter.
  Only ever applied inside a lab namespace.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from collections.abc import Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.lab import _SYSCTL_COMMON, _SYSCTL_EARLY, Lab, _run, wait_until  # noqa: E402

MAX_UPLINKS = 16


class UplinkLab(Lab):
    """A lab host with *uplinks* gateway uplinks eth0..eth<N-1> (roles: "host", "peers")."""

    def __init__(self, uplinks: int) -> None:
        if not 1 <= uplinks <= MAX_UPLINKS:
            raise ValueError(f"1..{MAX_UPLINKS} uplinks, not {uplinks}")
        self.uplinks = uplinks
        super().__init__()

    def _build(self) -> None:
        self._ns["peers"] = f"{self.prefix}-peers"
        for role in ("host", "peers"):
            _run(["ip", "netns", "add", self._ns[role]])
            self._created.append(self._ns[role])
        self._sysctl(self.host, {**_SYSCTL_EARLY["host"], **_SYSCTL_COMMON})
        self._sysctl(self._ns["peers"], {**_SYSCTL_EARLY["client"], **_SYSCTL_COMMON})
        host, peers = ["link set lo up"], ["link set lo up"]
        for i in range(self.uplinks):
            self.exec(self.host, ["ip", "link", "add", f"eth{i}", "type", "veth",
                                  "peer", "name", f"p{i}", "netns", self._ns["peers"]])
            host += [f"link set eth{i} up", f"addr add 198.51.100.{16 * i + 1}/28 dev eth{i}",
                     f"route add default via 198.51.100.{16 * i + 2} dev eth{i} metric {100 + i}"]
            peers += [f"link set p{i} up", f"addr add 198.51.100.{16 * i + 2}/28 dev p{i}"]
        self.exec(self.host, ["ip", "-batch", "-"], input="\n".join(host) + "\n")
        self.exec(self._ns["peers"], ["ip", "-batch", "-"], input="\n".join(peers) + "\n")
        wait_until(self._settled, timeout=10, what=f"{self.host}: links did not come up")


# Private address of the server in the 2014 recipe, and the veth's host end.
RECIPE_SERVER = "198.18.1.1"
RECIPE_DISTRIBUTE = "198.18.1.2"
_RECIPE_TABLE = 1010


@contextlib.contextmanager
def recipe_2014(lab: Lab, port: int, uplinks: list[tuple[str, str, str]]) -> Iterator[str]:
    """Apply the 2014 recipe for UDP *port* on *lab*'s host; yield the address the server binds.

    *uplinks*: (ifname, address, gateway) for each uplink. Undone on exit (the veth pair, rules,
    routes, nft table and sysctls: the sysctls are restored to their values before).
    """
    h = lab.host
    batch = [
        "link add serverintf type veth peer name distributeintf",
        f"addr add {RECIPE_SERVER}/30 dev serverintf",
        f"addr add {RECIPE_DISTRIBUTE}/30 dev distributeintf",
        "link set serverintf up",
        "link set distributeintf up",
        f"rule add from {RECIPE_SERVER} lookup {_RECIPE_TABLE} priority {_RECIPE_TABLE}",
        f"route add default via {RECIPE_DISTRIBUTE} dev serverintf table {_RECIPE_TABLE}",
    ]
    undo = [f"rule del priority {_RECIPE_TABLE}", "link del serverintf"]
    for i, (ifname, address, gateway) in enumerate(uplinks, start=1):
        batch += [f"rule add from {address} lookup {i} priority {1000 + i}",
                  f"route add default via {gateway} dev {ifname} table {i}"]
        undo += [f"rule del priority {1000 + i}", f"route flush table {i}"]
    # The recipe's sysctls; accept_local is needed on current kernels too: the looped reply
    # arrives on distributeintf with a source that is one of the host's own addresses.
    sysctls = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
               "net.ipv4.conf.serverintf.rp_filter": "0", "net.ipv4.conf.distributeintf.rp_filter": "0",
               "net.ipv4.conf.distributeintf.accept_local": "1"}
    sysctls.update({f"net.ipv4.conf.{ifname}.rp_filter": "2" for ifname, _, _ in uplinks})
    nft = f"""table ip recipe2014 {{
        chain raw {{ type filter hook prerouting priority raw; iifname "distributeintf" notrack; }}
        chain nat {{ type nat hook prerouting priority dstnat; udp dport {port} dnat to {RECIPE_SERVER}; }}
    }}"""
    global_keys = [k for k in sysctls if ".serverintf." not in k and ".distributeintf." not in k]
    saved = lab.exec(h, ["sysctl", *global_keys]).stdout.splitlines()
    try:
        lab.exec(h, ["ip", "-batch", "-"], input="\n".join(batch) + "\n")
        lab.exec(h, ["sysctl", "-qw", *(f"{k}={v}" for k, v in sysctls.items())])
        lab.exec(h, ["nft", "-f", "-"], input=nft)
        yield RECIPE_SERVER
    finally:
        lab.exec(h, ["nft", "delete", "table", "ip", "recipe2014"], check=False)
        lab.exec(h, ["sysctl", "-qw", *(line.replace(" ", "") for line in saved)], check=False)
        for line in reversed(undo):
            lab.exec(h, ["ip", *line.split()], check=False)
