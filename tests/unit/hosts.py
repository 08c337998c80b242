"""Fabricated hosts for the unit tests: `facts.Facts` built by hand, the instances that run there.

No root, no kernel: what `facts.gather` would have read on this host (the topology of tests/lab/):

    eth0  192.0.2.10/24, 192.0.2.11/24, 2001:db8:1::10/64   default via 192.0.2.1 metric 100, via fe80::1 (IPv6)
    eth1  198.51.100.10/24                                  default via 198.51.100.1 metric 200;
                                                            203.0.113.128/26 via 198.51.100.7
    eth2  203.0.113.65/26                                   no gateway
    nsw-0ld0ld an nswrap veth (never an uplink); lo

Every forwarding-related sysctl is 0: nswrap has everything to turn on.
"""

from __future__ import annotations

import ipaddress

from nswrap.config import DEFAULT_UDP_TIMEOUT, parse_ports, parse_uplink
from nswrap.datapath import Allocation, Datapath, Instance, datapath, ula_subnet
from nswrap.datatypes import replace
from nswrap.facts import Facts, sysctl_keys
from nswrap.objects import RT_TABLE_MAIN, SCOPE_HOST, SCOPE_LINK, Address, Link, Route, Rule

N = ipaddress.ip_network
IF = ipaddress.ip_interface
A = ipaddress.ip_address

MASK = 0xF0000000
KERNEL, BOOT, STATIC = 2, 3, 4  # rtnetlink protocols of routes nswrap did not make

LINKS = (Link(1, "lo", 65536), Link(2, "eth0"), Link(3, "eth1", 9000), Link(4, "eth2"), Link(5, "nsw-0ld0ld"))
UPLINKS = ("eth0", "eth1", "eth2")
ADDRESSES4 = ("192.0.2.10", "192.0.2.11", "198.51.100.10", "203.0.113.65")


def _sysctls(value: str = "0") -> dict[str, str]:
    return {key: value for key in sysctl_keys(list(UPLINKS))}


def host(**overrides: object) -> Facts:
    """The host above; keyword arguments replace whole fields of Facts."""
    facts = Facts(
        links=LINKS,
        addresses=(
            Address("lo", IF("127.0.0.1/8"), SCOPE_HOST),
            Address("lo", IF("::1/128"), SCOPE_HOST),
            Address("eth0", IF("192.0.2.10/24")),
            Address("eth0", IF("192.0.2.11/24")),
            Address("eth0", IF("2001:db8:1::10/64")),
            Address("eth0", IF("fe80::10/64"), SCOPE_LINK),
            Address("eth1", IF("198.51.100.10/24")),
            Address("eth2", IF("203.0.113.65/26")),
            Address("nsw-0ld0ld", IF("198.18.0.1/30")),
        ),
        routes=(
            Route(N("0.0.0.0/0"), "eth0", A("192.0.2.1"), metric=100, proto=BOOT),
            Route(N("0.0.0.0/0"), "eth1", A("198.51.100.1"), metric=200, proto=BOOT),
            Route(N("192.0.2.0/24"), "eth0", scope=SCOPE_LINK, prefsrc=A("192.0.2.10"), proto=KERNEL),
            Route(N("198.51.100.0/24"), "eth1", scope=SCOPE_LINK, prefsrc=A("198.51.100.10"), proto=KERNEL),
            Route(N("203.0.113.128/26"), "eth1", A("198.51.100.7"), proto=STATIC),
            Route(N("203.0.113.64/26"), "eth2", scope=SCOPE_LINK, prefsrc=A("203.0.113.65"), proto=KERNEL),
            Route(N("198.18.0.0/30"), "nsw-0ld0ld", scope=SCOPE_LINK, proto=KERNEL),
            Route(N("::/0"), "eth0", A("fe80::1"), metric=1024, proto=BOOT),
            Route(N("2001:db8:1::/64"), "eth0", metric=256, proto=KERNEL),
        ),
        rules=(
            Rule(4, 0, 255, proto=KERNEL), Rule(4, 32766, RT_TABLE_MAIN, proto=KERNEL), Rule(4, 32767, 253, proto=KERNEL),
            Rule(6, 0, 255, proto=KERNEL), Rule(6, 32766, RT_TABLE_MAIN, proto=KERNEL),
        ),
        sysctls=_sysctls("0"),
    )
    return replace(facts, **overrides)  # type: ignore[arg-type]


def with_sysctls(facts: Facts, **values: str) -> Facts:
    """`facts` with some sysctls changed: with_sysctls(f, **{"net/ipv4/conf/eth0/forwarding": "1"})."""
    return replace(facts, sysctls={**facts.sysctls, **values})


def instance(id: str = "aaaaaa", ports: str = "53,53/tcp", subnet: str = "198.18.0.4/30", ipv6: bool = True,
             uplinks: tuple[str, ...] = (), addresses: tuple[str, ...] = (), loopback: str | None = None,
             outbound: bool = True, helpers: tuple[str, ...] = (), udp_timeout: int = DEFAULT_UDP_TIMEOUT) -> Instance:
    net = ipaddress.IPv4Network(subnet)
    return Instance(
        id=id, ports=parse_ports([ports]), subnet=net, subnet6=ula_subnet(net) if ipv6 else None,
        uplinks=tuple(parse_uplink(u) for u in uplinks), addresses=tuple(A(a) for a in addresses),
        loopback_ports=parse_ports([loopback]) if loopback else (), outbound=outbound, helpers=helpers,
        udp_timeout=udp_timeout,
    )


def fresh(facts: Facts | None = None, mask: int = MASK) -> Allocation:
    """The allocation of a namespace without nswrap: priorities from 5000, no uplink yet."""
    return Allocation(mask, 5000)


def golden_datapath() -> Datapath:
    """The datapath the golden files pin: two instances on the host above, one with --uplink,
    --address, a remapped range, the tftp helper and no outbound connections."""
    first = instance("aaaaaa", "53,53/tcp", loopback="53,53/tcp")
    second = instance("bbbbbb", "69,8080-8081:80-81/tcp", subnet="198.18.0.8/30", uplinks=("eth1=198.51.100.1", "eth2"),
                      addresses=("198.51.100.10", "203.0.113.65"), outbound=False, helpers=("tftp",))
    return datapath(host(), fresh(), (first, second))
