"""changes.py: every change shows itself as shell lines a person can paste (and its undo too).
No root: lines are checked by bash's parser (`bash -n`), sysctls written under a tmp_path /proc/sys.
(tests/system/test_pasteable.py pastes them into a real lab.)
"""

from __future__ import annotations

import errno
import shlex
import shutil
import subprocess

import pytest

import nswrap.changes as changes
import nswrap.facts as facts_module
from nswrap import ruleset, sync
from nswrap.changes import (
    AddRoute,
    AddRule,
    DeleteIptables,
    DeleteLink,
    DeleteRoom,
    DeleteRoute,
    DeleteRule,
    FlushMark,
    InsertRoom,
    NftBatch,
    ServerNetwork,
    SetSysctl,
    read_only_message,
    sysctl_name,
    write_sysctl,
)
from nswrap.errors import NswrapError
from nswrap.facts import sysctl_key
from nswrap.firewall import Blocker, rooms
from nswrap.objects import FR_ACT_UNREACHABLE, Route, Rule
from tests.unit.hosts import MASK, A, N, host, instance

# --- sysctl names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, name",
    [
        ("net/ipv4/conf/eth0/forwarding", "net.ipv4.conf.eth0.forwarding"),
        ("net/ipv4/conf/all/src_valid_mark", "net.ipv4.conf.all.src_valid_mark"),
        ("net/ipv6/conf/eth0/force_forwarding", "net.ipv6.conf.eth0.force_forwarding"),
        ("net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        ("net/ipv4/ip_unprivileged_port_start", "net.ipv4.ip_unprivileged_port_start"),
    ],
)
def test_sysctl_names(key, name):
    assert sysctl_name(key) == name


def test_vlan_sysctl_key_is_the_proc_sys_path():
    """Checked on Linux 6.18: `ip link add a.b type veth ...` shows as /proc/sys/net/ipv4/conf/a.b/."""
    assert sysctl_key(4, "eth0.100", "forwarding") == "net/ipv4/conf/eth0.100/forwarding"


def test_vlan_sysctl_name_is_what_sysctl_8_takes():
    """procps 4.0.2: `sysctl -w net.ipv4.conf.a/b.forwarding=1` works, `net.ipv4.conf.a.b.forwarding` fails."""
    assert sysctl_name("net/ipv4/conf/eth0.100/forwarding") == "net.ipv4.conf.eth0/100.forwarding"


def test_set_sysctl_lines():
    change = SetSysctl("net/ipv4/conf/eth1/src_valid_mark", "1", "0")
    assert change.render() == "sysctl -w net.ipv4.conf.eth1.src_valid_mark=1"
    assert change.render_undo() == "sysctl -w net.ipv4.conf.eth1.src_valid_mark=0"


def test_read_only_message_names_the_docker_sysctl_flags():
    keys = ["net/ipv4/conf/eth0/forwarding", "net/ipv4/conf/eth1/forwarding", "net/ipv4/conf/eth0/src_valid_mark",
            "net/ipv6/conf/eth0/force_forwarding"]
    assert read_only_message(keys) == (
        "cannot write net.ipv4.conf.eth0.forwarding: /proc/sys is read-only here (a container?); start it with "
        "--sysctl net.ipv4.ip_forward=1 --sysctl net.ipv4.conf.all.src_valid_mark=1 --sysctl net.ipv6.conf.all.forwarding=1")


@pytest.fixture
def proc_sys(tmp_path, monkeypatch):
    """A /proc/sys of files under tmp_path, for write_sysctl and read_sysctl."""
    monkeypatch.setattr(changes, "PROC_SYS", str(tmp_path))
    monkeypatch.setattr(facts_module, "PROC_SYS", str(tmp_path))
    (tmp_path / "net/ipv4/conf/eth0").mkdir(parents=True)
    return tmp_path


def test_set_sysctl_does_and_undoes_only_what_is_still_its_own(proc_sys):
    path = proc_sys / "net/ipv4/conf/eth0/forwarding"
    path.write_text("0\n")
    change = SetSysctl("net/ipv4/conf/eth0/forwarding", "1", "0")
    change.do(None)
    assert path.read_text() == "1"
    change.undo(None)
    assert path.read_text() == "0"
    path.write_text("1\n")
    change.do(None)
    path.write_text("2\n")  # someone else changed it since
    change.undo(None)
    assert path.read_text() == "2\n"
    SetSysctl("net/ipv4/conf/gone0/forwarding", "1", "0").undo(None)  # gone with its interface: fine


def test_a_read_only_proc_sys_is_one_line_naming_the_flags(proc_sys, monkeypatch):
    def read_only(path, mode="r"):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(changes, "open", read_only, raising=False)
    with pytest.raises(NswrapError) as raised:
        write_sysctl("net/ipv4/conf/eth0/src_valid_mark", "1")
    assert "--sysctl net.ipv4.conf.all.src_valid_mark=1" in str(raised.value) and "\n" not in str(raised.value)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        write_sysctl("net/ipv4/conf/gone0/forwarding", "1")


# --- the ip, nft, iptables and conntrack lines -------------------------------------------------------------


