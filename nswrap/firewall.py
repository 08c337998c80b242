"""Pure: other tools' firewalls on nswrap's path. What would drop its forwarded flows, where to
make room, and who else uses its mark bits, from the nft JSON ruleset (which includes
iptables-nft's tables), `iptables-legacy-save`, and, where the JSON names an xt extension on
marks without its values, those read from the kernel (nftrules.py).

A drop in any table is final (nftables evaluates every base chain on a hook), so an accept in
nswrap's own table cannot rescue a flow another table drops. nswrap makes room only where the
tool documents it (Docker: DOCKER-USER; ufw and plain iptables: the top of FORWARD); other tools'
native nft chains are never edited: nswrap refuses and names the chain instead.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from collections.abc import Iterator
from typing import Any

from nswrap.datapath import Room
from nswrap.datatypes import datatype
from nswrap.netlink.nftrules import Xt
from nswrap.ruleset import TABLE

TAG = "nswrap"  # the comment on nswrap's iptables rules


@datatype
class Blocker:
    where: str  # human words, e.g. "iptables-nft chain FORWARD (policy drop)"
    backend: str | None  # "iptables-nft" / "iptables-legacy": nswrap can make room; None: it cannot
    chain: str = "FORWARD"  # where to insert: DOCKER-USER when Docker's hook exists


@datatype
class FirewallFacts:
    nft: tuple[dict[str, Any], ...] = ()  # `nft -j list ruleset` items
    legacy: str = ""  # `iptables-legacy-save`, "" when no legacy table is loaded
    legacy6: str = ""  # `ip6tables-legacy-save`, the same for IPv6
    # the xt extensions of every rule, read over netlink (nftrules.py) only when `nft -j` shows one
    # on marks (XT_MARKS), since it does not show their values; `xt_error`: why they could not be
    xt: tuple[Xt, ...] = ()
    xt_error: str = ""


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
    """iptables-nft's or ip6tables-nft's own FORWARD (ufw and Docker set both families' policy)."""
    return family in IPTABLES_NFT and table == "filter" and chain.isupper()


def _legacy_filter(save: str) -> list[str]:
    lines, inside = [], False
    for line in save.splitlines():
        if line.startswith("*"):
            inside = line == "*filter"
        elif inside:
            lines.append(line)
    return lines


def _unconditional(expr: list[Any]) -> bool:
    """A rule every flow of nswrap matches: only a verdict (and counters, logging), or matches
    on nothing but the protocol (UDP or TCP, IPv4 or IPv6)."""
    for stmt in expr:
        if set(stmt) <= {"counter", "drop", "reject", "accept", "log"}:
            continue
        match = stmt.get("match", {})
        key = match.get("left", {}).get("meta", {}).get("key") if isinstance(match.get("left"), dict) else None
        right = json.dumps(match.get("right"))
        if key in ("l4proto", "nfproto", "protocol") and any(p in right for p in ('"udp"', '"tcp"', '"ipv4"', '"ipv6"')):
            continue
        return False
    return True


def _chain_blocks(chain: dict[str, Any], exprs: list[list[Any]]) -> str | None:
    """Why a forward chain would drop nswrap's flows, or None. Rules run in order: a rule that
    lets nswrap's flows pass (firewalld's `ct status dnat accept`, or one naming our veths)
    settles it, unless an unconditional drop comes first; a conditional drop elsewhere cannot be
    judged without the packet, so it is taken as blocking only when nothing lets ours pass."""
    for expr in exprs:
        if _lets_ours_pass(expr):
            return None
        if _verdicts(expr) & {"drop", "reject"} and _unconditional(expr):
            return "a drop rule"
    if chain.get("policy") == "drop":
        return "policy drop"
    if any(_verdicts(e) & {"drop", "reject"} for e in exprs):
        return "a drop rule"
    return None


IPTABLES_NFT = {"ip": "iptables-nft", "ip6": "ip6tables-nft"}


def blockers(facts: FirewallFacts) -> list[Blocker]:
    """Every other firewall, IPv4 and IPv6, that would drop nswrap's forwarded flows."""
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
        if chain.get("hook") != "forward" or family not in ("ip", "ip6", "inet") or (family, table) == ("inet", TABLE):
            continue
        exprs = rules.get(key, [])
        if family in IPTABLES_NFT and _iptables_nft(family, table, name):
            # iptables: a policy or DROP anywhere, whatever comes before; nswrap makes room at the top
            reason = "policy drop" if chain.get("policy") == "drop" else (
                "a drop rule" if any(_verdicts(e) & {"drop", "reject"} for e in exprs) else None)
            if reason:
                docker = (family, table, "DOCKER-USER") in chains
                target = "DOCKER-USER" if docker else "FORWARD"
                found.append(Blocker(f"{IPTABLES_NFT[family]} chain FORWARD ({reason})", IPTABLES_NFT[family], target))
            continue
        reason = _chain_blocks(chain, exprs)
        if reason:
            found.append(Blocker(f"nft chain {family} {table} {name} ({reason})", None))
    for binary, save in (("iptables-legacy", facts.legacy), ("ip6tables-legacy", facts.legacy6)):
        legacy = "\n".join(_legacy_filter(save))
        if not legacy:
            continue
        policy_drop = re.search(r"^:FORWARD DROP", legacy, re.M) is not None
        if policy_drop or re.search(r"^-A FORWARD .*-j (DROP|REJECT)", legacy, re.M):
            docker = re.search(r"^:DOCKER-USER ", legacy, re.M) is not None
            reason = "policy DROP" if policy_drop else "a DROP/REJECT rule"
            target = "DOCKER-USER" if docker else "FORWARD"
            found.append(Blocker(f"{binary} chain FORWARD ({reason})", binary, target))
    return found


def rooms(blocker: Blocker) -> list[Room]:
    """The narrowest room: nswrap's veths, both ways (nswrap's own guard decides what may cross
    them); into them only DNATed flows and replies."""
    assert blocker.backend is not None
    comment = ("-m", "comment", "--comment", TAG)
    return [
        Room(blocker.backend, blocker.chain, ("-i", "nsw-+", *comment, "-j", "ACCEPT")),
        Room(blocker.backend, blocker.chain,
             ("-o", "nsw-+", "-m", "conntrack", "--ctstate", "DNAT,RELATED,ESTABLISHED", *comment, "-j", "ACCEPT")),
    ]


def how_to_fix(blocker: Blocker) -> str:
    return (
        f"forwarded flows of nswrap would be dropped by {blocker.where}: nswrap does not edit other tools' "
        "nft tables; add 'iifname \"nsw-*\" accept' and 'oifname \"nsw-*\" accept' (or 'ct status dnat accept') "
        "at the top of that chain"
    )


# numbers inside a mark statement that are not marks: a set element's counter, a hash's seed
NOT_MARKS = frozenset({"counter", "seed", "timeout", "expires", "quota", "limit"})


def _mark_conflict(node: Any, mask: int, writing: bool = False, masking: bool = False) -> bool:
    """Does a statement read or write a packet or connection mark in a way that meets our bits?
    A value compared or set conflicts if it has our bits; an AND mask conflicts when reading
    through it sees our bits, or when writing through it clears them; so does a match nft lists
    as a prefix (`meta mark and 0xffff0000 == 0x10000` is `0x00010000/16`) whose mask sees them."""
    if isinstance(node, dict):
        if "mangle" in node:
            target = json.dumps(node["mangle"].get("key", {}))
            return '"mark"' in target and _mark_conflict(node["mangle"].get("value"), mask, True)
        if "&" in node:
            return any(_mark_conflict(v, mask, writing, True) for v in node["&"])
        prefix = node.get("prefix")
        if isinstance(prefix, dict) and isinstance(prefix.get("addr"), int) and isinstance(prefix.get("len"), int):
            through = (0xFFFFFFFF << (32 - min(max(prefix["len"], 0), 32))) & 0xFFFFFFFF  # a mark, not an address
            return bool(prefix["addr"] & mask) or (prefix["len"] < 32 and bool(through & mask))
        return any(_mark_conflict(v, mask, writing, masking) for k, v in node.items() if k not in NOT_MARKS)
    if isinstance(node, list):
        return any(_mark_conflict(v, mask, writing, masking) for v in node)
    if isinstance(node, int) and not isinstance(node, bool):
        if masking and writing:
            return bool(~node & 0xFFFFFFFF & mask)  # it clears some of our bits
        return bool(node & mask)
    return False


def _uses_mark(stmt: Any) -> bool:
    return '"key": "mark"' in json.dumps(stmt)


def _named(facts: FirewallFacts) -> dict[tuple[str, str, str], Any]:
    """(family, table, name) -> the elements of every named set and map, for `@name` in rules."""
    found = {}
    for item in facts.nft:
        for kind in ("set", "map"):
            if kind in item:
                s = item[kind]
                found[(s["family"], s["table"], s["name"])] = s.get("elem", [])
    return found


def _resolved(node: Any, family: str, table: str, named: dict[tuple[str, str, str], Any]) -> Any:
    """A statement with each `@name` replaced by that set's or map's elements."""
    if isinstance(node, str) and node.startswith("@"):
        return named.get((family, table, node[1:]), node)
    if isinstance(node, dict):
        return {k: _resolved(v, family, table, named) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolved(v, family, table, named) for v in node]
    return node


# The xt extensions (iptables-nft's and ebtables-nft's compat expressions) that read or write a
# packet or connection mark, per family. `nft -j` lists them by name only ({"xt": {"type":
# "target", "name": "MARK"}}): their values are read from the kernel (nftrules.py) and decoded by
# `xt_values`. (arp: arptables' MARK marks ARP packets, never nswrap's flows.)
_XT_IP = frozenset({("target", "MARK"), ("target", "CONNMARK"), ("target", "TPROXY"), ("target", "HMARK"),
                    ("match", "mark"), ("match", "connmark")})
XT_MARKS = {"ip": _XT_IP, "ip6": _XT_IP, "bridge": frozenset({("target", "mark"), ("match", "mark_m")})}
XT_CONNMARK_SET = 0  # CONNMARK's mode: --set-xmark uses ctmark/ctmask; --save-mark, --restore-mark the masks
# ebtables' mark target (include/uapi/linux/netfilter_bridge/ebt_mark_t.h): the operation, in
# `target & -16`
EBT_MARK_SET, EBT_MARK_OR, EBT_MARK_AND, EBT_MARK_XOR = 0xFFFFFFF0, 0xFFFFFFE0, 0xFFFFFFD0, 0xFFFFFFC0


def _match(mark: int, mask: int) -> list[int]:
    """A match's numbers: a whole-value match (`--mark 0x1`, the full mask iptables-save leaves
    unsaid) is another tool's own value, judged by its value alone."""
    return [mark] if mask & 0xFFFFFFFF == 0xFFFFFFFF else [mark, mask]


def xt_values(x: Xt) -> list[int] | None:
    """The numbers an xt extension's struct gives the mark, as iptables-save would print them and
    judged the same way (`_mark_values`): a value and its mask; the bits an AND clears; 0xffffffff
    for a write of the whole mark (HMARK, ebtables' --mark-set). None: a layout nswrap does not
    know (another revision)."""
    def words(n: int, layout: str = "=") -> tuple[int, ...]:
        return struct.unpack_from(f"{layout}{n}{'L' if layout == '@' else 'I'}", x.info)

    try:
        match (x.type, x.name, x.rev):
            case ("target", "MARK", 2):
                return list(words(2))  # xt_mark_tginfo2: mark, mask (mark = mark & ~mask ^ value)
            case ("match", "mark", 1) | ("match", "connmark", 1):
                return _match(*words(2))  # xt_mark_mtinfo1, xt_connmark_mtinfo1: mark, mask
            case ("target", "CONNMARK", 1 | 2):  # xt_connmark_tginfo1/2: ctmark, ctmask, nfmask, ..., mode
                ctmark, ctmask, nfmask = words(3)
                mode = x.info[12 if x.rev == 1 else 14]  # after rev 2's shift_dir and shift_bits
                return [ctmark, ctmask] if mode == XT_CONNMARK_SET else [ctmask, nfmask]  # --save/--restore-mark
            case ("target", "TPROXY", 0 | 1):
                return list(words(2))  # xt_tproxy_target_info(_v1): mark_mask, mark_value
            case ("target", "HMARK", _):
                return [0xFFFFFFFF]  # mark = hash % mod + offset
            case ("target", "mark", 0):  # ebt_mark_t_info: unsigned long mark; int target
                (mark,) = words(1, "@")
                action = struct.unpack_from("@i", x.info, struct.calcsize("@L"))[0] & -16 & 0xFFFFFFFF
                return {EBT_MARK_SET: [0xFFFFFFFF, mark & 0xFFFFFFFF],
                        EBT_MARK_AND: [~mark & 0xFFFFFFFF]}.get(action, [mark & 0xFFFFFFFF])
            case ("match", "mark_m", 0):  # ebt_mark_m_info: unsigned long mark, mask
                return _match(*(w & 0xFFFFFFFF for w in words(2, "@")))
    except (struct.error, IndexError):
        return None  # shorter than its struct
    return None


def _xt_marks(family: str, expr: list[Any]) -> list[tuple[str, str]]:
    """(type, name) of a rule's xt extensions that carry a mark."""
    known = XT_MARKS.get(family, frozenset())
    return [(x["type"], x["name"]) for x in (s.get("xt") for s in expr)
            if isinstance(x, dict) and (x.get("type"), x.get("name")) in known]


def needs_xt(nft: tuple[dict[str, Any], ...]) -> bool:
    """Does another table have an xt extension on marks, whose values must be read?"""
    return any(_xt_marks(rule["family"], rule["expr"]) for _, rule in _other_rules(FirewallFacts(nft)))


XtIndex = dict[tuple[str, str, str, int | None], list[Xt]]


def _xt_index(facts: FirewallFacts) -> XtIndex:
    """The xt extensions by rule: (family, table, chain, handle), as `nft -j` names the rule."""
    index: XtIndex = {}
    for x in facts.xt:
        index.setdefault((x.family, x.table, x.chain, x.handle), []).append(x)
    return index


def _xt_conflict(xts: XtIndex, rule: dict[str, Any], mask: int) -> bool | None:
    """Do the rule's xt mark extensions use a value under our mask? None: not read (the rule
    came after the dump, or a layout nswrap does not know)."""
    marks = set(_xt_marks(rule["family"], rule["expr"]))
    found = [xt_values(x) for x in xts.get((rule["family"], rule["table"], rule["chain"], rule.get("handle")), ())
             if (x.type, x.name) in marks]
    if not found or any(values is None for values in found):
        return None
    return any(v & mask for values in found for v in values or ())


def _save_rules(save: str) -> Iterator[tuple[str, str]]:
    """(table, line) of every `-A` line of an iptables-save (or ebtables-save) output."""
    table = "?"
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and len(line.split()) > 1:
            yield table, line


def _other_rules(facts: FirewallFacts) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, rule) of every rule in a table not nswrap's (`inet nswrap`: another family's table
    of that name is someone else's)."""
    for item in facts.nft:
        rule = item.get("rule")
        if rule and (rule["family"], rule["table"]) != ("inet", TABLE):
            yield f"nft table {rule['family']} {rule['table']} chain {rule['chain']}", rule


