"""The compiled attention rule (``sdpa_rule_f64`` in torch_handler/recurrent/cpu_kernels.c, called
by torch_handler/ops/rules/attention.py) against the same rule in torch ops.

The kernel evaluates the rule's formulas in float64 in another order (sums per query row, the
Rescale factor of exp from the exponentials it already has), so the two agree to float64
rounding: element-wise here for masks (boolean, additive, causal), broadcast batch axes, a custom
scale, both dtypes, one thread and two, scores that are equal in both halves and scores that
differ by hundreds; and whole explanations of a model with nn.MultiheadAttention match
``LSTM_DEEPSHAP_FUSED=0`` (the torch path) in shap and Captum and keep additivity.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import additivity_gap, captum_on_both_paths, relative
from torch import nn

from torch_handler.additivity import tolerance_for
from torch_handler.ops.rules import attention
from torch_handler.recurrent.fused_loops import ENV

FLOAT64_BAR = 1e-13  # max |kernel - torch| relative to the multipliers' scale, float64 operands


pytestmark = pytest.mark.usefixtures("compiled_library")


_COMPILED_RULE = attention._compiled_rule  # the real one, which both_paths' spy calls


def both_paths(monkeypatch, m, actual, reference, **params):
    """(compiled, torch) multipliers of the rule for the same call; the first call is checked
    to have taken the compiled path."""
    taken = []

    def spy(*args):
        taken.append(_COMPILED_RULE(*args))
        return taken[-1]

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(attention, "_compiled_rule", spy)
    compiled = attention.scaled_dot_product_attention(m, actual, reference, **params)
    assert taken and taken[-1] is not None, "the compiled rule should serve this call"
    monkeypatch.setenv(ENV, "0")
    plain = attention.scaled_dot_product_attention(m, actual, reference, **params)
    assert taken[-1] is None  # the torch-ops path
    monkeypatch.delenv(ENV)
    return compiled, plain


def operands(q_shape, k_shape, v_shape, dtype, spread=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(*s, generator=g, dtype=dtype) * spread  # noqa: E731
    actual, reference = (make(q_shape), make(k_shape), make(v_shape)), (make(q_shape), make(k_shape), make(v_shape))
    batch = torch.broadcast_shapes(q_shape[1:-2], k_shape[1:-2], v_shape[1:-2])  # per pair, after the pair axis
    m = torch.randn(2, q_shape[0], *batch, q_shape[-2], v_shape[-1], generator=g, dtype=dtype)
    return m, actual, reference


CASES = {
    "heads": ((5, 4, 7, 8), (5, 4, 9, 8), (5, 4, 9, 6), {}),
    "causal": ((5, 4, 9, 8), (5, 4, 9, 8), (5, 4, 9, 6), {"is_causal": True}),
    "bool-mask": ((5, 4, 7, 8), (5, 4, 9, 8), (5, 4, 9, 6), {"attn_mask": "bool"}),
    "additive-mask": ((5, 4, 7, 8), (5, 4, 9, 8), (5, 4, 9, 6), {"attn_mask": "float"}),
    "broadcast-q": ((3, 7, 8), (3, 2, 7, 8), (3, 2, 7, 5), {}),
    "broadcast-kv": ((3, 2, 7, 8), (3, 1, 7, 8), (3, 1, 7, 5), {}),
    "scale-tails": ((4, 3, 5, 3), (4, 3, 11, 3), (4, 3, 11, 7), {"scale": 0.3}),
    "model-sized": ((64, 4, 24, 8), (64, 4, 24, 8), (64, 4, 24, 8), {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [0.1, 2.0, 6.0], ids=["close", "moderate", "far"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_rule_matches_the_torch_rule(monkeypatch, threads, case, spread, dtype):
    q_shape, k_shape, v_shape, params = CASES[case]
    m, actual, reference = operands(q_shape, k_shape, v_shape, dtype, spread)
    params = dict(params)
    if params.get("attn_mask") == "bool":
        mask = torch.rand(q_shape[-2], k_shape[-2], generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True  # no row masked out entirely (softmax of an empty row is NaN natively too)
        params["attn_mask"] = mask
    elif params.get("attn_mask") == "float":
        params["attn_mask"] = torch.randn(q_shape[-2], k_shape[-2], generator=torch.Generator().manual_seed(2))
    compiled, plain = both_paths(monkeypatch, m, actual, reference, **params)
    for got, want, operand in zip(compiled, plain, actual, strict=True):
        assert got.shape == want.shape == (2, *operand.shape) and got.dtype == operand.dtype
        assert torch.isfinite(got).all()
        bar = FLOAT64_BAR if dtype == torch.float64 else tolerance_for(torch.float32)
        assert relative(got, want) <= bar


LAYOUTS = ["mha-views", "unequal-strides", "bfloat16", "two-batch-axes", "float64-views"]
BFLOAT16_BAR = 2.0**-7  # one bfloat16 rounding of the same float64 value, relative to the scale


@pytest.mark.parametrize("layout", LAYOUTS)
def test_operands_are_read_in_place_whatever_their_layout(monkeypatch, threads, layout):
    """The kernel reads float32 and float64 operands where they are (any strides: here the halves
    of one tensor stored (rows, 2N, heads, cols), as nn.MultiheadAttention's q, k, v, and a
    multiplier with its last two axes swapped) and writes the multipliers in their dtype; halves
    laid out differently and other dtypes are handed over as float64 copies; batch axes that do
    not merge into one are copied. Every layout against the torch rule."""
    N, H, L, S, E, F = 4, 3, 6, 7, 5, 4
    g = torch.Generator().manual_seed(3)
    dtype = {"bfloat16": torch.bfloat16, "float64-views": torch.float64}.get(layout, torch.float32)

    def doubled(rows, cols):
        t = torch.randn(rows, 2 * N, H, cols, generator=g).to(dtype).permute(1, 2, 0, 3)
        return t[:N], t[N:]

    (q_a, q_r), (k_a, k_r), (v_a, v_r) = doubled(L, E), doubled(S, E), doubled(S, F)
    m = torch.randn(2, N, H, F, L, generator=g).to(dtype).transpose(-1, -2)
    if layout == "unequal-strides":
        q_r, v_a = q_r.contiguous(), v_a.contiguous()
    if layout == "two-batch-axes":  # q (N, 2, H, L, E), k over every batch, v broadcast over heads
        q_a, q_r = (torch.stack([t, 2 * t], 1) for t in (q_a, q_r))
        k_a, k_r = (t.unsqueeze(1) for t in (k_a, k_r))
        v_a, v_r = (torch.stack([t[:, :1], -t[:, :1]], 1) for t in (v_a, v_r))
        m = torch.stack([m, m.flip(-1)], 2)
    actual, reference = (q_a, k_a, v_a), (q_r, k_r, v_r)
    assert not q_a.is_contiguous() or layout == "two-batch-axes"
    compiled, plain = both_paths(monkeypatch, m, actual, reference)
    bar = {torch.float64: FLOAT64_BAR, torch.bfloat16: BFLOAT16_BAR}.get(dtype, tolerance_for(torch.float32))
    for got, want, operand in zip(compiled, plain, actual, strict=True):
        assert got.shape == want.shape == (2, *operand.shape) and got.dtype == operand.dtype
        assert torch.isfinite(got).all()
        assert relative(got.double(), want.double()) <= bar


def test_equal_halves_and_a_shifted_reference(monkeypatch):
    """Rescale's limits: a pair whose halves are equal (every difference 0: the derivative), and a
    reference whose scores differ by a constant per row (softmax unchanged)."""
    m, actual, _ = operands((3, 2, 6, 4), (3, 2, 6, 4), (3, 2, 6, 4), torch.float64)
    compiled, plain = both_paths(monkeypatch, m, actual, actual)
    for got, want in zip(compiled, plain, strict=True):
        assert relative(got, want) <= FLOAT64_BAR


def test_the_compiled_rule_stands_aside(monkeypatch):
    """Masks that differ per head, empty operands and the opt-out take the torch path."""
    m, actual, reference = operands((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 5), torch.float64)
    per_head = torch.zeros(3, 4, 6, dtype=torch.float64)
    assert attention._compiled_rule(m, actual, reference, per_head, 0.5) is None
    assert attention._compiled_rule(m, actual, reference, torch.zeros(1, 4, 6, dtype=torch.float64), 0.5) is not None
    empty = tuple(t[..., :0, :] for t in actual)
    assert attention._compiled_rule(m[..., :0, :], empty, empty, None, 0.5) is None
    monkeypatch.setenv(ENV, "0")
    assert attention._compiled_rule(m, actual, reference, None, 0.5) is None


class Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(5, 16, batch_first=True)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h, _ = self.gru(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        context, _ = self.attention(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(context.mean(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explanations_match_the_torch_path(monkeypatch, threads, dtype):
    torch.manual_seed(0)
    model = Forecaster().to(dtype).eval()
    x, bg = torch.randn(4, 12, 5, dtype=dtype), torch.randn(6, 12, 5, dtype=dtype)
    compiled, plain = captum_on_both_paths(monkeypatch, model, x, bg, target=1)
    bar = tolerance_for(dtype)
    assert relative(compiled, plain) <= bar
    assert additivity_gap(model, x, bg, 1, compiled) <= bar


SOFTMAX_CASES = {
    "last-axis": ((6, 3, 10), -1),
    "middle-axis": ((6, 10, 3), -2),
    "first-axis": ((6, 7, 5), -2),
    "one-logit": ((4, 5, 1), -1),
    "tails": ((3, 2, 13), -1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [0.1, 2.0, 30.0], ids=["close", "moderate", "far"])
@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_compiled_softmax_matches_the_torch_rule(monkeypatch, threads, case, spread, dtype):
    from torch_handler.ops.rules import softmax

    shape, dim = SOFTMAX_CASES[case]
    g = torch.Generator().manual_seed(3)
    x_a, x_r = (torch.randn(*shape, generator=g, dtype=dtype) * spread for _ in range(2))
    m = torch.randn(2, *shape, generator=g, dtype=dtype)
    monkeypatch.delenv(ENV, raising=False)
    compiled = softmax._compiled_softmax(m, x_a, x_r, dim)
    assert compiled is not None
    (served,) = softmax.softmax(m, (x_a,), (x_r,), dim=dim)
    assert torch.equal(served, compiled)
    monkeypatch.setenv(ENV, "0")
    (plain,) = softmax.softmax(m, (x_a,), (x_r,), dim=dim)
    assert compiled.shape == plain.shape == (2, *shape) and compiled.dtype == dtype
    assert torch.isfinite(compiled).all()
    # Against the output multipliers' scale: with one logit both are rounding noise around 0.
    bar = FLOAT64_BAR if dtype == torch.float64 else tolerance_for(torch.float32)
    assert float((compiled - plain).abs().max()) <= bar * float(m.abs().max())


@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("layout", ["head-major-views", "unequal-strides", "bfloat16", "float64-views"])
def test_compiled_softmax_reads_operands_in_place(monkeypatch, threads, layout, dim):
    """The softmax kernel reads float32 and float64 logits and multipliers where they are (here
    the halves of one (L, 2N, S) tensor stored step-major, and multipliers laid out likewise) and
    writes the multipliers in their dtype; halves laid out differently and other dtypes go over
    as float64 copies. Every layout against the torch rule."""
    from torch_handler.ops.rules import softmax

    N, L, S = 5, 6, 11
    g = torch.Generator().manual_seed(6)
    dtype = {"bfloat16": torch.bfloat16, "float64-views": torch.float64}.get(layout, torch.float32)
    x = (torch.randn(L, 2 * N, S, generator=g) * 3).to(dtype).transpose(0, 1)
    x_a, x_r = x[:N], x[N:]
    m = torch.randn(L, 2, N, S, generator=g).to(dtype).permute(1, 2, 0, 3)
    if layout == "unequal-strides":
        x_r = x_r.contiguous()
    monkeypatch.delenv(ENV, raising=False)
    compiled = softmax._compiled_softmax(m, x_a, x_r, dim)
    monkeypatch.setenv(ENV, "0")
    (plain,) = softmax.softmax(m, (x_a,), (x_r,), dim=dim)
    assert compiled.shape == plain.shape == m.shape and compiled.dtype == dtype
    assert torch.isfinite(compiled).all()
    bar = {torch.float64: FLOAT64_BAR, torch.bfloat16: 2.0**-7}.get(dtype, tolerance_for(torch.float32))
    assert float((compiled.double() - plain.double()).abs().max()) <= bar * float(m.double().abs().max())


def test_compiled_softmax_masked_and_shifted(monkeypatch):
    """Logits at -inf in both halves get zero multipliers; a reference shifted by a constant
    per row (softmax unchanged) gets zero attributions, as the torch rule gives."""
    from torch_handler.ops.rules import softmax

    g = torch.Generator().manual_seed(4)
    x_a = torch.randn(5, 4, 9, generator=g, dtype=torch.float64)
    x_a[..., 3] = -math.inf
    x_r = x_a + torch.randn(5, 4, 1, generator=g, dtype=torch.float64)
    m = torch.randn(2, 5, 4, 9, generator=g, dtype=torch.float64)
    monkeypatch.delenv(ENV, raising=False)
    compiled = softmax._compiled_softmax(m, x_a, x_r, -1)
    monkeypatch.setenv(ENV, "0")
    (plain,) = softmax.softmax(m, (x_a,), (x_r,), dim=-1)
    assert torch.equal(compiled[..., 3], torch.zeros_like(compiled[..., 3]))
    finite = torch.isfinite(x_a)
    assert relative(compiled[:, finite], plain[:, finite]) <= FLOAT64_BAR
    shifted = (compiled[0] * torch.where(finite, x_a - x_r, 0)).sum(-1)
    assert float(shifted.abs().max()) <= 1e-13
