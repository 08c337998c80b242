"""The only module that drives nftables: through the `nft` binary, one atomic batch per call.

The binary (not libnftables in-process) on purpose: each batch is atomic, and no netlink socket of
ours can leak into the server we start afterwards. Reading parses `nft -j`; a listing that fails
raises (NswrapError): "could not look" is never "nothing there".
"""

from __future__ import annotations

import json
import subprocess

from nswrap.datapath import Element
from nswrap.datatypes import datatype, field
from nswrap.errors import NswrapError
from nswrap.ruleset import TABLE, VERSION_SET

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _nft(args: list[str], text: str | None = None, namespace_fd: int | None = None) -> subprocess.CompletedProcess:
    preexec = None
    if namespace_fd is not None:
        from nswrap import namespaces

        preexec = lambda: namespaces.enter_net(namespace_fd)  # noqa: E731
    try:
        return subprocess.run(["nft", *args], input=text, capture_output=True, text=True, timeout=60, env=ENV,
                              preexec_fn=preexec, pass_fds=(namespace_fd,) if namespace_fd is not None else ())
    except FileNotFoundError:
        raise NswrapError("nft not found: install nftables") from None
    except subprocess.TimeoutExpired:
        raise NswrapError(f"nft {' '.join(args)} did not answer within 60 s") from None


def _first_error(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if line.strip()), "unknown error")


def apply(text: str, namespace_fd: int | None = None) -> None:
    """Load a batch atomically: all of it or nothing."""
    done = _nft(["-f", "-"], text, namespace_fd)
    if done.returncode != 0:
        raise NswrapError(f"nft refused the ruleset: {_first_error(done.stderr)}")


def check(text: str) -> None:
    """`nft -c`: would the kernel take this batch? Nothing is committed."""
    done = _nft(["-c", "-f", "-"], text)
    if done.returncode != 0:
        raise NswrapError(_first_error(done.stderr))


@datatype(frozen=False)
class Table:
    """nswrap's table as the kernel has it."""

    elements: dict[str, frozenset[Element]] = field(default_factory=dict)
    counters: dict[tuple[str, Element], tuple[int, int]] = field(default_factory=dict)  # packets, bytes
    rules: dict[str, int] = field(default_factory=dict)  # chain -> number of rules
    version: str = ""
    named_counters: dict[str, int] = field(default_factory=dict)  # counter object -> packets


def read_table() -> Table | None:
    """nswrap's table, or None if there is none."""
    done = _nft(["-j", "list", "table", "inet", TABLE])
    if done.returncode != 0:
        if "No such file or directory" in done.stderr:
            return None
        raise NswrapError(f"nft list table inet {TABLE}: {_first_error(done.stderr)}")
    return parse_table(json.loads(done.stdout)["nftables"])


def table_in(items: list[dict]) -> Table | None:
    """nswrap's table out of a whole `nft -j list ruleset`, or None if it has none."""
    ours = [item for item in items for body in item.values()
            if isinstance(body, dict) and body.get("family") == "inet" and body.get("table", body.get("name")) == TABLE]
    return parse_table(ours) if any("table" in item for item in ours) else None


def parse_table(items: list[dict]) -> Table:
    table = Table()
    for item in items:
        if "chain" in item:
            table.rules.setdefault(item["chain"]["name"], 0)
        elif "rule" in item:
            chain = item["rule"]["chain"]
            table.rules[chain] = table.rules.get(chain, 0) + 1
        if "counter" in item and isinstance(item["counter"], dict):
            table.named_counters[item["counter"]["name"]] = item["counter"].get("packets", 0)
        for kind in ("set", "map"):
            if kind in item:
                _read_set(table, item[kind])
    return table


def _read_set(table: Table, s: dict) -> None:
    types = s["type"] if isinstance(s["type"], list) else [s["type"]]
    value_types = s.get("map", "").split(" . ") if "map" in s else []
    found = set()
    for raw in s.get("elem", []):
        key_raw, value_raw = (raw[0], raw[1]) if "map" in s else (raw, None)
        comment, counter = "", None
        if isinstance(key_raw, dict) and "elem" in key_raw:
            comment = key_raw["elem"].get("comment", "")
            counter = key_raw["elem"].get("counter")
            key_raw = key_raw["elem"]["val"]
        key = tuple(_word(t, v) for t, v in zip(types, _parts(key_raw), strict=False))
        value = tuple(_word(t, v) for t, v in zip(value_types, _parts(value_raw), strict=False)) if value_raw is not None else ()
        element = Element(key, value, comment)
        found.add(element)
        if counter:
            table.counters[(s["name"], element)] = (counter["packets"], counter["bytes"])
    if s["name"] == VERSION_SET:
        table.version = next((e.comment for e in found), "")
    else:
        table.elements[s["name"]] = frozenset(found)


def _parts(raw) -> list:
    return raw["concat"] if isinstance(raw, dict) and "concat" in raw else [raw]


def _word(kind: str, v) -> str:
    """One field of an element, written as nft reads it (and as datapath.py writes it)."""
    if isinstance(v, dict):
        if "range" in v:
            return f"{v['range'][0]}-{v['range'][1]}"
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "goto" in v:
            return f"goto {v['goto']['target']}"
        if "jump" in v:
            return f"jump {v['jump']['target']}"
    if kind == "ifname":
        return f'"{v}"'
    if kind == "mark":
        return f"{int(v):#010x}"
    return str(v)


def delete_table(family: str, name: str) -> None:
    """Delete a table; one already gone is success."""
    done = _nft(["delete", "table", family, name])
    if done.returncode != 0 and "No such file or directory" not in done.stderr:
        raise NswrapError(f"nft delete table {family} {name}: {_first_error(done.stderr)}")


def tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table in this namespace."""
    done = _nft(["-j", "list", "tables"])
    if done.returncode != 0:
        raise NswrapError(f"nft list tables: {_first_error(done.stderr)}")
    return [(t["table"]["family"], t["table"]["name"]) for t in json.loads(done.stdout)["nftables"] if "table" in t]


def has_table() -> bool:
    """Does nswrap's table exist? (Without reading its elements back.)"""
    return ("inet", TABLE) in tables()


def ruleset() -> list[dict]:
    """`nft -j list ruleset`: every table, for the firewall and mark checks."""
    done = _nft(["-j", "list", "ruleset"])
    if done.returncode != 0:
        raise NswrapError(f"nft list ruleset: {_first_error(done.stderr)}")
    return json.loads(done.stdout)["nftables"]
