"""Captum's DeepLift / DeepLiftShap / LayerDeepLift(Shap) with ``torch_handler.deeplift_mode``.

Captum's protocol (captum 0.9, ``attr/_core/deep_lift.py``), which the rule relies on:

* a forward pre-hook on the model replaces its inputs by ``cat([inputs, baselines])`` and a
  forward hook stacks the two output halves; ``compute_gradients`` then takes
  ``torch.autograd.grad`` with respect to ``inputs`` only, i.e. it reads the *first* half of
  the doubled-batch gradient, and returns ``(inputs - baselines) * gradient``;
* backward hooks go only on the types in ``SUPPORTED_NON_LINEAR`` (ReLU, Sigmoid, Tanh,
  MaxPool, Softmax, ...): nn.LSTM / GRU / RNN and the cells get no hook, so without
  deeplift_mode they contribute plain gradients;
* the convergence delta runs the model on ``baselines`` and on ``inputs`` separately (odd
  batch sizes) under ``torch.no_grad()``, where deeplift_mode runs torch's native forward;
* LayerDeepLift reads the first half of the gradient at the layer (``grad[0]``) and the two
  halves of the layer's activation as input and baseline.

Errors are relative to the scale of the model's outputs, max |f| over inputs and baselines.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap, LayerDeepLift, LayerDeepLiftShap
from helpers import TOLERANCE, model_state
from torch import nn

import torch_handler
from torch_handler.explanation import is_active

BAR = TOLERANCE  # the project's one definition of "exact" (torch_handler.additivity)
DTYPES = [torch.float64, torch.float32]

pytestmark = [
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require:UserWarning"),
]


class LSTMClassifier(nn.Module):
    """2-layer nn.LSTM; the head reads h_n of the last layer."""

    def __init__(self, inputs=5, hidden=8, classes=3):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, num_layers=2, batch_first=True)
        self.fc1 = nn.Linear(hidden, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        _, (h_n, _) = self.lstm(x)
        return self.fc2(self.act(self.fc1(h_n[-1])))


class BiLSTMClassifier(nn.Module):
    """Bidirectional nn.LSTM, time-major (batch_first=False): the doubled batch is on dim 1."""

    def __init__(self, inputs=5, hidden=8, classes=3):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, bidirectional=True)
        self.fc1 = nn.Linear(2 * hidden, 6)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        out, _ = self.lstm(x.transpose(0, 1))
        return self.fc2(self.act(self.fc1(out[-1])))


class GRUClassifier(nn.Module):
    """2-layer bidirectional nn.GRU; the head reads both directions' final h_n."""

    def __init__(self, inputs=5, hidden=8, classes=3):
        super().__init__()
        self.gru = nn.GRU(inputs, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc1 = nn.Linear(2 * hidden, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        _, h_n = self.gru(x)
        return self.fc2(self.act(self.fc1(torch.cat([h_n[-2], h_n[-1]], dim=1))))


class EmbedLSTM(nn.Module):
    """Linear embedding -> nn.LSTM -> head: layers both before and after the recurrence."""

    def __init__(self, inputs=5, embed=6, hidden=8, classes=3):
        super().__init__()
        self.embed = nn.Linear(inputs, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.fc2(self.act(self.fc1(out[:, -1])))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


MODELS = {"lstm2": LSTMClassifier, "bilstm": BiLSTMClassifier, "gru2bi": GRUClassifier}


def make(cls, dtype, seed=0, n=4, baselines=None):
    torch.manual_seed(seed)
    model = cls().to(dtype).eval()
    x = torch.randn(n, 7, 5, dtype=dtype)
    b = torch.randn(baselines or n, 7, 5, dtype=dtype)
    return model, x, b


def outputs(model, *tensors):
    with torch.no_grad():
        return [model(t) for t in tensors]


def scale_of(*outs) -> float:
    return max(float(o.abs().max()) for o in outs)


def sums(attr):
    return attr.detach().sum(dim=tuple(range(1, attr.ndim)))


def relative_error(model, x, b, attr, target) -> float:
    """max_j |Σ attr_j − (f(x_j) − f(b_j))[target_j]| / output scale."""
    fx, fb = outputs(model, x, b)
    index = torch.as_tensor(target).reshape(-1, 1).expand(len(x), 1)
    delta = (fx - fb).gather(1, index)[:, 0]
    return float((sums(attr) - delta).abs().max()) / scale_of(fx, fb)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_deeplift_exact(name, dtype):
    model, x, b = make(MODELS[name], dtype)
    with torch_handler.deeplift_mode(model):
        attr, delta = DeepLift(model).attribute(x, b, target=1, return_convergence_delta=True)
    scale = scale_of(*outputs(model, x, b))
    assert attr.shape == x.shape and attr.dtype == dtype
    assert float(delta.abs().max()) / scale <= BAR[dtype]
    assert relative_error(model, x, b, attr, 1) <= BAR[dtype]
    # Per-sample targets and a scalar baseline (Captum broadcasts it to a tensor).
    targets = [0, 2, 1, 2]
    with torch_handler.deeplift_mode(model):
        attr, delta = DeepLift(model).attribute(x, 0.0, target=targets,
                                                return_convergence_delta=True)
    zeros = torch.zeros_like(x)
    assert float(delta.abs().max()) / scale_of(*outputs(model, x, zeros)) <= BAR[dtype]
    assert relative_error(model, x, zeros, attr, targets) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deeplift_multipliers(dtype):
    """multiply_by_inputs=False returns the multipliers: m · (x − b) sums to Δf and equals
    the attributions of the default DeepLift."""
    model, x, b = make(LSTMClassifier, dtype)
    with torch_handler.deeplift_mode(model):
        m = DeepLift(model, multiply_by_inputs=False).attribute(x, b, target=2)
        attr = DeepLift(model).attribute(x, b, target=2)
    torch.testing.assert_close(m * (x - b), attr, rtol=0, atol=0)
    assert relative_error(model, x, b, m * (x - b), 2) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pairs_with_equal_rows(dtype):
    """An input equal to its baseline (wholly, for some steps, or up to 1e-9): Δz ≈ 0 takes the
    midpoint-derivative branch of the Rescale rule, with finite multipliers and zero error."""
    model, x, b = make(LSTMClassifier, dtype)
    b[0] = x[0]
    b[1, :3] = x[1, :3]
    b[2] = x[2] + 1e-9
    with torch_handler.deeplift_mode(model):
        m = DeepLift(model, multiply_by_inputs=False).attribute(x, b, target=1)
    assert bool(torch.isfinite(m).all())
    attr = m * (x - b)
    assert float(attr[0].abs().max()) == 0.0
    assert relative_error(model, x, b, attr, 1) <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["lstm2", "gru2bi"])
def test_deeplift_shap_exact(name, dtype):
    """DeepLiftShap: every (input, baseline) pair is exact, and the averaged attributions sum
    to f(x) − mean_k f(b_k)."""
    model, x, b = make(MODELS[name], dtype, n=3, baselines=4)
    with torch_handler.deeplift_mode(model):
        attr, delta = DeepLiftShap(model).attribute(x, b, target=0, return_convergence_delta=True)
    fx, fb = outputs(model, x, b)
    scale = scale_of(fx, fb)
    assert attr.shape == x.shape and delta.shape == (3 * 4,)
    assert float(delta.abs().max()) / scale <= BAR[dtype]
    expected = fx[:, 0] - fb[:, 0].mean()
    assert float((sums(attr) - expected).abs().max()) / scale <= BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_deeplift_after_and_before_the_lstm(dtype):
    """LayerDeepLift at a layer after the LSTM (fc1's output, and its input = the LSTM's last
    output) and before it (the embedding, whose multipliers come back through the rule)."""
    model, x, b = make(EmbedLSTM, dtype)
    fx, fb = outputs(model, x, b)
    scale = scale_of(fx, fb)
    cases = [(model.fc1, False), (model.fc1, True), (model.embed, False)]
    for layer, to_input in cases:
        with torch_handler.deeplift_mode(model):
            attr, delta = LayerDeepLift(model, layer).attribute(
                x, b, target=1, attribute_to_layer_input=to_input, return_convergence_delta=True
            )
        assert float(delta.abs().max()) / scale <= BAR[dtype], (layer, to_input)
        assert float((sums(attr) - (fx[:, 1] - fb[:, 1])).abs().max()) / scale <= BAR[dtype]
    # After the LSTM the rule is not on the path: the same values as without deeplift_mode.
    plain = LayerDeepLift(model, model.fc1).attribute(x, b, target=1)
    with torch_handler.deeplift_mode(model):
        ruled = LayerDeepLift(model, model.fc1).attribute(x, b, target=1)
    torch.testing.assert_close(ruled, plain, rtol=0, atol=100 * torch.finfo(dtype).eps * scale)
    # Before it, the rule is what makes the layer attributions exact.
    plain, plain_delta = LayerDeepLift(model, model.embed).attribute(
        x, b, target=1, return_convergence_delta=True)
    assert float(plain_delta.abs().max()) / scale > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_deeplift_shap(dtype):
    model, x, b = make(EmbedLSTM, dtype, n=3, baselines=4)
    fx, fb = outputs(model, x, b)
    scale = scale_of(fx, fb)
    for layer in (model.fc1, model.embed):
        with torch_handler.deeplift_mode(model):
            attr, delta = LayerDeepLiftShap(model, layer).attribute(
                x, b, target=2, return_convergence_delta=True)
        assert delta.shape == (3 * 4,)
        assert float(delta.abs().max()) / scale <= BAR[dtype]
        expected = fx[:, 2] - fb[:, 2].mean()
        assert float((sums(attr) - expected).abs().max()) / scale <= BAR[dtype]


def contrast_case():
    """2-layer nn.LSTM classifier, 32 inputs ~ N(0, 1), zero baselines, target 0."""
    model, x, _ = make(LSTMClassifier, torch.float64, seed=1, n=32)
    return model, x, torch.zeros_like(x)


def errors(model, x, b, delta):
    """(max |δ| / output scale, Σ|δ| / Σ|Δf|) for Captum's convergence deltas δ, target 0."""
    fx, fb = outputs(model, x, b)
    df = (fx - fb)[:, 0]
    return float(delta.abs().max()) / scale_of(fx, fb), float(delta.abs().sum() / df.abs().sum())


def test_without_deeplift_mode_captum_is_far_off():
    """Measured contrast: Captum alone gives nn.LSTM plain gradients (it hooks only the
    SUPPORTED_NON_LINEAR types), and misses Δf by about a third of it."""
    model, x, b = contrast_case()
    _, plain = DeepLift(model).attribute(x, b, target=0, return_convergence_delta=True)
    with torch_handler.deeplift_mode(model):
        _, exact = DeepLift(model).attribute(x, b, target=0, return_convergence_delta=True)
    plain_scale, plain_df = errors(model, x, b, plain)
    exact_scale, exact_df = errors(model, x, b, exact)
    assert plain_df > 1e-2  # measured: 0.333 of Σ|Δf|
    assert plain_scale > 1e-3  # measured: 0.011 of the output scale
    assert exact_df <= 1e-10  # measured: ~1e-15
    assert exact_scale <= 1e-10  # measured: ~1e-16


def test_nested_and_with_shap_register():
    """Nested deeplift_mode, inside register(): exact throughout; only the outermost exit
    restores; afterwards Captum gives exactly the plain values it gave before."""
    model, x, b = make(LSTMClassifier, torch.float64)
    plain = DeepLift(model).attribute(x, b, target=0)
    was_registered = torch_handler.is_registered()
    torch_handler.register()
    try:
        with torch_handler.deeplift_mode(model):
            with torch_handler.deeplift_mode(model):
                inner = DeepLift(model).attribute(x, b, target=0)
            assert is_active(model.lstm)
            outer, delta = DeepLift(model).attribute(x, b, target=0,
                                                     return_convergence_delta=True)
        assert not is_active(model.lstm)
        assert "forward" not in vars(model.lstm)
    finally:
        if not was_registered:
            torch_handler.unregister()
    assert relative_error(model, x, b, inner, 0) <= 1e-10
    torch.testing.assert_close(outer, inner, rtol=0, atol=0)
    assert float(delta.abs().max()) <= 1e-10 * scale_of(*outputs(model, x, b))
    torch.testing.assert_close(DeepLift(model).attribute(x, b, target=0), plain, rtol=0, atol=0)
    assert relative_error(model, x, b, plain, 0) > 1e-3


class PlainLSTMHead(nn.Module):
    """No module Captum hooks: nothing but deeplift_mode could leave state behind."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("cls", [PlainLSTMHead, GRUClassifier])
def test_exception_inside_captum_leaves_model_unchanged(cls):
    model, x, b = make(cls, torch.float64)
    model.train()  # no dropout: the mode allows it; the flag must survive untouched
    before = model_state(model)
    with pytest.raises(IndexError):
        with torch_handler.deeplift_mode(model):
            DeepLift(model).attribute(x, b, target=7)  # 3 outputs: out of range
    after = model_state(model)
    recurrent = {
        n for n, m in model.named_modules() if isinstance(m, torch_handler.SUPPORTED_MODULES)
    }
    for name in before:
        # Captum leaves .input/.output on nn.ReLU when it fails between forward and
        # backward; deeplift_mode removes them on the way out.
        assert after[name] == before[name], name
    assert recurrent and all(not before[n].instance_forward and before[n].training for n in recurrent)
    # And the model still explains exactly afterwards.
    model.eval()
    with torch_handler.deeplift_mode(model):
        attr = DeepLift(model).attribute(x, b, target=2)
    assert relative_error(model, x, b, attr, 2) <= 1e-10


def measure() -> None:
    """Print the figures quoted in the README: ``python tests/test_captum.py``."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for dtype in DTYPES:
        for name, cls in MODELS.items():
            model, x, b = make(cls, dtype, n=16, baselines=16)
            with torch_handler.deeplift_mode(model):
                _, d1 = DeepLift(model).attribute(x, b, target=1, return_convergence_delta=True)
                _, d2 = DeepLiftShap(model).attribute(x, b[:4], target=1,
                                                      return_convergence_delta=True)
            scale = scale_of(*outputs(model, x, b))
            print(f"{str(dtype):14} {name:7} DeepLift max|delta|/scale "
                  f"{float(d1.abs().max()) / scale:.1e}  DeepLiftShap "
                  f"{float(d2.abs().max()) / scale:.1e}")
    model, x, b = contrast_case()
    _, plain = DeepLift(model).attribute(x, b, target=0, return_convergence_delta=True)
    with torch_handler.deeplift_mode(model):
        _, exact = DeepLift(model).attribute(x, b, target=0, return_convergence_delta=True)
    for label, delta in (("without deeplift_mode", plain), ("with deeplift_mode", exact)):
        by_scale, by_df = errors(model, x, b, delta)
        print(f"2-layer nn.LSTM, {label:21}: max|delta|/scale {by_scale:.2e}, "
              f"sum|delta|/sum|df| {by_df:.2e}")

if __name__ == "__main__":
    measure()
