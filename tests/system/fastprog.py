"""The fast path's programs run on packets this module builds, for test_fastpath_programs.py: run
as a process of its own inside a throwaway namespace,

    ip netns exec NS python -m tests.system.fastprog CASE

it makes three veths there (up1, up2: uplinks; v1: a server's), loads nswrap's object with fresh
maps (nswrap.bpf.fast.load), publishes endpoints, runs each packet through `tc/uplink` or
`tc/veth` with BPF_PROG_TEST_RUN (nothing is attached, no packet is sent) and prints one JSON
object: what each packet became, parsed here, its checksums recomputed here (the oracle: RFC 768,
793, 792, 4443 arithmetic, not the programs' helpers), and the flows map where a case needs it.
The struct layouts are this module's own reading of nswrap/bpf/fastpath.bpf.c.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys

from nswrap.bpf import fast, syscall

BPF_PROG_TEST_RUN = 10
TEST_RUN = struct.Struct("=IIIIQQIIIIQQIII")  # union bpf_attr's `test`
SKB_IFINDEX, SKB_SIZE = 40, 192  # struct __sk_buff: ifindex's offset; its size (zeros beyond are allowed)
TC_ACT_UNSPEC, TC_ACT_REDIRECT = -1, 7
UDP, TCP = 17, 6
SYN, ACK = 0x02, 0x10
ETH = b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02"

C4, C6 = "192.0.2.50", "2001:db8:1::50"  # the client
A4, A6 = ("198.51.100.10", "198.51.100.11"), ("2001:db8:2::10", "2001:db8:2::11")  # the host's, asked
S4, S6 = "198.18.0.2", "fd6e:7377:7261::2"  # the server's
TIMEOUT = 30


class Programs:
    def __init__(self) -> None:
        for name in ("up1", "up2", "v1"):
            subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
        self.index = {name: socket.if_nametoindex(name) for name in ("up1", "up2", "v1")}
        self.loaded = fast.load()
        for uplink in ("up1", "up2"):
            for net in ("0.0.0.0/0", "::/0"):
                self.allow(uplink, net)
            for port, proto in ((123, UDP), (80, TCP), (5300, UDP)):
                for asked in (*A4, *A6):
                    self.publish(uplink, proto, port, asked)

    def allow(self, uplink: str, network: str) -> None:
        net = ipaddress.ip_network(network)
        addr = (bytes(10) + b"\xff\xff" + net.network_address.packed) if net.version == 4 else net.network_address.packed
        bits = net.prefixlen + (96 if net.version == 4 else 0)
        syscall.map_update(self.loaded.maps["sources"], struct.pack("=II16s", 32 + bits, self.index[uplink], addr), b"\x01")

    def publish(self, uplink: str, proto: int, port: int, asked: str) -> None:
        version = ipaddress.ip_address(asked).version
        server = S4 if version == 4 else S6
        key = struct.pack("=IBB2s16s", self.index[uplink], version, proto, port.to_bytes(2, "big"), _a16(asked))
        value = struct.pack("=II16s2s2xI", self.index["v1"], 0x10000000, _a16(server), port.to_bytes(2, "big"), TIMEOUT)
        syscall.map_update(self.loaded.maps["published"], key, value)

    def run(self, program: str, frame: bytes, ifname: str) -> tuple[int, bytes]:
        fd = self.loaded.programs[program]
        ctx = bytearray(SKB_SIZE)
        struct.pack_into("=I", ctx, SKB_IFINDEX, self.index[ifname])
        data_in = ctypes.create_string_buffer(frame, len(frame))
        data_out = ctypes.create_string_buffer(len(frame) + 256)
        ctx_in = ctypes.create_string_buffer(bytes(ctx), SKB_SIZE)
        result, code, attr = syscall._syscall(BPF_PROG_TEST_RUN, TEST_RUN.pack(
            fd, 0, len(frame), len(data_out), ctypes.addressof(data_in), ctypes.addressof(data_out), 1, 0,
            SKB_SIZE, 0, ctypes.addressof(ctx_in), 0, 0, 0, 0))
        if result < 0:
            raise OSError(code, f"BPF_PROG_TEST_RUN: {os.strerror(code)}")
        retval, _, size = struct.unpack_from("=III", attr.raw, 4)
        return ctypes.c_int32(retval).value, data_out.raw[:size]

    def ask(self, client: str, port: int, asked: str, asked_port: int, proto: int = UDP, uplink: str = "up1",
            flags: int = SYN) -> dict:
        """A client's packet through an uplink: the verdict and the packet the server gets."""
        verdict, out = self.run("nswrap_uplink", packet(client, asked, port, asked_port, proto, flags=flags), uplink)
        return {"verdict": verdict, **(parse(out) if verdict == TC_ACT_REDIRECT else {})}

    def answer(self, seen: dict, proto: int = UDP, zero: bool = False) -> dict:
        """The server's answer to what it got (`seen`), through its veth."""
        frame = packet(seen["dst"], seen["src"], seen["dport"], seen["sport"], proto, zero=zero, flags=ACK)
        verdict, out = self.run("nswrap_veth", frame, "v1")
        return {"verdict": verdict, **(parse(out) if verdict == TC_ACT_REDIRECT else {})}

    def flows(self) -> list[dict]:
        found = []
        for key, value in syscall.map_items(self.loaded.maps["flows"], 40, 36):
            size = 4 if key[36] == 4 else 16
            found.append({"client": str(ipaddress.ip_address(key[:size])), "port_seen": int.from_bytes(key[32:34], "big"),
                          "proto": key[37], "asked": str(ipaddress.ip_address(value[:size])),
                          "client_port": int.from_bytes(value[18:20], "big"), "key": key.hex(), "value": value.hex()})
        return found

    def forget(self, client: str, port_seen: int, proto: int) -> None:
        """The LRU evicted this flow (as a flood makes it)."""
        for f in self.flows():
            if (f["client"], f["port_seen"], f["proto"]) == (client, port_seen, proto):
                syscall.map_delete(self.loaded.maps["flows"], bytes.fromhex(f["key"]))

    def quiet(self, client: str, port_seen: int, proto: int) -> None:
        """This flow's client last sent longer ago than its timeout."""
        for f in self.flows():
            if (f["client"], f["port_seen"], f["proto"]) == (client, port_seen, proto):
                value = bytearray.fromhex(f["value"])
                struct.pack_into("=I", value, 32, struct.unpack_from("=I", value, 32)[0] - TIMEOUT - 1)
                syscall.map_update(self.loaded.maps["flows"], bytes.fromhex(f["key"]), bytes(value))


