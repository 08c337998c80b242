"""Small traffic tools for scripts/bench.py, run inside lab namespaces (stdlib only).

    bench_traffic.py echo PORT
        UDP echo server bound to 0.0.0.0:PORT; answers every datagram to its sender.
    bench_traffic.py probe ADDRESS PORT TIMEOUT
        Prints "ready", then sends a datagram every millisecond, each from a new source port,
        until one is answered and prints
        the CLOCK_MONOTONIC time (seconds) of the first answer; exit 1 after TIMEOUT seconds.
    bench_traffic.py flows ADDRESS PORT SOURCES FIRST_PORT COUNT DEADLINE
        Opens COUNT distinct UDP flows to ADDRESS:PORT, one datagram each, from the source
        addresses SOURCES (comma-separated) and source ports FIRST_PORT upwards, through raw
        sockets (no socket per flow). At most WINDOW datagrams are unanswered at a time; one not
        answered within LOST_AFTER seconds counts as lost. Prints a JSON summary.

CLOCK_MONOTONIC is not namespaced by network namespaces, so times printed here compare directly
with time.monotonic() in the caller.
"""

from __future__ import annotations

import collections
import json
import select
import socket
import struct
import sys
import time

WINDOW = 256
LOST_AFTER = 1.0


def echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def probe(address: str, port: int, timeout: float) -> int:
    # A fresh socket (source port) per datagram: each one is a new flow, so a conntrack entry
    # made by an early datagram (before the DNAT rule existed) cannot hide the answer.
    live: collections.deque[socket.socket] = collections.deque()
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        live.append(sock)
        if len(live) > 100:
            live.popleft().close()
        try:
            sock.sendto(b"probe", (address, port))
        except OSError:
            pass
        for ready in select.select(live, [], [], 0.001)[0]:
            try:
                ready.recvfrom(2048)
            except OSError:
                continue  # e.g. ICMP port unreachable while nothing listens yet
            print(f"{time.monotonic():.6f}", flush=True)
            return 0
    return 1


def _packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    # IP_HDRINCL: the kernel fills in total length, id and the header checksum.
    # UDP checksum 0 means "none" in IPv4.
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return ip + udp + payload


def flows(address: str, port: int, sources: list[str], first_port: int, count: int, deadline_s: float) -> dict:
    per_source = 65535 - first_port + 1
    if count > per_source * len(sources):
        raise SystemExit(f"{count} flows need more than {len(sources)} source address(es)")
    dst = socket.inet_aton(address)
    send = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    recv = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    recv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    recv.setblocking(False)

    def flow(i: int) -> tuple[str, int]:
        return sources[i // per_source], first_port + i % per_source

    outstanding: collections.OrderedDict[tuple[str, int], float] = collections.OrderedDict()
    answered = lost = sent = 0
    start = time.monotonic()
    deadline = start + deadline_s
    while time.monotonic() < deadline and (sent < count or outstanding):
        while sent < count and len(outstanding) < WINDOW:
            src, sport = flow(sent)
            send.sendto(_packet(socket.inet_aton(src), dst, sport, port, struct.pack("!Q", sent)), (address, 0))
            outstanding[(src, sport)] = time.monotonic()
            sent += 1
        select.select([recv], [], [], 0.005)
        while True:
            try:
                data = recv.recv(2048)
            except BlockingIOError:
                break
            ihl = (data[0] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", data, ihl)
            if data[12:16] == dst and sport == port:
                key = (socket.inet_ntoa(data[16:20]), dport)
                if outstanding.pop(key, None) is not None:
                    answered += 1
        now = time.monotonic()
        while outstanding:
            key, when = next(iter(outstanding.items()))
            if now - when < LOST_AFTER:
                break
            del outstanding[key]
            lost += 1
    elapsed = time.monotonic() - start
    lost += len(outstanding)
    return {
        "flows_wanted": count,
        "sent": sent,
        "answered": answered,
        "lost": lost,
        "seconds": round(elapsed, 3),
        "flows_per_second": round(answered / elapsed) if elapsed else 0,
        "deadline_hit": sent < count,
    }


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "echo":
        echo(int(args[0]))
        return 0
    if cmd == "probe":
        return probe(args[0], int(args[1]), float(args[2]))
    if cmd == "flows":
        address, port, sources, first_port, count, deadline = args
        result = flows(address, int(port), sources.split(","), int(first_port), int(count), float(deadline))
        print(json.dumps(result))
        return 0
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
