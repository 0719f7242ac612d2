"""The compiled norm rule (``norm_rule_f64`` in torch_handler/recurrent/cpu_kernels.c, called by
torch_handler/ops/rules/norms.py for layer_norm and rms_norm) against the same rule in torch ops.

The kernel evaluates the rule's formulas in float64 with its sums in another order, so the two
agree to float64 rounding: element-wise here for one and two normalized dims, with and without
a weight, both dtypes, one thread and two, rows whose halves are close, apart and equal, and
row lengths that leave vector tails; whole explanations of a LayerNorm model match
``LSTM_DEEPSHAP_FUSED=0`` (the torch path) and keep additivity.
"""

from __future__ import annotations

import pytest
import torch
from helpers import additivity_gap, captum_on_both_paths, relative
from torch import nn

from torch_handler.additivity import tolerance_for
from torch_handler.ops.rules import norms
from torch_handler.recurrent.fused_loops import ENV

FLOAT64_BAR = 1e-13  # max |kernel - torch| relative to the multipliers' scale, float64 operands

pytestmark = pytest.mark.usefixtures("compiled_library")

_COMPILED_NORM = norms._compiled_norm  # the real one, which both_paths' spy calls


def both_paths(monkeypatch, rule, m, x_a, x_r, **params):
    """(compiled, torch) multipliers of ``rule`` for the same call; the first call is checked
    to have taken the compiled path."""
    taken = []

    def spy(*args, **kwargs):
        taken.append(_COMPILED_NORM(*args, **kwargs))
        return taken[-1]

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(norms, "_compiled_norm", spy)
    (compiled,) = rule(m, (x_a,), (x_r,), **params)
    assert taken and taken[-1] is not None, "the compiled rule should serve this call"
    monkeypatch.setenv(ENV, "0")
    (plain,) = rule(m, (x_a,), (x_r,), **params)
    assert taken[-1] is None  # the torch-ops path
    monkeypatch.delenv(ENV)
    return compiled, plain


SHAPES = {"one-dim": ((6, 5, 32), (32,)), "tails": ((4, 3, 7), (7,)), "two-dims": ((5, 3, 4, 6), (4, 6)),
          "one-number": ((3, 2, 1), (1,))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [0.01, 1.0, 20.0], ids=["close", "moderate", "far"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("rule", ["layer_norm", "rms_norm"])
def test_compiled_norm_matches_the_torch_rule(monkeypatch, threads, rule, shape, weighted, spread, dtype):
    x_shape, normalized = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x_a = torch.randn(*x_shape, generator=g, dtype=dtype) * 2 + 0.5
    x_r = x_a + torch.randn(*x_shape, generator=g, dtype=dtype) * spread
    m = torch.randn(2, *x_shape, generator=g, dtype=dtype)
    weight = torch.randn(*normalized, generator=g, dtype=dtype) if weighted else None
    compiled, plain = both_paths(monkeypatch, getattr(norms, rule), m, x_a, x_r, normalized_shape=normalized,
                                 weight=weight, eps=1e-5)
    assert compiled.shape == plain.shape == m.shape and compiled.dtype == dtype
    assert torch.isfinite(compiled).all()
    bar = FLOAT64_BAR if dtype == torch.float64 else tolerance_for(torch.float32)
    assert relative(compiled, plain) <= bar


@pytest.mark.parametrize("layout", ["time-major-views", "unequal-strides", "bfloat16", "float64-views"])
@pytest.mark.parametrize("rule", ["layer_norm", "rms_norm"])
def test_operands_are_read_in_place_whatever_their_layout(monkeypatch, threads, rule, layout):
    """The kernel reads float32 and float64 operands where they are (here the halves of a
    recurrent layer's batch-first output stored time-major, (T, 2N, H), and a multiplier laid out
    likewise) and writes the multipliers in their dtype; halves laid out differently and other
    dtypes are handed over as float64 copies. Every layout against the torch rule."""
    N, T, n = 5, 7, 12
    g = torch.Generator().manual_seed(4)
    dtype = {"bfloat16": torch.bfloat16, "float64-views": torch.float64}.get(layout, torch.float32)
    x = torch.randn(T, 2 * N, n, generator=g).to(dtype).transpose(0, 1)
    x_a, x_r = x[:N], x[N:]
    m = torch.randn(T, 2, N, n, generator=g).to(dtype).permute(1, 2, 0, 3)
    if layout == "unequal-strides":
        x_r = x_r.contiguous()
    weight = torch.randn(n, generator=g).to(dtype)
    compiled, plain = both_paths(monkeypatch, getattr(norms, rule), m, x_a, x_r, normalized_shape=(n,),
                                 weight=weight, eps=1e-5)
    assert compiled.shape == plain.shape == m.shape and compiled.dtype == dtype
    assert torch.isfinite(compiled).all()
    bar = {torch.float64: FLOAT64_BAR, torch.bfloat16: 2.0**-7}.get(dtype, tolerance_for(torch.float32))
    assert relative(compiled.double(), plain.double()) <= bar


def test_equal_halves_give_the_gradient(monkeypatch):
    """A pair whose halves are equal: the multipliers are layer_norm's gradient (autograd's)."""
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    weight = torch.randn(16, dtype=torch.float64)
    m = torch.randn(2, 4, 9, 16, dtype=torch.float64)
    compiled, plain = both_paths(monkeypatch, norms.layer_norm, m, x, x, normalized_shape=(16,), weight=weight)
    assert relative(compiled, plain) <= FLOAT64_BAR
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(nn.functional.layer_norm(leaf, (16,), weight, None, 1e-5), leaf, m[0])
    assert relative(compiled[0], grad) <= FLOAT64_BAR


def test_the_compiled_norm_stands_aside(monkeypatch):
    """Empty operands and the opt-out take the torch path."""
    x = torch.randn(3, 0, 8, dtype=torch.float64)
    assert norms._compiled_norm(torch.randn(2, 3, 0, 8, dtype=torch.float64), x, x, None, 1e-5, 1, True) is None
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    m = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    assert norms._compiled_norm(m, x, x, None, 1e-5, 1, True) is not None
    monkeypatch.setenv(ENV, "0")
    assert norms._compiled_norm(m, x, x, None, 1e-5, 1, True) is None


class NormedForecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 24, batch_first=True)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(nn.functional.rms_norm(self.norm(h), (24,)).mean(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explanations_match_the_torch_path(monkeypatch, threads, dtype):
    torch.manual_seed(0)
    model = NormedForecaster().to(dtype).eval()
    X, background = torch.randn(4, 11, 5, dtype=dtype), torch.randn(6, 11, 5, dtype=dtype)
    compiled, plain = captum_on_both_paths(monkeypatch, model, X, background, target=1)
    bar = FLOAT64_BAR if dtype == torch.float64 else tolerance_for(torch.float32)
    assert relative(compiled, plain) <= bar
    assert additivity_gap(model, X, background, 1, compiled) <= tolerance_for(dtype)
