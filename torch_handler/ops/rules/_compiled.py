"""The float64 scratch memory of the op rules' compiled twins.

``torch_handler/recurrent/cpu_kernels.c`` holds, beside the recurrent loops, the attention
rule (``sdpa_rule_f64``) and the softmax rule over the last axis (``softmax_rule_f64``): the
same formulas as ops/rules/attention.py and ops/rules/softmax.py, in float64, one row of scores
at a time. The library is built and loaded by :mod:`torch_handler.recurrent.cpu_loops`
(compiled once per machine in the background, cached); until it is loaded, and wherever it does
not serve (``cpu_kernels.serving``), the rules run as torch ops, with the same results to
rounding (``tests/test_attention_kernel.py``).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_SCRATCH = threading.local()


def scratch(numel: int) -> Tensor:
    """This thread's float64 scratch buffer of at least ``numel`` numbers, kept between calls.

    Why: a kernel's float64 operands are a few MB at a few hundred pairs, and fresh memory of
    that size comes from the OS page by page at every call (measured on the 2-core VM: page
    faults cost the attention rule about as much as its arithmetic). Per thread, so concurrent
    explanations never share it; it grows to the largest call's size and is freed with its
    thread. Callers hand out none of it: what they return is copied out of it.
    """
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH.buffer = torch.empty(numel, dtype=torch.float64)
    return buffer[:numel]
