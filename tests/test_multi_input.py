"""Models with several inputs, through shap, Captum and tangermeme (issue 19, item 1).

shap differentiates once per model input over a retained graph: every rule's backward must
survive repeated passes. Covered: a sequence and static features joined by ``+`` (then SiLU,
tanh, sigmoid, GELU, softmax, LayerNorm, a product, a matmul), two sequences, an initial
hidden state computed from a second input; shap (``register()``), Captum ``DeepLift``,
``DeepLiftShap`` and ``LayerDeepLift``, tangermeme (the static input passed as ``args``, equal
in both halves); and randomized multi-input architectures through shap, compared element-wise
with Captum on the same pairs.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap, LayerDeepLift
from helpers import TOLERANCE, additivity_error, explain
from tangermeme.deep_lift_shap import deep_lift_shap
from torch import nn
from torch.nn import functional as F

import torch_handler

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor [0-9]+ did not already require:UserWarning"),
    # every op after the join has a rule: a warning about one without would be a failure
    pytest.mark.filterwarnings("error::torch_handler.errors.UnsupportedOpWarning"),
]

DTYPES = [torch.float64, torch.float32]
TARGET, HIDDEN, LENGTH = 1, 6, 7


def after_join(op: str, j: torch.Tensor, a: torch.Tensor, b: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """One op family applied after joining ``a`` (from the sequence) and ``b`` (the other
    input) into ``j = a + b``; (N, HIDDEN) in and out."""
    if op == "silu":
        return F.silu(j)
    if op == "tanh":
        return torch.tanh(j)
    if op == "sigmoid":
        return torch.sigmoid(j)
    if op == "gelu":
        return F.gelu(j)
    if op == "softmax":
        return torch.softmax(j, dim=-1) * a
    if op == "layer_norm":
        return norm(j)
    if op == "product":
        return j * b
    if op == "matmul":  # outer product of the two sides, contracted with the join
        return (a.unsqueeze(-1) @ b.unsqueeze(-2) @ j.unsqueeze(-1)).squeeze(-1)
    if op == "relu":
        return torch.relu(j)
    if op == "rms_norm":
        return F.rms_norm(j, (j.shape[-1],))
    if op == "log_softmax":
        return F.log_softmax(j, dim=-1)
    if op == "glu":
        return F.glu(torch.cat([j, b], dim=-1), dim=-1)
    if op == "max":
        return torch.maximum(a, b) + j.amax(dim=-1, keepdim=True)
    raise ValueError(op)


OPS = ["silu", "tanh", "sigmoid", "gelu", "softmax", "layer_norm", "product", "matmul"]
MORE_OPS = [*OPS, "relu", "rms_norm", "log_softmax", "glu", "max"]
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class SequenceAndStatic(nn.Module):
    """x (N, 4, L) -> recurrent layer -> last step; z (N, 3) -> Linear; joined by + -> ops."""

    def __init__(self, ops, cell="lstm", bidirectional=False):
        super().__init__()
        self.ops = list(ops)
        self.rnn = CELLS[cell](4, HIDDEN // (1 + bidirectional), batch_first=True, bidirectional=bidirectional)
        self.static = nn.Linear(3, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, 2)

    def forward(self, x, z):
        a = self.rnn(x.transpose(1, 2))[0][:, -1]
        b = self.static(z)
        h = a + b
        for op in self.ops:
            h = after_join(op, h, a, b, self.norm)
        return self.out(h)


class TwoSequences(nn.Module):
    """x1 (N, 4, L) -> LSTM, x2 (N, 3, L2) -> GRU (time-major); cross-attention between them."""

    def __init__(self, ops=("tanh",)):
        super().__init__()
        self.ops = list(ops)
        self.first = nn.LSTM(4, HIDDEN, batch_first=True)
        self.second = nn.GRU(3, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, 2)

    def forward(self, x1, x2):
        h1 = self.first(x1.transpose(1, 2))[0]  # (N, L, H)
        h2 = self.second(x2.permute(2, 0, 1))[0].transpose(0, 1)  # (N, L2, H)
        weights = torch.softmax(h1 @ h2.transpose(1, 2), dim=-1)  # (N, L, L2)
        context = (weights @ h2).mean(1)
        a, b = h1[:, -1], context
        h = a + b
        for op in self.ops:
            h = after_join(op, h, a, b, self.norm)
        return self.out(h)


class InitialStateFromInput(nn.Module):
    """z (N, 3) -> tanh(Linear) -> the initial (h0, c0) of an LSTM over x (N, 4, L)."""

    def __init__(self, ops=("silu",), cell="lstm"):
        super().__init__()
        self.ops, self.cell = list(ops), cell
        self.init_h = nn.Linear(3, HIDDEN)
        self.init_c = nn.Linear(3, HIDDEN)
        self.rnn = CELLS[cell](4, HIDDEN, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, 2)

    def forward(self, x, z):
        h0 = torch.tanh(self.init_h(z)).unsqueeze(0)
        state = (h0, torch.sigmoid(self.init_c(z)).unsqueeze(0)) if self.cell == "lstm" else h0
        a = self.rnn(x.transpose(1, 2), state)[0][:, -1]
        b = self.init_h(z)
        h = a + b
        for op in self.ops:
            h = after_join(op, h, a, b, self.norm)
        return self.out(h)


def inputs_for(model, n, generator, dtype):
    """Random model inputs (list) for ``model``, n rows."""
    x = torch.randn(n, 4, LENGTH, generator=generator, dtype=dtype)
    if isinstance(model, TwoSequences):
        return [x, torch.randn(n, 3, LENGTH - 2, generator=generator, dtype=dtype)]
    return [x, torch.randn(n, 3, generator=generator, dtype=dtype)]


def setup(model, dtype, n=3, n_background=4, seed=0):
    torch.manual_seed(seed)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, inputs_for(model, n, g, dtype), inputs_for(model, n_background, g, dtype)


def scale_of(model, *input_lists) -> float:
    with torch.no_grad():
        return max(float(model(*inputs).abs().max()) for inputs in input_lists)


def captum_shap(model, X, background):
    """Captum DeepLiftShap in deeplift_mode: a tuple of attributions, one per input."""
    with torch_handler.deeplift_mode(model):
        return DeepLiftShap(model).attribute(tuple(X), baselines=tuple(background), target=TARGET)


def assert_shap_matches_captum(model, X, background, bar, nonzero=True):
    """shap (register()) sums to Δf and equals Captum DeepLiftShap element-wise on the same pairs.
    ``nonzero``: require some attribution to be non-zero (a random architecture may end in
    relu(log_softmax(.)), which is 0 whatever the input)."""
    values = explain(model, background, X)  # shap's own strict additivity check runs too
    assert isinstance(values, list) and len(values) == len(X)
    assert additivity_error(model, background, X, values) <= bar
    captum = captum_shap(model, X, background)
    scale = max(float(np.abs(c.detach().numpy()).max()) for c in captum)
    assert scale > 0 or not nonzero
    for v, c in zip(values, captum, strict=True):
        assert v.shape == (*c.shape, 2)
        assert np.abs(v[..., TARGET] - c.detach().double().numpy()).max() <= bar * scale


MODELS = {
    **{f"static_{op}": (lambda op=op: SequenceAndStatic([op])) for op in OPS},
    "two_sequences": lambda: TwoSequences(["layer_norm", "silu"]),
    "initial_state_lstm": lambda: InitialStateFromInput(["gelu"]),
    "initial_state_gru": lambda: InitialStateFromInput(["softmax"], cell="gru"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_shap_is_exact_and_equals_captum(name, dtype):
    model, X, background = setup(MODELS[name](), dtype)
    assert_shap_matches_captum(model, X, background, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_captum_deeplift_is_exact(name, dtype):
    model, X, background = setup(MODELS[name](), dtype)
    baselines = [b[: len(X[0])] for b in background]
    with torch_handler.deeplift_mode(model):
        attr = DeepLift(model).attribute(tuple(X), baselines=tuple(baselines), target=TARGET)
    total = sum(a.detach().double().flatten(1).sum(1) for a in attr)
    with torch.no_grad():
        delta = (model(*X) - model(*baselines))[:, TARGET].double()
    assert float((total - delta).abs().max()) / scale_of(model, X, baselines) <= TOLERANCE[dtype]


class Swapped(nn.Module):
    """``model`` with its two inputs in the other order (Captum attributes the first)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, second, first):
        return self.model(first, second)


