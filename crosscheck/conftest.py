"""Fixtures of the cross-check."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def compiled_cpu_loops():
    """The cross-check runs the code explanations run: the compiled CPU loops where they serve
    (see tests/conftest.py), loaded before the first case."""
    from torch_handler.recurrent import cpu_loops

    cpu_loops.load(timeout=300)
