"""Pure: other tools' firewalls on nswrap's path. What would drop its forwarded flows, where to
make room, and who else uses its mark bits, from the nft JSON ruleset (which includes
iptables-nft's tables) and `iptables-legacy-save`.

A drop in any table is final (nftables evaluates every base chain on a hook), so an accept in
nswrap's own table cannot rescue a flow another table drops. nswrap makes room only where the
tool documents it (Docker: DOCKER-USER; ufw and plain iptables: the top of FORWARD); other tools'
native nft chains are never edited: nswrap refuses and names the chain instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nswrap.datapath import Room
from nswrap.ruleset import TABLE

TAG = "nswrap"  # the comment on nswrap's iptables rules


@dataclass(frozen=True)
class Blocker:
    where: str  # human words, e.g. "iptables-nft chain FORWARD (policy drop)"
    backend: str | None  # "iptables-nft" / "iptables-legacy": nswrap can make room; None: it cannot
    chain: str = "FORWARD"  # where to insert: DOCKER-USER when Docker's hook exists


@dataclass(frozen=True)
class FirewallFacts:
    nft: tuple[dict[str, Any], ...] = ()  # `nft -j list ruleset` items
    legacy: str = ""  # `iptables-legacy-save`, "" when no legacy table is loaded


def _walk(node: Any) -> Iterator[Any]:
    """Every dict and scalar inside a JSON expression."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node


def _verdicts(expr: Any) -> set[str]:
    found = set()
    for node in _walk(expr):
        if isinstance(node, dict):
            found |= {k for k in ("drop", "reject", "accept") if k in node}
            if node.get("type") == "target" and node.get("name") in ("REJECT", "DROP"):
                found.add("reject")
    return found


def _lets_ours_pass(expr: Any) -> bool:
    """firewalld's `ct status dnat accept`, or a rule naming our veths, before any drop."""
    text = json.dumps(expr)
    return "accept" in _verdicts(expr) and ('"dnat"' in text or '"nsw-' in text)


def _iptables_nft(family: str, table: str, chain: str) -> bool:
    return family == "ip" and table == "filter" and chain.isupper()


def _legacy_filter(save: str) -> list[str]:
    lines, inside = [], False
    for line in save.splitlines():
        if line.startswith("*"):
            inside = line == "*filter"
        elif inside:
            lines.append(line)
    return lines


def blockers(facts: FirewallFacts) -> list[Blocker]:
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    rules: dict[tuple[str, str, str], list[Any]] = {}
    for item in facts.nft:
        if "chain" in item:
            c = item["chain"]
            chains[(c["family"], c["table"], c["name"])] = c
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r["expr"])
    found = []
    for key, chain in chains.items():
        family, table, name = key
        if chain.get("hook") != "forward" or family not in ("ip", "inet") or table == TABLE:
            continue
        exprs = rules.get(key, [])
        reason = "policy drop" if chain.get("policy") == "drop" else None
        if reason is None and any(_verdicts(e) & {"drop", "reject"} for e in exprs):
            reason = "a drop rule"
        if reason is None:
            continue
        if _iptables_nft(family, table, name):
            docker = (family, table, "DOCKER-USER") in chains
            found.append(Blocker(f"iptables-nft chain FORWARD ({reason})", "iptables-nft", "DOCKER-USER" if docker else "FORWARD"))
        elif not any(_lets_ours_pass(e) for e in exprs):
            found.append(Blocker(f"nft chain {family} {table} {name} ({reason})", None))
    legacy = "\n".join(_legacy_filter(facts.legacy))
    if legacy:
        policy_drop = re.search(r"^:FORWARD DROP", legacy, re.M) is not None
        if policy_drop or re.search(r"^-A FORWARD .*-j (DROP|REJECT)", legacy, re.M):
            docker = re.search(r"^:DOCKER-USER ", legacy, re.M) is not None
            reason = "policy DROP" if policy_drop else "a DROP/REJECT rule"
            found.append(Blocker(f"iptables-legacy chain FORWARD ({reason})", "iptables-legacy", "DOCKER-USER" if docker else "FORWARD"))
    return found


def rooms(blocker: Blocker) -> list[Room]:
    """The narrowest room: nswrap's veths, both ways (nswrap's own guard decides what may cross
    them); into them only DNATed flows and replies."""
    assert blocker.backend is not None
    comment = ("-m", "comment", "--comment", TAG)
    return [
        Room(blocker.backend, blocker.chain, ("-i", "nsw-+", *comment, "-j", "ACCEPT")),
        Room(blocker.backend, blocker.chain, ("-o", "nsw-+", "-m", "conntrack", "--ctstate", "DNAT,RELATED,ESTABLISHED", *comment, "-j", "ACCEPT")),
    ]


def how_to_fix(blocker: Blocker) -> str:
    return (
        f"forwarded flows of nswrap would be dropped by {blocker.where}: nswrap does not edit other tools' "
        "nft tables; add 'iifname \"nsw-*\" accept' and 'oifname \"nsw-*\" accept' (or 'ct status dnat accept') "
        "at the top of that chain"
    )


def _mark_values(expr: list[Any]) -> list[int]:
    """Integers in the statements of a rule that read or write a packet or connection mark."""
    values = []
    for stmt in expr:
        text = json.dumps(stmt)
        if '"key": "mark"' in text:
            values += [v for v in _walk(stmt) if isinstance(v, int) and not isinstance(v, bool)]
    return values


def mark_users(facts: FirewallFacts, mask: int) -> list[str]:
    """Other tables' rules and iptables-legacy rules that use a value under our mask."""
    users = []
    for item in facts.nft:
        rule = item.get("rule")
        if rule and rule["table"] != TABLE and any(v & mask for v in _mark_values(rule["expr"])):
            users.append(f"nft table {rule['family']} {rule['table']} chain {rule['chain']}")
    table = "?"
    for line in facts.legacy.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif "mark" in line.lower() and line.startswith("-A"):
            if any(int(v, 16) & mask for v in re.findall(r"0x([0-9a-fA-F]+)", line)):
                users.append(f"iptables-legacy table {table} chain {line.split()[1]}")
    return sorted(set(users))
