"""The autograd Function that carries the rule through time.

Why a ``torch.autograd.Function`` and not module backward hooks: a hook on
``nn.LSTMCell`` cannot return multipliers for the ``hx`` tuple, a cell reused over steps
overwrites whatever a forward hook saved, and ``nn.LSTM``'s hook never fires when only
``h_n`` is read. A Function sits inside the graph: each call gets its own ``ctx`` (so a cell
reused in a Python loop keeps one saved context per step), its backward sees the multipliers
of *every* output (sequence, h_n, c_n; None for outputs nobody read) and returns the
multipliers of *every* input (x, h0, c0).

One Function runs one layer in one direction over a whole sequence: all input projections in
one matmul before the loop, one matmul per step in each direction, preallocated buffers (no
per-step lists to stack, no per-step temporaries for the gates), and in backward the rule's
coefficients computed a chunk of steps at a time, with one matmul per chunk for the input
multipliers. A single cell step is the same Function with ``T = 1``, so cells and sequences
share one code path. The step loops run compiled where they can (C on CPUs,
:mod:`torch_handler.recurrent.cpu_loops`; Triton kernels on GPUs, :mod:`torch_handler.recurrent.fused_loops`) and
as the eager loops below otherwise: the same rule, the same results to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_handler.errors import NonFiniteError
from torch_handler.recurrent import cpu_kernels, fused_loops, row_layout


def _split_pairs(t: Tensor) -> Tensor:
    """View a doubled-batch tensor (B, ...) as (2, N, ...): actual half, reference half."""
    return t.reshape(2, t.shape[0] // 2, *t.shape[1:])


# Elements of the widest coefficient tensor computed at once in backward (steps x pairs x
# gate width). Small batches take a quarter of the sequence per chunk (few, larger kernels:
# at 1-64 rows per step the kernel launches, not the arithmetic, cost the time; a quarter
# keeps the chunk's temporaries below the saved buffers, so peak memory stays below native
# autograd's); large batches take a step or a few at a time, so that a chunk's temporaries
# stay in the CPU caches and below the allocator's mmap threshold (fresh pages for every
# temporary cost more than the arithmetic on them).
# With the fused loops (a GPU) each chunk costs a few dozen kernel launches whatever its
# size, and the device's memory bandwidth, not a CPU cache, sets the arithmetic's speed:
# chunks then hold up to CHUNK_ELEMENTS_FUSED elements (64 MiB of float32 per tensor), the
# whole sequence when it fits.
CHUNK_ELEMENTS = 1 << 18
CHUNK_ELEMENTS_FUSED = 1 << 24
CHUNKS_AT_LEAST = 4
# A short sequence cut in quarters gives chunks of one or two steps, whose fixed cost (three
# calls from Python and a matmul, about 0.1 ms) outweighs their arithmetic: up to this many
# steps, and SHORT_CHUNK_ELEMENTS, it is one chunk (measured on the 2-core VM: Captum's call on
# the demo's 8-step windows 6-12 % faster; 30-100-step sequences gained nothing from larger
# chunks, LSTMs lost up to 7 %, so they keep the rule above).
SHORT_SEQUENCE_STEPS = 8
SHORT_CHUNK_ELEMENTS = 4 * CHUNK_ELEMENTS


def chunk_steps(steps: int, pairs: int, width: int, fused: bool = False) -> int:
    """Steps per backward chunk for ``pairs`` pairs and ``width`` gate pre-activations (a
    sequence that fits one CPU chunk is one chunk: at a few rows, fewer and larger kernels)."""
    elements = CHUNK_ELEMENTS_FUSED if fused else CHUNK_ELEMENTS
    if not fused and steps <= SHORT_SEQUENCE_STEPS and steps * pairs * width <= SHORT_CHUNK_ELEMENTS:
        return steps
    longest = steps if fused or steps * pairs * width <= elements else -(-steps // CHUNKS_AT_LEAST)
    return max(1, min(longest, elements // max(1, pairs * width)))


class RecurrentRuleFunction(torch.autograd.Function):
    """``apply(rule, weights, mask, x, *state0) -> (out, *state_n)``.

    rule: an object from :mod:`torch_handler.recurrent.rules`; weights: its weights tuple (detached
    tensors: under DeepLIFT parameter "gradients" would be meaningless, so none are
    produced); mask: None or a bool (T, B) tensor, False where a (packed) sequence has ended
    (a suffix of each row: the state then passes through unchanged); x: (T, B, I) on the
    doubled batch B = 2N; state0: the cell state tensors, each (B, ·).

    Returns out (T, B, P) (zeros where ``mask`` is False) and the final state tensors.
    Backward returns DeepLIFT multipliers for x and every state0 tensor: the same rule
    applied to each half's incoming multiplier.
    """

    @staticmethod
    def forward(ctx, rule, weights, mask, x, *state0):
        B = x.shape[1]
        # The engines' doubled batches repeat rows: the forward runs once per distinct row
        # (see row_layout; packed sequences keep every row).
        layout = row_layout.detect(x, state0) if mask is None else None
        run_x, run_state0 = (x, state0) if layout is None else layout.compact(x, state0)
        buffers = rule.forward_buffers(weights, run_x)
        fused = fused_loops.enabled(rule, weights, run_x, mask)
        if fused:
            state = fused_loops.forward(rule, weights, buffers, run_state0)
        elif cpu_kernels.enabled(rule, weights, run_x.shape[1], x.device, x.dtype, mask):
            state = cpu_kernels.forward(rule, weights, buffers, run_state0)
        else:
            state = _forward_loop(rule, weights, buffers, mask, run_state0, rule.step_workspace(weights, run_x))
        check_finite_buffers(buffers)
        compiled_backward = not fused and cpu_kernels.enabled(rule, weights, B, x.device, x.dtype, mask)
        if layout is None:
            out, state = buffers[-1], tuple(s.clone() for s in state)  # copies: views of the buffers
            rows = torch.arange(B, device=x.device) if compiled_backward else None
        else:
            out = buffers[-1].index_select(1, layout.index)
            state = tuple(s.index_select(0, layout.index) for s in state)
            if compiled_backward:  # the factor kernels read the distinct rows through the row map
                rows, state0 = layout.index, run_state0
            else:  # the eager and fused backward read every row's buffers
                rows, buffers = None, tuple(b.index_select(1, layout.index) for b in buffers)
        ctx.rule, ctx.weights, ctx.mask, ctx.num_states, ctx.fused = rule, weights, mask, len(state0), fused
        ctx.batch, ctx.rows = B, rows
        # The output buffer is saved only for rules whose backward reads it (GRU): otherwise a
        # layer's output, once the next layer has read it, is freed like native autograd's.
        ctx.save_for_backward(*state0, *(buffers if rule.reads_output else buffers[:-1]))
        # Outputs nobody reads reach backward as None instead of a tensor of zeros.
        ctx.set_materialize_grads(False)
        return (out, *state)

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        rule, weights, mask = ctx.rule, ctx.weights, ctx.mask
        saved = ctx.saved_tensors
        state0, buffers = saved[: ctx.num_states], saved[ctx.num_states :]
        if not rule.reads_output:
            buffers = (*buffers, None)
        T, B = buffers[0].shape[0], ctx.batch
        gates = weights.w_hh.shape[0]  # pre-activation columns: the input multipliers' side
        width = rule.side_width(weights)  # a step's multiplier row: gates (and more, see rules)
        need_x = ctx.needs_input_grad[3]
        # Running multipliers of the state, (2, N, ·) each, owned here (updated in place;
        # row-major, as the fused loops' kernels read and write them).
        m_state = [
            s.new_zeros(2, B // 2, *s.shape[1:]) if g is None
            else _split_pairs(g).clone(memory_format=torch.contiguous_format)
            for s, g in zip(state0, grad_state, strict=True)
        ]
        m_h, m_rest = m_state[0], tuple(m_state[1:])
        # Output multipliers per step, (B, P) views; each is added to m_h by the matmul
        # that produces m_h (addmm), except the last step's, added here.
        grad_steps = None if grad_out is None else grad_out.unbind(0)
        if grad_steps is not None:
            m_h.add_(grad_steps[T - 1].reshape(m_h.shape))
        keeps = None if mask is None else mask.reshape(T, 2, B // 2, 1).unbind(0)
        grad_x = buffers[0].new_empty(T, B, weights.w_ih.shape[1]) if need_x else None
        tau = chunk_steps(T, B // 2, width, ctx.fused)
        m_z_chunk = buffers[0].new_empty(tau, B, width)
        # A chunk's step loop: one fused GPU kernel, one compiled CPU call, or eager torch ops.
        compiled = fused_loops if ctx.fused else (cpu_kernels if ctx.rows is not None else None)
        # Where no multiplier reaches the reference half (deep_shap, and any engine that
        # differentiates the actual half's outputs only), the compiled loops skip its rows:
        # the recurrent rule never mixes the halves, so they would stay zero.
        halves = 1 if compiled is cpu_kernels and _reference_half_idle(grad_out, grad_state, B // 2) else 2
        if halves == 1 and need_x:
            grad_x[:, B // 2 :].zero_()
        for t1 in range(T, 0, -tau):
            t0 = max(0, t1 - tau)
            if compiled is cpu_kernels:
                coeffs = cpu_kernels.step_factors(rule, weights, buffers, state0, t0, t1, ctx.rows)
                cpu_kernels.backward_chunk(rule, weights, coeffs, m_h, m_rest, m_z_chunk, grad_out, t0, t1, halves)
                if need_x:
                    _input_multipliers(m_z_chunk, weights, grad_x, t0, t1, gates, halves)
                continue
            coeffs = rule.step_factors(weights, rule.coefficients(weights, buffers, state0, t0, t1))
            if compiled is not None:
                compiled.backward_chunk(rule, weights, coeffs, m_h, m_rest, m_z_chunk, grad_out, t0, t1)
                if need_x:
                    _input_multipliers(m_z_chunk, weights, grad_x, t0, t1, gates)
                continue
            coeff_steps = tuple(zip(*(c.unbind(0) for c in coeffs), strict=True))
            # The state multipliers may be views of the step rows this chunk overwrites.
            m_rest = tuple(m.clone() for m in m_rest)
            m_z_steps = m_z_chunk.view(tau, 2, B // 2, width).unbind(0)
            for t in reversed(range(t0, t1)):
                grad_prev = grad_steps[t - 1] if grad_steps is not None and t > 0 else None
                m_z = m_z_steps[t - t0]
                if keeps is None:
                    m_h, m_rest = rule.step_backward(weights, coeff_steps[t - t0], m_h, m_rest, m_z, grad_prev)
                    continue
                # A finished sequence passes its state through: so do its multipliers.
                m_rest_in = tuple(m.clone() for m in m_rest)
                m_h_new, m_rest = rule.step_backward(weights, coeff_steps[t - t0], m_h, m_rest, m_z, None)
                keep = keeps[t]
                m_z.mul_(keep)
                m_h = torch.where(keep, m_h_new, m_h)
                m_rest = tuple(torch.where(keep, new, old) for new, old in zip(m_rest, m_rest_in, strict=True))
                if grad_prev is not None:
                    m_h.add_(grad_prev.reshape(m_h.shape))
            if need_x:
                _input_multipliers(m_z_chunk, weights, grad_x, t0, t1, gates)
        grads_state = [m_h.reshape(B, -1), *(m.reshape(B, -1) for m in m_rest)]  # copies if views
        grads_state = [g if ctx.needs_input_grad[4 + k] else None for k, g in enumerate(grads_state)]
        return (None, None, None, grad_x, *grads_state)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every element of these floating tensors is finite (True for none).

    One test of the sum of their sums first: NaN and ±Inf propagate through it, so a finite
    total proves every element finite, at a fraction of the cost of ``isfinite(t).all()``
    (which writes a bool tensor as large as the input; measured 47x slower on a (50, 512, 64)
    layer output), and in one test for the whole set (each test is a few microseconds of
    dispatch, which count at shap's small per-sample batches). Only a non-finite total (a
    non-finite element, or finite values whose sum overflows) takes the exact check.
    """
    if not tensors:
        return True
    if bool(torch.isfinite(sum(t.sum() for t in tensors))):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_finite_buffers(buffers) -> None:
    """Raise NonFiniteError if a forward buffer holds NaN or Inf (every loop, eager or compiled,
    has written them when this runs).

    The outputs alone do not show every overflow: saturating gates turn an infinite
    pre-activation (float32 ``W_ih x`` of large inputs or weights) into finite outputs, whose
    Rescale multipliers are then 0 (or NaN), and the attributions silently all zero. The
    caller (:mod:`torch_handler.recurrent.modules`) adds the module's name.
    """
    if not all_finite(*buffers):
        raise NonFiniteError(
            "its pre-activations or states contain NaN or Inf although its inputs are finite: "
            "the input projection W_ih x + b or the recurrence overflowed (float32 inputs or "
            "weights too large) or its weights are not finite. The DeepLIFT multipliers would "
            "be zero or NaN. Explain in float64 (model.double(), inputs .double()), rescale the "
            "inputs / weights, or check the weights for NaN / Inf."
        )


