"""config.py: what the user asked for, validated before nswrap looks at the host. Pure, no root."""

from __future__ import annotations

import ipaddress
import sys
import tracemalloc

import pytest

from nswrap.config import (
    DEFAULT_UDP_TIMEOUT,
    MAX_STOP_TIMEOUT,
    MAX_UDP_TIMEOUT,
    MIN_UDP_TIMEOUT,
    Config,
    PortRange,
    check_ifname,
    check_stop_timeout,
    check_udp_timeout,
    parse_address,
    parse_mark_mask,
    parse_port_item,
    parse_ports,
    parse_subnet,
    parse_uplink,
    parse_user,
    valid_ifname,
)
from nswrap.datapath import mark_capacity, mark_value
from nswrap.errors import EXIT_USAGE, NswrapError, UsageError


def refused(call, *args, culprit: str = "") -> UsageError:
    """call(*args) raises a one-line UsageError (exit 2) naming `culprit`."""
    with pytest.raises(UsageError) as raised:
        call(*args)
    message = str(raised.value)
    assert raised.value.code == EXIT_USAGE and "\n" not in message, message
    assert culprit in message, message
    return raised.value


# --- port specs --------------------------------------------------------------------------------


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
        ("00053", [PortRange("udp", 53, 53, 53)]),  # five ASCII digits, leading zeros and all
        (" 53 , 123 ", [PortRange("udp", 53, 53, 53), PortRange("udp", 123, 123, 123)]),
        ("53,53/tcp", [PortRange("tcp", 53, 53, 53), PortRange("udp", 53, 53, 53)]),
    ],
)
def test_valid_port_specs(spec, expected):
    assert list(parse_ports([spec])) == expected


def test_repeated_specs_merge_sorted():
    assert parse_ports(["123", "53,53/tcp"]) == (
        PortRange("tcp", 53, 53, 53), PortRange("udp", 53, 53, 53), PortRange("udp", 123, 123, 123))


def test_port_range_properties():
    remap = parse_port_item("8080-8081:80-81/tcp")
    assert (remap.count, remap.remapped, remap.inner_hi) == (2, True, 81)
    keep = parse_port_item("53")
    assert (keep.count, keep.remapped, keep.inner_hi) == (1, False, 53)
    assert keep.overlaps(parse_port_item("50-60")) and not keep.overlaps(parse_port_item("53/tcp"))


@pytest.mark.parametrize(
    "spec, culprit",
    [
        ("0", "port 0"),
        ("65536", "port 65536"),
        ("5010-5000", "ends before it starts"),
        ("5000-5010:6000-6005", "same length"),
        ("53:5300-5301", "same length"),
        ("53:0", "port 0"),
        ("53/icmp", "udp or tcp"),
        ("53/sctp", "udp or tcp"),
        ("dns", "'dns'"),
        ("53,", "empty item"),
        ("", "empty item"),
        ("-53", "'-53'"),
        ("53::54", "'53::54'"),
        ("53-", "'53-'"),
        ("+53", "'+53'"),
        ("0x35", "'0x35'"),
        ("5_3", "'5_3'"),
        ("53,53", "twice"),
        ("5000-5010,5005", "twice"),
        ("53:5300,53:5301", "twice"),
        ("1-65535,65535", "twice"),
        # Arabic-Indic and full-width digits: int() takes them, nswrap must not
        ("\u0665\u0663", "invalid port spec"),
        ("5\u0663", "invalid port spec"),
        ("\uff15\uff13", "invalid port spec"),
        ("53:\u0665\u0663", "invalid port spec"),
    ],
)
def test_invalid_port_specs_name_the_culprit(spec, culprit):
    refused(parse_ports, [spec], culprit=culprit)


def test_a_5000_digit_port_is_refused_at_once():
    """Never handed to int(): Python refuses more than sys.get_int_max_str_digits() digits with a
    ValueError, which `refused` would let through (it expects the one-line UsageError)."""
    saved = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(4300)  # Python's default, whatever PYTHONINTMAXSTRDIGITS says
    try:
        for spec in ("9" * 5000, "1" * 5000 + "/tcp", "53:" + "7" * 5000, "1-" + "2" * 5000):
            refused(parse_ports, [spec], culprit="invalid port spec")
    finally:
        sys.set_int_max_str_digits(saved)


def test_same_port_on_both_protocols_is_fine():
    assert len(parse_ports(["53", "53/tcp"])) == 2


