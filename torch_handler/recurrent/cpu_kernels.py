"""One layer's loops as calls of the compiled kernels (``cpu_kernels.c``, built and loaded by
:mod:`torch_handler.recurrent.cpu_loops`): the forward loop, a backward chunk's step factors, and
a backward chunk's step loop, each one C call, writing into torch tensors."""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from torch_handler.recurrent import cpu_loops
from torch_handler.recurrent.cpu_loops import _KIND, _SUFFIX
from torch_handler.recurrent.fused_loops import ENV

MAX_WEIGHT_BYTES = 1 << 20


# The operands per row the factor kernels can read from a cache (see step_factors), and the
# forward buffers the operands kernel reads them from: LSTM the four gates (Z) and 2c' (C),
# GRU r and z (GX), RNN with tanh 2 pre (PRE; relu has no exponentials).
_OPERANDS = {"LSTM": (5, (0, 1)), "GRU": (2, (0,)), "RNN": (1, (0,))}

MAX_ROWS = 64
"""The compiled loops serve a layer whose recurrent weights take at most MAX_WEIGHT_BYTES (an
LSTM up to hidden size 256 in float32), at any batch size, and larger layers up to MAX_ROWS
doubled-batch rows. Their products stream the weights from cache once per block of rows (8
with AVX-512, else 4) and step; BLAS blocks large products better, which pays once the weights
outgrow the cache and the batch is large (measured on the 2-core EPYC, two threads: hidden 512,
512 rows, 1.10x the eager loops; hidden 256, 1.03x; hidden 128, every batch from 2 to 2048
rows, 0.7-1.0x)."""


def serving(device: torch.device) -> ctypes.CDLL | None:
    """The loaded library for tensors on ``device``; None off the CPU, under
    ``LSTM_DEEPSHAP_FUSED=0`` or before it has loaded (asking starts its build)."""
    if device.type != "cpu" or os.environ.get(ENV, "1") == "0" or not cpu_loops._compiled():
        return None
    return cpu_loops.library()


def enabled(rule, weights, rows: int, device: torch.device, dtype: torch.dtype, mask: Tensor | None) -> bool:
    """Whether the compiled loops serve this layer: its forward loop, and its backward's chunk
    factors and step loops (see the module docstring)."""
    if device.type != "cpu" or dtype not in _SUFFIX or mask is not None:
        return False
    if rows > MAX_ROWS and weights.w_hh.numel() * weights.w_hh.element_size() > MAX_WEIGHT_BYTES:
        return False
    if getattr(rule, "name", None) not in _KIND or getattr(weights, "w_hr", None) is not None:
        return False
    return serving(device) is not None


