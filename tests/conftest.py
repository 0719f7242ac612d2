"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster and steadier on one intra-op thread on a shared 2-core machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; restores the setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