@pytest.mark.parametrize("spec", ["53/udp", "53:5300/tcp", "5000-5010/udp", "5000-5010:6000-6010/udp"])
def test_port_range_str_round_trips(spec):
    assert str(parse_ports([spec])[0]) == spec
    assert parse_port_item(str(parse_ports([spec])[0])) == parse_ports([spec])[0]


# --- --user ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("nobody", ("nobody", "")),
        ("nobody:nogroup", ("nobody", "nogroup")),
        ("65534", ("65534", "")),
        ("65534:65534", ("65534", "65534")),
        ("0:0", ("0", "0")),
        ("4294967294:4294967294", ("4294967294", "4294967294")),  # the largest id that is not (uid_t)-1
        ("svc_user.1", ("svc_user.1", "")),
        ("machine$", ("machine$", "")),  # Samba's machine accounts
    ],
)
def test_valid_users(spec, expected):
    assert parse_user(spec) == expected


@pytest.mark.parametrize(
    "spec, culprit",
    [
        ("", "empty user"),
        (":root", "empty user"),
        ("nobody:", "empty group"),
        ("0:4294967296", "group id 4294967296 is out of range"),
        ("4294967295", "user id 4294967295 is out of range"),  # (uid_t)-1: "unchanged" to setuid
        ("9" * 5000, "out of range"),
        ("-1", "'-1'"),
        ("no body", "'no body'"),
        ("a:b:c", "'b:c'"),
        ("root\n", "'root\\n'"),
        ("\u0665\u0663", "is not a user name or number"),  # Arabic-Indic digits are no uid
        ("../etc", "'../etc'"),
    ],
)
def test_invalid_users(spec, culprit):
    refused(parse_user, spec, culprit=culprit)


# --- --stop-timeout ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.5, 10.0, MAX_STOP_TIMEOUT])
def test_valid_stop_timeouts(value):
    assert check_stop_timeout(value) == value


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), -1.0, -0.001, MAX_STOP_TIMEOUT + 1, 1e308])
def test_invalid_stop_timeouts(value):
    refused(check_stop_timeout, value, culprit="--stop-timeout")
    refused(lambda: Config(command=("true",), ports=parse_ports(["53"]), stop_timeout=value), culprit="--stop-timeout")


# --- --udp-timeout -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [MIN_UDP_TIMEOUT, DEFAULT_UDP_TIMEOUT, 300, MAX_UDP_TIMEOUT])
def test_valid_udp_timeouts(value):
    assert check_udp_timeout(value) == value
    assert Config(command=("true",), ports=parse_ports(["53"]), udp_timeout=value).udp_timeout == value


@pytest.mark.parametrize("value", [0, -20, MIN_UDP_TIMEOUT - 1, MAX_UDP_TIMEOUT + 1, 10**100, True, 20.5])
def test_invalid_udp_timeouts(value):
    refused(check_udp_timeout, value, culprit="--udp-timeout")
    refused(lambda: Config(command=("true",), ports=parse_ports(["53"]), udp_timeout=value), culprit="--udp-timeout")


def test_the_default_udp_timeout_outlives_a_10_s_keepalive_twice_and_drains_a_flood_within_30_s():
    assert 2 * 10 <= DEFAULT_UDP_TIMEOUT < 30


# --- --mark-mask -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, mask",
    [("0xf0000000", 0xF0000000), ("0XF0000000", 0xF0000000), ("0x00f00000", 0x00F00000), ("0xffffffff", 0xFFFFFFFF),
     ("0x1", 1), ("4026531840", 0xF0000000), (" 0xff ", 0xFF), ("0x80000000", 0x80000000)],
)
def test_valid_mark_masks(text, mask):
    assert parse_mark_mask(text) == mask


@pytest.mark.parametrize(
    "text, culprit",
    [("0", "non-zero"), ("0x0", "non-zero"), ("0x5", "contiguous"), ("0xf00f0000", "contiguous"),
     ("0x1ffffffff", "expected a number"), ("4294967296", "non-zero 32-bit"), ("x", "expected a number"),
     ("-0xf0", "expected a number"), ("0x_f0", "expected a number"), ("0b1111", "expected a number"),
     ("0xf" + "0" * 5000, "expected a number"), ("\u0664\u0660\u0669\u0666", "expected a number"), ("", "expected a number")],
)
def test_invalid_mark_masks(text, culprit):
    refused(parse_mark_mask, text, culprit=culprit)


