"""The rule's step loops compiled into one GPU kernel per layer (Triton), where it pays.

Why: on a GPU the eager step loop of :mod:`torch_handler.recurrent.function` launches about ten small
kernels per time step (seven forward, three backward), and at 5-10 µs of launch cost each the
launches, not the arithmetic, set the time: 10-50x cuDNN's fused RNN kernels. Here one kernel
runs a whole layer's forward loop, and one a whole backward chunk's loop: each program owns a
block of batch rows (backward: a block of pairs, both halves) and keeps the cell state and the
multipliers in registers across steps; the recurrent matmul of every step reads the previous
h (or the step's multipliers) back from global memory a slice at a time, after a barrier
(the whole row would not fit the registers beside the weights), and runs ``tl.dot`` in IEEE
float32 (never TF32: the rule needs the forward values it differentiates to float32
rounding). A row's recurrence never reads another row, so programs never wait for each other.

Compilation never blocks an explanation: the first call that could use the kernels for a cell
type and hidden size on a device starts their compilation in a background thread (1-3 s on
an H200 with an empty Triton cache, a fraction of a second once its on-disk cache holds them) and
runs the eager loop; calls after it has finished get the fused loops. :func:`wait` blocks until
pending compilations are done (benchmarks use it to time the steady state).

What stays in :mod:`torch_handler.recurrent.rules`: everything vectorised over time (the input
projection, the chunk's rule coefficients ``coefficients`` / ``step_factors``, the input
multipliers' matmul). The kernels below are compiled twins of the rules' ``step`` and
``step_backward``, one pair per cell type; ``tests/test_fused_loops.py`` checks them against
those element-wise (on CPU through Triton's interpreter, on CUDA in the sweep's
``--sections check``), and every explanation still passes the additivity check.

Used when all of these hold, else the eager loop runs (same rule, same results to rounding):
Triton is importable; the tensors are float32 on CUDA (or on CPU under ``TRITON_INTERPRET=1``,
Triton's own debugging mode, where the kernels run at once, interpreted); no packed-sequence
mask; no LSTM projection (``proj_size``); ``hidden_size <= 128``; at least :data:`MIN_STEPS`
steps (shorter loops launch few kernels anyway); the kernels are compiled (see above); and the
environment variable ``LSTM_DEEPSHAP_FUSED`` is not ``0``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["MIN_STEPS", "MAX_HIDDEN", "enabled", "forward", "backward_chunk", "wait"]

MIN_STEPS = 16
"""Shortest sequence that gets the fused loops (shorter ones: the eager loop)."""

MAX_HIDDEN = 128
"""Largest hidden size the kernels take: each gate's block of a program's rows is one register
tile of the padded hidden size (larger ones would spill)."""

ENV = "LSTM_DEEPSHAP_FUSED"
"""Set to ``0`` to run the eager step loops everywhere, these GPU kernels and the compiled CPU
loops (:mod:`torch_handler.recurrent.cpu_loops`) off: to compare, or to rule the compiled code out."""

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_ROWS = 16  # forward: batch rows per program (tl.dot needs >= 16)
_PAIRS = 8  # backward: pairs per program, both halves: 16 rows
_SLICE = 32  # forward: columns of the state per partial matmul (tl.dot needs >= 16)
_SLICE_BACKWARD = 32  # backward: columns of the multipliers per partial matmul
_WARPS = 8  # warps per program for hidden sizes above 64 (4 below)
_STAGES = 1  # no software pipelining of the weight loads (it would multiply shared memory)
_DOT = "ieee"  # tl.dot's input precision: IEEE float32, never TF32 (see _mm)


def _kernels_for(rule) -> str | None:
    name = getattr(rule, "name", None)
    if name == "RNN":
        return "relu" if rule.nonlinearity == "relu" else "tanh"
    return name if name in ("LSTM", "GRU") else None


def enabled(rule, weights, x: Tensor, mask: Tensor | None) -> bool:
    """Whether the fused loops serve this layer (see the module docstring)."""
    if triton is None or mask is not None or os.environ.get(ENV, "1") == "0":
        return False
    if x.dtype != torch.float32 or not (x.is_cuda or (_INTERPRETED and x.device.type == "cpu")):
        return False
    if _kernels_for(rule) is None or getattr(weights, "w_hr", None) is not None:
        return False
    hidden = weights.w_hh.shape[1]
    if hidden > MAX_HIDDEN or x.shape[0] < MIN_STEPS:
        return False
    return _INTERPRETED or _compiled(rule, weights, x.device)


# Compilation state per kernel variant: (cell kind, hidden size, bias, device, tiles) -> an
# Event set when its background compilation has finished; failures keep their exception.
_COMPILED: dict[tuple, threading.Event] = {}
_FAILED: dict[tuple, BaseException] = {}
_LOCK = threading.Lock()


def _compiled(rule, weights, device: torch.device) -> bool:
    """Whether this layer's kernels are compiled on ``device``; starts their compilation in a
    background thread the first time a variant is asked for."""
    bias = getattr(weights, "b_hn", None) is not None  # the one bias a kernel reads (GRU's b_hn)
    hidden = weights.w_hh.shape[1]
    key = (_kernels_for(rule), hidden, bias, device, *_tiles())
    with _LOCK:
        done = _COMPILED.get(key)
        if done is None:
            done = _COMPILED[key] = threading.Event()
            threading.Thread(target=_compile, args=(key, rule, hidden, bias, device, done), daemon=True,
                             name="lstm-deepshap-compile").start()
    return done.is_set() and key not in _FAILED


def _tiles() -> tuple:
    return _SLICE, _SLICE_BACKWARD, _WARPS, _STAGES, _DOT


def _compile(key, rule, hidden: int, bias: bool, device: torch.device, done: threading.Event) -> None:
    """Compile a variant's kernels by running them once on a one-step, two-row layer (on a side
    stream): the same launches as a real call, so Triton caches exactly the variant real calls
    use. A failure is kept, reported once, and leaves that variant to the eager loop."""
    try:
        torch.cuda.set_device(device)  # this thread's current device, for Triton's launcher
        with torch.cuda.stream(torch.cuda.Stream(device)):
            gates = {"LSTM": 4, "GRU": 3}.get(rule.name, 1) * hidden
            zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
            b = zeros(gates) if bias else None
            weights = rule.weights(zeros(gates, 1), zeros(gates, hidden), b, b)
            x, state0 = zeros(1, 2, 1), tuple(zeros(2, hidden) for _ in range(2 if rule.name == "LSTM" else 1))
            buffers = rule.forward_buffers(weights, x)
            forward(rule, weights, buffers, state0)
            factors = rule.step_factors(weights, rule.coefficients(weights, buffers, state0, 0, 1))
            m_state = [zeros(2, 1, hidden) for _ in state0]
            backward_chunk(rule, weights, factors, m_state[0], tuple(m_state[1:]),
                           zeros(1, 2, rule.side_width(weights)), zeros(1, 2, hidden), 0, 1)
            torch.cuda.current_stream(device).synchronize()
    except Exception as error:  # noqa: BLE001 - reported, and the eager loop serves this variant
        _FAILED[key] = error
        warnings.warn(f"torch_handler: compiling the fused {key[0]} loops for hidden size {hidden} on {device} "
                      f"failed ({error!r}); the eager loop (same rule, slower) serves it. Set {ENV}=0 to "
                      "silence this.", RuntimeWarning, stacklevel=1)
    finally:
        done.set()


def wait(timeout: float | None = None) -> bool:
    """Block until every compilation started so far has finished (at most ``timeout`` seconds
    in all); True when none is pending."""
    with _LOCK:
        pending = list(_COMPILED.values())
    for done in pending:
        if not done.wait(timeout):
            return False
    return True


def _hp(hidden: int) -> int:
    return max(16, triton.next_power_of_2(hidden))


def _warps(hp: int) -> int:
    return _WARPS if hp >= 128 else 4


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(rule, weights, buffers, state0) -> tuple[Tensor, ...]:
    """The whole forward loop of one layer: writes ``buffers`` as the rule's ``step`` would
    (see each rule's ``forward_buffers``) and returns the final state, views of the buffers'
    last step. state0: the rule's state tensors, each (B, ·)."""
    with _on(buffers[-1].device):
        return _forward(rule, weights, buffers, state0)


def _forward(rule, weights, buffers, state0) -> tuple[Tensor, ...]:
    out = buffers[-1]
    T, B, H = out.shape
    hp = _hp(H)
    grid = (triton.cdiv(B, _ROWS),)
    state0 = tuple(s.contiguous() for s in state0)
    common = dict(BM=_ROWS, HP=hp, BK=_SLICE, DOT=_DOT, num_warps=_warps(hp), num_stages=_STAGES)
    kind = _kernels_for(rule)
    if kind == "LSTM":
        Z, C, OUT = buffers
        _lstm_forward[grid](Z, C, OUT, weights.w_hh_t, state0[0], state0[1], T, B, H, **common)
        return OUT[-1], C[-1]
    if kind == "GRU":
        GX, HN, OUT = buffers
        b_hn = weights.b_hn
        _gru_forward[grid](GX, HN, OUT, weights.w_rz_t, weights.w_n_t, b_hn if b_hn is not None else OUT,
                           state0[0], T, B, H, HAS_BHN=b_hn is not None, **common)
        return (OUT[-1],)
    PRE, OUT = buffers
    _rnn_forward[grid](PRE, OUT, weights.w_hh.contiguous(), state0[0], T, B, H, RELU=kind == "relu", **common)
    return (OUT[-1],)


def backward_chunk(rule, weights, factors, m_h: Tensor, m_rest: tuple[Tensor, ...], m_z_chunk: Tensor,
                   grad_out: Tensor | None, t0: int, t1: int) -> None:
    """Steps t1-1 down to t0 of backward, as the rule's ``step_backward`` would run them.

    factors: the chunk's ``step_factors`` (each (τ, N, ...)); m_h (2, N, H) and m_rest (the
    other state multipliers, (2, N, H) each): row-major, updated in place to the multipliers
    of the state before step t0 (m_h including ``grad_out[t0 - 1]``); m_z_chunk (τ', B, width):
    rows 0..τ-1 written with the pre-activations' multipliers (the columns the input
    multipliers' matmul reads); grad_out: None or the output multipliers (T, B, H).
    """
    with _on(m_h.device):
        _backward_chunk(rule, weights, factors, m_h, m_rest, m_z_chunk, grad_out, t0, t1)


def _backward_chunk(rule, weights, factors, m_h, m_rest, m_z_chunk, grad_out, t0: int, t1: int) -> None:
    two, N, H = m_h.shape
    tau = t1 - t0
    hp = _hp(H)
    width = m_z_chunk.shape[-1]
    # grad_prev of step t is grad_out[t - 1]: steps t1-1..1 have one, step 0 none.
    with_grad = 0 if grad_out is None else min(tau, t1 - 1)
    # The last step's grad_prev rows and grad_out's strides (autograd may hand an expanded
    # tensor, e.g. stride 0 everywhere for out.sum(): read in place, never copied).
    grad = grad_out[t1 - 2] if with_grad else m_h
    g_strides = grad_out.stride() if with_grad else (0, 0, 0)
    factors = tuple(f.contiguous() for f in factors)
    w_hh = weights.w_hh.contiguous()  # (gates, H), row-major
    grid = (triton.cdiv(N, _PAIRS),)
    common = dict(BP=_PAIRS, HP=hp, BK=_SLICE_BACKWARD, DOT=_DOT, num_warps=_warps(hp), num_stages=_STAGES)
    kind = _kernels_for(rule)
    if kind == "LSTM":
        F_c, F_p = factors
        (m_c,) = m_rest
        _lstm_backward[grid](F_c, F_p, m_h, m_c, w_hh, grad, m_z_chunk, tau, with_grad, *g_strides, N, H,
                             width, **common)
    elif kind == "GRU":
        K_x, K_h, mean_z = factors
        side = m_h.new_empty(two * N, 3 * H)
        _gru_backward[grid](K_x, K_h, mean_z, m_h, w_hh, grad, m_z_chunk, side, tau, with_grad, *g_strides, N,
                            H, width, **common)
    else:
        (R,) = factors
        _rnn_backward[grid](R, m_h, w_hh, grad, m_z_chunk, tau, with_grad, *g_strides, N, H,
                            width, **common)


if triton is not None:
    # Integer arguments that change between calls are not specialised on (Triton would
    # otherwise compile a variant per divisibility class of, e.g., the chunk length).
    _VARYING = ["T", "B", "tau", "with_grad", "g_st", "g_sb", "g_sh", "N"]

    @triton.jit
    def _sigmoid(v):
        return 1.0 / (1.0 + tl.exp(-v))

    @triton.jit
    def _operand(a_ptr, rows, ld, rows_ok, k0, K, BK: tl.constexpr):
        """Columns k0..k0+BK of rows ``rows`` of a row-major matrix (leading dimension ld) with
        K columns: (len(rows), BK), zero outside."""
        k = k0 + tl.arange(0, BK)
        return tl.load(a_ptr + rows[:, None] * ld + k[None, :], mask=rows_ok[:, None] & (k[None, :] < K), other=0.0)

    @triton.jit
    def _weights(w_ptr, k0, K, ld, col0, n_cols, BK: tl.constexpr, HP: tl.constexpr):
        """Rows k0..k0+BK and columns col0..col0+HP of a row-major matrix (leading dimension
        ld): (BK, HP), zero outside K rows and n_cols columns."""
        k = k0 + tl.arange(0, BK)
        n = tl.arange(0, HP)
        return tl.load(w_ptr + k[:, None] * ld + col0 + n[None, :], mask=(k[:, None] < K) & (n[None, :] < n_cols),
                       other=0.0)

    @triton.jit
    def _mm(acc, a, w, DOT: tl.constexpr):
        # Never plain TF32, whose 10-bit mantissa would break additivity: "ieee" (float32
        # FMA) or "tf32x3" (three TF32 products, float32's accuracy on tensor cores).
        return tl.dot(a, w, acc, input_precision=DOT)

    @triton.jit(do_not_specialize=_VARYING)
    def _lstm_forward(z_ptr, c_ptr, out_ptr, w_t_ptr, h0_ptr, c0_ptr, T, B, H,
                      BM: tl.constexpr, HP: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
        """LSTMRule.step for T steps. Z (T, B, 4H) pre-activations from the input projection
        (g's block doubled), completed in place; C, OUT (T, B, H); w_t (H, 4H); h0, c0 (B, H).
        The previous h is read back from OUT (h0 first) a BK-column slice at a time, after a
        barrier: the whole state row would not fit one thread block's registers with the
        weights."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, HP)
        rows_ok = rows < B
        ok = rows_ok[:, None] & (cols[None, :] < H)
        state = rows[:, None] * H + cols[None, :]
        zrow = rows[:, None] * (4 * H) + cols[None, :]
        c = tl.load(c0_ptr + state, mask=ok, other=0.0)
        h_prev, z_t, c_t, out_t = h0_ptr, z_ptr, c_ptr, out_ptr  # 64-bit pointers, advanced per step
        for _ in range(T):
            zi = tl.load(z_t + zrow, mask=ok, other=0.0)
            zf = tl.load(z_t + zrow + H, mask=ok, other=0.0)
            zg = tl.load(z_t + zrow + 2 * H, mask=ok, other=0.0)
            zo = tl.load(z_t + zrow + 3 * H, mask=ok, other=0.0)
            for k0 in range(0, H, BK):
                a = _operand(h_prev, rows, H, rows_ok, k0, H, BK)
                zi = _mm(zi, a, _weights(w_t_ptr, k0, H, 4 * H, 0, H, BK, HP), DOT)
                zf = _mm(zf, a, _weights(w_t_ptr, k0, H, 4 * H, H, H, BK, HP), DOT)
                zg = _mm(zg, a, _weights(w_t_ptr, k0, H, 4 * H, 2 * H, H, BK, HP), DOT)
                zo = _mm(zo, a, _weights(w_t_ptr, k0, H, 4 * H, 3 * H, H, BK, HP), DOT)
            tl.store(z_t + zrow, zi, mask=ok)
            tl.store(z_t + zrow + H, zf, mask=ok)
            tl.store(z_t + zrow + 2 * H, zg, mask=ok)
            tl.store(z_t + zrow + 3 * H, zo, mask=ok)
            # g = tanh(z_g) = 2σ(u_g) − 1 with u_g = 2 z_g (the doubled rows): c' = f c + 2 i (σ(u_g) − ½)
            c = _sigmoid(zf) * c + 2.0 * _sigmoid(zi) * (_sigmoid(zg) - 0.5)
            h = _sigmoid(zo) * (2.0 * _sigmoid(2.0 * c) - 1.0)  # o ⊙ tanh(c')
            tl.store(c_t + state, c, mask=ok)
            tl.store(out_t + state, h, mask=ok)
            tl.debug_barrier()  # h' is read back, by other threads, in the next step
            h_prev = out_t
            z_t += B * 4 * H
            c_t += B * H
            out_t += B * H

    @triton.jit(do_not_specialize=_VARYING)
    def _gru_forward(gx_ptr, hn_ptr, out_ptr, w_rz_t_ptr, w_n_t_ptr, b_hn_ptr, h0_ptr, T, B, H,
                     HAS_BHN: tl.constexpr, BM: tl.constexpr, HP: tl.constexpr, BK: tl.constexpr,
                     DOT: tl.constexpr):
        """GRURule.step for T steps. GX (T, B, 3H): r and z columns completed in place to
        pre-activations; HN (T, B, H) = hn' (doubled n rows); OUT (T, B, H); w_rz_t (H, 2H),
        w_n_t (H, H)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, HP)
        rows_ok = rows < B
        ok = rows_ok[:, None] & (cols[None, :] < H)
        state = rows[:, None] * H + cols[None, :]
        grow = rows[:, None] * (3 * H) + cols[None, :]
        if HAS_BHN:
            b_hn = tl.load(b_hn_ptr + cols, mask=cols < H, other=0.0)[None, :]
        h_prev, gx_t, hn_t, out_t = h0_ptr, gx_ptr, hn_ptr, out_ptr
        for _ in range(T):
            pre_r = tl.load(gx_t + grow, mask=ok, other=0.0)
            pre_z = tl.load(gx_t + grow + H, mask=ok, other=0.0)
            hn = tl.zeros((BM, HP), dtype=tl.float32)
            if HAS_BHN:
                hn += b_hn
            for k0 in range(0, H, BK):
                a = _operand(h_prev, rows, H, rows_ok, k0, H, BK)
                pre_r = _mm(pre_r, a, _weights(w_rz_t_ptr, k0, H, 2 * H, 0, H, BK, HP), DOT)
                pre_z = _mm(pre_z, a, _weights(w_rz_t_ptr, k0, H, 2 * H, H, H, BK, HP), DOT)
                hn = _mm(hn, a, _weights(w_n_t_ptr, k0, H, H, 0, H, BK, HP), DOT)
            tl.store(gx_t + grow, pre_r, mask=ok)
            tl.store(gx_t + grow + H, pre_z, mask=ok)
            tl.store(hn_t + state, hn, mask=ok)
            # n = tanh(pre_n) = 2σ(u) − 1, u = gx_n' + r ⊙ hn'; h' = n + z ⊙ (h − n)
            u = tl.load(gx_t + grow + 2 * H, mask=ok, other=0.0) + _sigmoid(pre_r) * hn
            n = (_sigmoid(u) - 0.5) * 2.0
            h = tl.load(h_prev + state, mask=ok, other=0.0)
            h = n + _sigmoid(pre_z) * (h - n)
            tl.store(out_t + state, h, mask=ok)
            tl.debug_barrier()  # h' is read back, by other threads, in the next step
            h_prev = out_t
            gx_t += B * 3 * H
            hn_t += B * H
            out_t += B * H

    @triton.jit(do_not_specialize=_VARYING)
    def _rnn_forward(pre_ptr, out_ptr, w_ptr, h0_ptr, T, B, H, RELU: tl.constexpr,
                     BM: tl.constexpr, HP: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
        """RNNRule.step for T steps: PRE (T, B, H) completed in place, OUT (T, B, H);
        w (H, H) = w_hh, used transposed."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, HP)
        rows_ok = rows < B
        ok = rows_ok[:, None] & (cols[None, :] < H)
        state = rows[:, None] * H + cols[None, :]
        h_prev, pre_t, out_t = h0_ptr, pre_ptr, out_ptr
        for _ in range(T):
            pre = tl.load(pre_t + state, mask=ok, other=0.0)
            for k0 in range(0, H, BK):
                a = _operand(h_prev, rows, H, rows_ok, k0, H, BK)
                k = k0 + tl.arange(0, BK)
                # w_hh.T's rows k0..k0+BK: element (k, n) = w_hh[n, k]
                w_t = tl.load(w_ptr + cols[None, :] * H + k[:, None], mask=(k[:, None] < H) & (cols[None, :] < H),
                              other=0.0)
                pre = _mm(pre, a, w_t, DOT)
            tl.store(pre_t + state, pre, mask=ok)
            if RELU:
                h = tl.maximum(pre, 0.0)
            else:
                h = 2.0 * _sigmoid(2.0 * pre) - 1.0  # tanh
            tl.store(out_t + state, h, mask=ok)
            tl.debug_barrier()  # h' is read back, by other threads, in the next step
            h_prev = out_t
            pre_t += B * H
            out_t += B * H

    @triton.jit
    def _pair_rows(N, BP: tl.constexpr):
        """Rows of a program's block of pairs, both halves: (pair index, batch row), 2·BP each."""
        j = tl.arange(0, 2 * BP)
        pair = tl.program_id(0) * BP + (j % BP)
        return pair, (j // BP) * N + pair

    @triton.jit
    def _recurrent(side_ptr, ld, G, row, pair_ok, w_ptr, H, acc, BK: tl.constexpr, HP: tl.constexpr,
                   DOT: tl.constexpr):
        """``acc + side[row, :G] @ w_hh`` with w_hh (G, H) row-major; side read back from
        global memory (written by this program before a barrier) BK columns at a time."""
        for k0 in range(0, G, BK):
            side = _operand(side_ptr, row, ld, pair_ok, k0, G, BK)
            acc = _mm(acc, side, _weights(w_ptr, k0, G, H, 0, H, BK, HP), DOT)
        return acc

    @triton.jit(do_not_specialize=_VARYING)
    def _lstm_backward(fc_ptr, fp_ptr, mh_ptr, mc_ptr, w_ptr, grad_ptr, mz_ptr, tau, with_grad,
                       g_st, g_sb, g_sh, N, H, width,
                       BP: tl.constexpr, HP: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
        """LSTMRule.step_backward for a chunk's τ steps, last first. F_c, F_p (τ, N, 5, H);
        m_h, m_c (2N, H) in place; w (4H, H) = w_hh; grad: the row block of grad_out for the
        chunk's last step minus one, earlier steps g_st elements before; m_z (τ, 2N, width)."""
        pair, row = _pair_rows(N, BP)
        cols = tl.arange(0, HP)
        pair_ok = pair < N
        ok = pair_ok[:, None] & (cols[None, :] < H)
        state = row[:, None] * H + cols[None, :]
        frow = pair[:, None] * (5 * H) + cols[None, :]
        zrow = row[:, None] * width + cols[None, :]
        g_rows = row[:, None] * g_sb + cols[None, :] * g_sh  # grad_out may be strided or expanded
        m_h = tl.load(mh_ptr + state, mask=ok, other=0.0)
        m_c = tl.load(mc_ptr + state, mask=ok, other=0.0)
        fc_t = fc_ptr + (tau - 1) * N * 5 * H
        fp_t = fp_ptr + (tau - 1) * N * 5 * H
        mz_t = mz_ptr + (tau - 1) * 2 * N * width
        grad_t = grad_ptr
        for s in range(tau):
            # [m_i, m_f, m_g, m_o, m_c] = m_c' ⊙ F_c + m_h' ⊙ F_p
            for k in tl.static_range(4):
                m_k = (m_c * tl.load(fc_t + frow + k * H, mask=ok, other=0.0)
                       + m_h * tl.load(fp_t + frow + k * H, mask=ok, other=0.0))
                tl.store(mz_t + zrow + k * H, m_k, mask=ok)
            m_c = m_c * tl.load(fc_t + frow + 4 * H, mask=ok, other=0.0) + m_h * tl.load(fp_t + frow + 4 * H, mask=ok,
                                                                                          other=0.0)
            tl.debug_barrier()  # the gates' multipliers are read back by other threads
            # m_h_prev = [m_i m_f m_g m_o] @ w_hh (+ the previous step's output multiplier)
            m_h = tl.load(grad_t + g_rows, mask=ok & (row[:, None] * 0 + s < with_grad), other=0.0)
            m_h = _recurrent(mz_t, width, 4 * H, row, pair_ok, w_ptr, H, m_h, BK, HP, DOT)
            fc_t -= N * 5 * H
            fp_t -= N * 5 * H
            mz_t -= 2 * N * width
            grad_t -= g_st
        tl.store(mh_ptr + state, m_h, mask=ok)
        tl.store(mc_ptr + state, m_c, mask=ok)

    @triton.jit(do_not_specialize=_VARYING)
    def _gru_backward(kx_ptr, kh_ptr, mean_z_ptr, mh_ptr, w_ptr, grad_ptr, mz_ptr, side_ptr, tau, with_grad,
                      g_st, g_sb, g_sh, N, H, width,
                       BP: tl.constexpr, HP: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
        """GRURule.step_backward for a chunk's τ steps, last first. K_x, K_h (τ, N, 3, H);
        mean_z (τ, N, H); m_h (2N, H) in place; w (3H, H) = w_hh; m_z (τ, 2N, width);
        side (2N, 3H) scratch for m_h' ⊙ K_h."""
        pair, row = _pair_rows(N, BP)
        cols = tl.arange(0, HP)
        pair_ok = pair < N
        ok = pair_ok[:, None] & (cols[None, :] < H)
        state = row[:, None] * H + cols[None, :]
        krow = pair[:, None] * (3 * H) + cols[None, :]
        prow = pair[:, None] * H + cols[None, :]
        zrow = row[:, None] * width + cols[None, :]
        srow = row[:, None] * (3 * H) + cols[None, :]
        g_rows = row[:, None] * g_sb + cols[None, :] * g_sh
        m_h = tl.load(mh_ptr + state, mask=ok, other=0.0)
        kx_t = kx_ptr + (tau - 1) * N * 3 * H
        kh_t = kh_ptr + (tau - 1) * N * 3 * H
        mean_z_t = mean_z_ptr + (tau - 1) * N * H
        mz_t = mz_ptr + (tau - 1) * 2 * N * width
        grad_t = grad_ptr
        for s in range(tau):
            for k in tl.static_range(3):
                tl.store(mz_t + zrow + k * H, m_h * tl.load(kx_t + krow + k * H, mask=ok, other=0.0), mask=ok)
                tl.store(side_ptr + srow + k * H, m_h * tl.load(kh_t + krow + k * H, mask=ok, other=0.0), mask=ok)
            tl.debug_barrier()  # the side multipliers are read back by other threads
            # m_h_prev = (m_h' ⊙ K_h) @ w_hh + m_h' ⊙ mean(z) (+ the previous step's output multiplier)
            acc = tl.load(grad_t + g_rows, mask=ok & (row[:, None] * 0 + s < with_grad), other=0.0)
            acc += m_h * tl.load(mean_z_t + prow, mask=ok, other=0.0)
            m_h = _recurrent(side_ptr, 3 * H, 3 * H, row, pair_ok, w_ptr, H, acc, BK, HP, DOT)
            tl.debug_barrier()  # the next step overwrites the side scratch
            kx_t -= N * 3 * H
            kh_t -= N * 3 * H
            mean_z_t -= N * H
            mz_t -= 2 * N * width
            grad_t -= g_st
        tl.store(mh_ptr + state, m_h, mask=ok)

    @triton.jit(do_not_specialize=_VARYING)
    def _rnn_backward(r_ptr, mh_ptr, w_ptr, grad_ptr, mz_ptr, tau, with_grad, g_st, g_sb, g_sh, N, H, width,
                      BP: tl.constexpr, HP: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
        """RNNRule.step_backward for a chunk's τ steps, last first. R (τ, N, H); m_h (2N, H)
        in place; w (H, H) = w_hh; m_z (τ, 2N, width)."""
        pair, row = _pair_rows(N, BP)
        cols = tl.arange(0, HP)
        pair_ok = pair < N
        ok = pair_ok[:, None] & (cols[None, :] < H)
        state = row[:, None] * H + cols[None, :]
        prow = pair[:, None] * H + cols[None, :]
        zrow = row[:, None] * width + cols[None, :]
        g_rows = row[:, None] * g_sb + cols[None, :] * g_sh
        m_h = tl.load(mh_ptr + state, mask=ok, other=0.0)
        r_t = r_ptr + (tau - 1) * N * H
        mz_t = mz_ptr + (tau - 1) * 2 * N * width
        grad_t = grad_ptr
        for s in range(tau):
            tl.store(mz_t + zrow, m_h * tl.load(r_t + prow, mask=ok, other=0.0), mask=ok)
            tl.debug_barrier()  # m_z is read back by other threads
            m_h = tl.load(grad_t + g_rows, mask=ok & (row[:, None] * 0 + s < with_grad), other=0.0)
            m_h = _recurrent(mz_t, width, H, row, pair_ok, w_ptr, H, m_h, BK, HP, DOT)
            r_t -= N * H
            mz_t -= 2 * N * width
            grad_t -= g_st
        tl.store(mh_ptr + state, m_h, mask=ok)
