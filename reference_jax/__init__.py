"""A pure-functional JAX oracle for exact DeepLIFT / DeepSHAP multipliers of the PyTorch
recurrent cells (``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell``), stacks (``nn.LSTM`` /
``nn.GRU`` / ``nn.RNN``) in torch's parameter layout, and the tensor ops around them.

Independent of torch by design (nothing here imports it). Needs the ``jax`` extra
(``pip install 'lstm-deepshap[jax]'``). Importing this package turns on float64 in JAX
(``jax_enable_x64``): the oracle's bar is exactness to float64 rounding.

Modules, one per concept:

* :mod:`reference_jax.rescale`  — Rescale factor and Shapley product rule (elementwise).
* :mod:`reference_jax.lstm`, :mod:`reference_jax.gru`, :mod:`reference_jax.rnn` — one
  cell each: ``*Params``, ``<kind>_cell``, ``<kind>_cell_multipliers``,
  ``<kind>_cell_contributions`` and ``<kind>_cell_multiplier_tables`` (per-hidden-unit
  tables), and their ``batched_*`` forms. One signature for all three::

      <kind>_cell(params, x, state) -> new_state
      <kind>_cell_multipliers(params, x, state, x_ref, state_ref, m_out) -> (m_x, m_state)

  where ``state``, ``new_state``, ``m_out`` and ``m_state`` are tuples: ``(h, c)`` for
  LSTM, ``(h,)`` for GRU and RNN (RNN adds the static ``nonlinearity=``).
* :mod:`reference_jax.sequence` — whole stacks (layers, directions, projection) by scan,
  with the same tuple convention (``state0 = (h0, c0)`` or ``(h0,)``).
* :mod:`reference_jax.ops`      — the op rules (activations, products, matmul / einsum,
  softmax, norms, attention, ...): ``OP_RULES``, ``batched_op_multipliers``; a folder with
  one module per family and the table (``ops/table.py``) that declares each op once.
* :mod:`reference_jax.shapley`  — brute-force Shapley values (≤ 16 players).
* :mod:`reference_jax.transform` — ``deeplift(fn)`` / ``deep_shap``: DeepLIFT of any JAX
  function of one pytree, as a function transformation (docs/jax-deeplift.md).

Numerical notes (details in :func:`reference_jax.rescale.rescale`):

* Rescale of sigmoid and tanh uses one cancellation-free closed form each,
  ``σ(hi) σ(−lo) (1 − e^{−d})/d`` (:func:`reference_jax.rescale.sigmoid_quotient`; tanh by
  ``tanh z = 2σ(2z) − 1``), accurate to a few ulps for every ``Δz`` with no threshold; relu,
  piecewise linear, uses the quotient of its values for every ``Δz ≠ 0``.
* Tables are built per hidden unit (``vmap`` over ``k``) from the forward values of the
  cell function itself, so their rows sum to the very Δ that function reports.
* The exported ``batched_*`` functions are ``jit``-compiled without LLVM optimisation
  (``_checks.COMPILER_OPTIONS``): these graphs are tiny and compile time dominates.
"""

try:  # jax first, so that the error names it when both are missing
    import jax  # noqa: I001
    import chex  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"reference_jax (the JAX oracle) needs JAX and chex: {error}. Install the extra: "
        f"pip install 'lstm-deepshap[jax]'"
    ) from error

jax.config.update("jax_enable_x64", True)

from reference_jax import ops  # noqa: E402
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
    batched_lstm_cell,
    batched_lstm_cell_contributions,
    batched_lstm_cell_multiplier_tables,
    batched_lstm_cell_multipliers,
    lstm_cell,
    lstm_cell_contributions,
    lstm_cell_multiplier_tables,
    lstm_cell_multipliers,
)
from reference_jax.ops import OP_FORWARDS, OP_RULES, batched_op_multipliers  # noqa: E402
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
from reference_jax.transform import deep_shap, deeplift  # noqa: E402

__all__ = [
    "MAX_PLAYERS",
    "NONLINEARITIES",
    "OP_FORWARDS",
    "OP_RULES",
    "GRUContributions",
    "GRUParams",
    "LSTMContributions",
    "LSTMParams",
    "RNNContributions",
    "RNNParams",
    "activation",
    "average",
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
    "batched_op_multipliers",
    "batched_rnn_cell",
    "batched_rnn_cell_contributions",
    "batched_rnn_cell_multiplier_tables",
    "batched_rnn_cell_multipliers",
    "batched_rnn_sequence",
    "batched_rnn_sequence_multipliers",
    "deep_shap",
    "deeplift",
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
    "ops",
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
