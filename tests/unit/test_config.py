"""Port specs, uplinks, subnets and masks: valid and invalid inputs, no root needed."""

import ipaddress

import pytest

from nswrap.config import Config, PortRange, parse_mark_mask, parse_ports, parse_subnet, parse_uplink
from nswrap.errors import UsageError


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("53", [PortRange("udp", 53, 53, 53)]),
        ("53/tcp", [PortRange("tcp", 53, 53, 53)]),
        ("53/UDP", [PortRange("udp", 53, 53, 53)]),
        ("53:5300", [PortRange("udp", 53, 53, 5300)]),
        ("53:5300/tcp", [PortRange("tcp", 53, 53, 5300)]),
        ("5000-5010", [PortRange("udp", 5000, 5010, 5000)]),
        ("5000-5010:6000-6010", [PortRange("udp", 5000, 5010, 6000)]),
        ("1-65535", [PortRange("udp", 1, 65535, 1)]),
        (" 53 , 123 ", [PortRange("udp", 53, 53, 53), PortRange("udp", 123, 123, 123)]),
        ("53,53/tcp", [PortRange("tcp", 53, 53, 53), PortRange("udp", 53, 53, 53)]),
    ],
)
def test_valid_port_specs(spec, expected):
    assert list(parse_ports([spec])) == expected


def test_repeated_specs_merge_sorted():
    assert parse_ports(["123", "53,53/tcp"]) == (
        PortRange("tcp", 53, 53, 53),
        PortRange("udp", 53, 53, 53),
        PortRange("udp", 123, 123, 123),
    )


@pytest.mark.parametrize(
    "spec, culprit",
    [
        ("0", "port 0"),
        ("65536", "port 65536"),
        ("5010-5000", "ends before it starts"),
        ("5000-5010:6000-6005", "same length"),
        ("53:5300-5301", "same length"),
        ("53/icmp", "udp or tcp"),
        ("dns", "'dns'"),
        ("53,", "empty item"),
        ("", "empty item"),
        ("-53", "'-53'"),
        ("53::54", "'53::54'"),
        ("53,53", "twice"),
        ("5000-5010,5005", "twice"),
        ("53:5300,53:5301", "twice"),
    ],
)
def test_invalid_port_specs_name_the_culprit(spec, culprit):
    with pytest.raises(UsageError) as err:
        parse_ports([spec])
    assert culprit in str(err.value)
    assert err.value.code == 2
    assert "\n" not in str(err.value)


def test_same_port_on_both_protocols_is_fine():
    assert len(parse_ports(["53", "53/tcp"])) == 2


def test_port_range_str_round_trips():
    for spec in ["53/udp", "53:5300/tcp", "5000-5010/udp", "5000-5010:6000-6010/udp"]:
        assert str(parse_ports([spec])[0]) == spec


def test_uplinks():
    assert parse_uplink("eth0").gateway is None
    assert parse_uplink("eth1=198.51.100.1").gateway == ipaddress.IPv4Address("198.51.100.1")
    for bad in ["", "a-very-long-interface-name", "eth0=nope", "eth 0", "a/b"]:
        with pytest.raises(UsageError):
            parse_uplink(bad)


def test_subnet_and_mask():
    assert parse_subnet("198.18.7.0/30").prefixlen == 30
    for bad in ["198.18.7.1/30", "198.18.7.0/31", "nope"]:
        with pytest.raises(UsageError):
            parse_subnet(bad)
    assert parse_mark_mask("0xf0000000") == 0xF0000000
    assert parse_mark_mask("0x00f00000") == 0x00F00000
    for bad in ["0", "0x1ffffffff", "0x50000000", "x"]:
        with pytest.raises(UsageError):
            parse_mark_mask(bad)


def test_config_needs_ports_and_command():
    ports = parse_ports(["53"])
    with pytest.raises(UsageError, match="no ports"):
        Config(command=("true",), ports=())
    with pytest.raises(UsageError, match="no command"):
        Config(command=(), ports=ports)
    Config(command=(), ports=ports, dry_run=True)
    with pytest.raises(UsageError, match="twice"):
        Config(command=("true",), ports=ports, uplinks=(parse_uplink("eth0"), parse_uplink("eth0")))
