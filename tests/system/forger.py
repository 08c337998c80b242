"""A hostile server for the containment tests: run by nswrap (root in its own network namespace),
it gives its eth0 the addresses it wants to forge and sends datagrams from them.

    forger.py GO_FILE TARGET4 TARGET6 SOURCE:PORT:DPORT ...

Each SOURCE gets its address on eth0 (a /32 or /128, no duplicate address detection), then a
socket bound to SOURCE:PORT; "own4"/"own6" mean the namespace's own address (the control: that one
must leave). Prints "ready", waits for GO_FILE to exist (at most 30 s), sends each datagram 3
times to TARGET4/TARGET6:DPORT (a distinct DPORT per source, so a capture tells them apart, even
once masquerading rewrote a source), prints "done" and stays until it is stopped.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time


def own(version: int) -> str:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.10" if version == 4 else "2001:db8:1::10", 9))
        return s.getsockname()[0]


def main() -> None:
    go, target4, target6, *specs = sys.argv[1:]
    sends = []
    for spec in specs:
        source, port, dport = spec.rsplit(":", 2)
        if source in ("own4", "own6"):
            source = own(int(source[-1]))
        else:
            address = ipaddress.ip_address(source)
            six = ["-6"] if address.version == 6 else []
            extra = ["nodad"] if address.version == 6 else []
            subprocess.run(["ip", *six, "addr", "add", f"{source}/{address.max_prefixlen}", "dev", "eth0", *extra],
                           check=True)
        version = ipaddress.ip_address(source).version
        s = socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((source, int(port)))
        sends.append((s, (target4 if version == 4 else target6, int(dport))))
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(3):
        for s, target in sends:
            s.sendto(b"forged?", target)
    print("done", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
