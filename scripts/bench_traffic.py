"""Small traffic tools for scripts/bench.py, run inside lab namespaces (standard library only).

Every loop here is bounded in count and in time, and every tool stops by itself.

    bench_traffic.py echo PORT [ADDRESS]
        UDP echo server bound to ADDRESS:PORT (default 0.0.0.0); prints "listening" once bound,
        then answers every datagram.
    bench_traffic.py udpprobe TIMEOUT ADDRESS PORT
        Every millisecond a datagram to ADDRESS:PORT, each from a new socket, until one is echoed;
        prints the CLOCK_MONOTONIC time of that answer; exit 1 after TIMEOUT seconds.
    bench_traffic.py dnsprobe TIMEOUT PORT ADDRESS...
        Prints "ready", then every millisecond asks each ADDRESS (IPv4 or IPv6) for
        test.example A, each query from a new socket (a new flow: an entry made by an early query,
        before the server's rules existed, cannot hide the answer), until each has given a
        correct answer (192.0.2.99, from the address asked). Prints "ADDRESS TIME" per address,
        TIME being CLOCK_MONOTONIC at the first correct answer; exit 1 after TIMEOUT seconds.
    bench_traffic.py flows ADDRESS PORT SOURCES FIRST_PORT COUNT DEADLINE
        Opens COUNT distinct UDP flows to ADDRESS:PORT, one datagram each, from the source
        addresses SOURCES (comma-separated) and source ports FIRST_PORT upwards, through raw
        sockets (no socket per flow). At most WINDOW datagrams are unanswered at a time; one not
        answered within LOST_AFTER seconds counts as lost. Prints a JSON summary.
    bench_traffic.py blast ADDRESS PORT SOURCES FIRST_PORT COUNT DEADLINE
        A flood: COUNT DNS queries as fast as one CPU can send them, each from a new (source
        address, source port), never waiting for answers; stops after DEADLINE seconds at the
        latest. Prints a JSON summary (sent, first and last send time).
    bench_traffic.py legit ADDRESS PORT INTERVAL DURATION TIMEOUT
        A legitimate DNS client: one query every INTERVAL seconds, each from a new socket (as
        a resolver with random source ports does), for DURATION seconds; a query not answered
        correctly within TIMEOUT seconds is lost. Prints JSON: [send time, answered] per query.
    bench_traffic.py ctcount INTERVAL DURATION
        Samples this network namespace's conntrack entry count; prints JSON [[time, count], ...].

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
TEST_NAME = "test.example"
TEST_ANSWER = socket.inet_aton("192.0.2.99")


def dns_query(qid: int) -> bytes:
    """test.example IN A, recursion desired."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in TEST_NAME.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def dns_correct(data: bytes, qid: int) -> bool:
    """An answer to query *qid*, no error, whose (only) A record is TEST_ANSWER."""
    if len(data) < 12:
        return False
    rid, flags, _, ancount = struct.unpack_from("!HHHH", data)
    return rid == qid & 0xFFFF and flags & 0x8000 and flags & 0x000F == 0 and ancount >= 1 and TEST_ANSWER in data[12:]


