"""The only module that drives nftables: through the `nft` binary, one batch per call.

The binary (not libnftables in-process) on purpose: each batch is atomic, and no netlink socket of
ours can leak into the server we start afterwards.
"""

from __future__ import annotations

import json
import subprocess

from nswrap.errors import NswrapError


def _nft(args: list[str], text: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["nft", *args], input=text, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise NswrapError("nft not found: install nftables") from None


def apply(text: str) -> None:
    """Load a ruleset batch atomically: all of it or nothing."""
    done = _nft(["-f", "-"], text)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if line.strip()), "unknown error")
        raise NswrapError(f"nft refused the ruleset: {first}")


def replace(family: str, name: str, text: str) -> None:
    """Swap our table for a new definition in one transaction: no packet sees a half table."""
    apply(f"table {family} {name} {{}}\ndelete table {family} {name}\n{text}")


def counters(family: str, name: str, chain: str) -> dict[str, tuple[int, int]]:
    """Packets and bytes counted in `chain`, summed per input interface its rules match."""
    done = _nft(["-j", "list", "chain", family, name, chain])
    found: dict[str, tuple[int, int]] = {}
    if done.returncode != 0:
        return found
    for item in json.loads(done.stdout)["nftables"]:
        exprs = item.get("rule", {}).get("expr", [])
        iifname = next((e["match"]["right"] for e in exprs if "match" in e and e["match"].get("left") == {"meta": {"key": "iifname"}}), None)
        counter = next((e["counter"] for e in exprs if "counter" in e), None)
        if isinstance(iifname, str) and counter:
            packets, octets = found.get(iifname, (0, 0))
            found[iifname] = (packets + counter["packets"], octets + counter["bytes"])
    return found


def tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table in this namespace."""
    done = _nft(["-j", "list", "tables"])
    if done.returncode != 0:
        raise NswrapError(f"nft list tables: {done.stderr.strip()}")
    return [(t["table"]["family"], t["table"]["name"]) for t in json.loads(done.stdout)["nftables"] if "table" in t]


def delete_table(family: str, name: str) -> None:
    """Delete our table; a table already gone is success."""
    done = _nft(["delete", "table", family, name])
    if done.returncode != 0 and "No such file or directory" not in done.stderr:
        raise NswrapError(f"nft delete table {family} {name}: {done.stderr.strip()}")