def mark_users(facts: FirewallFacts, mask: int) -> list[str]:
    """Other tables' rules, iptables-legacy rules and xt extensions that use a value under our
    mask (a named set or map a rule refers to: its elements)."""
    named, xts = _named(facts), _xt_index(facts)
    users = [where for where, rule in _other_rules(facts)
             if any(_uses_mark(s) and _mark_conflict(_resolved(s, rule["family"], rule["table"], named), mask)
                    for s in rule["expr"])
             or (_xt_marks(rule["family"], rule["expr"]) and _xt_conflict(xts, rule, mask))]
    for binary, save in (("iptables-legacy", facts.legacy), ("ip6tables-legacy", facts.legacy6)):
        users += [f"{binary} table {table} chain {line.split()[1]}"
                  for table, line in _save_rules(save) if any(v & mask for v in _mark_values(line))]
    return sorted(set(users))


def unreadable_marks(facts: FirewallFacts) -> list[tuple[str, str]]:
    """(rule, why) of the rules whose xt mark extensions were not read: nswrap cannot tell
    whether they use its bits, whatever the mask."""
    found, xts = set(), _xt_index(facts)
    for where, rule in _other_rules(facts):
        names = "/".join(name for _, name in _xt_marks(rule["family"], rule["expr"]))
        if names and _xt_conflict(xts, rule, 0) is None:
            found.add((f"{where} (xt {names})", facts.xt_error or "its values could not be read (a revision nswrap "
                                                                  "does not know, or the rule changed meanwhile)"))
    return sorted(found)


