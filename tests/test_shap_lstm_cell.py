"""nn.LSTMCell explained end to end through the real shap.DeepExplainer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import shap
import torch
from helpers import TOLERANCE, additivity_error, explain
from torch import nn

import torch_handler


class SeedCell(nn.Module):
    """The seed's setting: one LSTMCell step, x, h, c as model inputs, weights filled with 0.1.

    Outputs h' and c' side by side (2H outputs), so both of the cell's outputs are explained.
    """

    def __init__(self, input_size: int, hidden: int = 2):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden)
        for p in self.cell.parameters():
            nn.init.constant_(p, 0.1)

    def forward(self, x, h, c):
        h1, c1 = self.cell(x, (h, c))
        return torch.cat((h1, c1), dim=1)


class UnrolledCell(nn.Module):
    """The usual model: one cell reused in a Python loop, then ReLU and a Linear head."""

    def __init__(self, features=4, hidden=6, outputs=3, read="h", pass_hx=True):
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.relu = nn.ReLU()
        self.read, self.pass_hx = read, pass_hx
        width = 2 * hidden if read == "hc" else hidden
        self.head = nn.Linear(width, outputs)

    def forward(self, x):
        state = None
        if self.pass_hx:
            zeros = x.new_zeros(x.shape[0], self.cell.hidden_size)
            state = (zeros, zeros)
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h, c = state
        features = {"h": h, "c": c, "hc": torch.cat((h, c), dim=1)}[self.read]
        return self.head(self.relu(features))


@pytest.mark.parametrize("input_size", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_cases_reach_exactness_where_the_seed_had_half_a_percent(input_size, dtype):
    # The seed's cases: input 2 or 3, hidden 2, weights 0.1, zero baselines.
    model = SeedCell(input_size).to(dtype).eval()
    x = torch.tensor([[0.5, -0.3, 0.8][:input_size]], dtype=dtype)
    h = torch.tensor([[0.2, -0.1]], dtype=dtype)
    c = torch.tensor([[0.4, 0.6]], dtype=dtype)
    background = [torch.zeros_like(x), torch.zeros_like(h), torch.zeros_like(c)]
    values = explain(model, background, [x, h, c])
    error = additivity_error(model, background, [x, h, c], values)
    assert error <= 1e-6
    assert error <= TOLERANCE[dtype]
    # h and c do get attributions of their own (the seed's handler dropped them).
    assert np.abs(values[1]).sum() > 1e-3 and np.abs(values[2]).sum() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("read", ["h", "c", "hc"])
def test_unrolled_cell_relu_linear_three_outputs(dtype, read):
    torch.manual_seed(1)
    model = UnrolledCell(read=read).to(dtype).eval()
    background = torch.randn(8, 5, 4, dtype=dtype)
    X = torch.randn(3, 5, 4, dtype=dtype)
    values = explain(model, background, X)
    assert values.shape == (3, 5, 4, 3)
    assert additivity_error(model, background, X, values) <= TOLERANCE[dtype]


def test_twenty_time_steps_and_hx_omitted():
    torch.manual_seed(2)
    model = UnrolledCell(features=3, hidden=5, outputs=2, pass_hx=False).double().eval()
    background = torch.randn(6, 24, 3, dtype=torch.float64)
    X = torch.randn(2, 24, 3, dtype=torch.float64)
    values = explain(model, background, X)
    assert additivity_error(model, background, X, values) <= 1e-10
    # Early steps matter too: the rule carried multipliers through all 24 steps.
    assert np.abs(values[:, 0]).max() > 0


def test_ranked_outputs():
    torch.manual_seed(3)
    model = UnrolledCell(outputs=4).double().eval()
    background = torch.randn(6, 4, 4, dtype=torch.float64)
    X = torch.randn(3, 4, 4, dtype=torch.float64)
    values, ranks = explain(model, background, X, ranked_outputs=2)
    assert values.shape == (3, 4, 4, 2) and ranks.shape == (3, 2)
    assert additivity_error(model, background, X, values, ranks.numpy()) <= 1e-10


class StatesAsInputs(nn.Module):
    """Initial states given as model inputs: a multi-input model."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, h0, c0):
        state = (h0, c0)
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


def test_multi_input_model_attributes_initial_states():
    torch.manual_seed(4)
    model = StatesAsInputs().double().eval()
    background = [torch.randn(5, 6, 3), torch.randn(5, 4), torch.randn(5, 4)]
    X = [torch.randn(2, 6, 3), torch.randn(2, 4), torch.randn(2, 4)]
    background = [b.double() for b in background]
    X = [x.double() for x in X]
    values = explain(model, background, X)
    assert [v.shape for v in values] == [(2, 6, 3, 2), (2, 4, 2), (2, 4, 2)]
    assert additivity_error(model, background, X, values) <= 1e-10
    assert np.abs(values[2]).max() > 0  # c0 gets its own attribution


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.cell = nn.LSTMCell(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        e = self.embed(x)
        state = None
        for t in range(e.shape[1]):
            state = self.cell(e[:, t], state)
        return self.head(state[0])


def test_interim_layer_mode():
    torch.manual_seed(5)
    model = Embedded().double().eval()
    background = torch.randn(6, 4, 3, dtype=torch.float64)
    X = torch.randn(2, 4, 3, dtype=torch.float64)
    torch_handler.register()
    try:
        explainer = shap.DeepExplainer((model, model.head), background)
        values = explainer.shap_values(X)
    finally:
        torch_handler.unregister()
    assert values.shape == (2, 4, 2)  # attributions of the head's input (the last h)
    assert additivity_error(model, background, X, values) <= 1e-10


def test_without_the_handler_shap_is_far_off():
    # The contrast the project exists for: shap 0.51 alone falls back to plain gradients.
    torch.manual_seed(1)
    model = UnrolledCell().double().eval()
    background = torch.randn(8, 5, 4, dtype=torch.float64)
    X = torch.randn(3, 5, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = shap.DeepExplainer(model, background).shap_values(X, check_additivity=False)
    assert additivity_error(model, background, X, values) > 1e-3
