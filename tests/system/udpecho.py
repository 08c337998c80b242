"""A plain UDP echo server and a strict client, for system tests.

    udpecho.py serve PORT                 bind 0.0.0.0:PORT, print "ready", answer with sendto()
    udpecho.py ask ADDR PORT [SPORT [SADDR]]  exit 0 once an echo came back *from ADDR:PORT*, else 1
    udpecho.py count ADDR PORT N          send N datagrams one at a time, each answered; exit 0 if all were

The server is the kind nswrap exists for: no IP_PKTINFO, the kernel picks the reply's source (one
dual-stack socket on ::, IPv4 clients arriving as ::ffff:a.b.c.d). The
client uses a connected socket, so a reply from any other address is never seen. Bounded: at most
ATTEMPTS tries of WAIT seconds.
"""

import socket
import sys

ATTEMPTS, WAIT = 5, 0.5


def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
    sock.bind(("::", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def ask(address: str, port: int, sport: int = 0, saddr: str = "") -> int:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((saddr, sport))
    sock.connect((address, port))
    sock.settimeout(WAIT)
    for attempt in range(ATTEMPTS):
        payload = f"ping {attempt}".encode()
        try:
            sock.send(payload)
            if sock.recv(65535) == payload:
                return 0
        except (TimeoutError, ConnectionRefusedError):
            continue
    return 1


def count(address: str, port: int, n: int) -> int:
    """Exactly n datagrams, one flow: each waits for its answer (no resend, so counters can be checked)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((address, port))
    sock.settimeout(5)
    for i in range(n):
        sock.send(f"n{i}".encode())
        if sock.recv(100) != f"n{i}".encode():
            return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "count":
        sys.exit(count(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        extra = sys.argv[4:6]
        sys.exit(ask(sys.argv[2], int(sys.argv[3]), int(extra[0]) if extra else 0, *extra[1:]))
