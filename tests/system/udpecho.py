"""A plain UDP echo server and a strict client, for system tests.

    udpecho.py serve PORT                 bind 0.0.0.0:PORT, print "ready", answer with sendto()
    udpecho.py ask ADDR PORT [SPORT]      exit 0 once an echo came back *from ADDR:PORT*, else 1

The server is the kind nswrap exists for: no IP_PKTINFO, the kernel picks the reply's source. The
client uses a connected socket, so a reply from any other address is never seen. Bounded: at most
ATTEMPTS tries of WAIT seconds.
"""

import socket
import sys

ATTEMPTS, WAIT = 5, 0.5


def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def ask(address: str, port: int, sport: int = 0) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", sport))
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


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        sys.exit(ask(sys.argv[2], int(sys.argv[3]), *(int(a) for a in sys.argv[4:5])))
