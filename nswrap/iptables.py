"""The only module that runs iptables (iptables-nft and iptables-legacy).

Reads the legacy rules nswrap must know about (nftables' own listing already includes
iptables-nft; the values of its xt extensions come from the kernel, netlink/nftrules.py), and
inserts or deletes nswrap's narrow ACCEPT rules. A command that cannot run raises (NswrapError):
a firewall nswrap could not read is never taken for an empty one.
"""

from __future__ import annotations

import shlex
import subprocess

from nswrap.errors import NswrapError

LEGACY_TABLES = {"iptables-legacy": "/proc/net/ip_tables_names", "ip6tables-legacy": "/proc/net/ip6_tables_names"}
# per network namespace; they list only the loaded tables
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
GONE_MESSAGES = ("does a matching rule exist", "No chain", "Bad rule")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=ENV)
    except FileNotFoundError:
        raise NswrapError(f"{argv[0]} not found: install iptables") from None
    except subprocess.TimeoutExpired:
        raise NswrapError(f"{argv[0]} did not answer within 30 s (another tool holding the xtables lock?)") from None


def legacy_loaded(binary: str = "iptables-legacy") -> list[str]:
    """Legacy tables loaded in this namespace. Listing one would load it, so nswrap only ever
    looks at those already there."""
    try:
        with open(LEGACY_TABLES[binary]) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def _last_line(stderr: str) -> str:
    """iptables' message, one line (a usage error adds "Try `iptables -h'" after it)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("Try `")]
    return lines[-1] if lines else ""


def legacy_save(binary: str = "iptables-legacy") -> str:
    """`iptables-legacy-save` (or ip6tables') of the loaded tables, "" when none is loaded."""
    if not legacy_loaded(binary):
        return ""
    done = _run([f"{binary}-save"])
    if done.returncode != 0:
        raise NswrapError(f"{binary}-save: {_last_line(done.stderr) or done.returncode}")
    return done.stdout


def run(binary: str, action: str, chain: str, rule: list[str]) -> None:
    """Insert (-I) or delete (-D) one rule in the filter table; deleting one already gone is fine."""
    done = _run([binary, "-w", "5", action, chain, *rule])
    if done.returncode != 0:
        message = _last_line(done.stderr) or f"exit {done.returncode}"
        if action == "-D" and any(text in message for text in GONE_MESSAGES):
            return
        raise NswrapError(f"{binary} {action} {chain} {shlex.join(rule)}: {message}")


def rules(binary: str) -> list[list[str]]:
    """`-S` of the filter table, split into words; [] if that table does not exist here."""
    done = _run([binary, "-w", "5", "-t", "filter", "-S"])
    if done.returncode != 0:
        if "does not exist" in done.stderr or "Table does not exist" in done.stderr:
            return []
        raise NswrapError(f"{binary} -S: {_last_line(done.stderr) or done.returncode}")
    return [shlex.split(line) for line in done.stdout.splitlines()]
