"""Snapshots of a network namespace's state, and their differences: the oracle behind "the host
is exactly as it was". Read with the kernel's own tools (``ip -json``, ``nft -j``,
``iptables-legacy-save``, /proc/sys), never with the code under test."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

# Sysctls a snapshot reports (globs under /proc/sys of the namespace).
STATE_SYSCTLS = (
    "/proc/sys/net/ipv4/conf/*/forwarding",
    "/proc/sys/net/ipv4/conf/*/rp_filter",
    "/proc/sys/net/ipv4/conf/*/src_valid_mark",
    "/proc/sys/net/ipv4/conf/*/route_localnet",
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/*/forwarding",
    "/proc/sys/net/ipv6/conf/*/force_forwarding",
    "/proc/sys/net/ipv6/conf/*/accept_ra",
)

# iptables-legacy's rules, when its tables are loaded at all: listing them would load them, and
# a legacy table cannot be unloaded from a namespace again. Packet counters zeroed.
_LEGACY_SAVE = ("grep -q . /proc/net/ip_tables_names && iptables-legacy-save -c"
                " | sed -e '/^#/d' -e 's/\\[[0-9]*:[0-9]*\\]/[0:0]/g' || true")


def snapshot(read: Callable[[list[str]], str]) -> dict[str, Any]:
    """The state of one namespace; *read(argv)* runs a command there and returns its stdout.

    Links, addresses, IPv4/IPv6 policy rules and routes of all tables, the
    nftables ruleset (counter values zeroed: traffic moves them, e.g. in
    iptables-nft's rules), iptables-legacy's rules when its tables are
    loaded, and the forwarding/rp_filter/src_valid_mark/route_localnet
    sysctls. Two snapshots are equal when nothing changed.
    """
    def ip_json(*args: str) -> Any:
        return json.loads(read(["ip", "-json", *args]) or "[]")

    sysctls = {}
    for line in read(["sh", "-c", "grep -H '' " + " ".join(STATE_SYSCTLS)]).splitlines():
        path, _, value = line.rpartition(":")
        sysctls[path.removeprefix("/proc/sys/")] = value
    return {
        "link": ip_json("link", "show"),
        "addr": ip_json("addr", "show"),
        "rule4": ip_json("-4", "rule", "show"),
        "rule6": ip_json("-6", "rule", "show"),
        "route4": ip_json("-4", "route", "show", "table", "all"),
        "route6": [_timeless(r) for r in ip_json("-6", "route", "show", "table", "all")],
        "nft": zero_counters(json.loads(read(["nft", "-j", "list", "ruleset"]))["nftables"]),
        "iptables_legacy": read(["sh", "-c", _LEGACY_SAVE]),
        "sysctl": sysctls,
        # tc: clsact qdiscs (the fast path's filters hang on them), with their filters' count
        "qdisc": [{k: q.get(k) for k in ("dev", "kind", "handle", "parent")}
                  for q in json.loads(read(["tc", "-json", "qdisc", "show"]) or "[]")],
    }


def _timeless(route: dict[str, Any]) -> dict[str, Any]:
    """A route learned from a router advertisement counts down its lifetime: the route is the
    same whatever is left of it."""
    return {k: v for k, v in route.items() if k != "expires"}


def zero_counters(node: Any) -> Any:
    """The same JSON with every counter's packets/bytes set to 0."""
    if isinstance(node, list):
        return [zero_counters(v) for v in node]
    if isinstance(node, dict):
        if set(node) == {"packets", "bytes"}:
            return {"packets": 0, "bytes": 0}
        return {k: zero_counters(v) for k, v in node.items()}
    return node


def diff_states(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Human-readable difference of two snapshots ("" if equal).

    Lists are compared as multisets of entries ("-" only before, "+" only
    after); dicts key by key.
    """
    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

    out = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        out.append(f"{key}:")
        if isinstance(a, list) and isinstance(b, list):
            ca, cb = Counter(map(dump, a)), Counter(map(dump, b))
            out += [f"  - {e}" for e in (ca - cb).elements()]
            out += [f"  + {e}" for e in (cb - ca).elements()]
            if ca == cb:
                out.append("  (same entries, different order)")
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a.keys() | b.keys()):
                if a.get(k) != b.get(k):
                    out.append(f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
        else:
            out.append(f"  - {dump(a)}\n  + {dump(b)}")
    return "\n".join(out)