def echo(port: int, address: str = "0.0.0.0") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((address, port))
    print("listening", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def dnsprobe(timeout: float, port: int, addresses: list[str]) -> int:
    families = {a: socket.AF_INET6 if ":" in a else socket.AF_INET for a in addresses}
    pending = set(addresses)
    live: collections.deque[tuple[socket.socket, str, int]] = collections.deque()
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    qid = 0
    while pending and time.monotonic() < deadline:
        for address in sorted(pending):
            qid += 1
            sock = socket.socket(families[address], socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                # connect(): only datagrams from the address asked reach this socket
                sock.connect((address, port))
                sock.send(dns_query(qid))
            except OSError:
                sock.close()
                continue
            live.append((sock, address, qid))
        while len(live) > 200:
            live.popleft()[0].close()
        socks = {s: (a, q) for s, a, q in live}
        for ready in select.select(list(socks), [], [], 0.001)[0]:
            address, q = socks[ready]
            try:
                data = ready.recv(2048)
            except OSError:
                continue  # e.g. ICMP port unreachable while nothing listens yet
            if address in pending and dns_correct(data, q):
                print(f"{address} {time.monotonic():.6f}", flush=True)
                pending.discard(address)
    for sock, _, _ in live:
        sock.close()
    return 0 if not pending else 1


def udpprobe(timeout: float, address: str, port: int) -> int:
    live: collections.deque[socket.socket] = collections.deque()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        live.append(sock)
        if len(live) > 100:
            live.popleft().close()
        try:
            sock.connect((address, port))
            sock.send(b"probe")
        except OSError:
            pass
        for ready in select.select(live, [], [], 0.001)[0]:
            try:
                if ready.recv(2048) == b"probe":
                    print(f"{time.monotonic():.6f}", flush=True)
                    return 0
            except OSError:
                continue  # e.g. ICMP port unreachable while nothing listens yet
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


def blast(address: str, port: int, sources: list[str], first_port: int, count: int, deadline_s: float) -> dict:
    per_source = 65535 - first_port + 1
    if count > per_source * len(sources):
        raise SystemExit(f"{count} flows need more than {len(sources)} source address(es)")
    dst = socket.inet_aton(address)
    send = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    # One packet per source address, patched in place: only the source port changes per flow.
    packets = [bytearray(_packet(socket.inet_aton(s), dst, 0, port, dns_query(0x5EED))) for s in sources]
    target = (address, 0)
    sent = errors = 0
    start = time.monotonic()
    deadline = start + deadline_s
    while sent < count:
        if sent % 1024 == 0 and time.monotonic() >= deadline:
            break
        packet = packets[sent // per_source]
        struct.pack_into("!H", packet, 20, first_port + sent % per_source)
        try:
            send.sendto(packet, target)
        except OSError:  # ENOBUFS: the qdisc is full; that datagram is simply not sent
            errors += 1
        sent += 1
    end = time.monotonic()
    return {"sent": sent - errors, "send_errors": errors, "t_start": start, "t_end": end,
            "seconds": round(end - start, 3), "per_second": round((sent - errors) / max(end - start, 1e-9))}


def legit(address: str, port: int, interval: float, duration: float, timeout: float) -> list:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    results: list[list] = []  # [send time, answered]
    outstanding: dict[socket.socket, tuple[int, int, float]] = {}  # sock -> (index, qid, sent)
    start = time.monotonic()
    next_send = start
    qid = 0
    while True:
        now = time.monotonic()
        if now >= start + duration and not outstanding:
            break
        if now >= start + duration + timeout + 1:
            break  # bounded whatever happens
        if now >= next_send and now < start + duration:
            qid += 1
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            results.append([round(now, 4), 0])
            try:
                sock.connect((address, port))
                sock.send(dns_query(qid))
                outstanding[sock] = (len(results) - 1, qid, now)
            except OSError:
                sock.close()
            next_send += interval
        wait = max(0.0, min(next_send - time.monotonic(), 0.01))
        for ready in select.select(list(outstanding), [], [], wait)[0] if outstanding else ():
            index, q, _ = outstanding[ready]
            try:
                data = ready.recv(2048)
            except OSError:
                continue
            if dns_correct(data, q):
                results[index][1] = 1
                del outstanding[ready]
                ready.close()
        if not outstanding:
            time.sleep(wait)
        now = time.monotonic()
        for sock in [s for s, (_, _, sent) in outstanding.items() if now - sent >= timeout]:
            del outstanding[sock]
            sock.close()
    return results


def ctcount(interval: float, duration: float) -> list:
    samples = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        try:
            with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
                count = int(f.read())
        except OSError:
            count = 0  # conntrack not loaded in this namespace (yet)
        samples.append([round(time.monotonic(), 3), count])
        time.sleep(interval)
    return samples


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "echo":
        echo(int(args[0]), *args[1:2])
        return 0
    if cmd == "udpprobe":
        return udpprobe(float(args[0]), args[1], int(args[2]))
    if cmd == "dnsprobe":
        return dnsprobe(float(args[0]), int(args[1]), args[2:])
    if cmd in ("flows", "blast"):
        address, port, sources, first_port, count, deadline = args
        tool = flows if cmd == "flows" else blast
        print(json.dumps(tool(address, int(port), sources.split(","), int(first_port), int(count), float(deadline))))
        return 0
    if cmd == "legit":
        address, port, interval, duration, timeout = args
        print(json.dumps(legit(address, int(port), float(interval), float(duration), float(timeout))))
        return 0
    if cmd == "ctcount":
        print(json.dumps(ctcount(float(args[0]), float(args[1]))))
        return 0
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
