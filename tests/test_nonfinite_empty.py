"""Overflow inside a recurrent layer's input projection, and empty batches, in every engine.

* float32 inputs 3e38 and weights 4: ``W_ih x`` is Inf, the saturating gates give finite
  outputs, and the Rescale multipliers through them are 0: Captum returned all-zero
  attributions without a word. Every recurrent module now raises NonFiniteError naming
  itself, with the compiled CPU loops and with the eager ones (``LSTM_DEEPSHAP_FUSED=0``).
* An empty batch: torch returns an empty result, but no engine can attribute one (Captum and
  shap fail inside their own code); the recurrent module says the batch is empty
  (DoubledBatchError, a ValueError), shap's wrapper does before shap runs.
"""

from __future__ import annotations

import pytest
import shap
import torch
from captum.attr import DeepLift, DeepLiftShap
from helpers import explain, model_state
from tangermeme.deep_lift_shap import deep_lift_shap
from torch import nn

import torch_handler
from torch_handler import DoubledBatchError, NonFiniteError
from torch_handler.recurrent import cpu_kernels, cpu_loops, fused_loops

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LAYERS = {
    "LSTM": lambda: nn.LSTM(3, 4, batch_first=True),
    "GRU": lambda: nn.GRU(3, 4, batch_first=True),
    "RNN": lambda: nn.RNN(3, 4, batch_first=True),
    "RNN-relu": lambda: nn.RNN(3, 4, nonlinearity="relu", batch_first=True),
    "LSTM-2-layers-bidirectional": lambda: nn.LSTM(3, 2, num_layers=2, bidirectional=True, batch_first=True),
    "LSTMCell": lambda: nn.LSTMCell(3, 4),
    "GRUCell": lambda: nn.GRUCell(3, 4),
    "RNNCell": lambda: nn.RNNCell(3, 4),
}


class Model(nn.Module):
    """``rec`` (a sequence layer or a cell) on channels-first input (N, 3, T) times ``scale``
    (tangermeme takes one-hot inputs only: the scale makes them large), then a head."""

    def __init__(self, rec: nn.Module, scale: float = 1.0):
        super().__init__()
        self.rec = rec
        self.scale = scale
        self.cell = isinstance(rec, (nn.LSTMCell, nn.GRUCell, nn.RNNCell))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = x.transpose(1, 2)
        if self.scale != 1.0:
            x = x * self.scale
        if self.cell:
            out = self.rec(x[:, -1])
            return self.head(out[0] if isinstance(out, tuple) else out)
        return self.head(self.rec(x)[0][:, -1])


def overflowing(kind: str, scale: float = 1.0) -> Model:
    """A float32 model whose recurrent weights are all 4: inputs of 3e38 overflow ``W_ih x``."""
    torch.manual_seed(0)
    model = Model(LAYERS[kind](), scale).eval()
    with torch.no_grad():
        for p in model.rec.parameters():
            p.fill_(4.0)
    return model


def _engines():
    def shap_engine(model, X, reference):
        return explain(model, reference, X)

    def deeplift(model, X, reference):
        with torch_handler.deeplift_mode(model):
            return DeepLift(model).attribute(X, reference, target=0)

    def deepliftshap(model, X, reference):
        with torch_handler.deeplift_mode(model):
            return DeepLiftShap(model).attribute(X, torch.cat([reference, reference]), target=0)

    def tangermeme(model, X, reference):
        with torch_handler.deeplift_mode(model):
            return deep_lift_shap(model, X, references=reference.unsqueeze(1), target=0, device="cpu")

    return {"shap": shap_engine, "DeepLift": deeplift, "DeepLiftShap": deepliftshap, "tangermeme": tangermeme}


ENGINES = _engines()


@pytest.fixture(params=["compiled", "eager"])
def loops(request, monkeypatch):
    """Both forward paths of the rule: the compiled CPU loops and the eager torch loops."""
    monkeypatch.setenv(fused_loops.ENV, "1" if request.param == "compiled" else "0")
    if request.param == "compiled":
        cpu_loops.load(timeout=300)
    return request.param


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_an_overflowing_input_projection_raises_naming_the_module(kind, engine, loops):
    if engine == "tangermeme":  # one-hot inputs, scaled by 3e38 inside the model
        model = overflowing(kind, scale=3e38)
        X = torch.eye(3)[torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])].transpose(1, 2).contiguous()
        reference = torch.eye(3)[torch.tensor([[1, 1, 0, 2, 2], [0, 1, 2, 0, 1]])].transpose(1, 2).contiguous()
    else:  # the case: inputs 3e38, weights 4
        model = overflowing(kind)
        X = torch.full((2, 3, 5), 3e38)
        X[1, 0] = -3e38
        reference = torch.zeros(2, 3, 5)
    before = model_state(model)
    with pytest.raises(NonFiniteError, match=rf"rec \({type(model.rec).__name__}\).*NaN or Inf.*W_ih x.*float64"):
        ENGINES[engine](model, X, reference)
    assert model_state(model) == before


