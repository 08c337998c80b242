"""One step of test_bpf_plumbing.py, run as a process of its own inside a namespace:

    ip netns exec NS python tests/system/bpfplumbing.py STEP ARGS...

Each step prints one JSON line. A step that needs the maps finds them again through the tc filter
(filter -> program id -> maps_of), never from the process that made them: that process is gone.

    attach IFNAME       the fixture's ingress program and fresh maps, attached at priority 1, handle 1
    maps IFNAME         the filters, and the counts the program keeps
    set IFNAME VALUE    settings[0] = VALUE (0: deleted): 1 makes the program drop IPv4
    detach IFNAME       the filter and then clsact removed; what is left
    refused             a program the verifier refuses; its LoadError
    fast UPLINK VETH    nswrap's fast path applied with UPLINK and VETH (VETH may not exist: a dying
                        instance's), one endpoint through lo and one through VETH; "none": detach all
    receive ADDR PORT   prints "ready", then each datagram's payload, until one says "stop"
    send ADDR PORT TEXT one datagram
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

from nswrap.bpf import LoadError, maps_of, syscall
from nswrap.netlink import tc
from tests.unit.fixtures.bpf import load

PRIORITY, HANDLE = 1, 1
NAME = "fixture.bpf.o:[tc/ingress]"
KEY0 = struct.pack("=I", 0)
# r1 = 0; r0 = *(u32 *)(r1 + 0); exit: a load through a null scalar
REFUSED = struct.pack("<BBhi", 0xB7, 0x01, 0, 0) + struct.pack("<BBhi", 0x61, 0x10, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def attach(ifname: str) -> dict[str, object]:
    index = socket.if_nametoindex(ifname)
    prog, maps = load("tc/ingress", "count")
    try:
        with tc.Tc() as t:
            added = t.ensure_clsact(index)
            t.attach(index, "ingress", prog, NAME, PRIORITY, HANDLE)
        info = syscall.prog_info(prog)
        return {"added_clsact": added, "prog_id": info.id, "tag": info.tag,
                "maps": {name: syscall.map_info(fd).id for name, fd in maps.items()}}
    finally:
        for fd in (prog, *maps.values()):
            os.close(fd)


def found(ifname: str) -> tuple[list[tc.Filter], dict[str, int]]:
    with tc.Tc() as t:
        filters = t.filters(socket.if_nametoindex(ifname), "ingress")
    ours = [f for f in filters if (f.priority, f.handle) == (PRIORITY, HANDLE)]
    return filters, maps_of(ours[0].prog_id) if ours else {}


def read_maps(ifname: str) -> dict[str, object]:
    filters, maps = found(ifname)
    try:
        counts = [struct.unpack("=Q", syscall.map_lookup(maps["counts"], struct.pack("=I", i)) or bytes(8))[0]
                  for i in range(4)]
        settings = {struct.unpack("=I", k)[0]: struct.unpack("=I", syscall.map_lookup(maps["settings"], k) or bytes(4))[0]
                    for k in syscall.map_keys(maps["settings"])}
        return {"filters": [[f.priority, f.handle, f.name, f.prog_id] for f in filters], "counts": counts,
                "maps": {name: syscall.map_info(fd).id for name, fd in maps.items()}, "settings": settings}
    finally:
        for fd in maps.values():
            os.close(fd)


def set_setting(ifname: str, value: int) -> dict[str, object]:
    _, maps = found(ifname)
    try:
        if value:
            syscall.map_update(maps["settings"], KEY0, struct.pack("=I", value))
            return {"set": value}
        return {"deleted": syscall.map_delete(maps["settings"], KEY0)}
    finally:
        for fd in maps.values():
            os.close(fd)


def detach(ifname: str) -> dict[str, object]:
    index = socket.if_nametoindex(ifname)
    with tc.Tc() as t:
        detached = t.detach(index, "ingress", PRIORITY, HANDLE)
        again = t.detach(index, "ingress", PRIORITY, HANDLE)
        removed = t.remove_clsact(index)
        removed_again = t.remove_clsact(index)
        return {"detached": [detached, again], "removed": [removed, removed_again],
                "left": [t.filters(index, d) for d in tc.DIRECTIONS] != [[], []]}


def refused() -> dict[str, object]:
    try:
        fd = syscall.prog_load(syscall.BPF_PROG_TYPE_SCHED_CLS, REFUSED, "GPL", "nswt_refused")
    except LoadError as e:
        return {"error": str(e), "errno": e.errno}
    os.close(fd)
    return {"error": None}


def fast_step(uplink: str, veth: str) -> dict[str, object]:
    """nswrap.bpf.fast.apply as a sync makes it (the test reads tc and the map with its oracles)."""
    import ipaddress

    from nswrap.bpf import fast
    from nswrap.fastpath import Endpoint, Fast

    if uplink == "none":
        fast.apply(Fast())
        return {"applied": True}
    server = ipaddress.ip_address("198.18.0.2")
    endpoints = frozenset(Endpoint(uplink, ipaddress.ip_address("192.0.2.1"), "udp", port, v, 0x10000000, server, port)
                          for port, v in ((7000, "lo"), (7001, veth)))  # one through an interface that exists
    fast.apply(Fast(frozenset({uplink}), frozenset({veth}), endpoints))
    return {"applied": True}


def receive(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, port))
        print("ready", flush=True)
        while True:
            text = s.recv(100).decode()
            print(text, flush=True)
            if text == "stop":
                return


def main(step: str, *args: str) -> None:
    if step == "receive":
        return receive(args[0], int(args[1]))
    if step == "send":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(args[2].encode(), (args[0], int(args[1])))
        return None
    result = {"attach": lambda: attach(args[0]), "maps": lambda: read_maps(args[0]),
              "set": lambda: set_setting(args[0], int(args[1])), "detach": lambda: detach(args[0]),
              "refused": refused, "fast": lambda: fast_step(args[0], args[1] if len(args) > 1 else "")}[step]()
    print(json.dumps(result))
    return None


if __name__ == "__main__":
    main(*sys.argv[1:])