def _packed(w: Tensor) -> Tensor:
    """``w`` (K, M)'s first M - M mod C columns as (M // C, K, C), C columns per block: the
    layout the kernels' products stream (each block's K rows contiguous)."""
    K, M = w.shape
    C = cpu_loops.library().packed_block_bytes() // w.element_size()
    full = M // C * C
    return w[:, :full].reshape(K, full // C, C).transpose(0, 1).contiguous()


def forward(rule, weights, buffers, state0) -> tuple[Tensor, ...]:
    """The whole forward loop of one layer, as the rule's ``step`` would run it: writes
    ``buffers`` (holding the input projection in their first, see each rule's
    ``forward_buffers``) and returns the final state, views of the buffers' last step."""
    out = buffers[-1]
    T, B, H = out.shape
    h0 = state0[0].contiguous()
    threads = torch.get_num_threads()
    kernel = getattr(cpu_loops.library(), f"{_KIND[rule.name]}_forward_{_SUFFIX[out.dtype]}")
    if rule.name == "LSTM":
        Z, C, OUT = buffers
        # Every tensor whose address a kernel gets is held by a name until the kernel returns.
        w_t, c0, gates = weights.w_hh_t, state0[1].contiguous(), Z.new_empty(B, 4 * H)
        packed = _packed(w_t)
        kernel(threads, T, B // 2, H, Z.data_ptr(), C.data_ptr(), OUT.data_ptr(), w_t.data_ptr(), packed.data_ptr(),
               h0.data_ptr(), c0.data_ptr(), gates.data_ptr())
        return OUT[-1], C[-1]
    if rule.name == "GRU":
        GX, HN, OUT = buffers
        w_rz, w_n = weights.w_rz_t, weights.w_n_t
        packed_rz, packed_n = _packed(w_rz), _packed(w_n)
        b_hn = None if weights.b_hn is None else weights.b_hn.contiguous()
        gates = GX.new_empty(B, 2 * H)
        kernel(threads, T, B // 2, H, GX.data_ptr(), HN.data_ptr(), OUT.data_ptr(), w_rz.data_ptr(),
               packed_rz.data_ptr(), w_n.data_ptr(), packed_n.data_ptr(), None if b_hn is None else b_hn.data_ptr(),
               h0.data_ptr(), gates.data_ptr())
        return (OUT[-1],)
    PRE, OUT = buffers
    w_t = weights.w_hh.T.contiguous()
    packed = _packed(w_t)
    kernel(threads, T, B // 2, H, int(rule.nonlinearity == "relu"), PRE.data_ptr(), OUT.data_ptr(), w_t.data_ptr(),
           packed.data_ptr(), h0.data_ptr())
    return (OUT[-1],)


def step_factors(rule, weights, buffers, state0, t0: int, t1: int, rows: Tensor) -> tuple[Tensor, ...]:
    """``rule.step_factors(weights, rule.coefficients(weights, buffers, state0, t0, t1))`` in one
    pass over the chunk: LSTM (F_c, F_p), each (τ, N, 5, H); GRU (K_x, K_h) (τ, N, 3, H) and
    mean(z) (τ, N, H); RNN (R,) (τ, N, H).

    rows: (2N,) int64, the buffers' row of each row of the doubled batch (pair p: rows[p] and
    rows[N + p]); the buffers (and ``state0``) hold 2N rows, or R < 2N where the forward ran
    once per distinct row (:mod:`torch_handler.recurrent.row_layout`). Then each row's
    exponentials and sigmoids are computed once (the operands kernel, into a cache the factor
    kernel reads for every pair the row is in) instead of once per pair: the same bits.
    """
    tau, H = t1 - t0, state0[0].shape[-1]
    N, R, threads = rows.shape[0] // 2, buffers[0].shape[1], torch.get_num_threads()
    library, suffix = cpu_loops.library(), _SUFFIX[buffers[0].dtype]
    ops = None
    if R < 2 * N and getattr(rule, "nonlinearity", None) != "relu":
        slots, sources = _OPERANDS[rule.name]
        ops = buffers[0].new_empty(tau, R, slots, 2, H)
        operands = getattr(library, f"{_KIND[rule.name]}_operands_{suffix}")
        operands(threads, tau, R, H, *(buffers[k][t0].data_ptr() for k in sources), ops.data_ptr())
    row_map = (rows.data_ptr(), R, None if ops is None else ops.data_ptr())
    kernel = getattr(library, f"{_KIND[rule.name]}_factors_{suffix}")
    new = lambda *shape: buffers[0].new_empty(tau, N, *shape)  # noqa: E731
    if rule.name == "LSTM":
        Z, C, _ = buffers
        c_first = C[t0 - 1] if t0 > 0 else state0[1].contiguous()
        F_c, F_p = new(5, H), new(5, H)
        kernel(threads, tau, N, H, Z[t0].data_ptr(), C[t0].data_ptr(), c_first.data_ptr(), F_c.data_ptr(),
               F_p.data_ptr(), *row_map)
        return F_c, F_p
    if rule.name == "GRU":
        GX, HN, OUT = buffers
        h_first = OUT[t0 - 1] if t0 > 0 else state0[0].contiguous()
        K_x, K_h, mean_z = new(3, H), new(3, H), new(H)
        kernel(threads, tau, N, H, GX[t0].data_ptr(), HN[t0].data_ptr(), OUT[t0].data_ptr(), h_first.data_ptr(),
               K_x.data_ptr(), K_h.data_ptr(), mean_z.data_ptr(), *row_map)
        return K_x, K_h, mean_z
    R = new(H)
    kernel(threads, tau, N, H, int(rule.nonlinearity == "relu"), buffers[0][t0].data_ptr(), R.data_ptr(), *row_map)
    return (R,)


def backward_chunk(rule, weights, factors, m_h: Tensor, m_rest: tuple[Tensor, ...], m_z_chunk: Tensor,
                   grad_out: Tensor | None, t0: int, t1: int, halves: int = 2) -> None:
    """Steps t1-1 down to t0 of backward, as the rule's ``step_backward`` would run them; the
    same contract as :func:`torch_handler.recurrent.fused_loops.backward_chunk`. halves=1 runs
    the actual half's rows only (the caller found no multiplier reaching the reference half:
    its multipliers stay zero, and its rows of ``m_z_chunk`` are left unwritten)."""
    two, N, H = m_h.shape
    tau = t1 - t0
    width = m_z_chunk.shape[-1]
    # grad_prev of step t is grad_out[t - 1]: steps t1-1..1 have one, step 0 none.
    with_grad = 0 if grad_out is None else min(tau, t1 - 1)
    grad = grad_out[t1 - 2] if with_grad else m_h
    g_strides = grad_out.stride() if with_grad else (0, 0, 0)
    factors = tuple(f.contiguous() for f in factors)
    w_hh = weights.w_hh.contiguous()
    packed = _packed(w_hh)
    w = (w_hh.data_ptr(), packed.data_ptr())
    kernel = getattr(cpu_loops.library(), f"{_KIND[rule.name]}_backward_{_SUFFIX[m_h.dtype]}")
    tail = (grad.data_ptr(), with_grad, *g_strides, halves)
    threads = torch.get_num_threads()
    if rule.name == "LSTM":
        F_c, F_p = factors
        (m_c,) = m_rest
        kernel(threads, tau, N, H, F_c.data_ptr(), F_p.data_ptr(), m_h.data_ptr(), m_c.data_ptr(),
               m_z_chunk.data_ptr(), width, *w, *tail)
    elif rule.name == "GRU":
        K_x, K_h, mean_z = factors
        side = m_h.new_empty(two * N, 3 * H)
        kernel(threads, tau, N, H, K_x.data_ptr(), K_h.data_ptr(), mean_z.data_ptr(), m_h.data_ptr(),
               m_z_chunk.data_ptr(), width, side.data_ptr(), *w, *tail)
    else:
        (R,) = factors
        kernel(threads, tau, N, H, R.data_ptr(), m_h.data_ptr(), m_z_chunk.data_ptr(), width, *w, *tail)