# The options of iptables-save's (and ebtables-save's) lines that carry a mark value or mask
# (MARK, CONNMARK, TPROXY, HMARK, the mark and connmark matches; ebtables' mark target and match)
MARK_OPTIONS = frozenset({"--set-xmark", "--set-mark", "--and-mark", "--or-mark", "--xor-mark", "--mark", "--nfmask",
                          "--ctmask", "--mask", "--tproxy-mark", "--hmark-offset",
                          "--mark-set", "--mark-or", "--mark-and", "--mark-xor"})
AND_OPTIONS = frozenset({"--and-mark", "--mark-and"})  # the bits they keep: what they clear is what counts
# writes of the whole mark, whatever their value: ebtables' `--mark-set`; HMARK (mark = hash % mod + offset)
WHOLE_MARK = frozenset({"--mark-set", "--hmark-mod"})


def _mark_values(line: str) -> list[int]:
    """The numbers an iptables-save line gives its mark options (`0x4000/0x4000`: both), and only
    those: a comment or an interface name that reads `0xf0000000` is not a mark."""
    try:
        words = shlex.split(line)
    except ValueError:  # an unbalanced quote: take every word
        words = line.split()
    values = []
    for option, value in zip(words, words[1:], strict=False):  # each word and the next
        if option in WHOLE_MARK:
            values.append(0xFFFFFFFF)
        if option in MARK_OPTIONS:
            for number in value.split("/"):
                try:
                    n = int(number, 0)
                except ValueError:
                    continue  # `--mask 255.255.255.255` of the recent match, say
                values.append(~n & 0xFFFFFFFF if option in AND_OPTIONS else n)
    return values