def _forward_loop(rule, weights, buffers, mask, state0, work):
    """The eager forward: one ``rule.step`` per time step, writing the buffers in place."""
    state = state0
    keeps = mask.unsqueeze(2).unbind(0) if mask is not None else None
    for t, views in enumerate(zip(*(b.unbind(0) for b in buffers), strict=True)):
        new_state = rule.step(weights, views, state, work)
        if keeps is not None:
            new_state = tuple(torch.where(keeps[t], new, old) for new, old in zip(new_state, state, strict=True))
            views[-1].mul_(keeps[t])
        state = new_state
    return state


def _input_multipliers(m_z_chunk: Tensor, weights, grad_x: Tensor, t0: int, t1: int, gates: int,
                       halves: int = 2) -> None:
    """One matmul per chunk: the input multipliers of steps t0..t1-1 into ``grad_x`` (with
    halves=1, the actual half's rows only)."""
    steps, B, width = t1 - t0, grad_x.shape[1], m_z_chunk.shape[-1]
    if halves == 1:
        torch.matmul(m_z_chunk[:steps, : B // 2, :gates], weights.w_ih, out=grad_x[t0:t1, : B // 2])
        return
    torch.mm(m_z_chunk[:steps].view(steps * B, width)[:, :gates], weights.w_ih,
             out=grad_x[t0:t1].view(steps * B, -1))


def _reference_half_idle(grad_out: Tensor | None, grad_state, N: int) -> bool:
    """Whether every multiplier reaching the layer's reference half (rows N..2N-1 of its
    outputs and final states) is zero (None: nobody read that output)."""
    if grad_out is not None and bool(grad_out[:, N:].any()):
        return False
    return all(g is None or not bool(g[N:].any()) for g in grad_state)
