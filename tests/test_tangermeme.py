"""tangermeme's deep_lift_shap with ``torch_handler.deeplift_mode`` on one-hot sequences.

tangermeme's protocol (tangermeme 1.6, ``deep_lift_shap.py``), which the rule relies on:

* for each batch of (example, reference) pairs it runs ``model(cat([X, references]))`` with
  grad enabled and takes ``torch.autograd.grad(y.sum(), X)``: the first half of the
  doubled-batch gradient, i.e. the multipliers, returned as such with ``raw_outputs=True``
  (shape (N, n_shuffles, 4, L)); otherwise projected onto the four characters
  (``hypothetical_attributions``), averaged over the references and multiplied by X;
* references are a (N, n_shuffles, 4, L) one-hot tensor, or a function (default
  ``dinucleotide_shuffle``) called per pair with ``n=1``;
* rules are module backward hooks (``register_full_backward_hook``) on the types of its
  ``_NON_LINEAR_OPS`` table (ReLU, Sigmoid, Tanh, MaxPool, ...), extended through
  ``additional_nonlinear_ops``. Recurrent modules are not in the table and get no hook, so
  inside deeplift_mode their autograd Function's multipliers pass through untouched;
* it warns when a pair's |Δf − Σ attributions| exceeds ``warning_threshold`` (default 1e-3,
  absolute) or when the mean delta is over 1 % of the mean |Δf|.

Why the rule is *not* offered through ``additional_nonlinear_ops``: a rule there is called
as ``rule(module, grad_input, grad_output)`` from a full backward hook, with the module's
cached ``inputs[0]`` and output tensor. For nn.LSTM / GRU / RNN and nn.LSTMCell the output is
a tuple (tangermeme's forward hook calls ``outputs.requires_grad`` on it and fails), the
initial state ``hx`` is never cached, and a full backward hook only sees top-level tensors,
so multipliers for ``h0``/``c0`` and for ``h_n`` read by the head cannot pass (the README's
"How it works" says why an autograd Function is needed).
``test_additional_nonlinear_ops_cannot_carry_the_rule`` records the failure.

Errors are relative to the scale of the model's outputs, max |f| over inputs and references.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TOLERANCE, model_state
from tangermeme.deep_lift_shap import deep_lift_shap
from tangermeme.ersatz import dinucleotide_shuffle
from tangermeme.utils import random_one_hot
from torch import nn

import torch_handler
from torch_handler.explanation import is_active

BAR = TOLERANCE  # the project's one definition of "exact" (torch_handler.additivity)
DTYPES = [torch.float64, torch.float32]
WARNING_THRESHOLD = 1e-3  # tangermeme's default ``warning_threshold``
N, S, L = 4, 3, 24  # examples, references per example, sequence length


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class OneHotLSTM(nn.Module):
    """(N, 4, L) -> (N, L, 4) -> nn.LSTM(batch_first) -> last step -> Linear, ReLU, Linear."""

    def __init__(self, rnn=nn.LSTM, hidden=8, targets=2):
        super().__init__()
        self.rnn = rnn(4, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, targets)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(1, 2))
        return self.fc2(self.act(self.fc1(out[:, -1])))


class OneHotGRU(OneHotLSTM):
    def __init__(self):
        super().__init__(rnn=nn.GRU)


class ConvBiLSTM(nn.Module):
    """Conv1d + ReLU, then a 2-layer bidirectional nn.LSTM whose final h_n feed the head."""

    def __init__(self, hidden=8, targets=2):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size=5, padding=2)
        self.act = nn.ReLU()
        self.lstm = nn.LSTM(6, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, targets)

    def forward(self, x):
        _, (h_n, _) = self.lstm(self.act(self.conv(x)).transpose(1, 2))
        return self.fc(torch.cat([h_n[-2], h_n[-1]], dim=1))


MODELS = {"lstm": OneHotLSTM, "gru": OneHotGRU, "conv_bilstm": ConvBiLSTM}


def make(cls, dtype, seed=0, n=N):
    torch.manual_seed(seed)
    model = cls().to(dtype).eval()
    X = random_one_hot((n, 4, L), random_state=seed).to(dtype)
    refs = dinucleotide_shuffle(X, n=S, random_state=seed)  # (n, S, 4, L)
    return model, X, refs


def predict(model, X, refs):
    """f(X) (n, C) and f(refs) (n, S, C), without gradients (torch's native forward)."""
    with torch.no_grad():
        fr = model(refs.reshape(-1, *refs.shape[2:])).reshape(*refs.shape[:2], -1)
        return model(X), fr


def pair_deltas(model, X, refs, multipliers, target):
    """Σ (X − ref) · m − (f(X) − f(ref)) per (example, reference) pair, and the output scale."""
    fx, fr = predict(model, X, refs)
    contributions = ((X[:, None] - refs) * multipliers).sum(dim=(2, 3))
    delta = contributions - (fx[:, None, target] - fr[..., target])
    return delta, max(float(fx.abs().max()), float(fr.abs().max()))


def tangermeme_warnings(record):
    return [str(w.message) for w in record if "Convergence deltas" in str(w.message)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_raw_outputs_are_exact_multipliers(name, dtype):
    model, X, refs = make(MODELS[name], dtype)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch_handler.deeplift_mode(model):
            # batch_size 5: the 12 pairs run as 5 + 5 + 2, splitting an example's references.
            m = deep_lift_shap(model, X, references=refs, target=1, raw_outputs=True,
                               batch_size=5, device="cpu")
    assert m.shape == (N, S, 4, L) and m.dtype == dtype
    delta, scale = pair_deltas(model, X, refs, m, target=1)
    assert float(delta.abs().max()) / scale <= BAR[dtype]
    assert float(delta.abs().max()) <= WARNING_THRESHOLD * 1e-2
    assert tangermeme_warnings(record) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attributions_sum_to_mean_output_difference(dtype):
    """raw_outputs=False, default references (dinucleotide shuffles drawn by tangermeme):
    the attributions of each example sum to f(X) − mean_s f(ref_s); hypothetical=True gives
    the same values once multiplied by X."""
    model, X, _ = make(ConvBiLSTM, dtype)
    with torch_handler.deeplift_mode(model):
        result = deep_lift_shap(model, X, target=0, n_shuffles=S, random_state=3,
                                return_references=True, device="cpu")
        hypothetical = deep_lift_shap(model, X, target=0, n_shuffles=S, random_state=3,
                                      hypothetical=True, device="cpu")
    attr, refs = result.attributions, result.references
    assert attr.shape == X.shape and refs.shape == (N, S, 4, L)
    fx, fr = predict(model, X, refs.to(dtype))
    scale = max(float(fx.abs().max()), float(fr.abs().max()))
    expected = fx[:, 0] - fr[..., 0].mean(dim=1)
    assert float((attr.sum(dim=(1, 2)) - expected).abs().max()) / scale <= BAR[dtype]
    assert float(((attr - attr * X).abs()).max()) == 0.0  # only observed characters
    torch.testing.assert_close(hypothetical * X, attr, rtol=0, atol=10 * torch.finfo(dtype).eps)


def test_without_deeplift_mode_tangermeme_warns():
    """Measured contrast: tangermeme alone gives nn.LSTM plain gradients and says so."""
    model, X, refs = make(OneHotLSTM, torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        m = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
    delta, scale = pair_deltas(model, X, refs, m, target=0)
    fx, fr = predict(model, X, refs)
    df = fx[:, None, 0] - fr[..., 0]
    assert float(delta.abs().max()) / scale > 1e-3  # measured: 0.0044 of the output scale
    assert float(delta.abs().sum() / df.abs().sum()) > 1e-2  # measured: 0.33 of Σ|Δf|
    assert any("33.0% of the output differences" in w for w in tangermeme_warnings(record))


def test_additional_nonlinear_ops_cannot_carry_the_rule():
    """A recurrent rule in tangermeme's table would run as a module hook: its forward hook
    reads ``outputs.requires_grad`` and nn.LSTM returns a tuple. deeplift_mode is the way."""
    model, X, refs = make(OneHotLSTM, torch.float64)

    def passthrough(module, grad_input, grad_output):
        return grad_input

    with pytest.raises(AttributeError, match="tuple"):
        deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu",
                       additional_nonlinear_ops={nn.LSTM: passthrough})
    assert all(not m._backward_hooks and not m._forward_hooks for m in model.modules())


def test_nested_and_with_shap_register():
    model, X, refs = make(OneHotLSTM, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tangermeme's own warning about the plain gradients
        plain = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
    was_registered = torch_handler.is_registered()
    torch_handler.register()
    try:
        with torch_handler.deeplift_mode(model):
            with torch_handler.deeplift_mode(model):
                inner = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
            assert is_active(model.rnn)
            outer = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
        assert not is_active(model.rnn) and "forward" not in vars(model.rnn)
    finally:
        if not was_registered:
            torch_handler.unregister()
    delta, scale = pair_deltas(model, X, refs, inner, target=0)
    assert float(delta.abs().max()) / scale <= 1e-10
    torch.testing.assert_close(outer, inner, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    delta, _ = pair_deltas(model, X, refs, plain, target=0)
    assert float(delta.abs().max()) / scale > 1e-3


@pytest.mark.parametrize("name", ["lstm", "conv_bilstm"])
def test_exception_inside_tangermeme_leaves_model_unchanged(name):
    model, X, refs = make(MODELS[name], torch.float64)
    model.train()  # no dropout: deeplift_mode allows it; tangermeme's eval() must be undone
    before = model_state(model)
    with pytest.raises(IndexError):
        with torch_handler.deeplift_mode(model):
            deep_lift_shap(model, X, references=refs, target=5, device="cpu")  # 2 outputs
    assert model_state(model) == before
    assert all(state.training for state in before.values())
    model.eval()
    with torch_handler.deeplift_mode(model):
        m = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
    delta, scale = pair_deltas(model, X, refs, m, target=0)
    assert float(delta.abs().max()) / scale <= 1e-10


def measure() -> None:
    """Print the figures quoted in the README: ``python tests/test_tangermeme.py``."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for dtype in DTYPES:
        for name, cls in MODELS.items():
            model, X, refs = make(cls, dtype, n=16)
            with torch_handler.deeplift_mode(model):
                m = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
            delta, scale = pair_deltas(model, X, refs, m, target=0)
            print(f"{str(dtype):14} {name:12} max|delta| {float(delta.abs().max()):.1e} "
                  f"(tangermeme warns above {WARNING_THRESHOLD:g}), "
                  f"max|delta|/scale {float(delta.abs().max()) / scale:.1e}")
    model, X, refs = make(OneHotLSTM, torch.float64)
    m = deep_lift_shap(model, X, references=refs, raw_outputs=True, device="cpu")
    delta, scale = pair_deltas(model, X, refs, m, target=0)
    fx, fr = predict(model, X, refs)
    df = fx[:, None, 0] - fr[..., 0]
    print(f"no deeplift_mode, lstm float64: max|delta| {float(delta.abs().max()):.1e}, "
          f"max|delta|/scale {float(delta.abs().max()) / scale:.2e}, "
          f"sum|delta|/sum|df| {float(delta.abs().sum() / df.abs().sum()):.2e}")


if __name__ == "__main__":
    measure()
