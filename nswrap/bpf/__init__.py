"""BPF: the plumbing under a tc-BPF fast path, without libbpf or bpffs.

syscall.py is the bpf(2) system call (maps, programs, objects found again by id); elf.py parses
and links a relocatable BPF object, pure. Nothing is pinned: a map lives as long as a program
attached with tc holds it, and another process finds it again through the tc filter
(nswrap/netlink/tc.py): filter -> program id -> `maps_of`.
"""

from nswrap.bpf.syscall import LoadError, MapInfo, ProgInfo, maps_of

__all__ = ["LoadError", "MapInfo", "ProgInfo", "maps_of"]
