"""Whole recurrent models, explained as written, through the real shap, Captum and tangermeme.

Each head family of ``benchmarks/whole_model_zoo.py`` (attention with ``nn.Softmax`` or
``torch.softmax`` and an elementwise product, a functional ``torch.relu`` head, ``nn.LayerNorm``,
``nn.MultiheadAttention`` with ``batch_first`` True and False, a time-major LSTM with a softmax
over dim 0 and ``torch.tanh``, scaled dot-product attention written with ``torch.bmm``, a
``torch.sigmoid(a) * F.gelu(b)`` gate, ``nn.RMSNorm`` + ``F.glu`` + ``amax``), float32 and float64:

* shap.DeepExplainer after ``register()``, Captum's DeepLift and DeepLiftShap and tangermeme's
  deep_lift_shap inside ``deeplift_mode``: attributions sum to f(x) − E f within 1e-10 (float64)
  / 1e-5 (float32) of the output scale (max |f| over inputs and references);
* for the same (input, reference) pair the three engines give the same attributions;
* the user's model is left exactly as found.

Also: a model without recurrent modules gets bit-identical shap values with and without
``register()``; an op without a rule is named in a warning (an error with ``strict=True``);
per-token attributions of an ``nn.Embedding`` -> LSTM -> attention model through Captum's
LayerDeepLiftShap on the embedding layer.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap, LayerDeepLift, LayerDeepLiftShap
from helpers import TOLERANCE, additivity_error, explain, model_state
from tangermeme.deep_lift_shap import deep_lift_shap
from torch import nn

import torch_handler
from torch_handler.errors import UnsupportedOpError, UnsupportedOpWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import whole_model_zoo as zoo  # noqa: E402

BAR = TOLERANCE  # the project's one definition of "exact" (torch_handler.additivity)
DTYPES = [torch.float64, torch.float32]
FAMILIES = list(zoo.FAMILIES)
TARGET = 1

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require:UserWarning"),
    # every op of the zoo's heads has a rule: a warning about one without would be a failure
    pytest.mark.filterwarnings("error::torch_handler.errors.UnsupportedOpWarning"),
]


def outputs(model, *tensors):
    with torch.no_grad():
        return [model(t).double() for t in tensors]


def scale_of(*outs) -> float:
    return max(float(o.abs().max()) for o in outs)


def sums(attr: torch.Tensor) -> torch.Tensor:
    return attr.detach().double().sum(dim=tuple(range(1, attr.ndim)))


def captum_deeplift(model, X, baselines, target=TARGET):
    with torch_handler.deeplift_mode(model):
        return DeepLift(model).attribute(X, baselines=baselines, target=target)


def tangermeme_multipliers(model, X, references, target=TARGET):
    """deep_lift_shap's raw multipliers (N, S, 4, L) for references (N, S, 4, L)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch_handler.deeplift_mode(model):
            m = deep_lift_shap(model, X, references=references, target=target, raw_outputs=True, device="cpu")
    assert not [w for w in record if "Convergence deltas" in str(w.message)]
    return m


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shap_is_exact(family, dtype):
    model, X, references = zoo.make(family, dtype)
    before = model_state(model)
    values = explain(model, references, X)  # shap's strict additivity check runs too
    assert model_state(model) == before
    assert np.asarray(values).shape == (*X.shape, zoo.OUTPUTS)
    assert additivity_error(model, references, X, values) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_captum_deeplift_is_exact(family, dtype):
    model, X, references = zoo.make(family, dtype)
    baselines = references[: len(X)]
    before = model_state(model)
    attr = captum_deeplift(model, X, baselines)
    assert model_state(model) == before
    fx, fb = outputs(model, X, baselines)
    error = (sums(attr) - (fx[:, TARGET] - fb[:, TARGET])).abs().max()
    assert float(error) / scale_of(fx, fb) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_captum_deeplift_shap_is_exact(family, dtype):
    model, X, references = zoo.make(family, dtype)
    with torch_handler.deeplift_mode(model):
        attr = DeepLiftShap(model).attribute(X, baselines=references, target=TARGET)
    fx, fr = outputs(model, X, references)
    error = (sums(attr) - (fx[:, TARGET] - fr[:, TARGET].mean())).abs().max()
    assert float(error) / scale_of(fx, fr) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tangermeme_is_exact(family, dtype):
    model, X, references = zoo.make(family, dtype)
    per_example = references.unsqueeze(0).expand(len(X), *references.shape)  # (N, S, 4, L)
    m = tangermeme_multipliers(model, X, per_example)
    assert m.shape == per_example.shape and m.dtype == dtype
    fx, fr = outputs(model, X, references)
    contributions = ((X.unsqueeze(1) - per_example) * m).double().sum(dim=(2, 3))  # (N, S)
    error = (contributions - (fx[:, None, TARGET] - fr[None, :, TARGET])).abs().max()
    assert float(error) / scale_of(fx, fr) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_engines_agree_on_the_same_pair(family, dtype):
    """One reference for every input: shap (background of one), Captum DeepLift and tangermeme
    give the same attributions, to rounding."""
    model, X, references = zoo.make(family, dtype)
    reference = references[:1]
    shap_values = np.asarray(explain(model, reference, X))[..., TARGET]
    captum = captum_deeplift(model, X, reference.expand_as(X)).detach().double().numpy()
    m = tangermeme_multipliers(model, X, reference.expand_as(X).unsqueeze(1))
    tangermeme = ((X - reference) * m[:, 0]).double().numpy()
    scale = np.abs(captum).max()
    assert np.abs(shap_values - captum).max() <= BAR[dtype] * scale
    assert np.abs(tangermeme - captum).max() <= BAR[dtype] * scale
    assert scale > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine", ["shap", "captum"])
