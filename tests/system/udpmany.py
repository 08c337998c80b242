"""A UDP echo server on many ports and strict clients for many targets at once, for system tests.

    udpmany.py serve [--tag T] PORT... bind [::]:PORT (dual-stack) for each PORT, print "ready", echo
                                       (T: ignored, a marker to find the process by its command line)
    udpmany.py ask TARGET...           echo each TARGET until answered, at most ROUNDS rounds of
                                       ROUND seconds; print {"TARGET": true|false, ...}; exit 0 if all were
    udpmany.py once [--dns] TARGET...  strict one-shot: open a connected socket per TARGET, print
                                       "armed", wait for one line on stdin, then send exactly ONE
                                       datagram per TARGET (a DNS query for test.example A with
                                       --dns) and wait at most WAIT seconds; print the same JSON;
                                       exit 0 only if every single datagram was answered

TARGET is ADDR:PORT, with an IPv6 ADDR in brackets ([2001:db8::1]:53). Every client socket is
connected, so the kernel drops replies from any other address or port: an answer means it came
from exactly the address and port asked. Like udpecho.py, the server needs no IP_PKTINFO: the
kernel picks each reply's source, which is what nswrap exists for.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import time

ROUNDS, ROUND = 5, 1.0  # ask: bounded
WAIT = 2.0  # once: how long the single datagram may take to be answered
DNS_NAME = "test.example"


def parse_target(text: str) -> tuple[str, int]:
    address, _, port = text.rpartition(":")
    return address.strip("[]"), int(port)


def serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
        sock.bind(("::", port))
        sel.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            data, peer = key.fileobj.recvfrom(65535)
            key.fileobj.sendto(data, peer)


def _connect(target: str) -> socket.socket:
    address, port = parse_target(target)
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((address, port))
    return sock


def dns_query(query_id: int) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    name = b"".join(bytes([len(label)]) + label.encode() for label in DNS_NAME.split(".")) + b"\0"
    return header + name + struct.pack("!HH", 1, 1)  # A, IN


def dns_answered(reply: bytes, query_id: int) -> bool:
    """The reply to our query, NOERROR, with at least one answer."""
    if len(reply) < 12:
        return False
    rid, flags, _qd, answers = struct.unpack("!HHHH", reply[:8])
    return rid == query_id and flags & 0x8000 and flags & 0x000F == 0 and answers > 0


def _exchange(socks: dict[str, socket.socket], payloads: dict[str, bytes], check, deadline: float,
              answered: dict[str, bool]) -> None:
    """Send each unanswered target its payload once, then collect replies until the deadline."""
    sel = selectors.DefaultSelector()
    for target, sock in socks.items():
        if answered[target]:
            continue
        try:
            sock.send(payloads[target])
        except OSError:  # e.g. an ICMP error from an earlier round: try again next round
            continue
        sel.register(sock, selectors.EVENT_READ, target)
    while sel.get_map() and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            target = key.data
            try:
                reply = key.fileobj.recv(65535)
            except OSError:  # ICMP port/host unreachable: no answer this round
                sel.unregister(key.fileobj)
                continue
            if check(target, reply):
                answered[target] = True
                sel.unregister(key.fileobj)
    sel.close()


def ask(targets: list[str]) -> dict[str, bool]:
    socks = {t: _connect(t) for t in targets}
    payloads = {t: f"ping {t} {os.getpid()}".encode() for t in targets}
    answered = dict.fromkeys(targets, False)
    for _ in range(ROUNDS):
        _exchange(socks, payloads, lambda t, reply: reply == payloads[t], time.monotonic() + ROUND, answered)
        if all(answered.values()):
            break
    for sock in socks.values():
        sock.close()
    return answered


def once(targets: list[str], dns: bool) -> dict[str, bool]:
    socks = {t: _connect(t) for t in targets}
    ids = {t: int.from_bytes(os.urandom(2), "big") for t in targets}
    payloads = {t: dns_query(ids[t]) if dns else f"once {t}".encode() for t in targets}
    check = (lambda t, r: dns_answered(r, ids[t])) if dns else (lambda t, r: r == payloads[t])
    print("armed", flush=True)
    if not sys.stdin.readline():
        sys.exit(3)  # the test went away without a go
    answered = dict.fromkeys(targets, False)
    _exchange(socks, payloads, check, time.monotonic() + WAIT, answered)
    return answered


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        ports = argv[3:] if argv[1:2] == ["--tag"] else argv[1:]
        serve([int(p) for p in ports])
        return 0
    if argv[0] == "ask":
        result = ask(argv[1:])
    elif argv[0] == "once":
        dns = argv[1:2] == ["--dns"]
        result = once(argv[2:] if dns else argv[1:], dns)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0 if all(result.values()) else 1


# --- for the tests: ask along the lab's paths --------------------------------------------------

COMMAND = [sys.executable, os.path.abspath(__file__)]


def target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def unanswered(lab, paths, ports) -> list[str]:
    """Echo every (path, port) at once, one `ask` per client namespace, all running in parallel;
    the (path, port) pairs that got no answer, by name. Bounded: ROUNDS * ROUND seconds."""
    import subprocess

    by_client: dict[str, list[tuple[object, int]]] = {}
    for path in paths:
        for port in ports:
            by_client.setdefault(path.client, []).append((path, port))
    asks = {client: subprocess.Popen(["ip", "netns", "exec", client, *COMMAND, "ask",
                                      *(target(p.address, port) for p, port in items)],
                                     stdout=subprocess.PIPE, text=True)
            for client, items in by_client.items()}
    missing = []
    try:
        for client, proc in asks.items():
            out, _ = proc.communicate(timeout=ROUNDS * ROUND + 60)
            answered = json.loads(out) if out.strip() else {}
            missing += [f"{p.name} port {port}" for p, port in by_client[client]
                        if not answered.get(target(p.address, port))]
    finally:
        for proc in asks.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return missing


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
