"""How the op rules' compiled twins get their operands, and their float64 scratch memory.

``torch_handler/recurrent/cpu_kernels.c`` holds, beside the recurrent loops, the attention
rule (``sdpa_rule_f64``), the softmax rule over the last axis (``softmax_rule_f64``), the
layer_norm / rms_norm rule (``norm_rule_f64``) and gelu's (``gelu_rule_f64``): the same
formulas as ops/rules/attention.py, softmax.py, norms.py and unary.py, in float64, a row at a
time. The library is built and loaded by :mod:`torch_handler.recurrent.cpu_loops`
(compiled once per machine in the background, cached); until it is loaded, and wherever it does
not serve (``cpu_kernels.serving``), the rules run as torch ops, with the same results to
rounding (``tests/test_attention_kernel.py``).
"""

from __future__ import annotations

import ctypes
import threading

import torch
from torch import Tensor

_SCRATCH = threading.local()

IN_PLACE = (torch.float32, torch.float64)
"""The dtypes the kernels read operands and write multipliers in, in place (they compute in
float64 either way); an operand of another dtype is handed over as a float64 copy."""


def written_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes the multipliers of an operand of ``dtype`` in: its own where the
    kernels write it (:data:`IN_PLACE`), else float64 (the caller converts them)."""
    return dtype if dtype in IN_PLACE else torch.float64


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


def halves(a: Tensor, r: Tensor, keep: list) -> list[int]:
    """How a kernel reads an operand's actual and reference halves ``a`` and ``r`` (or writes a
    multiplier's) in place: ``[address of a, address of r, float32?, four strides in elements]``
    (of up to four dims, the leading ones 0 where ``a`` has fewer).

    Why: copying the operands into float64 buffers and the multipliers back, op by op from
    Python, cost the attention rule about as much as its arithmetic (see ``sdpa_blocks`` in
    ``cpu_kernels.c``). The halves share one layout, as the two halves of one tensor do; where
    they do not (or the dtype is not in :data:`IN_PLACE`), both are copied into contiguous
    float64. ``keep`` holds every tensor whose address is handed out until the kernel returns.
    """
    if a.dtype not in IN_PLACE or a.dtype != r.dtype or a.stride() != r.stride():
        a, r = (torch.empty(t.shape, dtype=torch.float64, device=t.device).copy_(t) for t in (a, r))
    keep += (a, r)
    return [a.data_ptr(), r.data_ptr(), int(a.dtype == torch.float32), *(0,) * (4 - a.dim()), *a.stride()]


def table(layouts: list[list[int]]) -> ctypes.Array:
    """The operands' layouts (see :func:`halves`) as the one int64 array a kernel reads."""
    flat = [number for layout in layouts for number in layout]
    return (ctypes.c_int64 * len(flat))(*flat)


def x_m_out(x_a: Tensor, x_r: Tensor, m_a: Tensor, m_r: Tensor, shape: tuple) -> tuple[ctypes.Array, Tensor, list]:
    """The operands of a row kernel (the softmax, norm and GELU rules): the layout table of x,
    its output's multipliers m and the result out, each of ``shape`` per half; out itself,
    (2, *shape) in the dtype the kernel writes (:func:`written_dtype`); and the tensors whose
    addresses the table holds, for the caller to keep by a name until the kernel returns."""
    keep: list = []
    out = torch.empty((2, *shape), dtype=written_dtype(x_a.dtype))
    layouts = [halves(x_a, x_r, keep), halves(m_a, m_r, keep), halves(out[0], out[1], keep)]
    return table(layouts), out, keep
