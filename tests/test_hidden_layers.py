"""Recurrent layers hidden in TorchScript (torch.jit.trace / torch.jit.script) through shap.

``register()`` hands a model without visible recurrent modules to shap unchanged; a traced or
scripted LSTM inside it used to get plain gradients and miss most of f(x) − E f (109 % on the
issue's model) without a word. It is refused by name, exactly as ``deeplift_mode`` refuses it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import shap
import torch
from helpers import explain, model_state
from torch import nn

import torch_handler
from torch_handler import UnsupportedConfigurationError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

_OP = {nn.LSTM: "aten::lstm", nn.GRU: "aten::gru", nn.RNN: "aten::rnn_tanh",
       nn.LSTMCell: "(aten::lstm_cell, )?nn.LSTMCell",
       nn.GRUCell: "(aten::gru_cell, )?nn.GRUCell", nn.RNNCell: "(aten::rnn_tanh_cell, )?nn.RNNCell"}


class WithEncoder(nn.Module):
    """A model holding ``encoder`` (a sequence layer or a cell, possibly TorchScript) and a head."""

    def __init__(self, encoder, cell: bool):
        super().__init__()
        self.encoder = encoder
        self.cell = cell
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out = self.encoder(x[:, -1] if self.cell else x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out if self.cell else out[:, -1])


def _torchscript(layer, x, make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        return torch.jit.trace(layer, x) if make == "trace" else torch.jit.script(layer)


def _eager_state(model):
    """What shap could leave on the root and the head (TorchScript modules hold no Python state)."""
    root = (dict(model._forward_hooks), dict(model._forward_pre_hooks), dict(model._backward_hooks),
            sorted(vars(model)), model.training, model._is_full_backward_hook)
    return root, model_state(model.head)


def _hidden_model(cls, make):
    """(model, background, X): ``cls`` inside the model as a TorchScript module."""
    torch.manual_seed(0)
    cell = cls in (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
    layer = cls(3, 4) if cell else cls(3, 4, batch_first=True)
    x = torch.randn(6, 5, 3)
    encoder = _torchscript(layer, x[:, -1] if cell else x, make)
    model = WithEncoder(encoder, cell).eval()
    return model, x[:4], x[4:]


@pytest.mark.parametrize("make", ["trace", "script"])
@pytest.mark.parametrize("cls", list(_OP))
def test_a_torchscript_recurrent_submodule_is_refused_by_name_through_shap(cls, make):
    model, background, X = _hidden_model(cls, make)
    before = _eager_state(model)
    with pytest.raises(UnsupportedConfigurationError, match=rf"encoder .*TorchScript.*{_OP[cls]}.*eager model"):
        explain(model, background, X)
    assert _eager_state(model) == before
    assert not torch_handler.is_registered()


def test_the_refusal_also_covers_an_explainer_built_before_register():
    # (shap's own constructor fails on a model holding a *scripted* LSTM: traced only.)
    model, background, X = _hidden_model(nn.LSTM, "trace")
    explainer = shap.DeepExplainer(model, background)  # shap's own constructor: no check
    torch_handler.register()
    try:
        with pytest.raises(UnsupportedConfigurationError, match=r"encoder .*TorchScript.*aten::lstm"):
            explainer.shap_values(X)
    finally:
        torch_handler.unregister()


def test_the_same_model_is_refused_by_deeplift_mode_with_the_same_message():
    model, background, X = _hidden_model(nn.GRU, "trace")
    with pytest.raises(UnsupportedConfigurationError) as through_shap:
        explain(model, background, X)
    with pytest.raises(UnsupportedConfigurationError) as through_mode:
        with torch_handler.deeplift_mode(model):
            pass
    assert str(through_shap.value) == str(through_mode.value)


def test_a_whole_traced_model_is_refused_through_shap():
    model, background, X = _hidden_model(nn.LSTM, "trace")
    eager = WithEncoder(nn.LSTM(3, 4, batch_first=True), cell=False).eval()
    traced = _torchscript(eager, X, "trace")
    with pytest.raises(UnsupportedConfigurationError, match=r"TorchScript.*aten::lstm"):
        explain(traced, background, X)


def test_without_register_shap_misses_most_of_the_delta_on_such_a_model():
    # Why the refusal matters: shap's own result on the model is far from exact.
    model, background, X = _hidden_model(nn.LSTM, "trace")
    values = shap.DeepExplainer(model, background).shap_values(X, check_additivity=False)
    with torch.no_grad():
        delta = (model(X) - model(background).mean(0)).numpy()
    miss = np.abs(values.sum(axis=(1, 2)) - delta).max() / np.abs(delta).max()
    assert miss > 0.05


def test_a_torchscript_submodule_without_recurrent_ops_is_left_to_shap():
    torch.manual_seed(0)

    class ScriptedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(15, 4), nn.ReLU())
            self.head = _torchscript(nn.Linear(4, 2), torch.randn(2, 4), "script")

        def forward(self, x):
            return self.head(self.body(x))

    model = ScriptedHead().eval()
    x = torch.randn(6, 5, 3)
    # shap itself cannot hook a TorchScript module; with register() it fails the same way.
    with pytest.raises(Exception) as plain:
        shap.DeepExplainer(model, x[:4]).shap_values(x[4:])
    with pytest.raises(type(plain.value)) as registered:
        explain(model, x[:4], x[4:])
    assert str(registered.value) == str(plain.value)


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_a_traced_cell_is_refused_by_deeplift_mode_although_its_graph_has_no_cell_op(cls):
    # Tracing a cell records linear / sigmoid / tanh / mul, not aten::*_cell: the module's
    # original class name gives it away. Captum would otherwise get plain gradients through it.
    model, _, _ = _hidden_model(cls, "trace")
    with pytest.raises(UnsupportedConfigurationError, match=rf"encoder .*TorchScript.*nn.{cls.__name__}"):
        with torch_handler.deeplift_mode(model):
            pass
