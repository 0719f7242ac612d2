"""Bad input and failures: clear errors, nothing leaked, nothing silently wrong."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import shap
import torch
from helpers import explain, model_state
from torch import nn

import torch_handler
from torch_handler import AdditivityError, DoubledBatchError, UnsupportedConfigurationError
from torch_handler.errors import UnsupportedOpWarning
from torch_handler.explanation import is_active
from torch_handler.recurrent.registry import TORCH_FORWARD


class Classifier(nn.Module):
    def __init__(self, hidden=4, dropout=0.0):
        super().__init__()
        self.lstm = nn.LSTM(3, hidden, num_layers=2, batch_first=True, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(self.drop(out[:, -1]))


def data(dtype=torch.float64, n=4, steps=5):
    torch.manual_seed(0)
    return torch.randn(n, steps, 3, dtype=dtype), torch.randn(2, steps, 3, dtype=dtype)


# --- clear errors --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["input", "background"])
def test_nan_or_inf_in_inputs_or_background(bad, where):
    model = Classifier().double().eval()
    background, X = data()
    (X if where == "input" else background)[0, 1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*Clean or impute"):
        explain(model, background, X)


def test_input_and_background_of_different_shapes():
    model = Classifier().double().eval()
    background, X = data()
    with pytest.raises(ValueError, match=r"per-sample shape \(6, 3\).*\(5, 3\)"):
        explain(model, background, torch.randn(2, 6, 3, dtype=torch.float64))


def test_input_and_background_of_different_dtypes():
    model = Classifier().double().eval()
    background, X = data()
    with pytest.raises(TypeError, match="dtype torch.float32 but its background has torch.float64"):
        explain(model, background, X.float())


def test_input_and_background_on_different_devices():
    # No second real device here: the meta device stands in for one.
    model = Classifier().double().eval()
    background, X = data()
    torch_handler.register()
    try:
        explainer = shap.DeepExplainer(model, background)
        with pytest.raises(ValueError, match="is on meta but its background is on cpu"):
            explainer.shap_values(X.to("meta"))
    finally:
        torch_handler.unregister()


def test_a_batch_that_cannot_be_doubled():
    model = Classifier().double().eval()
    x = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    with torch_handler.deeplift_mode(model), pytest.raises(DoubledBatchError, match="must be even"):
        model(x)
    cell = nn.LSTMCell(3, 2).double()
    with torch_handler.deeplift_mode(cell), pytest.raises(DoubledBatchError, match="unbatched"):
        cell(torch.randn(3, dtype=torch.float64))
    # Without gradients (an engine's plain forward pass) any batch runs natively.
    with torch_handler.deeplift_mode(model), torch.no_grad():
        assert model(x).shape == (3, 2)


def test_training_mode_with_active_dropout():
    model = Classifier(dropout=0.3).double().train()
    with pytest.raises(UnsupportedConfigurationError, match=r"training mode.*model.eval\(\)"):
        with torch_handler.deeplift_mode(model):
            pass
    assert model.training and "forward" not in model.lstm.__dict__
    model.eval()
    with torch_handler.deeplift_mode(model):
        pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_raises(dtype):
    model = Classifier().to(dtype).eval()
    with pytest.raises(UnsupportedConfigurationError, match="float32 and float64 only"):
        with torch_handler.deeplift_mode(model):
            pass


def test_input_dtype_must_match_the_module():
    lstm = nn.LSTM(3, 2).double()
    with torch_handler.deeplift_mode(lstm), pytest.raises(TypeError, match="cast one to match"):
        lstm(torch.randn(4, 2, 3, requires_grad=True))


def test_module_overriding_forward_is_outside_the_support_table():
    class Peephole(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    with pytest.raises(UnsupportedConfigurationError, match="overrides forward"):
        with torch_handler.deeplift_mode(nn.Sequential(Peephole(3, 2))):
            pass


def test_deeplift_mode_warns_on_a_model_without_recurrent_layers():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with pytest.warns(UserWarning, match="no nn.LSTM/GRU/RNN"):
        with torch_handler.deeplift_mode(model):
            pass


# --- nothing silently wrong ----------------------------------------------------------------


class CumulativeGate(Classifier):
    """torch.cumprod has no DeepLIFT rule (a running product over the time steps)."""

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(torch.cumprod(torch.sigmoid(5.0 * out), dim=1)[:, -1])


def test_unhandled_functional_op_fails_the_additivity_check_with_per_sample_errors():
    torch.manual_seed(0)
    model = CumulativeGate().double().eval()
    background, X = data(n=8)
    with pytest.warns(UnsupportedOpWarning, match="`cumprod`"):
        with pytest.raises(AdditivityError, match=r"relative error per sample \[.*functional cumprod in"):
            explain(model, background, X)
    # The same model is explained (approximately) when the user opts out.
    with pytest.warns(UnsupportedOpWarning, match="`cumprod`"):
        values = explain(model, background, X, check_additivity=False)
    assert values.shape == (2, 5, 3, 2)


def test_register_changes_nothing_for_models_without_recurrent_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    background, X = torch.randn(10, 4), torch.randn(3, 4)
    without = shap.DeepExplainer(model, background).shap_values(X)
    with_handler = explain(model, background, X)
    assert np.array_equal(without, with_handler)


# --- nothing leaked --------------------------------------------------------------------------


class FailsInsideBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom inside backward")


class Exploding(Classifier):
    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(FailsInsideBackward.apply(out[:, -1]))


def test_exception_inside_shap_values_leaves_the_model_as_found():
    model = Exploding().double().eval()
    background, X = data()
    torch_handler.register()
    try:
        explainer = shap.DeepExplainer(model, background)
        before = model_state(model)
        original_forward = type(model.lstm).forward
        with pytest.raises(RuntimeError, match="boom inside backward"):
            explainer.shap_values(X)
        assert model_state(model) == before
        assert type(model.lstm).forward is original_forward
        assert len(list(model.parameters())) == len(list(Classifier().parameters()))
    finally:
        torch_handler.unregister()
    # shap itself is restored after the failure too.
    from shap.explainers._deep import deep_pytorch

    assert "LSTM" not in deep_pytorch.op_handler
    assert not hasattr(deep_pytorch.PyTorchDeep.shap_values, "__wrapped__")


def test_successful_explanation_leaves_the_model_as_found():
    model = Classifier().double().eval()
    background, X = data()
    torch_handler.register()
    try:
        explainer = shap.DeepExplainer(model, background)
        before = model_state(model)
        explainer.shap_values(X)
        assert model_state(model) == before
    finally:
        torch_handler.unregister()


def test_exception_inside_deeplift_mode_restores_forwards():
    model = Classifier().double().eval()
    with pytest.raises(KeyError):
        with torch_handler.deeplift_mode(model):
            assert is_active(model.lstm) and "forward" not in model.lstm.__dict__
            raise KeyError("user code failed")
    assert not is_active(model.lstm) and "forward" not in model.lstm.__dict__
    assert nn.LSTM.forward is TORCH_FORWARD[nn.LSTM]


def test_register_and_unregister_are_idempotent_and_restore_shap_exactly():
    from shap.explainers._deep import deep_pytorch

    handlers_before = dict(deep_pytorch.op_handler)
    methods_before = dict(vars(deep_pytorch.PyTorchDeep))
    torch_handler.register()
    torch_handler.register()
    assert deep_pytorch.op_handler["LSTMCell"] is torch_handler.lstm_cell_handler
    assert deep_pytorch.op_handler["GRU"] is torch_handler.gru_handler
    torch_handler.unregister()
    torch_handler.unregister()
    assert deep_pytorch.op_handler == handlers_before
    assert dict(vars(deep_pytorch.PyTorchDeep)) == methods_before


def test_register_and_unregister_are_safe_across_threads():
    from shap.explainers._deep import deep_pytorch

    original = deep_pytorch.PyTorchDeep.__dict__["shap_values"]
    errors = []

    def churn(k):
        try:
            for i in range(200):
                (torch_handler.register if (i + k) % 2 else torch_handler.unregister)()
        except Exception as error:  # pragma: no cover - the assertion below reports it
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    torch_handler.register()
    assert deep_pytorch.PyTorchDeep.__dict__["shap_values"].__wrapped__ is original
    torch_handler.unregister()
    assert deep_pytorch.PyTorchDeep.__dict__["shap_values"] is original
    assert "LSTM" not in deep_pytorch.op_handler


def test_handler_reached_outside_the_rule_behaves_like_shap_without_the_handler():
    # Only a shap_values call that did not go through register()'s wrapper can reach it; it
    # warns and passes the gradient on (raising would make shap leak its hooks).
    cell = nn.LSTMCell(3, 2)
    with pytest.warns(UserWarning, match="not running the DeepLIFT rule.*deeplift_mode"):
        assert torch_handler.lstm_cell_handler(cell, (None,), (None,)) is None
