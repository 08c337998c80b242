"""transaction.Transaction with fault injection: fake changes record what was done and undone, and fail
where a test says. No root, no kernel: the transaction never looks inside a change.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import pytest

from nswrap.changes import Change
from nswrap.errors import NswrapError
from nswrap.transaction import Transaction

N = 5


class Boom(Exception):
    pass


@dataclass(eq=False)
class Fake(Change):
    name: str
    log: list[str]
    fail_do: BaseException | None = None
    fail_undo: BaseException | None = None
    lines: int = 1
    kernels: list[object] = field(default_factory=list)

    def do(self, kernel) -> None:
        self.kernels.append(kernel)
        self.log.append(f"do {self.name}")
        if self.fail_do is not None:
            raise self.fail_do

    def undo(self, kernel) -> None:
        self.log.append(f"undo {self.name}")
        if self.fail_undo is not None:
            raise self.fail_undo

    def render(self) -> str:
        return "\n".join([f"add {self.name}"] + [f"  more of {self.name}"] * (self.lines - 1))

    def render_undo(self) -> str:
        return f"del {self.name}"


def changes(log: list[str], **faults: dict[str, BaseException]) -> list[Fake]:
    """c0..c4; faults={'do': {'c2': Boom()}, 'undo': {...}}."""
    do, undo = faults.get("do", {}), faults.get("undo", {})
    return [Fake(f"c{i}", log, do.get(f"c{i}"), undo.get(f"c{i}")) for i in range(N)]


KERNEL = object()


def test_all_changes_run_in_order_and_commit():
    log: list[str] = []
    said: list[str] = []
    with Transaction(KERNEL, say=said.append) as tx:  # type: ignore[arg-type]
        tx.run_all(changes(log))
    assert log == [f"do c{i}" for i in range(N)]
    assert said == [f"add c{i}" for i in range(N)]
    assert tx.done == []  # committed: nothing left to undo


@pytest.mark.parametrize("failing", range(N))
def test_a_failure_undoes_everything_before_in_reverse_and_reraises(failing):
    """The failing change's own undo runs first (recorded before it was done, it treats
    "already gone" as success), then every earlier one, newest first."""
    log: list[str] = []
    error = Boom(f"c{failing} failed")
    with pytest.raises(Boom) as raised:
        with Transaction(KERNEL, say=lambda line: None) as tx:  # type: ignore[arg-type]
            tx.run_all(changes(log, do={f"c{failing}": error}))
    assert raised.value is error, "the original error, not one from the rollback"
    assert log == [f"do c{i}" for i in range(failing + 1)] + [f"undo c{i}" for i in range(failing, -1, -1)]
    assert tx.done == []


@pytest.mark.parametrize("failing", range(N))
@pytest.mark.parametrize("undo_fails", [0, 2, 4])
def test_an_undo_failure_is_logged_and_the_rest_still_run(failing, undo_fails, caplog):
    log: list[str] = []
    bad = {"do": {f"c{failing}": Boom("do failed")}, "undo": {f"c{undo_fails}": OSError(errno.EBUSY, "Device or resource busy")}}
    with caplog.at_level(logging.WARNING, logger="nswrap"), pytest.raises(Boom, match="do failed"):
        with Transaction(KERNEL, say=lambda line: None) as tx:  # type: ignore[arg-type]
            tx.run_all(changes(log, **bad))
    assert log[failing + 1:] == [f"undo c{i}" for i in range(failing, -1, -1)], "every undo ran"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if undo_fails <= failing:
        assert warnings == [f"undo failed: del c{undo_fails}: [Errno {errno.EBUSY}] Device or resource busy"]
    else:
        assert warnings == []  # never done, never undone


def test_rollback_returns_the_undo_errors():
    log: list[str] = []
    tx = Transaction(KERNEL, say=lambda line: None)  # type: ignore[arg-type]
    tx.run_all(changes(log, undo={"c1": RuntimeError("gone wrong"), "c3": NswrapError("nft refused")}))
    assert tx.rollback() == ["del c3: nft refused", "del c1: gone wrong"]
    assert log[N:] == [f"undo c{i}" for i in range(N - 1, -1, -1)]
    assert tx.rollback() == []  # nothing twice


def test_an_oserror_becomes_one_line_naming_the_change():
    log: list[str] = []
    change = Fake("rule 5002", log, OSError(errno.EPERM, "Operation not permitted"), lines=3)
    tx = Transaction(KERNEL, say=lambda line: None)  # type: ignore[arg-type]
    with pytest.raises(NswrapError) as raised:
        tx.run(change)
    assert str(raised.value) == "add rule 5002: Operation not permitted"
    assert isinstance(raised.value.__cause__, OSError)
    bare = Fake("x", log, OSError("no errno"))
    with pytest.raises(NswrapError, match="^add x: no errno$"):
        tx.run(bare)


def test_other_errors_pass_through_unchanged():
    log: list[str] = []
    tx = Transaction(KERNEL, say=lambda line: None)  # type: ignore[arg-type]
    for error in (NswrapError("nft refused the ruleset: syntax error"), KeyboardInterrupt(), ValueError("bug")):
        with pytest.raises(type(error)) as raised:
            tx.run(Fake("x", log, error))
        assert raised.value is error


def test_ctrl_c_during_setup_rolls_back_too():
    log: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with Transaction(KERNEL, say=lambda line: None) as tx:  # type: ignore[arg-type]
            tx.run_all(changes(log, do={"c3": KeyboardInterrupt()}))
    assert log == ["do c0", "do c1", "do c2", "do c3", "undo c3", "undo c2", "undo c1", "undo c0"]


def test_a_checkpoint_interrupts_between_changes():
    log: list[str] = []
    calls = []

    def checkpoint() -> None:
        calls.append(len(log))
        if len(log) == 2:
            raise Boom("SIGTERM during setup")

    with pytest.raises(Boom):
        with Transaction(KERNEL, checkpoint=checkpoint, say=lambda line: None) as tx:  # type: ignore[arg-type]
            tx.run_all(changes(log))
    assert log == ["do c0", "do c1", "undo c1", "undo c0"], "c2 was never started, so never undone"


def test_every_change_gets_the_transactions_kernel():
    log: list[str] = []
    items = changes(log)
    with Transaction(KERNEL, say=lambda line: None) as tx:  # type: ignore[arg-type]
        tx.run_all(items)
    assert all(c.kernels == [KERNEL] for c in items)


def test_the_undo_line_is_said_when_rolling_back():
    log: list[str] = []
    said: list[str] = []
    with pytest.raises(Boom):
        with Transaction(KERNEL, say=said.append) as tx:  # type: ignore[arg-type]
            tx.run_all(changes(log, do={"c1": Boom()}))
    assert said == ["add c0", "add c1", "del c1", "del c0"]


@pytest.mark.parametrize("failing", range(N))
def test_best_effort_runs_every_change_and_undoes_nothing(failing, caplog):
    """Teardown, cleanup, fail closed: one failure (of any kind) is said, the rest still runs."""
    log: list[str] = []
    tx = Transaction(KERNEL)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="nswrap"):
        errors = tx.run_each(changes(log, do={f"c{failing}": ValueError("nft said garbage")}), "teardown")
    assert log == [f"do c{i}" for i in range(N)]
    assert errors == [f"add c{failing}: nft said garbage"]
    assert f"teardown: add c{failing}: nft said garbage" in caplog.text
    assert tx.rollback() == [] and log == [f"do c{i}" for i in range(N)]  # nothing kept to undo
