"""Other tools' firewalls on our path: what would drop our flows, and who uses our mark bits.

The only module that runs iptables. Reading is pure over data gathered by `probe()` (the nft JSON
ruleset, which includes iptables-nft's tables, and iptables-legacy's rules when its filter table
is loaded). Writing is two tagged ACCEPT rules per blocking iptables backend, inserted where the
tool documents it (Docker: DOCKER-USER; ufw and plain iptables: the top of FORWARD) and deleted
exactly at teardown. Native nft chains of other tools are never edited: nswrap refuses instead.

A drop in any table is final (nftables evaluates every base chain on a hook), so an accept in our
own table cannot rescue a flow another table drops.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass

from nswrap.errors import NswrapError

LEGACY_TABLES = "/proc/net/ip_tables_names"  # per network namespace; lists only loaded tables


@dataclass(frozen=True)
class Blocker:
    where: str  # human words, e.g. "iptables-nft chain FORWARD (policy DROP)"
    backend: str | None  # "iptables-nft" / "iptables-legacy": nswrap can make room; None: it cannot
    chain: str = "FORWARD"  # where to insert: DOCKER-USER when Docker's hook exists


@dataclass(frozen=True)
class FirewallFacts:
    nft: tuple  # `nft -j list ruleset` items
    legacy: str = ""  # `iptables-legacy -S` of the filter table, "" when not loaded
    legacy_all: str = ""  # `iptables-legacy-save`, for the mark scan


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return ""
    return done.stdout if done.returncode == 0 else ""


def probe() -> FirewallFacts:
    ruleset = _run(["nft", "-j", "list", "ruleset"])
    items = tuple(json.loads(ruleset)["nftables"]) if ruleset else ()
    legacy = legacy_all = ""
    loaded = _legacy_loaded()
    if loaded:  # reading loaded tables loads nothing new
            legacy_all = _run(["iptables-legacy-save"])
            if "filter" in loaded:
                legacy = _run(["iptables-legacy", "-t", "filter", "-S"])
    return FirewallFacts(items, legacy, legacy_all)


# --- who would drop our forwarded flows ------------------------------------------------------


def _walk(node):
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


def _verdicts(expr) -> set[str]:
    found = set()
    for node in _walk(expr):
        if isinstance(node, dict):
            found |= {k for k in ("drop", "reject", "accept") if k in node}
            if node.get("type") == "target" and node.get("name") in ("REJECT", "DROP"):
                found.add("reject")
    return found


def _lets_ours_pass(expr) -> bool:
    """firewalld's `ct status dnat accept`, or a rule naming our veths, before any drop."""
    text = json.dumps(expr)
    return "accept" in _verdicts(expr) and ('"dnat"' in text or '"nsw-' in text)


def _iptables_nft(family: str, table: str, chain: str) -> bool:
    return family == "ip" and table == "filter" and chain.isupper()


def blockers(facts: FirewallFacts, own_prefix: str) -> list[Blocker]:
    chains, rules = {}, {}
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
        if chain.get("hook") != "forward" or family not in ("ip", "inet") or table.startswith(own_prefix):
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
    if facts.legacy:
        policy_drop = "-P FORWARD DROP" in facts.legacy
        if policy_drop or re.search(r"-j (DROP|REJECT)", facts.legacy):
            docker = "-N DOCKER-USER" in facts.legacy
            reason = "policy DROP" if policy_drop else "a DROP/REJECT rule"
            found.append(Blocker(f"iptables-legacy chain FORWARD ({reason})", "iptables-legacy", "DOCKER-USER" if docker else "FORWARD"))
    return found


def accept_rules(host_if: str, tag: str) -> list[list[str]]:
    """The narrowest room for this instance: its own veth, both ways (our nft guard decides what
    may cross it); into the namespace only DNATed flows and replies."""
    comment = ["-m", "comment", "--comment", tag]
    return [
        ["-i", host_if, *comment, "-j", "ACCEPT"],
        ["-o", host_if, "-m", "conntrack", "--ctstate", "DNAT,RELATED,ESTABLISHED", *comment, "-j", "ACCEPT"],
    ]


def how_to_fix(blocker: Blocker) -> str:
    return (
        f"forwarded flows of nswrap would be dropped by {blocker.where}: nswrap does not edit other tools' "
        "nft tables; add 'iifname \"nsw-*\" accept' and 'oifname \"nsw-*\" accept' (or 'ct status dnat accept') "
        "at the top of that chain"
    )


def iptables(binary: str, action: str, chain: str, rule: list[str]) -> None:
    done = subprocess.run([binary, "-w", "5", action, chain, *rule], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        if action == "-D" and ("does a matching rule exist" in message or "No chain" in message or "Bad rule" in message):
            return  # already gone
        raise NswrapError(f"{binary} {action} {chain} {shlex.join(rule)}: {message}")


def _legacy_loaded() -> list[str]:
    try:
        with open(LEGACY_TABLES) as f:
            return f.read().split()
    except OSError:
        return []


def tagged_rules(binary: str, prefix: str, nft_tables) -> list[tuple[str, list[str], str]]:
    """(chain, rule, tag) of every rule carrying one of our comments, for the sweep.

    Only where a filter table already exists: listing iptables-legacy would load its table.
    """
    present = ("ip", "filter") in nft_tables if binary == "iptables-nft" else "filter" in _legacy_loaded()
    if not present:
        return []
    out = []
    for line in _run([binary, "-t", "filter", "-S"]).splitlines():
        words = shlex.split(line)
        if words[:1] == ["-A"] and "--comment" in words:
            tag = words[words.index("--comment") + 1]
            if tag.startswith(prefix):
                out.append((words[1], words[2:], tag))
    return out


# --- who uses our mark bits ------------------------------------------------------------------


def _mark_values(expr) -> list[int]:
    """Integers in the statements of a rule that read or write a packet or connection mark."""
    values = []
    for stmt in expr:
        text = json.dumps(stmt)
        if '"key": "mark"' in text:
            values += [v for v in _walk(stmt) if isinstance(v, int) and not isinstance(v, bool)]
    return values


def mark_users(facts: FirewallFacts, mask: int, own_prefix: str) -> list[str]:
    users = []
    for item in facts.nft:
        rule = item.get("rule")
        if rule and not rule["table"].startswith(own_prefix):
            if any(v & mask for v in _mark_values(rule["expr"])):
                users.append(f"nft table {rule['family']} {rule['table']} chain {rule['chain']}")
    table = "?"
    for line in facts.legacy_all.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif "mark" in line.lower():
            if any(int(v, 16) & mask for v in re.findall(r"0x([0-9a-fA-F]+)", line)):
                chain = line.split()[1] if len(line.split()) > 1 else "?"
                users.append(f"iptables-legacy table {table} chain {chain}")
    return sorted(set(users))
