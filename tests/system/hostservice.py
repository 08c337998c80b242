"""A host service that must keep its clients, and a client of it, for system tests (issue 23).

    hostservice.py serve PROTO ADDR PORT BANNER   bind ADDR:PORT (tcp: listen), print "ready"; answer
                                                  each line (tcp) or datagram (udp) with "BANNER line"
    hostservice.py ask ADDR PORT                  tcp: one connection, one line; print the answer
                                                  (exit 1 if none within a few seconds)
    hostservice.py session ADDR PORT              tcp: one connection held open; print "connected",
                                                  then for each line on stdin send it and print the answer

An sshd stand-in (serve tcp 0.0.0.0 22 HOST) with an open session to it, and a squatter (serve udp
127.0.0.1 PORT, as nobody) that binds first to capture the host's own clients.
"""

from __future__ import annotations

import socket
import sys
import threading

TIMEOUT = 3.0


def serve(proto: str, address: str, port: int, banner: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    if proto == "udp":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((address, port))
        print("ready", flush=True)
        while True:
            data, peer = sock.recvfrom(65535)
            sock.sendto(f"{banner} ".encode() + data, peer)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen()
    print("ready", flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=answer, args=(conn, banner), daemon=True).start()


def answer(conn: socket.socket, banner: str) -> None:
    with conn, conn.makefile("rwb") as f:
        for line in f:
            f.write(f"{banner} ".encode() + line)
            f.flush()


def ask(address: str, port: int) -> int:
    try:
        with socket.create_connection((address, port), timeout=TIMEOUT) as sock, sock.makefile("rwb") as f:
            f.write(b"hello\n")
            f.flush()
            line = f.readline()
    except OSError as e:
        print(e, file=sys.stderr)
        return 1
    print(line.decode().strip())
    return 0 if line else 1


def session(address: str, port: int) -> None:
    with socket.create_connection((address, port), timeout=TIMEOUT) as sock, sock.makefile("rwb") as f:
        sock.settimeout(None)  # held open for as long as the test wants
        print("connected", flush=True)
        for line in sys.stdin:
            f.write(line.encode())
            f.flush()
            print(f.readline().decode().strip() or "closed", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "ask":
        sys.exit(ask(sys.argv[2], int(sys.argv[3])))
    else:
        session(sys.argv[2], int(sys.argv[3]))
