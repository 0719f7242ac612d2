"""scaled_dot_product_attention: bilinear scores, a constant mask, the softmax rule, a bilinear product."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torch_handler.ops.rules._common import Multipliers, _f64, _pad_after_pair, _reduce_to
from torch_handler.ops.rules._compiled import halves, scratch, table, written_dtype
from torch_handler.ops.rules.bilinear import _matmul_multipliers
from torch_handler.ops.rules.softmax import _exp_sums, _softmax_input_multiplier
from torch_handler.recurrent import cpu_kernels


def scaled_dot_product_attention(
    m: Tensor, actual, reference, *, attn_mask=None, is_causal: bool = False, scale=None, dropout_p=0.0
) -> Multipliers:
    """y = softmax(S) @ v with S = (q @ kᵀ) · scale + mask (scale = 1/√E if None; a bool mask
    is −∞ where False, is_causal masks the upper triangle), composed of the bilinear rule
    (m_P = m @ mean(v)ᵀ, m_v = mean(P)ᵀ @ m), the softmax rule on S (dim −1) and the bilinear
    rule again (m_q = scale · m_S @ mean(k), m_k = scale · m_Sᵀ @ mean(q)).

    actual = (q_a, k_a, v_a): q (N, *b, L, E), k (N, *b, S, E), v (N, *b, S, Ev) (batch axes
    broadcast per pair); attn_mask constant, broadcastable to (*b, L, S);
    m (2, N, *b, L, Ev) -> (m_q, m_k, m_v). Computed in float64.
    """
    if dropout_p:
        raise ValueError(
            "scaled_dot_product_attention rule: dropout_p must be 0 while explaining (put the model in eval() mode)"
        )
    (q_a, k_a, v_a), (q_r, k_r, v_r) = actual, reference
    if scale is None:
        scale = 1.0 / math.sqrt(q_a.shape[-1])
    L, S = q_a.shape[-2], k_a.shape[-2]
    additive = None
    if is_causal or attn_mask is not None:
        additive = torch.zeros((L, S), dtype=torch.float64, device=q_a.device)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q_a.device).tril()
        additive = additive.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            additive = additive + torch.zeros_like(attn_mask, dtype=torch.float64).masked_fill(~attn_mask, -math.inf)
        else:
            additive = additive + _f64(attn_mask)

    compiled = _compiled_rule(m, actual, reference, additive, scale)
    if compiled is not None:
        return compiled
    q_a64, k_a64, v_a64, q_r64, k_r64, v_r64 = map(_f64, (q_a, k_a, v_a, q_r, k_r, v_r))

    def scores(q, k):
        ndim = max(q.ndim, k.ndim)
        s = torch.matmul(_pad_after_pair(q, ndim), _pad_after_pair(k, ndim).transpose(-1, -2)).mul_(scale)
        return s if additive is None else s.add_(additive)  # in place: no fresh float64 temporaries

    # Everything in float64: the products too (in float32 they would cost the sdpa rows of the
    # op crosscheck a factor 70 in accuracy, 5.6e-08 -> 4.0e-06, for a third of the rule's time).
    S_a, S_r = scores(q_a64, k_a64), scores(q_r64, k_r64)
    # The probabilities from the softmax rule's own exponentials (one exp pass, not three).
    sums = _exp_sums(S_a, S_r, (-1,))
    (_, _), (e_a, e_r), (sum_a, sum_r) = sums
    P_a, P_r = e_a / sum_a, e_r / sum_r
    m_P, m_v = _matmul_multipliers(_f64(m), P_a, P_r, v_a64, v_r64)
    m_S = _softmax_input_multiplier(m_P, S_a, S_r, (-1,), sums)
    m_q, m_kt = _matmul_multipliers(m_S, q_a64, q_r64, k_a64.transpose(-1, -2), k_r64.transpose(-1, -2), scale=scale)
    return (
        _reduce_to(m_q, q_a.shape).to(q_a.dtype),
        _reduce_to(m_kt.transpose(-1, -2), k_a.shape).to(k_a.dtype),
        _reduce_to(m_v, v_a.shape).to(v_a.dtype),
    )


def _compiled_rule(m: Tensor, actual, reference, additive: Tensor | None, scale: float) -> Multipliers | None:
    """The same rule in one call of the compiled CPU library (``sdpa_rule_f64`` in
    ``torch_handler/recurrent/cpu_kernels.c``, float64 throughout), or None where it does not
    serve: not on the CPU, the library not loaded yet (its first use starts the build, see
    :mod:`torch_handler.recurrent.cpu_loops`), ``LSTM_DEEPSHAP_FUSED=0``, an empty operand, or
    a mask that differs between heads or pairs.

    Why: in torch the rule is some thirty float64 passes over (pairs, heads, L, S) tensors, each
    a fresh allocation of a few MB; the kernel keeps one query row's scores in the cache. It
    evaluates the same formulas (sums in another order, exp by the library's polynomial), so the
    two agree to rounding: ``tests/test_attention_kernel.py``. It reads the operands where they
    are and writes the multipliers in their dtype (see ``_compiled.halves``).
    """
    q_a, k_a, v_a = actual
    library = cpu_kernels.serving(q_a.device)
    if library is None:
        return None
    N, (L, E), (S, F) = q_a.shape[0], q_a.shape[-2:], v_a.shape[-2:]
    if min(N, L, E, S, F) == 0:
        return None
    batch = torch.broadcast_shapes(q_a.shape[1:-2], k_a.shape[1:-2], v_a.shape[1:-2])
    mask = None
    if additive is not None:
        if math.prod(additive.shape[:-2]) != 1:
            return None
        mask = additive.reshape(additive.shape[-2:]).expand(L, S).contiguous()
    G, ndim = math.prod(batch), 1 + len(batch) + 2

    def blocks(t: Tensor) -> Tensor:
        """(N, *b, rows, cols) as (N, G, rows, cols): the batch axes broadcast (stride 0), a view
        wherever they merge into one (always with one batch axis, as attention's heads)."""
        return _pad_after_pair(t, ndim).expand(N, *batch, *t.shape[-2:]).reshape(N, G, *t.shape[-2:])

    keep: list = []
    layouts = [halves(blocks(a), blocks(r), keep) for a, r in zip(actual, reference, strict=True)]
    layouts.append(halves(blocks(m[0]), blocks(m[1]), keep))
    results = []
    for a in actual:
        # In the operand's dtype, unless it was broadcast over the batch axes (its multipliers are
        # then summed over them below, in float64 as the torch rule does).
        whole = a.shape[1:] == (*batch, *a.shape[-2:])
        # Laid out (rows, 2, N, G, cols) in memory, as attention's projections are (the heads split
        # off a (T, 2N, E) tensor): the multipliers then merge back without a copy.
        rows, cols = a.shape[-2:]
        dtype = written_dtype(a.dtype) if whole else torch.float64
        out = torch.empty((rows, 2, N, G, cols), dtype=dtype).permute(1, 2, 3, 0, 4)
        layouts.append(halves(out[0], out[1], keep))
        results.append(out)
    work = scratch(torch.get_num_threads() * library.sdpa_work_f64(L, S, E, F))
    library.sdpa_rule_f64(torch.get_num_threads(), N, G, L, S, E, F, float(scale), table(layouts),
                          None if mask is None else mask.data_ptr(), work.data_ptr())
    return tuple(
        _reduce_to(out.view(2, N, *batch, *out.shape[-2:]), a.shape).to(a.dtype)
        for out, a in zip(results, actual, strict=True)
    )
