"""A pure-functional JAX oracle for exact DeepLIFT / DeepSHAP multipliers of the
PyTorch recurrent cells (``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell``) and stacks
(``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``), in torch's parameter layout.

Independent of torch by design (nothing here imports it). Importing this package turns
on float64 in JAX (``jax_enable_x64``): the oracle's bar is exactness to float64 rounding.

Modules, one per concept:

* :mod:`reference_jax.rescale`  — Rescale factor and Shapley product rule (elementwise).
* :mod:`reference_jax.lstm`     — ``LSTMParams``, ``lstm_cell``, ``cell_multipliers``,
  ``cell_contributions`` (per-hidden-unit tables).
* :mod:`reference_jax.gru`      — the same for ``nn.GRUCell``.
* :mod:`reference_jax.rnn`      — the same for ``nn.RNNCell`` (tanh / relu).
* :mod:`reference_jax.sequence` — whole stacks (layers, directions, projection) by scan.
* :mod:`reference_jax.shapley`  — brute-force Shapley values (≤ 16 players).

Numerical notes (details in :func:`reference_jax.rescale.rescale_threshold`):

* Rescale uses the quotient where ``|Δz| > τ = (24 eps)^(1/3)``, else its expansion about
  the midpoint, ``φ'(m) + φ'''(m) Δz²/24`` (the curvature term keeps sums exact to float64
  rounding just under ``τ``); relu, piecewise linear, uses the quotient for every
  ``Δz ≠ 0`` (threshold 0).
* Tables are built per hidden unit (``vmap`` over ``k``) from the forward values of the
  cell function itself, so their rows sum to the very Δ that function reports.
* The exported ``batched_*`` functions are ``jit``-compiled without LLVM optimisation
  (``_checks.COMPILER_OPTIONS``): these graphs are tiny and compile time dominates.
"""

import jax

jax.config.update("jax_enable_x64", True)

from reference_jax.gru import (  # noqa: E402
    GRUContributions,
    GRUParams,
    batched_gru_cell,
    batched_gru_cell_contributions,
    batched_gru_cell_multiplier_tables,
    batched_gru_cell_multipliers,
    gru_cell,
    gru_cell_contributions,
    gru_cell_multiplier_tables,
    gru_cell_multipliers,
)
from reference_jax.lstm import (  # noqa: E402
    LSTMContributions,
    LSTMParams,
    batched_cell_contributions,
    batched_cell_multiplier_tables,
    batched_cell_multipliers,
    batched_lstm_cell,
    cell_contributions,
    cell_multiplier_tables,
    cell_multipliers,
    lstm_cell,
)
from reference_jax.rescale import (  # noqa: E402
    NONLINEARITIES,
    activation,
    average,
    product_multipliers,
    rescale,
    rescale_threshold,
)
from reference_jax.rnn import (  # noqa: E402
    RNNContributions,
    RNNParams,
    batched_rnn_cell,
    batched_rnn_cell_contributions,
    batched_rnn_cell_multiplier_tables,
    batched_rnn_cell_multipliers,
    rnn_cell,
    rnn_cell_contributions,
    rnn_cell_multiplier_tables,
    rnn_cell_multipliers,
)
from reference_jax.sequence import (  # noqa: E402
    batched_gru_sequence,
    batched_gru_sequence_multipliers,
    batched_lstm_sequence,
    batched_lstm_sequence_multipliers,
    batched_rnn_sequence,
    batched_rnn_sequence_multipliers,
    gru_sequence,
    gru_sequence_multipliers,
    lstm_sequence,
    lstm_sequence_multipliers,
    rnn_sequence,
    rnn_sequence_multipliers,
)
from reference_jax.shapley import MAX_PLAYERS, exact_shapley  # noqa: E402

# LSTM names with an explicit prefix, for symmetry with the GRU / RNN ones.
lstm_cell_multipliers = cell_multipliers
lstm_cell_contributions = cell_contributions
lstm_cell_multiplier_tables = cell_multiplier_tables
batched_lstm_cell_multipliers = batched_cell_multipliers
batched_lstm_cell_contributions = batched_cell_contributions
batched_lstm_cell_multiplier_tables = batched_cell_multiplier_tables

__all__ = [
    "MAX_PLAYERS",
    "NONLINEARITIES",
    "GRUContributions",
    "GRUParams",
    "LSTMContributions",
    "LSTMParams",
    "RNNContributions",
    "RNNParams",
    "activation",
    "average",
    "batched_cell_contributions",
    "batched_cell_multiplier_tables",
    "batched_cell_multipliers",
    "batched_gru_cell",
    "batched_gru_cell_contributions",
    "batched_gru_cell_multiplier_tables",
    "batched_gru_cell_multipliers",
    "batched_gru_sequence",
    "batched_gru_sequence_multipliers",
    "batched_lstm_cell",
    "batched_lstm_cell_contributions",
    "batched_lstm_cell_multiplier_tables",
    "batched_lstm_cell_multipliers",
    "batched_lstm_sequence",
    "batched_lstm_sequence_multipliers",
    "batched_rnn_cell",
    "batched_rnn_cell_contributions",
    "batched_rnn_cell_multiplier_tables",
    "batched_rnn_cell_multipliers",
    "batched_rnn_sequence",
    "batched_rnn_sequence_multipliers",
    "cell_contributions",
    "cell_multiplier_tables",
    "cell_multipliers",
    "exact_shapley",
    "gru_cell",
    "gru_cell_contributions",
    "gru_cell_multiplier_tables",
    "gru_cell_multipliers",
    "gru_sequence",
    "gru_sequence_multipliers",
    "lstm_cell",
    "lstm_cell_contributions",
    "lstm_cell_multiplier_tables",
    "lstm_cell_multipliers",
    "lstm_sequence",
    "lstm_sequence_multipliers",
    "product_multipliers",
    "rescale",
    "rescale_threshold",
    "rnn_cell",
    "rnn_cell_contributions",
    "rnn_cell_multiplier_tables",
    "rnn_cell_multipliers",
    "rnn_sequence",
    "rnn_sequence_multipliers",
]
