"""Run nswrap, held between two of its host changes: fault injection at an exact step.

    holdlog.py AFTER HELD_FD GO_FD -- NSWRAP_ARGS...

Runs `python -m nswrap NSWRAP_ARGS` (give -v) in this process, its stderr passed through. nswrap
logs each host change at -v *before* carrying it out; once AFTER of them are logged, the next
record nswrap writes (the next change's, or "serving" after the last one) is held back: this
writes "held before: <that record's first line>" to HELD_FD and blocks until GO_FD yields a byte
or closes. Whatever the test does meanwhile (SIGTERM, SIGKILL) lands exactly after change AFTER
was carried out and before the next one begins. A signal handler of nswrap's runs during the wait
(the read is resumed afterwards, PEP 475), as it would during any other write.

Only nswrap's stderr is looked at, never its internals: the same bytes the tests read.
"""

from __future__ import annotations

import os
import runpy
import sys

# The first line of a host change in the -v log, printed as a pasteable shell line (shared with
# tests/system/common.py).
STEP_LINE = ("ip ", "sysctl ", "nft ", "conntrack ", "iptables")


class HeldStderr:
    """sys.stderr, but holding back the first record after `after` host changes."""

    def __init__(self, stream, after: int, held_fd: int, go_fd: int):
        self.stream, self.after, self.held_fd, self.go_fd = stream, after, held_fd, go_fd
        self.seen = 0
        self.done = False

    def write(self, text: str) -> int:
        if not self.done and text.startswith(("nswrap: ", *STEP_LINE)):  # a record (logging writes one per call)
            if self.seen == self.after:
                self._hold(text.splitlines()[0])
            elif text.startswith(STEP_LINE):
                self.seen += 1
        return self.stream.write(text)

    def _hold(self, first_line: str) -> None:
        self.done = True
        self.stream.flush()
        os.write(self.held_fd, f"held before: {first_line}\n".encode())
        os.close(self.held_fd)
        os.read(self.go_fd, 1)
        os.close(self.go_fd)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def main() -> None:
    after, held_fd, go_fd, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: holdlog.py AFTER HELD_FD GO_FD -- NSWRAP_ARGS..."
    sys.stderr = HeldStderr(sys.stderr, int(after), int(held_fd), int(go_fd))
    sys.argv = ["nswrap", *args]
    runpy.run_module("nswrap", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
