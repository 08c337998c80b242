"""The transaction: runs host changes in order and keeps their undo stack.

The only module that calls a change's `do` or `undo` (changes.py): setup, following the host,
teardown, the sweep and sysctl restores all go through here. On failure, everything applied so far
is undone in reverse and the original error re-raised; an undo that fails is logged and the rest
still run. Each change's undo is recorded *before* it is done, and every undo treats "already gone"
as success, so an interruption at any point rolls back exactly what exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from nswrap import netlink
from nswrap.changes import Change
from nswrap.datatypes import datatype, field
from nswrap.errors import NswrapError

log = logging.getLogger("nswrap")


class Kernel:
    """The adapters changes act through, opened once per transaction's owner."""

    def __init__(self, routing: netlink.Routing | None = None):
        self.routing = routing or netlink.Routing()
        self._conntrack: netlink.Conntrack | None = None

    def fast(self):
        """The fast path's adapter (nswrap/bpf/fast.py), imported only where it is used."""
        from nswrap.bpf import fast

        return fast

    def conntrack(self) -> netlink.Conntrack:
        if self._conntrack is None:
            self._conntrack = netlink.Conntrack()
        return self._conntrack

    def close(self) -> None:
        self.routing.close()
        if self._conntrack is not None:
            self._conntrack.close()
            self._conntrack = None

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@datatype(frozen=False)
class Done:
    """An undo entry: the change applied and how it reads when undone."""

    change: Change
    line: str


@datatype(frozen=False)
class Transaction:
    kernel: Kernel
    checkpoint: Callable[[], None] = lambda: None  # raises to interrupt between changes
    # -v: each change as the shell lines a person would type, printed as they are (pasteable)
    say: Callable[[str], None] = lambda line: log.info("%s", line, extra={"shell": True})
    done: list[Done] = field(default_factory=list)

    def run(self, change: Change) -> None:
        self.checkpoint()
        line = change.render()
        self.say(line)
        self.done.append(Done(change, change.render_undo()))
        try:
            change.do(self.kernel)
        except OSError as e:  # the kernel said no: one line naming the change
            raise NswrapError(f"{line.splitlines()[0]}: {e.strerror or e}") from e

    def run_all(self, changes: list[Change]) -> None:
        for change in changes:
            self.run(change)

    def run_each(self, changes: Sequence[Change], what: str = "") -> list[str]:
        """Best effort (teardown, cleanup, fail closed): every change runs whatever the others
        did; the errors are logged (prefixed `what`) and returned; nothing is kept to undo."""
        errors = []
        for change in changes:
            try:
                self.run(change)
            except Exception as e:  # the rest still runs
                line = f"{change.render().splitlines()[0]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                errors.append(line)
                log.warning("%s%s", f"{what}: " if what else "", line)
        self.commit()
        return errors

    def rollback(self) -> list[str]:
        """Undo everything, newest first; returns the undo errors (also logged)."""
        errors = []
        while self.done:
            entry = self.done.pop()
            self.say(entry.line)
            try:
                entry.change.undo(self.kernel)
            except Exception as e:  # keep going: one failed undo must not skip the others
                errors.append(f"{entry.line.splitlines()[0]}: {e}")
                log.warning("undo failed: %s: %s", entry.line.splitlines()[0], e)
        return errors

    def commit(self) -> None:
        """What was done stays done: forget the undo stack."""
        self.done.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is not None:
            self.rollback()
        else:
            self.commit()
