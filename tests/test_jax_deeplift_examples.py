"""The equinox and flax example scripts run, explain exactly, and (equinox) agree element-wise
with the oracle's hand-written LSTM sequence multipliers for the same weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import reference_jax as oracle
from torch_handler.additivity import tolerance_for

TOL = tolerance_for("float64")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # flax's dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_equinox_example_is_exact_and_matches_the_oracle(capsys):
    example = _load("jax_equinox_classifier")
    out = example.main(seed=1, steps=7, hidden=5)
    assert out["gap"] <= TOL and out["shap_gap"] <= TOL
    assert "DeepSHAP" in capsys.readouterr().out

    model, x, reference = out["model"], out["x"], out["reference"]
    hidden = model.cell.hidden_size
    params = [[oracle.LSTMParams(model.cell.weight_ih, model.cell.weight_hh, model.cell.bias,
                                 jnp.zeros_like(model.cell.bias))]]
    zeros = jnp.zeros((1, 1, hidden))
    for k in range(model.head.out_features):
        m_out = (jnp.zeros((1, x.shape[0], hidden)), model.head.weight[k].reshape(1, 1, hidden), zeros)
        m_x, _ = oracle.batched_lstm_sequence_multipliers(
            params, x[None], (zeros, zeros), reference[None], (zeros, zeros), m_out)
        ours = np.asarray(out["multipliers"][k])
        error = np.abs(ours - np.asarray(m_x[0])).max() / np.abs(np.asarray(m_x[0])).max()
        assert error <= TOL, (k, error)


def test_flax_example_is_exact(capsys):
    example = _load("jax_flax_classifier")
    out = example.main(seed=2, steps=6, hidden=4)
    assert out["gap"] <= TOL and out["shap_gap"] <= TOL
    assert out["multipliers"].shape == out["xs"].shape
    assert np.all(np.isfinite(out["multipliers"]))
    assert "predicted classes" in capsys.readouterr().out
