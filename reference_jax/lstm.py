"""One ``nn.LSTMCell`` step (torch layout) and its exact DeepLIFT / DeepSHAP multipliers.

Forward, gate order **i, f, g, o** (rows ``[0:H]``, ``[H:2H]``, ``[2H:3H]``, ``[3H:4H]``)::

    z  = W_ih x + b_ih + W_hh h + b_hh
    i = σ(z_i)   f = σ(z_f)   g = tanh(z_g)   o = σ(z_o)
    c' = f ⊙ c + i ⊙ g
    p  = o ⊙ tanh(c')
    h' = p            or, with a projection (torch ``proj_size``),  h' = W_hr p

Backward (given ``m_h'`` and ``m_c'``), each hidden unit with its own factors::

    m_p = m_h'  (or W_hr^T m_h')
    m_o = m_p · mean(tanh c')      m_t = m_p · mean(o)
    m_c'tot = m_c' + m_t · Rescale_tanh(c')
    m_f = m_c'tot · mean(c)   m_c = m_c'tot · mean(f)
    m_i = m_c'tot · mean(g)   m_g = m_c'tot · mean(i)
    m_z* = m_* · Rescale(z*)      m_x = W_ih^T m_z      m_h = W_hh^T m_z

``mean(u) = (u_a + u_r) / 2``. Shapes: ``I`` inputs, ``H`` hidden units, ``P`` the size of
``h`` (``P = H`` without projection). All functions take ONE example (1-D arrays), states
and output multipliers as tuples ``(h, c)`` and ``(m_h1, m_c1)`` (GRU and RNN cells take
1-tuples in the same places); the ``batched_*`` versions are ``jit(vmap(...))`` over a
leading batch axis of the data.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from reference_jax import _checks
from reference_jax._checks import batched
from reference_jax.rescale import product_multipliers, rescale

__all__ = [
    "LSTMContributions",
    "LSTMParams",
    "batched_lstm_cell",
    "batched_lstm_cell_contributions",
    "batched_lstm_cell_multiplier_tables",
    "batched_lstm_cell_multipliers",
    "lstm_cell",
    "lstm_cell_contributions",
    "lstm_cell_multiplier_tables",
    "lstm_cell_multipliers",
]


class LSTMParams(NamedTuple):
    """Parameters of one LSTM cell / one layer-direction of ``nn.LSTM`` (torch layout).

    Attributes:
      w_ih: ``(4H, I)`` input weights, gate rows in order i, f, g, o.
      w_hh: ``(4H, P)`` recurrent weights (``P = H``, or the projection size).
      b_ih: ``(4H,)`` input bias (zeros for a bias-free layer).
      b_hh: ``(4H,)`` recurrent bias (zeros for a bias-free layer).
      w_hr: ``(P, H)`` projection weights (torch ``weight_hr``), or ``None``.
    All arrays share one floating dtype.
    """

    w_ih: jax.Array
    w_hh: jax.Array
    b_ih: jax.Array
    b_hh: jax.Array
    w_hr: jax.Array | None = None


class LSTMContributions(NamedTuple):
    """Per-hidden-unit tables: entry ``[k, j]`` is the contribution of input element ``j``
    to output element ``k``. Row ``k`` of the ``h1_*`` tables sums to ``Δh1[k]``; row
    ``k`` of the ``c1_*`` tables sums to ``Δc1[k]``. (The same container also holds the
    multiplier tables ``M`` of :func:`lstm_cell_multiplier_tables`, where
    ``contribution = M * Δinput[None, :]``.)

    Attributes:
      h1_x: ``(P, I)``.  h1_h: ``(P, P)``.  h1_c: ``(P, H)``.
      c1_x: ``(H, I)``.  c1_h: ``(H, P)``.  c1_c: ``(H, H)`` (diagonal).
    """

    h1_x: jax.Array
    h1_h: jax.Array
    h1_c: jax.Array
    c1_x: jax.Array
    c1_h: jax.Array
    c1_c: jax.Array


# --------------------------------------------------------------------------- checks


class _Dims(NamedTuple):
    I: int
    H: int
    P: int


def _check_params(params: LSTMParams, name: str = "params") -> tuple[LSTMParams, _Dims]:
    if not isinstance(params, LSTMParams):
        raise TypeError(f"{name} must be an LSTMParams, got {type(params).__name__}")
    w_ih = _checks.array(f"{name}.w_ih", params.w_ih)
    dtype = w_ih.dtype
    _checks.rank(f"{name}.w_ih", w_ih, 2, ("4H", "I"))
    _checks.rows_divisible(f"{name}.w_ih", w_ih, 4, "gates i, f, g, o")
    four_h, i_dim = w_ih.shape
    h_dim = four_h // 4
    w_hr = params.w_hr
    if w_hr is not None:
        w_hr = _checks.array(f"{name}.w_hr", w_hr, dtype)
        _checks.rank(f"{name}.w_hr", w_hr, 2, ("P", "H"))
        _checks.shape(f"{name}.w_hr", w_hr, ("P", "H"), (w_hr.shape[0], h_dim),
                      f"{name}.w_ih (H={h_dim})")
        p_dim = w_hr.shape[0]
        p_src = f"{name}.w_hr"
    else:
        p_dim = h_dim
        p_src = f"{name}.w_ih (no projection, P=H)"
    w_hh = _checks.array(f"{name}.w_hh", params.w_hh, dtype)
    _checks.shape(f"{name}.w_hh", w_hh, ("4H", "P"), (four_h, p_dim), f"{name}.w_ih and {p_src}")
    b_ih = _checks.array(f"{name}.b_ih", params.b_ih, dtype)
    _checks.shape(f"{name}.b_ih", b_ih, ("4H",), (four_h,), f"{name}.w_ih")
    b_hh = _checks.array(f"{name}.b_hh", params.b_hh, dtype)
    _checks.shape(f"{name}.b_hh", b_hh, ("4H",), (four_h,), f"{name}.w_ih")
    return LSTMParams(w_ih, w_hh, b_ih, b_hh, w_hr), _Dims(i_dim, h_dim, p_dim)


def _check_data(params: LSTMParams, x, state, x_ref, state_ref):
    params, d = _check_params(params)
    dtype = params.w_ih.dtype
    out = []
    for suffix, xv, st in (("", x, state), ("_ref", x_ref, state_ref)):
        xv = _checks.array(f"x{suffix}", xv, dtype)
        _checks.shape(f"x{suffix}", xv, ("I",), (d.I,), "params.w_ih")
        st = _checks.state(f"state{suffix}", st, (f"h{suffix}", f"c{suffix}"))
        h = _checks.array(f"h{suffix}", st[0], dtype)
        _checks.shape(f"h{suffix}", h, ("P",), (d.P,), "params.w_hh")
        c = _checks.array(f"c{suffix}", st[1], dtype)
        _checks.shape(f"c{suffix}", c, ("H",), (d.H,), "params.w_ih")
        out.append((xv, h, c))
    return params, d, out[0], out[1]


# --------------------------------------------------------------------------- forward


class _Pointwise(NamedTuple):
    """Gate pre-activations and the values after them, for any common shape."""

    z_i: jax.Array
    z_f: jax.Array
    z_g: jax.Array
    z_o: jax.Array
    i: jax.Array
    f: jax.Array
    g: jax.Array
    o: jax.Array
    c: jax.Array  # incoming cell state
    c1: jax.Array
    t: jax.Array  # tanh(c1)
    p: jax.Array  # o * tanh(c1)


def _pointwise(z_i, z_f, z_g, z_o, c) -> _Pointwise:
    """Everything after the linear map, elementwise (vectors ``(H,)`` or scalars)."""
    i = jax.nn.sigmoid(z_i)
    f = jax.nn.sigmoid(z_f)
    g = jnp.tanh(z_g)
    o = jax.nn.sigmoid(z_o)
    c1 = f * c + i * g
    t = jnp.tanh(c1)
    return _Pointwise(z_i, z_f, z_g, z_o, i, f, g, o, c, c1, t, o * t)


def _preactivation(params: LSTMParams, x: jax.Array, h: jax.Array) -> jax.Array:
    """``z = W_ih x + b_ih + W_hh h + b_hh``, shape ``(4H,)``."""
    return params.w_ih @ x + params.b_ih + params.w_hh @ h + params.b_hh


def _forward(params: LSTMParams, x, h, c) -> _Pointwise:
    z_i, z_f, z_g, z_o = jnp.split(_preactivation(params, x, h), 4)
    return _pointwise(z_i, z_f, z_g, z_o, c)


def _project(params: LSTMParams, p: jax.Array) -> jax.Array:
    return p if params.w_hr is None else params.w_hr @ p


def _cell(params: LSTMParams, x, state):
    h, c = state
    fw = _forward(params, x, h, c)
    return _project(params, fw.p), fw.c1


def lstm_cell(params: LSTMParams, x: jax.Array, state: tuple[jax.Array, jax.Array]):
    """One ``nn.LSTMCell`` step for one example.

    Args:
      params: :class:`LSTMParams`.
      x: ``(I,)`` input.
      state: ``(h, c)`` with ``h`` ``(P,)`` and ``c`` ``(H,)``.

    Returns:
      ``(h1, c1)``: ``(P,)`` and ``(H,)``, dtype of ``params``.
    """
    params, _, (x, h, c), _ = _check_data(params, x, state, x, state)
    return _cell(params, x, (h, c))


# --------------------------------------------------------------------------- backward


class _Rescales(NamedTuple):
    """The Rescale factors of one step (elementwise, per hidden unit)."""

    z_i: jax.Array
    z_f: jax.Array
    z_g: jax.Array
    z_o: jax.Array
    c1: jax.Array  # of tanh(c1)


def _rescales(fa: _Pointwise, fr: _Pointwise) -> _Rescales:
    """Rescale factors from the actual and reference forward values (no new φ calls
    except the midpoint derivatives)."""
    return _Rescales(
        rescale("sigmoid", fa.z_i, fr.z_i, fa.i, fr.i),
        rescale("sigmoid", fa.z_f, fr.z_f, fa.f, fr.f),
        rescale("tanh", fa.z_g, fr.z_g, fa.g, fr.g),
        rescale("sigmoid", fa.z_o, fr.z_o, fa.o, fr.o),
        rescale("tanh", fa.c1, fr.c1, fa.t, fr.t),
    )


def _gate_multipliers(fa: _Pointwise, fr: _Pointwise, rs: _Rescales, m_p, m_c1):
    """Section-1 rule, elementwise per hidden unit (vectors ``(H,)`` or scalars); linear
    in the output multipliers ``m_p`` (of ``p = o ⊙ tanh c1``) and ``m_c1``.

    Returns:
      ``(m_z_i, m_z_f, m_z_g, m_z_o, m_c)``: multipliers of the four gate
      pre-activations and of the incoming cell state.
    """
    m_o, m_t = product_multipliers(m_p, fa.o, fr.o, fa.t, fr.t)
    m_c1_tot = m_c1 + m_t * rs.c1
    m_f, m_c = product_multipliers(m_c1_tot, fa.f, fr.f, fa.c, fr.c)
    m_i, m_g = product_multipliers(m_c1_tot, fa.i, fr.i, fa.g, fr.g)
    return m_i * rs.z_i, m_f * rs.z_f, m_g * rs.z_g, m_o * rs.z_o, m_c


def _cell_multipliers(params: LSTMParams, x, state, x_ref, state_ref, m_out):
    (h, c), (h_r, c_r), (m_h1, m_c1) = state, state_ref, m_out
    fa = _forward(params, x, h, c)
    fr = _forward(params, x_ref, h_r, c_r)
    m_p = m_h1 if params.w_hr is None else params.w_hr.T @ m_h1
    *m_zs, m_c = _gate_multipliers(fa, fr, _rescales(fa, fr), m_p, m_c1)
    m_z = jnp.concatenate(m_zs)
    return params.w_ih.T @ m_z, (params.w_hh.T @ m_z, m_c)


def lstm_cell_multipliers(
    params: LSTMParams,
    x: jax.Array,
    state: tuple[jax.Array, jax.Array],
    x_ref: jax.Array,
    state_ref: tuple[jax.Array, jax.Array],
    m_out: tuple[jax.Array, jax.Array],
):
    """DeepLIFT multipliers of the inputs of one LSTM step (vector–Jacobian form).

    Exact: ``m_x·Δx + m_h·Δh + m_c·Δc == m_h1·Δh1 + m_c1·Δc1`` up to rounding, and
    ``m_in * Δin == Σ_k m_h1[k] C.h1_*[k, :] + m_c1[k] C.c1_*[k, :]`` for the tables
    ``C`` of :func:`lstm_cell_contributions`.

    Args:
      params: :class:`LSTMParams`.
      x, x_ref: ``(I,)`` actual and reference input.
      state, state_ref: ``(h, c)`` and ``(h_ref, c_ref)``, ``h`` ``(P,)``, ``c`` ``(H,)``.
      m_out: ``(m_h1, m_c1)``, ``(P,)`` and ``(H,)``: multipliers of the outputs.

    Returns:
      ``(m_x, (m_h, m_c))``: ``(I,)``, ``(P,)``, ``(H,)``, dtype of ``params``.
    """
    params, d, (x, h, c), (x_r, h_r, c_r) = _check_data(params, x, state, x_ref, state_ref)
    m_out = _checks.state("m_out", m_out, ("m_h1", "m_c1"))
    dtype = params.w_ih.dtype
    m_h1 = _checks.array("m_h1", m_out[0], dtype)
    _checks.shape("m_h1", m_h1, ("P",), (d.P,), "the h1 output (params.w_hh)")
    m_c1 = _checks.array("m_c1", m_out[1], dtype)
    _checks.shape("m_c1", m_c1, ("H",), (d.H,), "the c1 output (params.w_ih)")
    return _cell_multipliers(params, x, (h, c), x_r, (h_r, c_r), (m_h1, m_c1))


# --------------------------------------------------------------------------- tables


def _gate_rows(w: jax.Array) -> jax.Array:
    """``(4H, J)`` torch-layout weights -> ``(H, 4, J)``: row ``k`` holds unit ``k``'s
    four gate rows ``w[k], w[H + k], w[2H + k], w[3H + k]``."""
    return jnp.swapaxes(w.reshape(4, w.shape[0] // 4, w.shape[1]), 0, 1)


def _unit_rows(fa: _Pointwise, fr: _Pointwise, w_ih_k, w_hh_k):
    """Multiplier rows of ONE hidden unit ``k``, from its own scalars only.

    Args:
      fa, fr: unit ``k``'s actual / reference forward values (scalar fields).
      w_ih_k, w_hh_k: its four gate rows, ``(4, I)`` and ``(4, P)``.

    Returns ``(p_x (I,), p_h (P,), p_c (), c1_x (I,), c1_h (P,), c1_c ())``: the
    multipliers of ``x``, ``h`` and ``c[k]`` for the outputs ``p[k]`` and ``c1[k]``.
    """
    rs = _rescales(fa, fr)
    one, zero = jnp.ones_like(fa.c), jnp.zeros_like(fa.c)

    def rows_for(m_p, m_c1):
        *m_zs, m_c = _gate_multipliers(fa, fr, rs, m_p, m_c1)
        m_z = jnp.stack(m_zs)  # (4,) in gate order i, f, g, o
        return m_z @ w_ih_k, m_z @ w_hh_k, m_c

    return (*rows_for(one, zero), *rows_for(zero, one))


def _multiplier_tables(params: LSTMParams, x, state, x_ref, state_ref) -> LSTMContributions:
    (h, c), (h_r, c_r) = state, state_ref
    # The forward values are those of lstm_cell (so the rows sum to exactly its Δ);
    # everything after the linear map is then done per hidden unit, vmapped over k.
    fa, fr = _forward(params, x, h, c), _forward(params, x_ref, h_r, c_r)
    p_x, p_h, p_c, c1_x, c1_h, c1_c = jax.vmap(_unit_rows)(
        fa, fr, _gate_rows(params.w_ih), _gate_rows(params.w_hh)
    )
    p_c, c1_c = jnp.diag(p_c), jnp.diag(c1_c)
    if params.w_hr is not None:  # h1 = W_hr p mixes the units linearly
        p_x, p_h, p_c = params.w_hr @ p_x, params.w_hr @ p_h, params.w_hr @ p_c
    return LSTMContributions(p_x, p_h, p_c, c1_x, c1_h, c1_c)


def _contributions(params, x, state, x_ref, state_ref) -> LSTMContributions:
    m = _multiplier_tables(params, x, state, x_ref, state_ref)
    dx, dh, dc = x - x_ref, state[0] - state_ref[0], state[1] - state_ref[1]
    return LSTMContributions(
        m.h1_x * dx, m.h1_h * dh, m.h1_c * dc, m.c1_x * dx, m.c1_h * dh, m.c1_c * dc
    )


def lstm_cell_multiplier_tables(params: LSTMParams, x, state, x_ref, state_ref) -> LSTMContributions:
    """Per-hidden-unit multiplier tables ``M[k, j]`` of one LSTM step.

    Built in per-dimension form: the forward values are those of :func:`lstm_cell`; then,
    for every hidden unit ``k`` separately (``vmap`` over ``k``), the section-1 rule is
    applied to unit ``k``'s scalars only (its gates, products and Rescale factors) and
    its multiplier rows are formed from its own four gate rows of ``W_ih`` / ``W_hh``.
    Nothing is pooled across units, no autodiff is used, and no input Δ is divided by.
    With a projection, the ``h1`` rows are ``W_hr`` times the per-unit ``p`` rows.

    Args: as :func:`lstm_cell_contributions`.

    Returns:
      :class:`LSTMContributions` of multipliers, shapes as documented there;
      ``contribution = M * Δinput[None, :]``.
    """
    params, _, (x, h, c), (x_r, h_r, c_r) = _check_data(params, x, state, x_ref, state_ref)
    return _multiplier_tables(params, x, (h, c), x_r, (h_r, c_r))


def lstm_cell_contributions(
    params: LSTMParams,
    x: jax.Array,
    state: tuple[jax.Array, jax.Array],
    x_ref: jax.Array,
    state_ref: tuple[jax.Array, jax.Array],
) -> LSTMContributions:
    """Contribution of every input element (x_j, h_j, c_j) to every output (h1_k, c1_k).

    ``C[k, j] = M[k, j] · Δinput[j]`` with ``M`` from :func:`lstm_cell_multiplier_tables`.
    Rows sum to the output differences: ``C.h1_x[k].sum() + C.h1_h[k].sum() +
    C.h1_c[k].sum() == h1[k] − h1_ref[k]`` (likewise for ``c1``), to float rounding.

    Args:
      params: :class:`LSTMParams`.
      x, x_ref: ``(I,)`` actual and reference input.
      state, state_ref: ``(h, c)`` and ``(h_ref, c_ref)``; ``h`` ``(P,)``, ``c`` ``(H,)``.

    Returns:
      :class:`LSTMContributions` with ``h1_x (P, I)``, ``h1_h (P, P)``, ``h1_c (P, H)``,
      ``c1_x (H, I)``, ``c1_h (H, P)``, ``c1_c (H, H)``; dtype of ``params``.
    """
    params, _, (x, h, c), (x_r, h_r, c_r) = _check_data(params, x, state, x_ref, state_ref)
    return _contributions(params, x, (h, c), x_r, (h_r, c_r))


# --------------------------------------------------------------------------- batched

batched_lstm_cell = batched(
    lstm_cell,
    ("x", "state"),
    doc="``jit(vmap(lstm_cell))``: x ``(B, I)``, state ``((B, P), (B, H))`` -> "
    "``((B, P), (B, H))``; params shared.",
)
batched_lstm_cell_multipliers = batched(
    lstm_cell_multipliers,
    ("x", "state", "x_ref", "state_ref", "m_out"),
    doc="``jit(vmap(lstm_cell_multipliers))``: every data argument gains a leading batch "
    "axis B (x ``(B, I)``, state ``((B, P), (B, H))``, ..., m_out ``((B, P), (B, H))``); "
    "returns ``(m_x (B, I), (m_h (B, P), m_c (B, H)))``; params shared.",
)
batched_lstm_cell_multiplier_tables = batched(
    lstm_cell_multiplier_tables,
    ("x", "state", "x_ref", "state_ref"),
    doc="``jit(vmap(lstm_cell_multiplier_tables))``: tables gain a leading batch axis B.",
)
batched_lstm_cell_contributions = batched(
    lstm_cell_contributions,
    ("x", "state", "x_ref", "state_ref"),
    doc="``jit(vmap(lstm_cell_contributions))``: tables gain a leading batch axis B "
    "(e.g. h1_x ``(B, P, I)``); params shared.",
)
