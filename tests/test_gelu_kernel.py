"""The compiled gelu rule (``gelu_rule_f64`` in torch_handler/recurrent/cpu_kernels.c, called by
torch_handler/ops/rules/unary.py for ``approximate="none"``) against the same rule in torch ops.

Same formulas, libm's erfc for torch's: element-wise agreement to float64 rounding over pairs in
the midpoint series' range, in the quotient's range on both tails and across zero, equal
halves, both dtypes, one thread and two; the tanh form keeps the torch path; a whole Captum
explanation of a GELU model matches ``LSTM_DEEPSHAP_FUSED=0`` and keeps additivity.
"""

from __future__ import annotations

import pytest
import torch
from helpers import additivity_gap, captum_on_both_paths, relative
from torch import nn

from torch_handler.additivity import tolerance_for
from torch_handler.ops.rules import unary
from torch_handler.recurrent.fused_loops import ENV

FLOAT64_BAR = 1e-13  # max |kernel - torch| relative to the multipliers' scale, float64 operands

pytestmark = pytest.mark.usefixtures("compiled_library")

_COMPILED_GELU = unary._compiled_gelu


def both_paths(monkeypatch, m, x_a, x_r, **params):
    taken = []

    def spy(*args):
        taken.append(_COMPILED_GELU(*args))
        return taken[-1]

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(unary, "_compiled_gelu", spy)
    (compiled,) = unary.gelu(m, (x_a,), (x_r,), **params)
    served = bool(taken) and taken[-1] is not None
    monkeypatch.setenv(ENV, "0")
    (plain,) = unary.gelu(m, (x_a,), (x_r,), **params)
    monkeypatch.delenv(ENV)
    return compiled, plain, served


# (centre, spread): the pair's midpoint and half-difference scales
RANGES = {"series": (0.0, 1e-4), "series-far": (4.0, 1e-5), "upper-tail": (3.0, 1.0), "lower-tail": (-3.0, 1.0),
          "across-zero": (0.0, 3.0), "far-tails": (0.0, 12.0), "equal": (1.0, 0.0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", list(RANGES))
def test_compiled_gelu_matches_the_torch_rule(monkeypatch, threads, where, dtype):
    centre, spread = RANGES[where]
    g = torch.Generator().manual_seed(0)
    mid = centre + torch.randn(64, 37, generator=g, dtype=torch.float64)
    half = spread * torch.randn(64, 37, generator=g, dtype=torch.float64)
    x_a, x_r = (mid + half).to(dtype), (mid - half).to(dtype)
    m = torch.randn(2, 64, 37, generator=g, dtype=dtype)
    compiled, plain, served = both_paths(monkeypatch, m, x_a, x_r)
    assert served, "the compiled rule should serve this call"
    assert compiled.shape == plain.shape == m.shape and compiled.dtype == dtype
    assert torch.isfinite(compiled).all()
    bar = FLOAT64_BAR if dtype == torch.float64 else tolerance_for(torch.float32)
    assert relative(compiled, plain) <= bar


@pytest.mark.parametrize("layout", ["transposed", "unequal-strides", "bfloat16"])
def test_operands_in_any_layout(monkeypatch, threads, layout):
    """Halves of a transposed tensor (copied contiguous in their dtype), halves laid out
    differently, and a dtype the kernel does not read in place (a float64 copy): against the
    torch rule, the multipliers in the operands' dtype."""
    g = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float32
    x = (torch.randn(9, 2 * 6, generator=g) * 2).to(dtype).t()
    x_a, x_r = x[:6], x[6:]
    if layout == "unequal-strides":
        x_r = x_r.contiguous()
    m = torch.randn(9, 2, 6, generator=g).to(dtype).permute(1, 2, 0)
    compiled, plain, served = both_paths(monkeypatch, m, x_a, x_r)
    assert served and compiled.shape == plain.shape == m.shape and compiled.dtype == dtype
    assert torch.isfinite(compiled).all()
    bar = 2.0**-7 if dtype == torch.bfloat16 else tolerance_for(torch.float32)
    assert relative(compiled.double(), plain.double()) <= bar


def test_equal_halves_give_the_derivative(monkeypatch):
    x = torch.linspace(-6, 6, 97, dtype=torch.float64)
    m = torch.ones(2, 97, dtype=torch.float64)
    compiled, _, served = both_paths(monkeypatch, m, x, x)
    leaf = x.clone().requires_grad_()
    (derivative,) = torch.autograd.grad(nn.functional.gelu(leaf).sum(), leaf)
    assert served and relative(compiled[0], derivative) <= FLOAT64_BAR


def test_the_compiled_gelu_stands_aside(monkeypatch):
    x = torch.randn(5, 3, dtype=torch.float64)
    m = torch.randn(2, 5, 3, dtype=torch.float64)
    assert _COMPILED_GELU(m, x, x) is not None
    compiled, plain, served = both_paths(monkeypatch, m, x, x + 1, approximate="tanh")
    assert not served and torch.equal(compiled, plain)  # the tanh form: torch ops
    assert _COMPILED_GELU(m[:, :0], x[:0], x[:0]) is None
    monkeypatch.setenv(ENV, "0")
    assert _COMPILED_GELU(m, x, x) is None


class GeluHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 16, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 3))

    def forward(self, x):
        h, _ = self.gru(x)
        return self.mlp(h.mean(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explanations_match_the_torch_path(monkeypatch, threads, dtype):
    torch.manual_seed(0)
    model = GeluHead().to(dtype).eval()
    X, background = torch.randn(4, 9, 4, dtype=dtype), torch.randn(6, 9, 4, dtype=dtype)
    compiled, plain = captum_on_both_paths(monkeypatch, model, X, background, target=2)
    bar = FLOAT64_BAR if dtype == torch.float64 else tolerance_for(torch.float32)
    assert relative(compiled, plain) <= bar
    assert additivity_gap(model, X, background, 2, compiled) <= tolerance_for(dtype)