def test_rule_and_route_lines():
    assert AddRule(Rule(4, 5000, 254, dst=N("198.18.0.0/15"), suppress_prefixlength=0)).render() == \
        "ip rule add to 198.18.0.0/15 lookup 254 suppress_prefixlength 0 priority 5000 protocol 110"
    assert AddRule(Rule(6, 5001, dst=N("fd6e:7377:7261::/48"), action=FR_ACT_UNREACHABLE)).render() == \
        "ip -6 rule add to fd6e:7377:7261::/48 unreachable priority 5001 protocol 110"
    fwmark = Rule(4, 5002, 5001, 0x20000000, MASK)
    assert AddRule(fwmark).render() == "ip rule add fwmark 0x20000000/0xf0000000 lookup 5001 priority 5002 protocol 110"
    assert AddRule(fwmark).render_undo() == DeleteRule(fwmark).render() == \
        "ip rule del fwmark 0x20000000/0xf0000000 lookup 5001 priority 5002 protocol 110"
    route = Route(N("::/0"), "eth0", A("fe80::1"), 5000, metric=1024)
    assert AddRoute(route).render() == "ip -6 route add default via fe80::1 dev eth0 table 5000 proto 110 metric 1024"
    assert DeleteRoute(route).render() == AddRoute(route).render_undo() == \
        "ip -6 route del default via fe80::1 dev eth0 table 5000 proto 110 metric 1024"
    assert DeleteRoute(route).render_undo() == AddRoute(route).render()
    link = Route(N("192.0.2.0/24"), "eth0", None, 5000, 253, A("192.0.2.10"))
    assert AddRoute(link).render() == "ip route add 192.0.2.0/24 dev eth0 scope link src 192.0.2.10 table 5000 proto 110"
    assert AddRoute(link).render_undo() == "ip route del 192.0.2.0/24 dev eth0 table 5000 proto 110"


def test_iptables_and_conntrack_lines():
    room = rooms(Blocker("", "iptables-nft", "DOCKER-USER"))[1]
    assert InsertRoom(room).render() == ("iptables-nft -I DOCKER-USER -o nsw-+ -m conntrack --ctstate DNAT,RELATED,ESTABLISHED "
                                         "-m comment --comment nswrap -j ACCEPT")
    assert InsertRoom(room).render_undo() == DeleteRoom(room).render() == InsertRoom(room).render().replace(" -I ", " -D ", 1)
    assert DeleteRoom(room).render_undo() == InsertRoom(room).render()
    old = DeleteIptables("iptables-legacy", "FORWARD",
                         ("-i", "nsw-abc123", "-m", "comment", "--comment", "nswrap-abc123", "-j", "ACCEPT"))
    assert old.render() == "iptables-legacy -D FORWARD -i nsw-abc123 -m comment --comment nswrap-abc123 -j ACCEPT"
    assert FlushMark(0x30000000, MASK).render().startswith("conntrack -D --mark 0x30000000/0xf0000000")
    assert DeleteLink("nsw-abc123").render() == "ip link del nsw-abc123"


def test_an_nft_batch_is_a_here_document():
    batch = NftBatch("add element inet nswrap ports { udp . 53 }\n", "delete element inet nswrap ports { udp . 53 }\n",
                     "elements")
    assert batch.render() == "nft -f - <<'EOF'  # elements\nadd element inet nswrap ports { udp . 53 }\nEOF"
    assert batch.render_undo() == "nft -f - <<'EOF'\ndelete element inet nswrap ports { udp . 53 }\nEOF"
    assert NftBatch("x\n").render_undo().startswith("#")


# --- a whole plan, as a shell script ------------------------------------------------------------------------


def plan_lines() -> list[str]:
    first = sync.plan(host(), None, None, (instance(), instance("bbbbbb", "69,8080:80/tcp", subnet="198.18.0.8/30",
                                                                  helpers=("tftp",), outbound=False)),
                      MASK, tuple(rooms(Blocker("", "iptables-nft", "FORWARD"))))
    lines = []
    for change in first.changes:
        lines += [change.render(), change.render_undo()]
    network = ServerNetwork(instance(), -1, 1500, "127.0.0.53", unprivileged_ports=True)
    lines += [network.render(), network.render_undo()]
    return lines


def test_rendered_lines_parse_as_shell():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is needed to parse the lines")
    script = "\n".join(plan_lines()) + "\n"
    done = subprocess.run([bash, "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not done.stderr, done.stderr


def test_rendered_lines_start_with_a_command_a_person_has():
    commands = {"ip", "sysctl", "nft", "iptables-nft", "iptables-legacy", "conntrack", "#"}
    for text in plan_lines():
        inside_heredoc = False
        for line in text.splitlines():
            if inside_heredoc:
                inside_heredoc = line != "EOF"
                continue
            words = shlex.split(line, comments=True) or ["#"]
            assert words[0] in commands, line
            assert "..." not in line, line
            inside_heredoc = "<<'EOF'" in line


def test_here_documents_never_end_early():
    for text in plan_lines():
        if "<<'EOF'" in text:
            body = text.split("\n")[1:-1]
            assert "EOF" not in body


def test_the_table_batch_is_the_ruleset():
    first = sync.plan(host(), None, None, (instance(),), MASK)
    [batch] = [c for c in first.changes if isinstance(c, NftBatch)]
    assert batch.render() == f"nft -f - <<'EOF'  # table inet nswrap (re)built\n{ruleset.table_text(first.datapath)}EOF"
