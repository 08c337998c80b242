"""Unit tests run without root and change nothing outside their tmp_path: no namespace, no
kernel object, no file under /run. Each test starts with no NSWRAP_* variable set and gets the
"nswrap" logger back as it found it (cli.py replaces its handlers when it runs in-process)."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for name in list(os.environ):
        if name.startswith("NSWRAP_") or name == "NOTIFY_SOCKET":
            monkeypatch.delenv(name)
    log = logging.getLogger("nswrap")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved
