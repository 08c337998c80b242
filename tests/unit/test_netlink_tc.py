"""nswrap.netlink.tc pinned to the kernel: filter dumps a real kernel sent (fixtures/netlink/tc.json,
made by its capture.py) decoded as made, as `tc -j filter show` says and as pyroute2 reads them;
requests encoded byte by byte and read back by pyroute2; the Tc client's choices over a fake socket.
"""

from __future__ import annotations

import errno
import json
import pathlib
import socket
import struct

import pytest

from nswrap.netlink import codec, tc

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "netlink" / "tc.json").read_text())


def datagrams(call: str) -> list[bytes]:
    return [bytes.fromhex(h) for c in FIXTURE["calls"] if c["call"] == call for h in c["datagrams"]]


def dumped(call: str) -> list[codec.Message]:
    return [m for data in datagrams(call) for m in codec.messages(data) if m.kind == tc.RTM_NEWTFILTER]


MADE = next(c["filters"] for c in FIXTURE["calls"] if c["call"] == "made")


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_dumped_filters_decode_as_made_and_as_tc_says(direction):
    found = sorted(f for f in map(tc.parse_filter, dumped(f"filters(veth0, {direction})")) if f is not None)
    made = sorted(tc.Filter(f["priority"], f["handle"], f["name"], f["prog_id"], True, f["tag"])
                  for f in MADE if f["direction"] == direction)
    assert found == made and found
    said = [entry for entry in FIXTURE["ip"][f"tc -j filter show dev veth0 {direction}"] if "options" in entry]
    assert sorted((e["pref"], int(e["options"]["handle"], 16), e["options"]["bpf_name"], e["options"]["prog"]["id"],
                   e["options"]["direct-action"], e["options"]["prog"]["tag"]) for e in said) == \
        [(f.priority, f.handle, f.name, f.prog_id, f.direct, f.tag) for f in found]


def test_the_priority_heads_of_a_dump_are_no_filters():
    """The kernel sends one message per priority (handle 0, no options) before its filters, and
    a priority's filters newest first."""
    messages = dumped("filters(veth0, ingress)")
    heads = [m for m in messages if tc.parse_filter(m) is None]
    assert len(heads) == 2 and len(messages) == 5
    assert [f.handle for f in map(tc.parse_filter, messages) if f is not None] == [2, 1, 0x10]


def test_an_interface_without_clsact_dumps_nothing():
    assert dumped("filters(veth1, ingress)") == []
    assert [m.kind for data in datagrams("filters(veth1, ingress)") for m in codec.messages(data)] == [codec.NLMSG_DONE]