def test_the_compiled_loops_serve_the_overflow_test():
    # The "compiled" case above is only a test of the compiled loops if they take the layer.
    model = overflowing("LSTM")
    from torch_handler.recurrent.rules import LSTMRule

    weights = LSTMRule.weights(*(p.detach() for p in model.rec.parameters()))
    cpu_loops.load(timeout=300)
    assert cpu_kernels.enabled(LSTMRule(), weights, 4, torch.device("cpu"), torch.float32, None)


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_a_non_finite_weight_raises_naming_the_module(kind):
    # NaN anywhere in the layer's computation: here from a weight, not the data.
    torch.manual_seed(0)
    model = Model(LAYERS[kind]()).eval()
    with torch.no_grad():
        if kind == "LSTM":
            model.rec.weight_hh_l0[0, 0] = float("nan")
        else:
            model.rec.weight_ih[0, 0] = float("inf")
    X, reference = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with torch_handler.deeplift_mode(model), pytest.raises(NonFiniteError, match=rf"rec \({kind}\)"):
        DeepLift(model).attribute(X, reference, target=0)


def test_finite_large_values_below_overflow_stay_exact():
    # The check costs nothing in exactness: large but finite pre-activations are explained.
    model = overflowing("LSTM")
    X, reference = torch.full((2, 3, 5), 1e30), torch.zeros(2, 3, 5)
    with torch_handler.deeplift_mode(model):
        attributions = DeepLift(model).attribute(X, reference, target=0)
    with torch.no_grad():
        delta = (model(X) - model(reference))[:, 0]
    torch.testing.assert_close(attributions.sum(dim=(1, 2)), delta, rtol=0, atol=1e-5)


# --- empty batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_an_empty_batch_inside_deeplift_mode_says_so(kind):
    torch.manual_seed(0)
    model = Model(LAYERS[kind]()).eval()
    empty = torch.zeros(0, 3, 5)
    expected = model(empty)
    assert expected.shape == (0, 2)
    with torch_handler.deeplift_mode(model):
        with torch.no_grad():  # no explanation runs: torch's own empty result
            assert model(empty).shape == (0, 2)
        with pytest.raises(DoubledBatchError, match=rf"{type(model.rec).__name__} received an empty batch"):
            model(empty)
    assert issubclass(DoubledBatchError, ValueError)


@pytest.mark.parametrize("engine", ["DeepLift", "DeepLiftShap"])
def test_an_empty_batch_through_captum_says_so(engine):
    # Captum alone fails with "IndexError: index 0 is out of bounds" on an empty batch.
    torch.manual_seed(0)
    model = Model(LAYERS["LSTM"]()).eval()
    before = model_state(model)
    background = torch.zeros(0, 3, 5) if engine == "DeepLift" else torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"LSTM received an empty batch \(0 rows\).*Skip empty batches"):
        ENGINES[engine](model, torch.zeros(0, 3, 5), background)
    assert model_state(model) == before


def test_an_empty_batch_through_shap_says_so():
    # shap alone fails with "RuntimeError: max(): Expected reduction dim to be specified".
    torch.manual_seed(0)
    model = Model(LAYERS["GRU"]()).eval()
    with pytest.raises(ValueError, match=r"input is an empty batch \(0 rows\)"):
        explain(model, torch.randn(4, 3, 5), torch.zeros(0, 3, 5))


def test_an_empty_batch_through_tangermeme_keeps_tangermemes_error():
    torch.manual_seed(0)
    model = Model(LAYERS["LSTM"]()).eval()
    with torch_handler.deeplift_mode(model), pytest.raises(ValueError, match=r"at least one example"):
        deep_lift_shap(model, torch.zeros(0, 3, 5), target=0, device="cpu")


def test_shap_without_register_is_unchanged_on_an_empty_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(15, 2)).eval()
    with pytest.raises(RuntimeError, match=r"max\(\)"):
        shap.DeepExplainer(model, torch.randn(4, 3, 5)).shap_values(torch.zeros(0, 3, 5))
    with pytest.raises(RuntimeError, match=r"max\(\)"):  # no recurrent module: shap's own path
        explain(model, torch.randn(4, 3, 5), torch.zeros(0, 3, 5))
