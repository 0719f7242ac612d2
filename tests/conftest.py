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


@pytest.fixture(scope="session", autouse=True)
def compiled_cpu_loops():
    """Every test sees the compiled CPU loops from its first explanation on (otherwise their
    background compilation would finish during the first tests, which would run the eager
    loops instead: the same rule, but not the same code from one run to the next).
    tests/test_cpu_loops.py compares the two element-wise."""
    from torch_handler.recurrent import cpu_loops

    cpu_loops.load(timeout=300)


@pytest.fixture(scope="module")
def compiled_library():
    """For modules that test the compiled CPU library itself: it must have loaded.

    Use with ``pytestmark = pytest.mark.usefixtures("compiled_library")``."""
    from torch_handler.recurrent import cpu_loops

    assert cpu_loops.load(timeout=300), (
        "the CPU library did not compile: these tests need a C compiler (cc, gcc or clang; $CC)")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Each test at one intra-op thread and at two (a team of threads in the kernels); restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