def test_shared_prefix_attention_is_exact(engine, dtype):
    """Input and reference equal on the first 7 of 10 positions: the recurrent outputs there
    have Δ = 0 exactly, the attention scores mix zero and non-zero deltas (where shap's own
    nn.Softmax rule lost mass)."""
    model, X, _ = zoo.make("attention_nn_softmax", dtype)
    references = X.clone()
    references[:, :, 7:] = X[:, :, 7:].roll(1, dims=1)  # another base at the last 3 positions
    fx, fr = outputs(model, X, references)
    if engine == "shap":
        values = np.asarray([explain(model, references[i : i + 1], X[i : i + 1]) for i in range(len(X))])
        got = torch.as_tensor(values[:, 0, ..., TARGET]).reshape(len(X), -1).sum(1)
    else:
        got = sums(captum_deeplift(model, X, references))
    error = (got - (fx[:, TARGET] - fr[:, TARGET])).abs().max()
    assert float(error) / scale_of(fx, fr) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["mha_batch_first", "mha_time_major"])
def test_frozen_parameters(family, dtype):
    """Parameters frozen with requires_grad_(False), as users often do before explaining."""
    model, X, references = zoo.make(family, dtype)
    model.requires_grad_(False)
    baselines = references[: len(X)]
    attr = captum_deeplift(model, X, baselines)
    fx, fb = outputs(model, X, baselines)
    error = (sums(attr) - (fx[:, TARGET] - fb[:, TARGET])).abs().max()
    assert float(error) / scale_of(fx, fb) <= BAR[dtype]


# --------------------------------------------------------------------------------------
# Models without recurrent modules, ops without rules
# --------------------------------------------------------------------------------------


class ConvAttention(nn.Module):
    """No recurrent module: Conv1d, nn.ReLU, a functional softmax attention and a product."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.score = nn.Linear(6, 1)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.conv(x)).transpose(1, 2)  # (N, L, 6)
        weights = torch.softmax(self.score(h), dim=1)
        return self.out((weights * torch.sigmoid(h)).sum(dim=1))


def test_register_leaves_non_recurrent_models_bit_identical():
    import shap

    model, X, references = zoo.make("relu_head", torch.float64)
    torch.manual_seed(0)
    model = ConvAttention().double().eval()
    plain = shap.DeepExplainer(model, references).shap_values(X, check_additivity=False)
    registered = explain(model, references, X, check_additivity=False)
    assert np.array_equal(np.asarray(plain), np.asarray(registered))


def test_deeplift_mode_leaves_non_recurrent_models_to_the_engine():
    """Without a recurrent module nothing is intercepted: Captum's values are bit-identical
    (and deeplift_mode says it has nothing to change)."""
    _, X, references = zoo.make("relu_head", torch.float64)
    torch.manual_seed(0)
    model = ConvAttention().double().eval()
    plain = DeepLift(model).attribute(X, baselines=references[: len(X)], target=0)
    with pytest.warns(UserWarning, match="no nn.LSTM/GRU/RNN"), torch_handler.deeplift_mode(model):
        inside = DeepLift(model).attribute(X, baselines=references[: len(X)], target=0)
    assert torch.equal(plain, inside)


class UnruledHead(nn.Module):
    """LSTM, then an op without a DeepLIFT rule on the input-dependent path."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.lstm(x.transpose(1, 2))[0][:, -1]  # (N, 6)
        if self.op == "sort":
            h = torch.sort(h, dim=-1).values
        elif self.op == "topk":
            h = torch.cat([torch.topk(h, 3, dim=-1).values, h[:, :3]], dim=-1)
        else:
            h = torch.cumprod(h, dim=-1)
        return self.out(h)