def layer_deeplift_error(model, layer, x, baseline, other, first: bool) -> float:
    """LayerDeepLift on ``layer`` attributing one input (``x`` vs ``baseline``), the other input
    ``other`` the same in both halves (``additional_forward_args``): max |Σ attr − Δf| / scale.
    ``first``: whether the attributed input is the model's first argument."""
    forward = model if first else Swapped(model)
    with torch_handler.deeplift_mode(forward, strict=True):
        attr = LayerDeepLift(forward, layer).attribute(
            x, baselines=baseline, target=TARGET, additional_forward_args=(other,), attribute_to_layer_input=True
        )
    attr = attr if isinstance(attr, tuple) else (attr,)
    total = sum(a.detach().double().flatten(1).sum(1) for a in attr)
    with torch.no_grad():
        fx, fb = forward(x, other), forward(baseline, other)
    delta = (fx - fb)[:, TARGET].double()
    return float((total - delta).abs().max()) / max(float(fx.abs().max()), float(fb.abs().max()))


@pytest.mark.parametrize("name", ["static_layer_norm", "static_product", "initial_state_lstm", "two_sequences"])
def test_layer_deeplift_is_exact(name):
    """Captum's layer variant on a multi-input model: attributions to the recurrent layer's
    input (the sequence varies), and to the static branch's Linear (the static input varies)."""
    model, X, background = setup(MODELS[name](), torch.float64)
    baselines = [b[: len(X[0])] for b in background]
    # (Captum cannot attribute to an LSTM's input when it gets a state tuple: the output layer
    # stands in there; everything reaches the output through it.)
    layer = model.out if name.startswith("initial_state") else getattr(model, "rnn", None) or model.first
    assert layer_deeplift_error(model, layer, X[0], baselines[0], X[1], first=True) <= TOLERANCE[torch.float64]
    if hasattr(model, "static"):
        error = layer_deeplift_error(model, model.static, X[1], baselines[1], X[0], first=False)
        assert error <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("name", ["static_silu", "static_matmul", "initial_state_lstm"])