def test_pyroute2_reads_the_dump_the_same_way():
    marshal = pytest.importorskip("pyroute2.netlink.rtnl.marshal")
    theirs = [m for data in datagrams("filters(veth0, ingress)") for m in marshal.MarshalRtnl().parse(data)
              if m["header"]["type"] == tc.RTM_NEWTFILTER and m.get_attr("TCA_OPTIONS")]
    ours = [f for f in map(tc.parse_filter, dumped("filters(veth0, ingress)")) if f is not None]
    assert [(m["info"] >> 16, m["handle"], m.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME")) for m in theirs] == \
        [(f.priority, f.handle, f.name) for f in ours]


def test_a_cut_dump_is_malformed_not_an_index_error():
    message = next(m for m in dumped("filters(veth0, ingress)") if tc.parse_filter(m) is not None)
    for length in range(len(message.body)):
        cut = codec.Message(message.kind, message.flags, message.body[:length])
        try:
            tc.parse_filter(cut)
        except codec.Malformed:
            pass


# --- requests --------------------------------------------------------------------------------


def tcmsg(ifindex: int, handle: int, parent: int, info: int) -> bytes:
    return struct.pack("=BxxxiIII", 0, ifindex, handle, parent, info)


def test_the_clsact_request_bytes():
    kind, flags, body = tc.qdisc_request("add", 7)
    assert (kind, flags) == (tc.RTM_NEWQDISC, codec.NLM_F_CREATE | codec.NLM_F_EXCL)
    assert body == tcmsg(7, 0xFFFF0000, 0xFFFFFFF1, 0) + struct.pack("=HH", 11, 1) + b"clsact\0" + b"\0"
    assert tc.qdisc_request("del", 7) == (tc.RTM_DELQDISC, 0, body)


def test_the_filter_request_bytes():
    kind, flags, body = tc.filter_request(7, "egress", 5, "up", priority=3, handle=2)
    assert (kind, flags) == (tc.RTM_NEWTFILTER, codec.NLM_F_CREATE | codec.NLM_F_REPLACE)
    info = (3 << 16) | socket.htons(0x0003)
    options = (struct.pack("=HHI", 8, 6, 5) + struct.pack("=HH", 7, 7) + b"up\0" + b"\0"
               + struct.pack("=HHI", 8, 8, 1))
    assert body == (tcmsg(7, 2, 0xFFFFFFF3, info) + struct.pack("=HH", 8, 1) + b"bpf\0"
                    + struct.pack("=HH", 4 + len(options), 2 | codec.NLA_F_NESTED) + options)
    assert tc.filter_request(7, "ingress", 5, "up", 3, 2)[2][12:16] == struct.pack("=I", 0xFFFFFFF2)
    assert tc.filter_delete(7, "egress", 3, 2) == (tc.RTM_DELTFILTER, 0, body[:28])
    assert tc.filter_dump(7, "ingress") == (tc.RTM_GETTFILTER, tcmsg(7, 0, 0xFFFFFFF2, 0))


def test_pyroute2_reads_the_requests():
    marshal = pytest.importorskip("pyroute2.netlink.rtnl.marshal")
    kind, flags, body = tc.filter_request(7, "ingress", 5, "count:[tc/ingress]", 3, 2)
    m = next(iter(marshal.MarshalRtnl().parse(codec.HEADER.pack(16 + len(body), kind, flags, 1, 0) + body)))
    assert (m["index"], m["handle"], m["parent"], m["info"] >> 16, socket.ntohs(m["info"] & 0xFFFF)) == \
        (7, 2, 0xFFFFFFF2, 3, 0x0003)
    assert m.get_attr("TCA_KIND") == "bpf"
    options = [(a[0], a[1]) for a in m.get_attr("TCA_OPTIONS")["attrs"]]
    assert options == [("TCA_BPF_FD", 5), ("TCA_BPF_NAME", "count:[tc/ingress]"), ("TCA_BPF_FLAGS", 1)]


@pytest.mark.parametrize("args, message", [
    (("sideways", 0), "tc direction 'sideways': ingress or egress"),
    (("ingress", 0), "tc filter priority 0: 1 to 65535"),
    (("ingress", 0x10000), "tc filter priority 65536: 1 to 65535"),
])
def test_bad_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        tc.filter_delete(7, args[0], args[1])


# --- the client ------------------------------------------------------------------------------


class FakeSocket:
    """Answers batches with the given errnos and dumps with the given messages, per dump request."""

    def __init__(self, codes: list[int] | None = None, dumps: dict[bytes, list[codec.Message]] | None = None):
        self.codes, self.dumps, self.sent = list(codes or []), dumps or {}, []

    def batch(self, requests, ignore=frozenset()):
        results = []
        for request in requests:
            self.sent.append(request)
            code = self.codes.pop(0) if self.codes else 0
            if code and code not in ignore:
                raise codec.NetlinkError(code, "fake")
            results.append(code)
        return results

    def dump(self, kind, body):
        self.sent.append((kind, body))
        return self.dumps.get(body, [])

    def close(self):
        pass


def client(sock: FakeSocket) -> tc.Tc:
    t = tc.Tc.__new__(tc.Tc)
    t.sock = sock  # type: ignore[assignment]
    return t


def test_ensure_clsact_takes_an_existing_one():
    assert client(FakeSocket([0])).ensure_clsact(7) is True
    assert client(FakeSocket([errno.EEXIST])).ensure_clsact(7) is False
    with pytest.raises(OSError, match="fake"):
        client(FakeSocket([errno.EPERM])).ensure_clsact(7)


def test_detach_takes_what_is_gone_already():
    assert client(FakeSocket([0])).detach(7, "ingress", 3) is True
    assert client(FakeSocket([errno.ENOENT])).detach(7, "ingress", 3) is False
    assert client(FakeSocket([errno.EINVAL])).detach(7, "ingress", 3) is False  # no clsact


def test_clsact_stays_while_any_filter_is_on_it():
    head = codec.Message(tc.RTM_NEWTFILTER, 0, tcmsg(7, 0, 0xFFFFFFF3, (1 << 16) | 0x0300) + codec.text(tc.TCA_KIND, "u32"))
    sock = FakeSocket(dumps={tc.filter_dump(7, "egress")[1]: [head]})
    assert client(sock).remove_clsact(7) is False
    assert all(kind == tc.RTM_GETTFILTER for kind, *_ in sock.sent)
    sock = FakeSocket([0])
    assert client(sock).remove_clsact(7) is True and sock.sent[-1] == tc.qdisc_request("del", 7)
    assert client(FakeSocket([errno.ENOENT])).remove_clsact(7) is False


def test_filters_are_sorted_and_only_bpf_ones():
    sock = FakeSocket(dumps={tc.filter_dump(7, "ingress")[1]: dumped("filters(veth0, ingress)")})
    assert [(f.priority, f.handle) for f in client(sock).filters(7, "ingress")] == [(1, 1), (1, 2), (5, 0x10)]
