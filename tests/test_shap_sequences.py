"""nn.LSTM, nn.GRU and nn.RNN in every configuration, through the real shap.DeepExplainer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import shap
import torch
from helpers import TOLERANCE, additivity_error, explain
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

FEATURES, HIDDEN, STEPS = 3, 5, 6
KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class SequenceModel(nn.Module):
    """A recurrent layer and a Linear head reading ``read`` (a '+'-separated list of)
    'last', 'slice', 'mean', 'h_n', 'c_n'. ``states`` = 'none' | 'zeros' | 'input' (initial
    states computed from a second model input)."""

    def __init__(self, kind="lstm", read="last", states="none", batch_first=True, **rnn_kwargs):
        super().__init__()
        self.kind, self.read, self.states, self.batch_first = kind, read.split("+"), states, batch_first
        self.rnn = KINDS[kind](FEATURES, HIDDEN, batch_first=batch_first, **rnn_kwargs)
        directions = 2 if self.rnn.bidirectional else 1
        out_size = rnn_kwargs.get("proj_size", 0) or HIDDEN
        self.layers_x_dirs = self.rnn.num_layers * directions
        widths = {
            "last": directions * out_size,
            "slice": directions * out_size,
            "mean": directions * out_size,
            "h_n": self.layers_x_dirs * out_size,
            "c_n": self.layers_x_dirs * HIDDEN,
        }
        self.head = nn.Linear(sum(widths[r] for r in self.read), 2)
        if states == "input":
            self.init_h = nn.Sequential(nn.Linear(2, self.layers_x_dirs * out_size), nn.Tanh())
            self.init_c = nn.Linear(2, self.layers_x_dirs * HIDDEN)
            self.out_size = out_size

    def forward(self, x, context=None):
        hx = None
        B = x.shape[0]
        if self.states == "zeros":
            out_size = self.rnn.proj_size or HIDDEN if self.kind == "lstm" else HIDDEN
            h0 = x.new_zeros(self.layers_x_dirs, B, out_size)
            hx = (h0, x.new_zeros(self.layers_x_dirs, B, HIDDEN)) if self.kind == "lstm" else h0
        elif self.states == "input":
            h0 = self.init_h(context).view(B, self.layers_x_dirs, -1).transpose(0, 1)
            c0 = self.init_c(context).view(B, self.layers_x_dirs, -1).transpose(0, 1)
            hx = (h0.contiguous(), c0.contiguous()) if self.kind == "lstm" else h0.contiguous()
        seq = x if self.batch_first else x.transpose(0, 1)
        output, state = self.rnn(seq, hx)
        if not self.batch_first:
            output = output.transpose(0, 1)
        h_n, c_n = state if self.kind == "lstm" else (state, None)
        pieces = {
            "last": lambda: output[:, -1],
            "slice": lambda: output[:, 1:3].sum(1),
            "mean": lambda: output.mean(1),
            "h_n": lambda: h_n.transpose(0, 1).reshape(B, -1),
            "c_n": lambda: c_n.transpose(0, 1).reshape(B, -1),
        }
        return self.head(torch.cat([pieces[r]() for r in self.read], dim=1))


LSTM_CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(num_layers=3, bidirectional=True),
    dict(num_layers=4, read="h_n"),
    dict(batch_first=False, read="mean"),
    dict(batch_first=False, bidirectional=True, read="slice+h_n"),
    dict(proj_size=3, read="last+c_n"),
    dict(proj_size=2, num_layers=2, bidirectional=True, read="h_n+c_n"),
    dict(bias=False, num_layers=2),
    dict(dropout=0.5, num_layers=2),
    dict(states="zeros", read="c_n"),
    dict(states="input", num_layers=2, bidirectional=True, read="last+h_n+c_n"),
    dict(states="input", proj_size=3, read="mean"),
]


def _data(model, dtype, n_background=5, n_explain=2, seed=0):
    torch.manual_seed(seed)
    background = torch.randn(n_background, STEPS, FEATURES, dtype=dtype)
    X = torch.randn(n_explain, STEPS, FEATURES, dtype=dtype)
    if model.states == "input":
        background = [background, torch.randn(n_background, 2, dtype=dtype)]
        X = [X, torch.randn(n_explain, 2, dtype=dtype)]
    return background, X


def _check(kind, config, dtype):
    torch.manual_seed(0)
    model = SequenceModel(kind, **config).to(dtype).eval()
    background, X = _data(model, dtype)
    values = explain(model, background, X)
    return additivity_error(model, background, X, values)


@pytest.mark.parametrize("config", LSTM_CONFIGS, ids=repr)
def test_lstm_configurations_float64(config):
    assert _check("lstm", config, torch.float64) <= 1e-10


@pytest.mark.parametrize("config", LSTM_CONFIGS[::3], ids=repr)
def test_lstm_configurations_float32(config):
    assert _check("lstm", config, torch.float32) <= TOLERANCE[torch.float32]


GRU_RNN_CONFIGS = [
    ("gru", dict()),
    ("gru", dict(num_layers=3, bidirectional=True, read="mean+h_n")),
    ("gru", dict(batch_first=False, bias=False, num_layers=2, read="h_n")),
    ("gru", dict(states="input", num_layers=2, dropout=0.3, read="slice")),
    ("rnn", dict()),
    ("rnn", dict(nonlinearity="relu", num_layers=2, bidirectional=True, read="last+h_n")),
    ("rnn", dict(batch_first=False, bias=False, read="mean")),
    ("rnn", dict(states="input", nonlinearity="relu", num_layers=3, read="h_n")),
]


@pytest.mark.parametrize("kind,config", GRU_RNN_CONFIGS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gru_and_rnn_configurations(kind, config, dtype):
    assert _check(kind, config, dtype) <= TOLERANCE[dtype]


class CellLoop(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell(FEATURES, HIDDEN)
        self.act = nn.Tanh()
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x):
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(self.act(h))


@pytest.mark.parametrize("cell", [nn.GRUCell, nn.RNNCell, lambda i, h: nn.RNNCell(i, h, nonlinearity="relu")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gru_and_rnn_cells_reused_in_a_loop(cell, dtype):
    torch.manual_seed(0)
    model = CellLoop(cell).to(dtype).eval()
    background = torch.randn(5, 20, FEATURES, dtype=dtype)
    X = torch.randn(2, 20, FEATURES, dtype=dtype)
    values = explain(model, background, X)
    assert additivity_error(model, background, X, values) <= TOLERANCE[dtype]


class TwiceCalled(nn.Module):
    """The same nn.LSTM applied to two halves of the features: two calls, two contexts."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(2 * HIDDEN, 2)

    def forward(self, x):
        first, _ = self.lstm(x)
        _, (h_n, _) = self.lstm(x.flip(1) * 0.5)
        return self.head(torch.cat((first[:, -1], h_n[0]), dim=1))


