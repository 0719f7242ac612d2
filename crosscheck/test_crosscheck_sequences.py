"""Torch handler vs JAX oracle on whole nn.LSTM / nn.GRU / nn.RNN stacks, element-wise.

Random configurations (seeded): layers 1–3, bidirectional or not, proj_size (LSTM), bias or
not, T 1–12, batch 1–4, float64. The torch side is the real module inside deeplift_mode on
the doubled batch; the oracle is ``reference_jax``'s ``lax.scan`` stack. Multipliers of the
input sequence and of every initial state are compared, for output multipliers on the whole
output sequence, h_n and (LSTM) c_n at once.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from pairing import TOLERANCE, handler_multipliers, relative_error, stack_params
from torch import nn

import reference_jax as oracle

N_CONFIGS = {"lstm": 14, "gru": 7, "rnn": 7}


def _config(kind: str, index: int):
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{index}".encode()))
    config = dict(
        num_layers=int(rng.integers(1, 4)),
        bidirectional=bool(rng.integers(2)),
        bias=bool(rng.random() < 0.75),
        steps=int(rng.integers(1, 13)),
        batch=int(rng.integers(1, 5)),
        features=int(rng.integers(1, 6)),
        hidden=int(rng.integers(1, 7)),
    )
    if kind == "lstm":
        config["proj_size"] = int(rng.integers(0, config["hidden"])) if rng.random() < 0.5 else 0
    if kind == "rnn":
        config["nonlinearity"] = "relu" if rng.random() < 0.5 else "tanh"
    return config, rng


def _module(kind, config):
    kwargs = dict(
        num_layers=config["num_layers"],
        bidirectional=config["bidirectional"],
        bias=config["bias"],
        batch_first=True,
    )
    if kind == "lstm":
        return nn.LSTM(config["features"], config["hidden"], proj_size=config["proj_size"], **kwargs)
    if kind == "gru":
        return nn.GRU(config["features"], config["hidden"], **kwargs)
    return nn.RNN(config["features"], config["hidden"], nonlinearity=config["nonlinearity"], **kwargs)


CASES = [(kind, index) for kind, n in N_CONFIGS.items() for index in range(n)]


@pytest.mark.parametrize("kind,index", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_stacks_agree_with_the_oracle_elementwise(kind, index):
    config, rng = _config(kind, index)
    torch.manual_seed(index)
    module = _module(kind, config).double()
    B, T, I = config["batch"], config["steps"], config["features"]
    H = config["hidden"]
    P = config.get("proj_size", 0) or H
    LD = config["num_layers"] * (2 if config["bidirectional"] else 1)
    D = 2 if config["bidirectional"] else 1
    normal = lambda *shape: torch.as_tensor(rng.standard_normal(shape))  # noqa: E731
    is_lstm = kind == "lstm"

    actual = [normal(B, T, I), normal(LD, B, P)] + ([normal(LD, B, H)] if is_lstm else [])
    reference = [normal(B, T, I), normal(LD, B, P)] + ([normal(LD, B, H)] if is_lstm else [])
    m_out = [normal(B, T, D * P), normal(LD, B, P)] + ([normal(LD, B, H)] if is_lstm else [])
    if is_lstm:
        call = lambda m, x, h0, c0: (lambda o: (o[0], *o[1]))(m(x, (h0, c0)))  # noqa: E731
    else:
        call = lambda m, x, h0: m(x, h0)  # noqa: E731
    dims = [0, 1, 1][: len(actual)]  # batch axis: x is batch first, states are (L*D, B, ·)
    halves = handler_multipliers(module, call, actual, reference, dims, m_out, dims)

    # Oracle: batch first everywhere.
    to_oracle = lambda t, dim: t.movedim(dim, 0).numpy()  # noqa: E731
    a = [to_oracle(t, d) for t, d in zip(actual, dims, strict=False)]
    r = [to_oracle(t, d) for t, d in zip(reference, dims, strict=False)]
    m = [to_oracle(t, d) for t, d in zip(m_out, dims, strict=False)]
    params = stack_params(module)
    if kind == "lstm":
        m_x, (m_h0, m_c0) = oracle.batched_lstm_sequence_multipliers(
            params, a[0], (a[1], a[2]), r[0], (r[1], r[2]), (m[0], m[1], m[2])
        )
        expected = [m_x, m_h0, m_c0]
    elif kind == "gru":
        m_x, (m_h0,) = oracle.batched_gru_sequence_multipliers(params, a[0], (a[1],), r[0], (r[1],), (m[0], m[1]))
        expected = [m_x, m_h0]
    else:
        m_x, (m_h0,) = oracle.batched_rnn_sequence_multipliers(
            params, a[0], (a[1],), r[0], (r[1],), (m[0], m[1]), nonlinearity=config["nonlinearity"]
        )
        expected = [m_x, m_h0]

    for k, ((ours_a, ours_r), want) in enumerate(zip(halves, expected, strict=True)):
        want = np.asarray(want)
        for ours in (ours_a, ours_r):
            error = relative_error(ours.movedim(dims[k], 0), want)
            assert error <= TOLERANCE[torch.float64], f"{config}: input {k}: {error:.3g}"
