"""Polling with a deadline: the lab's (and the tests') only way to wait for something."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None], timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Call *predicate* until it returns something truthy and return that.

    Raises ``TimeoutError(what)`` once *timeout* seconds have passed (the
    predicate is always tried at least once, and once more at the deadline).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(what or f"condition not met within {timeout}s")
        time.sleep(min(interval, remaining))