def test_the_same_lstm_called_twice_in_one_forward():
    torch.manual_seed(0)
    model = TwiceCalled().double().eval()
    background = torch.randn(5, STEPS, FEATURES, dtype=torch.float64)
    X = torch.randn(2, STEPS, FEATURES, dtype=torch.float64)
    values = explain(model, background, X)
    assert additivity_error(model, background, X, values) <= 1e-10


class Packed(nn.Module):
    """Variable-length sequences: lengths read from a padding marker (trailing all-zero steps)."""

    def __init__(self, kind="lstm", bidirectional=False):
        super().__init__()
        self.rnn = KINDS[kind](FEATURES, HIDDEN, batch_first=True, bidirectional=bidirectional, num_layers=2)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), 2)
        self.kind = kind

    def forward(self, x):
        lengths = (x.detach().abs().sum(-1) != 0).sum(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        h_n = state[0] if self.kind == "lstm" else state
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(padded.sum(1) / lengths.unsqueeze(1).to(x.dtype)) + h_n[-1].sum(1, keepdim=True)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences_are_exact(kind, bidirectional):
    torch.manual_seed(0)
    model = Packed(kind, bidirectional).double().eval()
    X = torch.randn(3, STEPS, FEATURES, dtype=torch.float64)
    X[0, 4:] = 0  # length 4
    X[2, 2:] = 0  # length 2
    # shap pairs each input with every background row: keep all lengths equal to the input's
    # by explaining one sample against backgrounds padded the same way.
    for j, length in enumerate([4, STEPS, 2]):
        background = torch.randn(4, STEPS, FEATURES, dtype=torch.float64)
        background[:, length:] = 0
        values = explain(model, background, X[j : j + 1])
        assert additivity_error(model, background, X[j : j + 1], values) <= 1e-10
        assert np.all(values[0, length:] == 0)  # padding gets nothing


def test_packed_sequences_with_mismatched_reference_lengths_raise():
    import torch_handler

    model = Packed().double().eval()
    X = torch.randn(1, STEPS, FEATURES, dtype=torch.float64)
    background = torch.randn(3, STEPS, FEATURES, dtype=torch.float64)
    background[:, 3:] = 0
    with pytest.raises(torch_handler.UnsupportedConfigurationError, match="same length"):
        explain(model, background, X)


def test_without_the_handler_shap_misses_by_tens_of_percent():
    torch.manual_seed(0)
    model = SequenceModel("lstm", num_layers=2).double().eval()
    background, X = _data(model, torch.float64, n_background=20, n_explain=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = shap.DeepExplainer(model, background).shap_values(X, check_additivity=False)
    with torch.no_grad():
        delta = (model(X) - model(background).mean(0)).numpy()
    relative_to_delta = np.abs(values.sum(axis=(1, 2)) - delta).max() / np.abs(delta).max()
    assert relative_to_delta > 0.05
