"""shap's per-sample loop answered a chunk of samples at a time (torch_handler/engines/shap_batches.py):
the same values as shap's own per-sample gradients, in one pass per output and chunk."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import shap
import torch
from helpers import TOLERANCE, additivity_error, as_list, explain
from shap.explainers._deep.deep_pytorch import PyTorchDeep
from torch import nn

import torch_handler
from torch_handler.engines import shap_batches

N, S, T, F = 6, 5, 7, 3


class TwoInputs(nn.Module):
    """An LSTM over a sequence and a context vector through Linear + Tanh, three outputs."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(F, 8, batch_first=True)
        self.context = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x, c):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] + self.context(c))


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(F, 6, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out.mean(1))


def case(name: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = (TwoInputs() if name == "two_inputs" else GRUClassifier()).to(dtype).eval()
    X = [torch.randn(N, T, F, dtype=dtype)]
    background = [torch.randn(S, T, F, dtype=dtype)]
    if name == "two_inputs":
        X.append(torch.randn(N, 2, dtype=dtype))
        background.append(torch.randn(S, 2, dtype=dtype))
        return model, background, X
    return model, background[0], X[0]


@contextlib.contextmanager
def per_sample():
    """shap's own per-sample gradients inside register() (no plan is made)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(shap_batches.ENV, "0")
        yield


def passes(model):
    """Rows of every forward pass of ``model`` while the context is open."""
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, handle


def scale(values) -> float:
    return max(float(np.abs(v).max()) for v in as_list(values))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["two_inputs", "gru"])
def test_batched_equals_per_sample(name, dtype):
    model, background, X = case(name, dtype)
    batched = explain(model, background, X)
    with per_sample():
        alone = explain(model, background, X)
    for b, a in zip(as_list(batched), as_list(alone), strict=True):
        assert b.shape == a.shape and b.dtype == a.dtype
        assert np.abs(b - a).max() / scale(alone) <= TOLERANCE[dtype]
    assert additivity_error(model, background, X, batched) <= TOLERANCE[dtype]


def test_one_pass_per_output():
    model, background, X = case("two_inputs", torch.float64)
    rows, handle = passes(model)
    try:
        explain(model, background, X)
    finally:
        handle.remove()
    # the constructor's forward (S rows), a probe (2·4 rows), one pass of every sample's pairs
    # per output (three), the additivity check's forward (N rows)
    assert rows == [S, 8, 2 * N * S, 2 * N * S, 2 * N * S, N]


def test_chunks_of_samples(monkeypatch):
    model, background, X = case("gru", torch.float64)
    expected = explain(model, background, X)
    monkeypatch.setattr(shap_batches, "choose_pairs", lambda per_pair, device: 4 * S)  # 4 samples a pass
    rows, handle = passes(model)
    try:
        chunked = explain(model, background, X)
    finally:
        handle.remove()
    assert rows[2:-1] == [2 * 4 * S, 2 * 2 * S] * 2  # two outputs, samples 0-3 then 4-5
    assert np.abs(chunked - expected).max() / scale(expected) <= TOLERANCE[torch.float64]


def test_ranked_outputs_keep_shaps_loop():
    model, background, X = case("two_inputs", torch.float64)
    rows, handle = passes(model)
    try:
        values, ranks = explain(model, background, X, ranked_outputs=2)
    finally:
        handle.remove()
    assert rows.count(2 * S) == 2 * N  # one pass per sample and ranked output, as shap does
    assert additivity_error(model, background, X, values, ranks) <= TOLERANCE[torch.float64]


def test_switched_off_by_the_environment(monkeypatch):
    model, background, X = case("gru", torch.float64)
    expected = explain(model, background, X)
    monkeypatch.setenv(shap_batches.ENV, "0")
    rows, handle = passes(model)
    try:
        values = explain(model, background, X)
    finally:
        handle.remove()
    assert rows[1:-1] == [2 * S] * (2 * N)  # shap's own passes: one per sample and output
    assert np.abs(values - expected).max() / scale(expected) <= TOLERANCE[torch.float64]


def test_a_call_out_of_plan_goes_to_shap(monkeypatch):
    """From the first call that is not the one planned, shap's own gradient answers."""
    model, background, X = case("gru", torch.float64)
    with per_sample():
        expected = explain(model, background, X)
    expects = shap_batches._Plan.expects

    def third_is_unexpected(self, idx, inputs):
        return None if self.calls == 2 else expects(self, idx, inputs)

    monkeypatch.setattr(shap_batches._Plan, "expects", third_is_unexpected)
    rows, handle = passes(model)
    try:
        values = explain(model, background, X)
    finally:
        handle.remove()
    # the first chunk's pass (all six samples of output 0), then shap's per-sample passes from
    # the third call on: four for output 0, six for output 1
    assert rows[2] == 2 * N * S and rows[3:-1] == [2 * S] * 10
    assert np.abs(values - expected).max() / scale(expected) <= TOLERANCE[torch.float64]


def test_other_explainers_and_threads_keep_shaps_gradient():
    """A plan answers only its own explainer on its own thread; unregister() puts shap's back."""
    original = PyTorchDeep.__dict__["gradient"]
    model, background, X = case("gru", torch.float64)
    torch_handler.register()
    try:
        first, other = shap.DeepExplainer(model, background), shap.DeepExplainer(model, background)
        inputs = [torch.cat([X[:1].repeat(S, 1, 1), background])]
        with shap_batches.batched(first.explainer, X, None):
            plan = shap_batches._local.plans[id(first.explainer)]
            other.explainer.gradient(0, inputs)  # shap's own: the plan does not move
            assert plan.calls == 0 and plan.chunk is None
            first.explainer.gradient(0, inputs)
            assert plan.calls == 1 and plan.chunk[:3] == (0, 0, N)
        assert not shap_batches._local.plans
    finally:
        torch_handler.unregister()
    assert PyTorchDeep.__dict__["gradient"] is original


class LargestBatchState(nn.Module):
    """An initial state kept for a largest batch of 4·S rows and sliced to the batch: shap's
    2·S rows fit, a chunk of every sample's pairs does not."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(F, 8, batch_first=True)
        self.head = nn.Linear(8, 2)
        self.register_buffer("h0", torch.zeros(1, 4 * S, 8))
        self.register_buffer("c0", torch.zeros(1, 4 * S, 8))

    def forward(self, x):
        B = x.shape[0]
        out, _ = self.rnn(x, (self.h0[:, :B], self.c0[:, :B]))
        return self.head(out[:, -1])


def test_a_chunk_the_model_refuses_goes_to_shap():
    """What works one sample at a time still works: the failed chunk hands over to shap."""
    torch.manual_seed(4)
    model = LargestBatchState().double().eval()
    background, X = torch.randn(S, T, F, dtype=torch.float64), torch.randn(N, T, F, dtype=torch.float64)
    with per_sample():
        expected = explain(model, background, X)
    rows, handle = passes(model)
    try:
        values = explain(model, background, X)
    finally:
        handle.remove()
    # the constructor's forward, the probe (8 rows), the chunk that raised (2·N·S rows), then
    # shap's own passes: every sample of both outputs, and the additivity check's forward
    assert rows == [S, 8, 2 * N * S] + [2 * S] * (2 * N) + [N]
    assert np.abs(values - expected).max() / scale(expected) <= TOLERANCE[torch.float64]
    assert additivity_error(model, background, X, values) <= TOLERANCE[torch.float64]
    assert not shap_batches._local.plans


class GridOutput(nn.Module):
    """Outputs (B, 3, 2): shap's gradient selects outputs[:, i], which is not one per row."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(F, 8, batch_first=True)
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).view(x.shape[0], 3, 2)


@pytest.mark.parametrize("check", [False, True])
def test_outputs_shap_refuses_get_shaps_error(check):
    """A sum over the extra output axis would answer where shap's own gradient raises."""
    torch.manual_seed(5)
    model = GridOutput().eval()
    background, X = torch.randn(S, T, F), torch.randn(N, T, F)
    with per_sample(), pytest.raises(RuntimeError) as own:
        explain(model, background, X, check_additivity=check)
    with pytest.raises(RuntimeError) as batched:
        explain(model, background, X, check_additivity=check)
    assert str(batched.value) == str(own.value)
    assert "scalar outputs" in str(batched.value)
