"""The adapters fail closed: nft.py and iptables.py turn a command that could not run into an
NswrapError ("could not look" is never "nothing there"), and "already gone" into success. The
commands are replaced by canned results; facts.py's /proc and resolv.conf readers get canned files.
No root, no nft, no iptables.
"""

from __future__ import annotations

import io
import ipaddress
import subprocess

import pytest

import nswrap.facts as facts
from nswrap import iptables, nft
from nswrap.errors import NswrapError
from tests.unit.hosts import A


def done(returncode: int = 0, stdout: str = "", stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], returncode, stdout, stderr)


@pytest.fixture
def nft_says(monkeypatch):
    """nft_says(result) -> the argv nswrap ran, once it ran."""
    calls: list[list[str]] = []

    def install(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
        def fake(args, text=None, namespace_fd=None):
            calls.append(args)
            return result

        monkeypatch.setattr(nft, "_nft", fake)
        return calls

    return install


def test_no_table_is_none_but_an_unreadable_one_raises(nft_says):
    nft_says(done(1, stderr="Error: No such file or directory\nlist table inet nswrap\n"))
    assert nft.read_table() is None
    nft_says(done(1, stderr="\nError: Operation not permitted (you must be root)\n"))
    with pytest.raises(NswrapError, match="^nft list table inet nswrap: Error: Operation not permitted"):
        nft.read_table()


def test_listings_that_fail_raise(nft_says):
    nft_says(done(1, stderr="Error: Could not process rule: Operation not permitted\n"))
    for listing, what in ((nft.tables, "nft list tables"), (nft.ruleset, "nft list ruleset")):
        with pytest.raises(NswrapError, match=f"^{what}: Error: Could not process rule"):
            listing()


def test_listings(nft_says):
    calls = nft_says(done(0, '{"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "nswrap", "handle": 1}},'
                            '{"table": {"family": "ip", "name": "filter", "handle": 2}}]}'))
    assert nft.tables() == [("inet", "nswrap"), ("ip", "filter")]
    assert nft.ruleset()[1] == {"table": {"family": "inet", "name": "nswrap", "handle": 1}}
    assert calls == [["-j", "list", "tables"], ["-j", "list", "ruleset"]]


def test_a_refused_batch_names_the_first_error(nft_says):
    calls = nft_says(done(1, stderr="\n/dev/stdin:3:1-5: Error: syntax error\nmore\n"))
    with pytest.raises(NswrapError, match="^nft refused the ruleset: /dev/stdin:3:1-5: Error: syntax error$"):
        nft.apply("bogus\n")
    with pytest.raises(NswrapError, match="^/dev/stdin:3:1-5: Error: syntax error$"):
        nft.check("bogus\n")
    assert calls == [["-f", "-"], ["-c", "-f", "-"]]
    nft_says(done(1, stderr=""))
    with pytest.raises(NswrapError, match="unknown error"):
        nft.apply("x\n")


def test_deleting_a_table_already_gone_is_fine(nft_says):
    nft_says(done(1, stderr="Error: Could not process rule: No such file or directory\n"))
    nft.delete_table("inet", "nswrap-abc123")
    nft_says(done(1, stderr="Error: Could not process rule: Device or resource busy\n"))
    with pytest.raises(NswrapError, match="^nft delete table inet nswrap-abc123: Error"):
        nft.delete_table("inet", "nswrap-abc123")


def test_nft_missing_is_one_line(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "nft")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(NswrapError, match="^nft not found: install nftables$"):
        nft.apply("x\n")


# --- iptables -----------------------------------------------------------------------------------


@pytest.fixture
def iptables_says(monkeypatch):
    calls: list[list[str]] = []

    def install(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
        def fake(argv):
            calls.append(argv)
            return result

        monkeypatch.setattr(iptables, "_run", fake)
        return calls

    return install


RULE = ["-i", "nsw-+", "-m", "comment", "--comment", "nswrap", "-j", "ACCEPT"]


def test_iptables_insert_and_delete(iptables_says):
    calls = iptables_says(done(0))
    iptables.run("iptables-nft", "-I", "DOCKER-USER", RULE)
    assert calls == [["iptables-nft", "-w", "5", "-I", "DOCKER-USER", *RULE]]


@pytest.mark.parametrize("message", ["iptables: Bad rule (does a matching rule exist in that chain?).",
                                     "iptables v1.8.9 (nf_tables): Chain 'DOCKER-USER' does not exist\n"
                                     "No chain/target/match by that name."])
def test_deleting_an_iptables_rule_already_gone_is_fine(iptables_says, message):
    iptables_says(done(1, stderr=message + "\n"))
    iptables.run("iptables-nft", "-D", "FORWARD", RULE)
    with pytest.raises(NswrapError, match="^iptables-nft -I FORWARD -i nsw-\\+ .*: "):
        iptables.run("iptables-nft", "-I", "FORWARD", RULE)


def test_an_iptables_failure_is_one_line_naming_the_rule(iptables_says):
    iptables_says(done(4, stderr="Another app is currently holding the xtables lock. Stopped waiting after 5s.\n"))
    with pytest.raises(NswrapError) as raised:
        iptables.run("iptables-legacy", "-D", "FORWARD", RULE)
    assert str(raised.value) == ("iptables-legacy -D FORWARD -i nsw-+ -m comment --comment nswrap -j ACCEPT: "
                                 "Another app is currently holding the xtables lock. Stopped waiting after 5s.")
    iptables_says(done(3, stderr=""))
    with pytest.raises(NswrapError, match=": exit 3$"):
        iptables.run("iptables-legacy", "-I", "FORWARD", RULE)


def test_legacy_tables_are_read_only_when_loaded(iptables_says, monkeypatch, tmp_path):
    calls = iptables_says(done(0, "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n"))
    monkeypatch.setattr(iptables, "LEGACY_TABLES", {"iptables-legacy": str(tmp_path / "absent")})
    assert iptables.legacy_loaded() == [] and iptables.legacy_save() == "" and calls == []  # listing would load them
    names = tmp_path / "ip_tables_names"
    names.write_text("filter\nmangle\n")
    monkeypatch.setattr(iptables, "LEGACY_TABLES", {"iptables-legacy": str(names)})
    assert iptables.legacy_loaded() == ["filter", "mangle"]
    assert iptables.legacy_save().startswith("*filter") and calls == [["iptables-legacy-save"]]
    iptables_says(done(1, stderr="iptables-legacy-save: permission denied\n"))
    with pytest.raises(NswrapError, match="^iptables-legacy-save: iptables-legacy-save: permission denied$"):
        iptables.legacy_save()


def test_iptables_rules_of_a_missing_table(iptables_says):
    iptables_says(done(1, stderr="iptables v1.8.9 (legacy): can't initialize iptables table `filter': Table does not exist\n"))
    assert iptables.rules("iptables-legacy") == []
    iptables_says(done(0, "-P FORWARD DROP\n-A FORWARD -m comment --comment \"two words\" -j ACCEPT\n"))
    assert iptables.rules("iptables-nft") == [["-P", "FORWARD", "DROP"],
                                              ["-A", "FORWARD", "-m", "comment", "--comment", "two words", "-j", "ACCEPT"]]
    iptables_says(done(4, stderr="Permission denied (you must be root)\n"))
    with pytest.raises(NswrapError, match="-S: Permission denied"):
        iptables.rules("iptables-nft")


# --- facts.py's readers --------------------------------------------------------------------------


@pytest.fixture
def files(monkeypatch):
    """files({path: text}): what facts.py's open() finds; other paths do not exist."""

    def install(contents: dict[str, str]) -> None:
        def fake_open(path, *args, **kwargs):
            if path not in contents:
                raise FileNotFoundError(2, "No such file or directory", path)
            return io.StringIO(contents[path])

        monkeypatch.setattr(facts, "open", fake_open, raising=False)

    return install


HEADER_UDP = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer\n"
HEADER_TCP = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def test_listeners_are_sock_diags_in_a_stable_order(monkeypatch):
    """Every socket sock_diag reports, any address, sorted (Facts compare equal from one look to the next)."""
    from nswrap import netlink
    from nswrap.objects import Listener

    found = [Listener("udp", A("::"), 53, 9, v6only=True), Listener("tcp", A("10.0.2.15"), 22, 8),
             Listener("udp", A("127.0.0.53"), 53, 7), Listener("tcp", A("0.0.0.0"), 22, 6)]
    monkeypatch.setattr(netlink, "listeners", lambda: list(found))
    assert facts._listeners() == (found[3], found[1], found[2], found[0])


def test_socket_owners_reads_the_descriptors_of_every_process(tmp_path):
    """/proc/PID/fd/N -> socket:[INODE]: the lowest pid holding it (a forking server's parent) and
    its command name; a process that vanished mid-walk or a socket no process holds is left out."""
    def process(pid: int, comm: str, links: dict[str, str]) -> None:
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        for fd, target in links.items():
            (tmp_path / str(pid) / "fd" / fd).symlink_to(target)

    process(812, "sshd", {"0": "/dev/null", "3": "socket:[1001]"})
    process(9000, "sshd", {"3": "socket:[1001]"})  # a session's child holds the listener too
    process(77, "python3", {"5": "socket:[1002]", "6": "pipe:[5]"})
    (tmp_path / "31").mkdir()  # gone: no fd directory
    (tmp_path / "self").mkdir()
    assert facts.socket_owners({1001, 1002, 1003, 0}, str(tmp_path)) == {1001: (812, "sshd"), 1002: (77, "python3")}
    assert facts.socket_owners(set(), str(tmp_path)) == {}


def test_socket_owners_finds_this_process():
    import os
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # never bound: nothing on the network
        inode = os.fstat(sock.fileno()).st_ino
        with open("/proc/self/comm") as f:
            comm = f.read().strip()
        assert facts.socket_owners({inode}) == {inode: (os.getpid(), comm)}


@pytest.mark.parametrize(
    "resolv, stub",
    [
        ("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch example\n", A("127.0.0.53")),
        ("# Docker's embedded DNS\nnameserver 127.0.0.11\noptions ndots:0\n", A("127.0.0.11")),
        ("nameserver ::1\nnameserver 127.0.0.1\n", A("127.0.0.1")),
        ("nameserver ::1\n", None),  # no IPv4 loopback to reach
        ("nameserver 127.0.0.53\nnameserver 192.0.2.53\n", None),  # the server can use the other one
        ("nameserver fe80::1%eth0\n", None),
        ("nameserver\nnameserver not-an-address\n", None),
        ("", None),
    ],
)
def test_resolver_stub(files, resolv, stub):
    files({"/etc/resolv.conf": resolv})
    assert facts._resolver_stub() == stub


def test_no_resolv_conf(files):
    files({})
    assert facts._resolver_stub() is None


def test_sysctl_keys_the_datapath_reads():
    assert facts.sysctl_keys(["eth0"]) == [
        "net/ipv4/conf/all/src_valid_mark", "net/ipv4/conf/all/route_localnet", "net/ipv6/conf/all/forwarding",
        "net/ipv4/conf/all/forwarding", "net/ipv6/conf/default/forwarding", "net/ipv6/conf/default/accept_ra",
        "net/ipv4/conf/eth0/forwarding", "net/ipv4/conf/eth0/src_valid_mark", "net/ipv6/conf/eth0/force_forwarding"]


def test_read_sysctl(tmp_path, monkeypatch):
    monkeypatch.setattr(facts, "PROC_SYS", str(tmp_path))
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "x").write_text("1\n")
    assert facts.read_sysctl("net/x") == "1" and facts.read_sysctl("net/absent") is None


def test_netns_id_names_this_namespace():
    first, second = facts.netns_id(), facts.netns_id()
    assert first == second and first[0] in "ci" and first[1:].isdigit()


def test_conntrack_dumps_are_filtered_here_too():
    """Kernels before 5.8 ignore the dump filters and send every entry: the same filter runs here."""
    from nswrap.netlink import codec, conntrack as nl
    from nswrap.objects import FAMILIES

    def entry(proto: int, dst: str, dport: int, status: int = 0) -> codec.Message:
        address = ipaddress.ip_address(dst)
        orig = nl.tuple_attrs(address.version, dst=address, proto=proto, dport=dport)
        body = codec.NFGEN.pack(FAMILIES[address.version].af, 0, 0) + codec.nested(nl.CTA_TUPLE_ORIG, orig)
        return codec.Message(0, 0, body + codec.be32(nl.CTA_STATUS, status))

    everything = [entry(17, "192.0.2.10", 53), entry(6, "192.0.2.10", 53), entry(17, "192.0.2.11", 53),
                  entry(17, "192.0.2.10", 54), entry(17, "2001:db8::10", 53), entry(17, "192.0.2.10", 123, nl.IPS_DST_NAT)]

    class OldKernel:
        def dump_each(self, kind, body, deadline=None):
            return iter(everything)

    ct = object.__new__(nl.Conntrack)
    ct.sock = OldKernel()
    found = ct.flows(4, orig_proto=17, orig_dport=53, orig_dst=ipaddress.ip_address("192.0.2.10"))
    assert [(f.proto, str(f.dst), f.dport) for f in found] == [(17, "192.0.2.10", 53)]
    assert [f.dport for f in ct.flows(None, dnat_only=True)] == [123]
    assert len(ct.flows(6)) == 1


def test_conntrack_tally_of_dnated_flows_by_mark_and_server():
    """`nswrap list` counts without building a Flow per entry: read straight from the messages."""
    from nswrap.netlink import codec, conntrack as nl
    from nswrap.objects import FAMILIES

    def entry(mark: int, server: str, status: int = nl.IPS_DST_NAT) -> codec.Message:
        address = ipaddress.ip_address(server)
        reply = codec.nested(nl.CTA_TUPLE_IP, codec.attr(nl.CTA_IP_SRC[address.version], address.packed))
        body = (codec.NFGEN.pack(FAMILIES[address.version].af, 0, 0) + codec.nested(nl.CTA_TUPLE_REPLY, reply)
                + codec.be32(nl.CTA_STATUS, status) + codec.be32(nl.CTA_MARK, mark))
        return codec.Message(0, 0, body)

    everything = [entry(0x10000000, "198.18.0.2"), entry(0x10000000, "198.18.0.2"), entry(0x20000000, "198.18.0.2"),
                  entry(0x10000000, "fd6e:7377:7261::2"), entry(0x10000000, "198.18.0.2", status=0)]

    class Kernel:
        def dump_each(self, kind, body, deadline=None):
            return iter(everything)

    ct = object.__new__(nl.Conntrack)
    ct.sock = Kernel()
    v4, v6 = ipaddress.ip_address("198.18.0.2").packed, ipaddress.ip_address("fd6e:7377:7261::2").packed
    assert ct.tally_dnat() == ({(0x10000000, v4): 2, (0x20000000, v4): 1, (0x10000000, v6): 1}, True)


@pytest.mark.parametrize("call", [lambda: iptables.rules("iptables-nft"), lambda: nft.apply("flush ruleset\n")],
                         ids=["iptables", "nft"])
def test_a_tool_that_hangs_is_one_clear_error(monkeypatch, call):
    def hang(argv, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs.get("timeout"))

    monkeypatch.setattr(subprocess, "run", hang)
    with pytest.raises(NswrapError, match="did not answer within"):
        call()


def test_iptables_errors_are_their_message_line():
    assert iptables._last_line("iptables v1.8.9 (nf_tables): unknown option \"--bogus\"\n"
                               "Try `iptables -h' or 'iptables --help' for more information.\n") == \
        'iptables v1.8.9 (nf_tables): unknown option "--bogus"'
    assert iptables._last_line("") == ""
