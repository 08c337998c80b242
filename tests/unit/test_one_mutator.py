"""Only changes.py (run by the transaction, transaction.py) and the adapters write to the kernel.

An AST check over nswrap/: a call that writes (a sysctl, an nft batch, a netlink request, a
conntrack deletion) anywhere else fails this test, naming the file and line. The adapters are
the modules that talk to one kernel interface each; doctor's probe writes only into a throwaway
namespace of its own.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "nswrap"
ADAPTERS = {"netlink.py", "netlink", "bpf", "nft.py", "iptables.py", "namespaces.py", "supervise.py"}
MUTATOR = {"changes.py", "transaction.py"}
# (module, call) pairs that write into something that is not the host's: a throwaway namespace
ALLOWED = {("doctor.py", "routing.do")}
WRITES = {"write_sysctl", "do", "undo", "delete", "flush_mark", "apply", "batch", "_server_sysctl",
          # BPF objects and tc (nswrap/bpf, nswrap/netlink/tc.py)
          "map_create", "map_update", "map_delete", "map_update_batch", "map_delete_batch",
          "prog_load", "ensure_clsact", "attach", "detach", "remove_clsact"}


def called(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        base = func.value.id if isinstance(func.value, ast.Name) else (
            func.value.attr if isinstance(func.value, ast.Attribute) else "")
        return f"{base}.{func.attr}" if base else func.attr
    return ""


def writes_outside_the_mutator(package: pathlib.Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        top = path.relative_to(package).parts[0]
        if top in ADAPTERS | MUTATOR:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = called(node)
                if name.split(".")[-1] in WRITES and (top, name) not in ALLOWED:
                    found.append(f"{path.relative_to(package)}:{node.lineno}: {name}(...)")
    return found


def test_only_changes_and_the_adapters_write_to_the_kernel():
    assert writes_outside_the_mutator() == []


def test_the_check_sees_a_side_door(tmp_path):
    (tmp_path / "sneaky.py").write_text("from nswrap.changes import write_sysctl\nwrite_sysctl('net/x', '1')\n"
                                        "def f(ct, flows):\n    ct.delete(flows)\n")
    assert writes_outside_the_mutator(tmp_path) == ["sneaky.py:2: write_sysctl(...)", "sneaky.py:4: ct.delete(...)"]