def test_marks_under_the_widest_mask_are_computed_not_listed():
    """0xffffffff has 4294967295 marks: each is computed, never taken from a list of them all."""
    mask = parse_mark_mask("0xffffffff")
    tracemalloc.start()
    try:
        assert mark_capacity(mask) == 0xFFFFFFFF
        assert mark_value(mask, 1) == 1 and mark_value(mask, 0xFFFFFFFF) == 0xFFFFFFFF
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes to compute a mark"
    with pytest.raises(NswrapError, match="no room for uplink number 4294967296"):
        mark_value(mask, 0x1_0000_0000)


@pytest.mark.parametrize(
    "mask, index, mark",
    [(0xF0000000, 1, 0x10000000), (0xF0000000, 15, 0xF0000000), (0x00F00000, 3, 0x00300000), (0x1, 1, 1),
     (0x80000000, 1, 0x80000000), (0x0000FF00, 255, 0xFF00)],
)
def test_mark_values(mask, index, mark):
    assert mark_value(mask, index) == mark
    assert mark & ~mask == 0


@pytest.mark.parametrize("mask, index", [(0xF0000000, 0), (0xF0000000, 16), (0x1, 2), (0x80000000, 2), (0xF0000000, -1)])
def test_marks_outside_the_mask_are_refused(mask, index):
    with pytest.raises(NswrapError, match="--mark-mask"):
        mark_value(mask, index)


# --- interface names, uplinks, addresses, subnets -----------------------------------------------


@pytest.mark.parametrize("name", ["eth0", "eth0.100", "wg0", "br-lan", "veth_a@b", "x+y", "a" * 15, "ETH0", "0"])
def test_valid_interface_names(name):
    assert valid_ifname(name) and check_ifname(name) == name


@pytest.mark.parametrize("name", ["", "a" * 16, ".", "..", 'eth0"', '"', "eth 0", "a/b", "eth0;reboot", "eth\u00e9",
                                  "eth$(x)", "eth0'", "eth\\0", "{eth0}", "eth0\t", "*", "\neth0",
                                  "eth0\n"])
def test_invalid_interface_names(name):
    """Names go into nft text and shell lines between double quotes: none may break out of them."""
    assert not valid_ifname(name)
    refused(check_ifname, name, culprit="interface name")
    refused(parse_uplink, name, culprit="invalid uplink")


def test_uplinks():
    assert parse_uplink("eth0").gateway is None
    assert parse_uplink("eth1=198.51.100.1").gateway == ipaddress.IPv4Address("198.51.100.1")
    assert parse_uplink("eth0=fe80::1").gateway == ipaddress.IPv6Address("fe80::1")
    assert str(parse_uplink("eth1=198.51.100.1")) == "eth1=198.51.100.1"
    for bad in ["eth0=nope", "eth0=", "=198.51.100.1", "eth0=198.51.100.1=x", "eth0=0.0.0.0", "eth0=::",
                "eth0=127.0.0.1", "eth0=::1", "eth0=224.0.0.1", "eth0=ff02::1"]:
        refused(parse_uplink, bad, culprit="invalid uplink")
    assert parse_uplink("eth0=169.254.1.1").gateway == ipaddress.IPv4Address("169.254.1.1")  # Calico's, some clouds'


@pytest.mark.parametrize(
    "text, culprit",
    [
        ("eth0=255.255.255.255", "255.255.255.255 is the broadcast address, not a unicast gateway"),
        ("eth0=0.0.0.0", "the unspecified address"),
        ("eth0=0.1.2.3", "'this network' (0.0.0.0/8)"),
        ("eth0=127.0.0.53", "a loopback address"),
        ("eth0=239.1.1.1", "a multicast address"),
        ("eth0=::", "the unspecified address"),
        ("eth0=::1", "a loopback address"),
        ("eth0=ff02::2", "a multicast address"),
        ("eth0=::ffff:255.255.255.255", "IPv4-mapped IPv6 address: give 255.255.255.255"),
        ("eth0=::ffff:198.51.100.1", "give 198.51.100.1"),
        ("eth0=fe80::1%eth0", "without a %zone"),
        ('eth0=2001:db8::1%x"; reboot', "without a %zone"),  # the zone is free text: never into a shell line
    ],
)
def test_a_gateway_must_be_unicast(text, culprit):
    """Refused at parsing (exit 2), not by the kernel after the host was changed (exit 125)."""
    refused(parse_uplink, text, culprit=f"invalid uplink {text!r}: ")
    refused(parse_uplink, text, culprit=culprit)