def test_tangermeme_with_the_static_input_as_args_is_exact(name):
    """tangermeme attributes X only; the static input goes in ``args`` (repeated in both halves)."""
    model, X, background = setup(MODELS[name](), torch.float64)
    x, z = X
    references = background[0][: len(x)].unsqueeze(1)  # (N, 1, 4, L)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Convergence deltas")
        warnings.filterwarnings("ignore", "X must be one-hot")
        warnings.filterwarnings("ignore", "references must be one-hot")
        with torch_handler.deeplift_mode(model, strict=True):
            m = deep_lift_shap(
                model,
                x,
                args=(z,),
                references=references,
                target=TARGET,
                raw_outputs=True,
                device="cpu",
                only_warn=True,
            )
    with torch.no_grad():
        delta = (model(x, z) - model(references[:, 0], z))[:, TARGET]
    total = ((x - references[:, 0]) * m[:, 0]).sum(dim=(1, 2))
    assert float((total - delta).abs().max()) / scale_of(model, [x, z]) <= TOLERANCE[torch.float64]


# --- randomized multi-input architectures through shap ----------------------------------------

N_RANDOM = 40


def random_architecture(rng: random.Random) -> nn.Module:
    """One of the three multi-input shapes, with a random cell and 1–3 op families after the join."""
    ops = rng.sample(MORE_OPS, rng.randint(1, 3))
    shape = rng.choice(["static", "static", "two_sequences", "initial_state"])
    if shape == "static":
        return SequenceAndStatic(ops, cell=rng.choice(list(CELLS)), bidirectional=rng.random() < 0.3)
    if shape == "two_sequences":
        return TwoSequences(ops)
    return InitialStateFromInput(ops, cell=rng.choice(["lstm", "gru"]))


@pytest.mark.parametrize("seed", range(N_RANDOM))
def test_random_multi_input_architectures_through_shap(seed):
    """Seeded random architectures (float64): shap is exact and equals Captum on the same pairs."""
    rng = random.Random(seed)
    model, X, background = setup(random_architecture(rng), torch.float64, n=2, n_background=2, seed=seed)
    assert_shap_matches_captum(model, X, background, TOLERANCE[torch.float64], nonzero=False)


def test_a_rule_survives_repeated_backward_passes():
    """The op rules' backward over a retained graph, twice (what shap does once per input)."""
    model, X, background = setup(SequenceAndStatic(["silu", "softmax", "layer_norm"]), torch.float64)
    inputs = [torch.cat([x, b[: len(x)]]).requires_grad_() for x, b in zip(X, background, strict=True)]
    with torch_handler.deeplift_mode(model):
        y = model(*inputs)[:, TARGET].sum()
        first = torch.autograd.grad(y, inputs[0], retain_graph=True)[0]
        second = torch.autograd.grad(y, inputs[1], retain_graph=True)[0]
        again = torch.autograd.grad(y, inputs, retain_graph=False)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert first.abs().sum() > 0 and second.abs().sum() > 0