def _a16(address: str) -> bytes:
    return ipaddress.ip_address(address).packed.ljust(16, b"\0")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def _ip(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    if len(src) == 4:
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst))
        struct.pack_into("!H", header, 10, checksum(bytes(header)))
        return ETH + b"\x08\x00" + bytes(header) + payload
    return ETH + b"\x86\xdd" + struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, src, dst) + payload


def packet(src: str, dst: str, sport: int, dport: int, proto: int = UDP, zero: bool = False, flags: int = SYN) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    payload = b"hello"
    if proto == UDP:
        l4 = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
        where = 6
    else:
        l4 = bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0) + payload)
        where = 16
    if not zero:
        total = checksum(_pseudo(s, d, proto, len(l4)) + bytes(l4))
        struct.pack_into("!H", l4, where, 0xFFFF if proto == UDP and total == 0 else total)  # UDP's 0: none
    return _ip(s, d, proto, bytes(l4))


def _split(frame: bytes) -> tuple[bytes, bytes, int, bytes, bool]:
    """Source, destination, protocol, payload and whether the IP header's checksum holds."""
    if frame[12:14] == b"\x08\x00":
        header = frame[14:34]
        return header[12:16], header[16:20], header[9], frame[34:], checksum(header) == 0
    header = frame[14:54]
    return header[8:24], header[24:40], header[6], frame[54:], True


def parse(frame: bytes) -> dict:
    src, dst, proto, l4, ip_ok = _split(frame)
    out = {"src": str(ipaddress.ip_address(src)), "dst": str(ipaddress.ip_address(dst)), "ip_ok": ip_ok}
    if proto == 1 or proto == 58:  # an ICMP error: its checksum, and the packet it quotes
        pseudo = _pseudo(src, dst, 58, len(l4)) if proto == 58 else b""
        quoted = ETH + (b"\x08\x00" if proto == 1 else b"\x86\xdd") + l4[8:]
        qsrc, qdst, _, ql4, q_ok = _split(quoted)
        return {**out, "icmp_ok": checksum(pseudo + l4) == 0, "quoted_ip_ok": q_ok,
                "qsrc": str(ipaddress.ip_address(qsrc)), "qdst": str(ipaddress.ip_address(qdst)),
                "qsport": int.from_bytes(ql4[0:2], "big"), "qdport": int.from_bytes(ql4[2:4], "big")}
    where = 6 if proto == UDP else 16
    stored = int.from_bytes(l4[where:where + 2], "big")
    l4_ok = "zero" if proto == UDP and stored == 0 else checksum(_pseudo(src, dst, proto, len(l4)) + l4) == 0
    return {**out, "sport": int.from_bytes(l4[0:2], "big"), "dport": int.from_bytes(l4[2:4], "big"), "l4_ok": l4_ok}