@pytest.mark.parametrize("op", ["sort", "topk", "cumprod"])
def test_op_without_rule_is_named(op):
    torch.manual_seed(0)
    model = UnruledHead(op).double().eval()
    _, X, references = zoo.make("relu_head", torch.float64)
    baselines = references[: len(X)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch_handler.deeplift_mode(model):
            DeepLift(model).attribute(X, baselines=baselines, target=0)
    named = [w for w in record if issubclass(w.category, UnsupportedOpWarning)]
    assert named and f"`{op}`" in str(named[0].message)
    with pytest.raises(UnsupportedOpError, match=f"`{op}`"), torch_handler.deeplift_mode(model, strict=True):
        DeepLift(model).attribute(X, baselines=baselines, target=0)
    # the model is left as found even after the error
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("op", ["sort", "topk", "cumprod"])
def test_op_without_rule_under_shap_is_named_and_the_additivity_check_guards(op):
    """Through shap the op is named too, and the plain gradient it gets makes shap's strict
    additivity check fail with per-sample errors (measured 0.2 %–19 % of the output scale)."""
    torch.manual_seed(0)
    model = UnruledHead(op).double().eval()
    _, X, references = zoo.make("relu_head", torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(torch_handler.AdditivityError, match="relative error per sample"):
            explain(model, references, X)
    assert any(issubclass(w.category, UnsupportedOpWarning) and f"`{op}`" in str(w.message) for w in record)


# --------------------------------------------------------------------------------------
# Token inputs: per-token attributions at the embedding layer
# --------------------------------------------------------------------------------------


class TokenAttentionLSTM(nn.Module):
    """Token ids (N, L) -> nn.Embedding -> nn.LSTM -> additive attention (torch.softmax) -> Linear."""

    def __init__(self, vocabulary=20, embedding=6, hidden=8, outputs=2):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.score = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, tokens):
        h, _ = self.lstm(self.embedding(tokens))
        weights = torch.softmax(self.score(h).squeeze(-1), dim=1)
        return self.out((weights.unsqueeze(-1) * h).sum(dim=1))


def token_setup(dtype, n=3, n_references=4, length=9, vocabulary=20, pad=0):
    torch.manual_seed(0)
    model = TokenAttentionLSTM(vocabulary).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, vocabulary, (n, length), generator=g)
    # references: all-padding, and random sequences
    references = torch.randint(1, vocabulary, (n_references, length), generator=g)
    references[0] = pad
    return model, tokens, references


def per_token(model, tokens, references):
    """The how-to's recipe: DeepLIFT at the embedding layer for every (sequence, reference)
    pair, summed over the embedding dim, averaged over the references -> (N, L)."""
    n, s = len(tokens), len(references)
    pairs, baselines = tokens.repeat_interleave(s, dim=0), references.repeat(n, 1)
    attr = LayerDeepLift(model, model.embedding).attribute(pairs, baselines=baselines, target=TARGET)
    return attr.detach().double().sum(dim=-1).view(n, s, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_attributions_are_exact(dtype):
    model, tokens, references = token_setup(dtype)
    with torch_handler.deeplift_mode(model):
        pairs = per_token(model, tokens, references)  # (N, S, L)
    fx, fr = outputs(model, tokens, references)
    # per (sequence, reference) pair
    error = (pairs.sum(dim=-1) - (fx[:, None, TARGET] - fr[None, :, TARGET])).abs().max()
    assert float(error) / scale_of(fx, fr) <= BAR[dtype]
    # DeepSHAP: the mean over references sums to f(x) − mean f(references)
    error = (pairs.mean(dim=1).sum(dim=-1) - (fx[:, TARGET] - fr[:, TARGET].mean())).abs().max()
    assert float(error) / scale_of(fx, fr) <= BAR[dtype]


def test_layer_deeplift_shap_refuses_token_ids():
    """Why the recipe expands the pairs itself: Captum's LayerDeepLiftShap calls
    requires_grad_() on the (integer) inputs."""
    model, tokens, references = token_setup(torch.float64)
    with pytest.raises(RuntimeError, match="floating point"), torch_handler.deeplift_mode(model):
        LayerDeepLiftShap(model, model.embedding).attribute(tokens, baselines=references, target=TARGET)


def test_per_token_attributions_without_the_library_miss():
    """Measured contrast: Captum alone on the same model misses the output difference."""
    model, tokens, references = token_setup(torch.float64)
    pairs = per_token(model, tokens, references)
    fx, fr = outputs(model, tokens, references)
    error = (pairs.sum(dim=-1) - (fx[:, None, TARGET] - fr[None, :, TARGET])).abs().max()
    assert float(error) / scale_of(fx, fr) > 1e-4


def test_token_example_runs(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import token_attributions

    result = token_attributions.main(["--seed", "0", "--steps", "3"])
    assert result["relative_error"] <= BAR[torch.float64]
    assert "token" in capsys.readouterr().out
