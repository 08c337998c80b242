"""nftables rules over nfnetlink, read for one thing: the xt extensions in them.

iptables-nft and ebtables-nft write some matches and targets (MARK, CONNMARK, TPROXY, HMARK, the
mark and connmark matches, ebtables' mark) as nft_compat expressions (`target`, `match`) whose
payload is the xt module's own struct. `nft -j list ruleset` names them without their values
({"xt": {"type": "target", "name": "MARK"}}); firewall.py needs the values to tell whether another
tool uses nswrap's mark bits. A dump of every rule (NFT_MSG_GETRULE, all families) gives each
expression's name, revision and info bytes; the rule's handle joins it to `nft -j`'s rule.
(iptables-nft-save would decode them too, but stops at a native rule of another tool in
iptables' own tables, Tailscale's say, and is not always installed.) Pure but for `xt_extensions`.
"""

from __future__ import annotations

from nswrap.datatypes import datatype
from nswrap.netlink import codec
from nswrap.netlink.codec import NETLINK_NETFILTER, NFGEN, Message
from nswrap.netlink.transport import Socket

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETRULE = 7
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS = 1, 2, 3, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_XT_NAME, NFTA_XT_REV, NFTA_XT_INFO = 1, 2, 3  # NFTA_TARGET_* and NFTA_MATCH_* alike
NFPROTO = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


@datatype
class Xt:
    """One xt extension of a rule, as the kernel holds it."""

    family: str  # as nft -j names it: ip, ip6, bridge, arp
    table: str
    chain: str
    handle: int  # the rule's
    type: str  # "target" or "match"
    name: str  # MARK, mark, CONNMARK, ...
    rev: int
    info: bytes  # the xt module's struct (include/uapi/linux/netfilter/xt_*.h), native byte order


def parse_rule(m: Message) -> list[Xt]:
    """The xt extensions of one rule (NFT_MSG_NEWRULE, as a dump sends them)."""
    family = NFPROTO.get(codec.unpack(NFGEN, m.body)[0], "")
    if b"target\0" not in m.body and b"match\0" not in m.body:
        return []  # most rules of a big ruleset (kube-proxy's): no expression named so, nothing to parse
    a = codec.parse_attrs(m.body, NFGEN.size)
    table, chain = codec.string(a.get(NFTA_RULE_TABLE)), codec.string(a.get(NFTA_RULE_CHAIN))
    handle = int.from_bytes(a.get(NFTA_RULE_HANDLE, b""), "big")
    found = []
    expressions = a.get(NFTA_RULE_EXPRESSIONS, b"")
    for kind, start, end in codec.walk(expressions):
        if kind != NFTA_LIST_ELEM:
            continue
        expr = codec.parse_attrs(expressions[start:end])
        name = codec.string(expr.get(NFTA_EXPR_NAME))
        if name not in ("target", "match"):
            continue
        data = codec.parse_attrs(expr.get(NFTA_EXPR_DATA, b""))
        found.append(Xt(family, table, chain, handle, name, codec.string(data.get(NFTA_XT_NAME)),
                        int.from_bytes(data.get(NFTA_XT_REV, b""), "big"), data.get(NFTA_XT_INFO, b"")))
    return found


def xt_extensions() -> list[Xt]:
    """Every xt extension of every rule of this network namespace, all families."""
    with Socket(NETLINK_NETFILTER) as sock:
        messages = sock.dump(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETRULE, NFGEN.pack(0, 0, 0))
    return [x for m in messages for x in parse_rule(m)]