def icmp_error(src: str, dst: str, about: bytes) -> bytes:
    """A port unreachable from `src` to `dst` quoting the frame `about` (its IP header and 8 bytes)."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        body = bytearray(struct.pack("!BBHI", 3, 3, 0, 0) + about[14:14 + 28])
        struct.pack_into("!H", body, 2, checksum(bytes(body)))
        return _ip(s, d, 1, bytes(body))
    body = bytearray(struct.pack("!BBHI", 1, 4, 0, 0) + about[14:14 + 48])
    struct.pack_into("!H", body, 2, checksum(_pseudo(s, d, 58, len(body)) + bytes(body)))
    return _ip(s, d, 58, bytes(body))


def case_two_addresses(p: Programs) -> dict:
    """One client port asks both addresses, each protocol and family; the answers; the same again."""
    out = {}
    for client, asked in ((C4, A4), (C6, A6)):
        for proto, port, sport in ((UDP, 123, 123), (UDP, 5300, 700), (UDP, 5300, 40000), (TCP, 80, 40000)):
            name = f"{client} {proto} {sport}"
            got = [p.ask(client, sport, address, port, proto) for address in (*asked, *asked)]
            out[name] = {"asked": list(asked), "seen": got, "answers": [p.answer(g, proto) for g in got]}
    zero = p.ask(C4, 40001, A4[0], 5300), p.ask(C4, 40001, A4[1], 5300)
    out["zero"] = [p.answer(seen, UDP, zero=True) for seen in zero]  # IPv4 UDP without a checksum
    return out


def case_tcp_keeps_its_port(p: Programs) -> dict:
    first = p.ask(C4, 41000, A4[0], 80, TCP)
    second = p.ask(C4, 41000, A4[1], 80, TCP)
    p.forget(C4, 41000, TCP)  # the first flow's entry evicted: the second's next segment
    after = p.ask(C4, 41000, A4[1], 80, TCP, flags=ACK)
    again = p.ask(C4, 41000, A4[0], 80, TCP)  # a new connection to the first address
    p.forget(C4, second["sport"], TCP)  # the second's own entry evicted, the first live
    lost = p.ask(C4, 41000, A4[1], 80, TCP, flags=ACK)
    return {"first": first, "second": second, "after": after, "again": again, "lost": lost}


def case_quiet(p: Programs) -> dict:
    """The first flow quiet for its timeout: a new flow from that port takes the port itself."""
    first = p.ask(C4, 42000, A4[0], 5300)
    p.quiet(C4, 42000, UDP)
    return {"first": first, "then": p.ask(C4, 42000, A4[1], 5300)}


def case_errors(p: Programs) -> dict:
    """ICMP errors about a flow given another port: from its server (a closed port) and from its
    client (about an answer), and a client tuple that asks one address through two uplinks."""
    out = {}
    for client, asked in ((C4, A4), (C6, A6)):
        p.ask(client, 43000, asked[0], 5300)
        seen = p.ask(client, 43000, asked[1], 5300)
        to_server = packet(client, seen["dst"], seen["sport"], 5300)
        closed = p.run("nswrap_veth", icmp_error(seen["dst"], client, to_server), "v1")
        answer = packet(asked[1], client, 5300, 43000)
        about = p.run("nswrap_uplink", icmp_error(client, asked[1], answer), "up1")
        out[client] = {"seen": seen, "closed": [closed[0], parse(closed[1])], "about": [about[0], parse(about[1])]}
    p.ask(C4, 44000, A4[0], 5300, uplink="up1")
    seen = p.ask(C4, 44000, A4[0], 5300, uplink="up2")
    about = p.run("nswrap_uplink", icmp_error(C4, A4[0], packet(A4[0], C4, 5300, 44000)), "up2")
    out["two uplinks"] = {"seen": seen, "about": [about[0], parse(about[1])]}
    return out


CASES = {"two_addresses": case_two_addresses, "tcp_keeps_its_port": case_tcp_keeps_its_port, "quiet": case_quiet,
         "errors": case_errors}

if __name__ == "__main__":
    programs = Programs()
    try:
        print(json.dumps(CASES[sys.argv[1]](programs)))
    finally:
        programs.loaded.close()
