"""One ``nn.RNNCell`` (Elman) step and its exact DeepLIFT / DeepSHAP multipliers.

Forward: ``h' = φ(W_ih x + b_ih + W_hh h + b_hh)`` with ``φ = tanh`` or ``relu`` (the
static argument ``nonlinearity``, as torch's ``nonlinearity=``). Backward:
``m_a = m_h' · Rescale_φ(a)``, ``m_x = W_ih^T m_a``, ``m_h = W_hh^T m_a``.

``I`` inputs, ``H`` hidden units; one example (1-D arrays) per call. States and output
multipliers are tuples, ``(h,)`` and ``(m_h1,)``, as for every cell in this package.
``batched_*`` are ``jit(vmap(...))`` over a leading batch axis of the data arguments.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax

from reference_jax import _checks
from reference_jax._checks import batched
from reference_jax.rescale import activation, rescale

__all__ = [
    "RNNContributions",
    "RNNParams",
    "batched_rnn_cell",
    "batched_rnn_cell_contributions",
    "batched_rnn_cell_multiplier_tables",
    "batched_rnn_cell_multipliers",
    "rnn_cell",
    "rnn_cell_contributions",
    "rnn_cell_multiplier_tables",
    "rnn_cell_multipliers",
]

RNNNonlinearity = Literal["tanh", "relu"]


class RNNParams(NamedTuple):
    """Parameters of one Elman cell / one layer-direction of ``nn.RNN`` (torch layout).

    Attributes:
      w_ih: ``(H, I)``.  w_hh: ``(H, H)``.
      b_ih, b_hh: ``(H,)`` (zeros for a bias-free layer).
    All arrays share one floating dtype.
    """

    w_ih: jax.Array
    w_hh: jax.Array
    b_ih: jax.Array
    b_hh: jax.Array


class RNNContributions(NamedTuple):
    """Per-hidden-unit tables ``[k, j]``: input element ``j`` → output ``h1[k]``.

    Attributes:
      h1_x: ``(H, I)``.  h1_h: ``(H, H)``.
    """

    h1_x: jax.Array
    h1_h: jax.Array


def _check_nonlinearity(nonlinearity: str) -> None:
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


def _check_params(params: RNNParams, name: str = "params") -> tuple[RNNParams, int, int]:
    if not isinstance(params, RNNParams):
        raise TypeError(f"{name} must be an RNNParams, got {type(params).__name__}")
    w_ih = _checks.array(f"{name}.w_ih", params.w_ih)
    dtype = w_ih.dtype
    _checks.rank(f"{name}.w_ih", w_ih, 2, ("H", "I"))
    h_dim, i_dim = w_ih.shape
    w_hh = _checks.array(f"{name}.w_hh", params.w_hh, dtype)
    _checks.shape(f"{name}.w_hh", w_hh, ("H", "H"), (h_dim, h_dim), f"{name}.w_ih")
    b_ih = _checks.array(f"{name}.b_ih", params.b_ih, dtype)
    _checks.shape(f"{name}.b_ih", b_ih, ("H",), (h_dim,), f"{name}.w_ih")
    b_hh = _checks.array(f"{name}.b_hh", params.b_hh, dtype)
    _checks.shape(f"{name}.b_hh", b_hh, ("H",), (h_dim,), f"{name}.w_ih")
    return RNNParams(w_ih, w_hh, b_ih, b_hh), i_dim, h_dim


def _check_data(params: RNNParams, x, state, x_ref, state_ref, nonlinearity):
    """Validate one example; returns ``(params, x, h, x_ref, h_ref)`` as arrays."""
    _check_nonlinearity(nonlinearity)
    params, i_dim, h_dim = _check_params(params)
    dtype = params.w_ih.dtype
    (h,) = _checks.state("state", state, ("h",))
    (h_ref,) = _checks.state("state_ref", state_ref, ("h_ref",))
    out = [params]
    for name, value, n, sym, src in (
        ("x", x, i_dim, "I", "params.w_ih"),
        ("h", h, h_dim, "H", "params.w_hh"),
        ("x_ref", x_ref, i_dim, "I", "params.w_ih"),
        ("h_ref", h_ref, h_dim, "H", "params.w_hh"),
    ):
        value = _checks.array(name, value, dtype)
        _checks.shape(name, value, (sym,), (n,), src)
        out.append(value)
    return tuple(out)


def _preactivation(params: RNNParams, x, h):
    return params.w_ih @ x + params.b_ih + params.w_hh @ h + params.b_hh


def _cell(params: RNNParams, x, state, nonlinearity: str = "tanh"):
    """Unchecked step on the state tuple ``(h,)`` -> ``(h1,)``."""
    return (activation(nonlinearity, _preactivation(params, x, state[0])),)


def rnn_cell(
    params: RNNParams, x: jax.Array, state: tuple[jax.Array],
    nonlinearity: RNNNonlinearity = "tanh",
) -> tuple[jax.Array]:
    """One ``nn.RNNCell`` step for one example.

    Args:
      params: :class:`RNNParams`.  x: ``(I,)``.  state: ``(h,)``, ``h`` ``(H,)``.
      nonlinearity: ``"tanh"`` or ``"relu"`` (static).

    Returns:
      ``(h1,)``, ``h1`` ``(H,)``.
    """
    params, x, h, _, _ = _check_data(params, x, state, x, state, nonlinearity)
    return _cell(params, x, (h,), nonlinearity)


def _cell_multipliers(params: RNNParams, x, state, x_ref, state_ref, m_out, nonlinearity="tanh"):
    """Unchecked rule on state tuples: ``(m_x, (m_h,))`` for ``m_out = (m_h1,)``."""
    (h,), (h_ref,), (m_h1,) = state, state_ref, m_out
    a, a_r = _preactivation(params, x, h), _preactivation(params, x_ref, h_ref)
    m_a = m_h1 * rescale(nonlinearity, a, a_r, activation(nonlinearity, a),
                         activation(nonlinearity, a_r))
    return params.w_ih.T @ m_a, (params.w_hh.T @ m_a,)


def rnn_cell_multipliers(
    params: RNNParams, x: jax.Array, state: tuple[jax.Array], x_ref: jax.Array,
    state_ref: tuple[jax.Array], m_out: tuple[jax.Array], nonlinearity: RNNNonlinearity = "tanh",
):
    """DeepLIFT multipliers of the inputs of one Elman step (vector–Jacobian form).

    Args:
      params: :class:`RNNParams`.  x, x_ref: ``(I,)``.
      state, state_ref: ``(h,)``, ``(h_ref,)``, ``(H,)`` each.
      m_out: ``(m_h1,)``, ``(H,)``: the multiplier of the output state.
      nonlinearity: ``"tanh"`` or ``"relu"`` (static).

    Returns:
      ``(m_x (I,), (m_h (H,),))``.
    """
    params, x, h, x_r, h_r = _check_data(params, x, state, x_ref, state_ref, nonlinearity)
    (m_h1,) = _checks.state("m_out", m_out, ("m_h1",))
    m_h1 = _checks.array("m_h1", m_h1, params.w_ih.dtype)
    _checks.shape("m_h1", m_h1, ("H",), (h.shape[0],), "the h1 output (params.w_hh)")
    return _cell_multipliers(params, x, (h,), x_r, (h_r,), (m_h1,), nonlinearity)


def _unit_rows(a_k, a_r_k, w_ih_k, w_hh_k, nonlinearity):
    """Multiplier rows ``(M_x (I,), M_h (H,))`` of ONE hidden unit ``k``, from its
    pre-activations ``a_k``, ``a_r_k`` (scalars) and its weight rows."""
    factor = rescale(nonlinearity, a_k, a_r_k)
    return factor * w_ih_k, factor * w_hh_k


def _multiplier_tables(params, x, h, x_ref, h_ref, nonlinearity) -> RNNContributions:
    unit_rows = functools.partial(_unit_rows, nonlinearity=nonlinearity)
    m_x, m_h = jax.vmap(unit_rows)(
        _preactivation(params, x, h), _preactivation(params, x_ref, h_ref),
        params.w_ih, params.w_hh,
    )
    return RNNContributions(m_x, m_h)


def rnn_cell_multiplier_tables(
    params: RNNParams, x, state, x_ref, state_ref, nonlinearity: RNNNonlinearity = "tanh"
) -> RNNContributions:
    """Per-hidden-unit multiplier tables ``M[k, j]`` (``vmap`` over units ``k``);
    ``contribution = M * Δinput[None, :]``. Args as :func:`rnn_cell_contributions`."""
    params, x, h, x_r, h_r = _check_data(params, x, state, x_ref, state_ref, nonlinearity)
    return _multiplier_tables(params, x, h, x_r, h_r, nonlinearity)


def rnn_cell_contributions(
    params: RNNParams, x: jax.Array, state: tuple[jax.Array], x_ref: jax.Array,
    state_ref: tuple[jax.Array], nonlinearity: RNNNonlinearity = "tanh",
) -> RNNContributions:
    """Contribution of every input element (x_j, h_j) to every output ``h1[k]``.

    Args:
      params: :class:`RNNParams`.  x, x_ref: ``(I,)``.
      state, state_ref: ``(h,)``, ``(h_ref,)``, ``(H,)`` each.
      nonlinearity: ``"tanh"`` or ``"relu"`` (static).

    Returns:
      :class:`RNNContributions` ``(h1_x (H, I), h1_h (H, H))``; rows sum to ``Δh1[k]``.
    """
    params, x, h, x_r, h_r = _check_data(params, x, state, x_ref, state_ref, nonlinearity)
    m = _multiplier_tables(params, x, h, x_r, h_r, nonlinearity)
    return RNNContributions(m.h1_x * (x - x_r), m.h1_h * (h - h_r))


batched_rnn_cell = batched(
    rnn_cell, ("x", "state"), static_argnames=("nonlinearity",),
    doc="``jit(vmap(rnn_cell))``: x ``(B, I)``, state ``((B, H),)`` -> ``((B, H),)``; "
    "``nonlinearity=`` keyword (static).",
)
batched_rnn_cell_multipliers = batched(
    rnn_cell_multipliers, ("x", "state", "x_ref", "state_ref", "m_out"),
    static_argnames=("nonlinearity",),
    doc="``jit(vmap(rnn_cell_multipliers))``: data ``(B, ...)`` (states and m_out as "
    "1-tuples) -> ``(m_x (B, I), (m_h (B, H),))``; ``nonlinearity=`` keyword (static).",
)
batched_rnn_cell_multiplier_tables = batched(
    rnn_cell_multiplier_tables, ("x", "state", "x_ref", "state_ref"),
    static_argnames=("nonlinearity",),
    doc="``jit(vmap(rnn_cell_multiplier_tables))``; ``nonlinearity=`` keyword (static).",
)
batched_rnn_cell_contributions = batched(
    rnn_cell_contributions, ("x", "state", "x_ref", "state_ref"),
    static_argnames=("nonlinearity",),
    doc="``jit(vmap(rnn_cell_contributions))``; ``nonlinearity=`` keyword (static).",
)
