"""The autograd Function that carries the rule through time.

Why a ``torch.autograd.Function`` and not module backward hooks (RULES.md §3): a hook on
``nn.LSTMCell`` cannot return multipliers for the ``hx`` tuple, a cell reused over steps
overwrites whatever a forward hook saved, and ``nn.LSTM``'s hook never fires when only
``h_n`` is read. A Function sits inside the graph: each call gets its own ``ctx`` (so a cell
reused in a Python loop keeps one saved context per step), its backward sees the multipliers
of *every* output (sequence, h_n, c_n; zeros for outputs nobody read) and returns the
multipliers of *every* input (x, h0, c0).

One Function runs one layer in one direction over a whole sequence: all input projections in
one matmul before the loop, one matmul per step in each direction, and the rule's
coefficients computed for all steps at once in backward. A single cell step is the same
Function with ``T = 1``, so cells and sequences share one code path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _split_pairs(t: Tensor) -> Tensor:
    """View a doubled-batch tensor (B, ...) as (2, N, ...): actual half, reference half."""
    return t.reshape(2, t.shape[0] // 2, *t.shape[1:])


class RecurrentRuleFunction(torch.autograd.Function):
    """``apply(rule, weights, mask, x, *state0) -> (out, *state_n)``.

    rule: an instance or class from :mod:`torch_handler.rules`; weights: its weights tuple
    (detached tensors: under DeepLIFT the parameter "gradients" would be meaningless, so none
    are produced); mask: None or a bool (T, B) tensor, False where a (packed) sequence has
    ended, in which case the state passes through unchanged; x: (T, B, I) on the doubled
    batch B = 2N; state0: the cell state tensors, each (B, ·).

    Returns out (T, B, P) (zeros where ``mask`` is False) and the final state tensors.
    Backward returns DeepLIFT multipliers for x and every state0 tensor, the same rule
    applied to each half's incoming multiplier.
    """

    @staticmethod
    def forward(ctx, rule, weights, mask, x, *state0):
        xproj = rule.input_projection(weights, x)
        state = state0
        outputs, saved = [], []
        for t in range(x.shape[0]):
            h_new, new_state, saved_t = rule.step(weights, xproj[t], state)
            if mask is not None:
                keep = mask[t].unsqueeze(1)
                new_state = tuple(
                    torch.where(keep, new, old) for new, old in zip(new_state, state, strict=True)
                )
                h_new = h_new * keep
            outputs.append(h_new)
            saved.append(saved_t)
            state = new_state
        if isinstance(saved[0], tuple):
            ctx.saved_steps = tuple(torch.stack(parts) for parts in zip(*saved, strict=True))
        else:
            ctx.saved_steps = torch.stack(saved)
        ctx.rule, ctx.weights, ctx.mask = rule, weights, mask
        ctx.save_for_backward(*state0)
        return (torch.stack(outputs), *state)

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        rule, weights, mask = ctx.rule, ctx.weights, ctx.mask
        state0 = ctx.saved_tensors
        T, B = grad_out.shape[:2]
        coeffs = rule.coefficients(ctx.saved_steps, state0)
        m_h = _split_pairs(grad_state[0])
        m_rest = tuple(_split_pairs(g) for g in grad_state[1:])
        m_xproj = None
        for t in reversed(range(T)):
            m_h = m_h + _split_pairs(grad_out[t])
            m_z, m_h_prev, m_rest_prev = rule.step_backward(
                weights, tuple(c[t] for c in coeffs), m_h, m_rest
            )
            if mask is not None:
                # A finished sequence passes its state through: so do its multipliers.
                keep = _split_pairs(mask[t]).unsqueeze(-1)
                m_z = m_z * keep
                m_h_prev = torch.where(keep, m_h_prev, m_h)
                m_rest_prev = tuple(
                    torch.where(keep, new, old) for new, old in zip(m_rest_prev, m_rest, strict=True)
                )
            if m_xproj is None:
                m_xproj = m_z.new_empty((T, *m_z.shape))
            m_xproj[t] = m_z
            m_h, m_rest = m_h_prev, m_rest_prev
        grad_x = None
        if ctx.needs_input_grad[3]:
            grad_x = (m_xproj.reshape(T * B, -1) @ weights.w_ih).view(T, B, -1)
        grads_state = [m_h.reshape(B, -1), *(m.reshape(B, -1) for m in m_rest)]
        grads_state = [g if ctx.needs_input_grad[4 + k] else None for k, g in enumerate(grads_state)]
        return (None, None, None, grad_x, *grads_state)
