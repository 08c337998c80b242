"""Fixtures shared by the system tests."""

import pytest

from tests.lab import unbound_conf


@pytest.fixture
def unbound(tmp_path):
    """A stock unbound bound to 0.0.0.0:53, in the foreground, answering test.example."""
    return ["unbound", "-d", "-c", unbound_conf(tmp_path)]
