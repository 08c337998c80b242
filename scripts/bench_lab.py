"""Benchmark-only additions to the lab of tests/lab/ (which stays the single source of the
namespace plumbing: creation, exec, spawn, stop, state, cleanup), through its public interface.

:func:`recipe_2014`: the original veth-loop recipe (see the 2014 seed text) on the lab host:
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

from tests.lab import Lab  # noqa: E402

# Private address of the server in the 2014 recipe, and the veth's host end.
RECIPE_SERVER = "198.18.1.1"
RECIPE_DISTRIBUTE = "198.18.1.2"
_RECIPE_TABLE = 1010


@contextlib.contextmanager
def recipe_2014(lab: Lab, port: int, uplinks: list[tuple[str, str, str | None]]) -> Iterator[str]:
    """Apply the 2014 recipe for *port* (UDP and TCP) on *lab*'s host; yield the address the
    server binds.

    *uplinks*: (ifname, address, gateway or None) for each uplink; an uplink without a gateway
    gets its connected routes in its table instead. Undone on exit (the veth pair, rules,
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
        batch.append(f"rule add from {address} lookup {i} priority {1000 + i}")
        if gateway:
            batch.append(f"route add default via {gateway} dev {ifname} table {i}")
        else:
            connected = lab.exec(h, ["ip", "-4", "-o", "route", "show", "dev", ifname, "proto", "kernel"]).stdout
            batch += [f"route add {line.split()[0]} dev {ifname} src {address} table {i}" for line in connected.splitlines()]
        undo += [f"rule del priority {1000 + i}", f"route flush table {i}"]
    # The recipe's sysctls; accept_local is needed on current kernels too: the looped reply
    # arrives on distributeintf with a source that is one of the host's own addresses.
    sysctls = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
               "net.ipv4.conf.serverintf.rp_filter": "0", "net.ipv4.conf.distributeintf.rp_filter": "0",
               "net.ipv4.conf.distributeintf.accept_local": "1"}
    sysctls.update({f"net.ipv4.conf.{ifname}.rp_filter": "2" for ifname, _, _ in uplinks})
    nft = f"""table ip recipe2014 {{
        chain raw {{ type filter hook prerouting priority raw; iifname "distributeintf" notrack; }}
        chain nat {{
            type nat hook prerouting priority dstnat; meta l4proto {{ udp, tcp }} th dport {port} dnat to {RECIPE_SERVER};
        }}
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