def test_addresses():
    assert parse_address("192.0.2.10") == ipaddress.IPv4Address("192.0.2.10")
    assert parse_address("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert parse_address("127.0.0.1").is_loopback
    for bad in ["192.0.2.0/24", "host.example", "", "192.0.2.256", "\u0661\u0669\u0662.0.2.1",
                "0.0.0.0", "::", "::1", "127.0.0.2", "224.0.0.1", "ff02::1", "fe80::1", "169.254.1.1", "255.255.255.255",
                "2001:db8::1%eth0", "::ffff:192.0.2.10", "::ffff:127.0.0.1"]:
        refused(parse_address, bad, culprit="invalid address")


def test_subnets():
    assert parse_subnet("198.18.7.0/30").prefixlen == 30
    for bad, culprit in [("198.18.7.1/30", "host bits"), ("198.18.7.0/31", "/30"), ("198.18.7.0/29", "/30"),
                         ("nope", "'nope'"), ("2001:db8::/126", "'2001:db8::/126'"), ("224.0.0.0/30", "multicast"),
                         ("127.0.0.0/30", "loopback"), ("169.254.0.0/30", "link-local"), ("240.0.0.0/30", "reserved"),
                         ("255.255.255.252/30", "reserved"), ("0.0.0.0/30", "this network")]:
        refused(parse_subnet, bad, culprit=culprit)


# --- Config as a whole ---------------------------------------------------------------------------


def config(**kw) -> Config:
    return Config(**{"command": ("true",), "ports": parse_ports(["53"]), **kw})


def test_config_needs_ports_and_command():
    with pytest.raises(UsageError, match="no ports"):
        config(ports=())
    with pytest.raises(UsageError, match="no command"):
        config(command=())
    assert config(command=(), dry_run=True).dry_run


@pytest.mark.parametrize(
    "kw, culprit",
    [
        ({"firewall": "on"}, "--firewall 'on'"),
        ({"helpers": ("ftp",)}, "--helper 'ftp'"),
        ({"helpers": ("tftp",), "ports": parse_ports(["53"])}, "udp port 69"),
        ({"helpers": ("tftp",), "ports": parse_ports(["69/tcp"])}, "udp port 69"),
        ({"ready_fd": -1}, "--ready-fd -1"),
        ({"ready_fd": 1 << 20}, "--ready-fd"),
        ({"user": ""}, "empty user"),
        ({"command": ("",)}, "empty command name"),
        ({"command": ("true", "a\0b")}, "a NUL byte in argument 1 of the command"),
        ({"user": "0:4294967296"}, "out of range"),
        ({"uplinks": (parse_uplink("eth0"), parse_uplink("eth0"))}, "given twice"),
        ({"uplinks": (parse_uplink("eth0"), parse_uplink("eth0=2001:db8::1"))}, "given twice"),
        ({"uplinks": (parse_uplink("eth0=192.0.2.1"), parse_uplink("eth0=192.0.2.2"))}, "given twice"),
    ],
)
def test_invalid_configs(kw, culprit):
    refused(lambda: config(**kw), culprit=culprit)


def test_valid_configs():
    assert config(helpers=("tftp",), ports=parse_ports(["60-70"])).helpers == ("tftp",)
    two = (parse_uplink("eth0=192.0.2.1"), parse_uplink("eth0=2001:db8::1"))  # one gateway per family
    assert config(uplinks=two).uplinks == two
    assert config(ready_fd=0).ready_fd == 0 and config(user="nobody:nogroup").user == "nobody:nogroup"


def test_the_tftp_helper_is_on_by_default_where_udp_69_is_published():
    from nswrap.config import resolve_helpers

    assert resolve_helpers((), parse_ports(["69"])) == ("tftp",)
    assert resolve_helpers((), parse_ports(["60-70/udp"])) == ("tftp",)
    assert resolve_helpers((), parse_ports(["69/tcp", "53"])) == ()
    assert resolve_helpers(("none",), parse_ports(["69"])) == ()
    assert resolve_helpers(("tftp",), parse_ports(["69"])) == ("tftp",)
    with pytest.raises(UsageError, match="none cannot go with tftp"):
        resolve_helpers(("none", "tftp"), parse_ports(["69"]))
