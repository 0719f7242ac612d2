"""The autograd Function that carries the rule through time.

Why a ``torch.autograd.Function`` and not module backward hooks (RULES.md §3): a hook on
``nn.LSTMCell`` cannot return multipliers for the ``hx`` tuple, a cell reused over steps
overwrites whatever a forward hook saved, and ``nn.LSTM``'s hook never fires when only
``h_n`` is read. A Function sits inside the graph: each call gets its own ``ctx`` (so a cell
reused in a Python loop keeps one saved context per step), its backward sees the multipliers
of *every* output (sequence, h_n, c_n; zeros for outputs nobody read) and returns the
multipliers of *every* input (x, h0, c0).

One Function runs one layer in one direction over a whole sequence: all input projections in
one matmul before the loop, one matmul per step in each direction, preallocated buffers (no
per-step lists to stack), and in backward the rule's coefficients computed a chunk of steps
at a time, with one matmul per chunk for the input multipliers. A single cell step is the
same Function with ``T = 1``, so cells and sequences share one code path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _split_pairs(t: Tensor) -> Tensor:
    """View a doubled-batch tensor (B, ...) as (2, N, ...): actual half, reference half."""
    return t.reshape(2, t.shape[0] // 2, *t.shape[1:])


# Steps whose rule coefficients are computed together in backward: large enough to vectorise,
# small enough that the coefficient temporaries stay a fraction of the saved buffers.
CHUNK = 32


class RecurrentRuleFunction(torch.autograd.Function):
    """``apply(rule, weights, mask, x, *state0) -> (out, *state_n)``.

    rule: an object from :mod:`torch_handler.rules`; weights: its weights tuple (detached
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
        buffers = rule.forward_buffers(weights, x)
        out = buffers[-1]
        state = state0
        for t in range(x.shape[0]):
            new_state = rule.step(weights, buffers, t, state)
            if mask is not None:
                keep = mask[t].unsqueeze(1)
                new_state = tuple(torch.where(keep, new, old) for new, old in zip(new_state, state, strict=True))
                out[t].mul_(keep)
            state = new_state
        ctx.rule, ctx.weights, ctx.mask, ctx.num_states = rule, weights, mask, len(state0)
        ctx.save_for_backward(*state0, *buffers)
        # Final states are views of the buffers backward reads: hand out copies.
        return (out, *(s.clone() for s in state))

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        rule, weights, mask = ctx.rule, ctx.weights, ctx.mask
        saved = ctx.saved_tensors
        state0, buffers = saved[: ctx.num_states], saved[ctx.num_states :]
        T, B = grad_out.shape[:2]
        need_x = ctx.needs_input_grad[3]
        grad_x = grad_out.new_empty(T, B, weights.w_ih.shape[1]) if need_x else None
        m_h = _split_pairs(grad_state[0])
        m_rest = tuple(_split_pairs(g) for g in grad_state[1:])
        for t1 in range(T, 0, -CHUNK):
            t0 = max(0, t1 - CHUNK)
            coeffs = rule.coefficients(weights, buffers, state0, t0, t1)
            m_x_side = None
            for t in reversed(range(t0, t1)):
                m_h = m_h + _split_pairs(grad_out[t])
                m_z, m_h_prev, m_rest_prev = rule.step_backward(weights, tuple(c[t - t0] for c in coeffs), m_h, m_rest)
                if mask is not None:
                    # A finished sequence passes its state through: so do its multipliers.
                    keep = _split_pairs(mask[t]).unsqueeze(-1)
                    m_z = m_z * keep
                    m_h_prev = torch.where(keep, m_h_prev, m_h)
                    m_rest_prev = tuple(
                        torch.where(keep, new, old) for new, old in zip(m_rest_prev, m_rest, strict=True)
                    )
                if need_x:
                    if m_x_side is None:
                        m_x_side = m_z.new_empty((t1 - t0, *m_z.shape))
                    m_x_side[t - t0] = m_z
                m_h, m_rest = m_h_prev, m_rest_prev
            if need_x:
                # One matmul per chunk for the input multipliers.
                torch.mm(m_x_side.view((t1 - t0) * B, -1), weights.w_ih, out=grad_x[t0:t1].view((t1 - t0) * B, -1))
        grads_state = [m_h.reshape(B, -1), *(m.reshape(B, -1) for m in m_rest)]
        grads_state = [g if ctx.needs_input_grad[4 + k] else None for k, g in enumerate(grads_state)]
        return (None, None, None, grad_x, *grads_state)
