"""One ``nn.GRUCell`` step (torch layout) and its exact DeepLIFT / DeepSHAP multipliers.

Forward, gate order **r, z, n** (rows ``[0:H]``, ``[H:2H]``, ``[2H:3H]``)::

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)
    hn = W_hn h + b_hn
    n  = tanh(W_in x + b_in + r ⊙ hn)
    h' = (1 − z) ⊙ n + z ⊙ h

Each product is a two-operand Shapley product: ``u ⊙ n`` with ``u = 1 − z``, ``z ⊙ h``
and ``r ⊙ hn``. Backward (given ``m_h'``), each hidden unit with its own factors::

    m_u  = m_h' · mean(n)         m_n  = m_h' · mean(1 − z)
    m_z  = m_h' · mean(h) − m_u   m_h(direct) = m_h' · mean(z)
    m_an = m_n · Rescale_tanh(a_n)          (a_n = W_in x + b_in + r ⊙ hn)
    m_r  = m_an · mean(hn)        m_hn = m_an · mean(r)
    m_ar = m_r · Rescale_σ(a_r)   m_az = m_z · Rescale_σ(a_z)
    m_x  = W_ir^T m_ar + W_iz^T m_az + W_in^T m_an
    m_h  = W_hr^T m_ar + W_hz^T m_az + W_hn^T m_hn + m_h(direct)

``I`` inputs, ``H`` hidden units; one example (1-D arrays) per call. The signature is the
one of every cell in this package: states and output multipliers are tuples, here ``(h,)``
and ``(m_h1,)``. ``batched_*`` are ``jit(vmap(...))`` over a leading batch axis of the data.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from reference_jax import _checks
from reference_jax._checks import batched
from reference_jax.rescale import product_multipliers, rescale

__all__ = [
    "GRUContributions",
    "GRUParams",
    "batched_gru_cell",
    "batched_gru_cell_contributions",
    "batched_gru_cell_multiplier_tables",
    "batched_gru_cell_multipliers",
    "gru_cell",
    "gru_cell_contributions",
    "gru_cell_multiplier_tables",
    "gru_cell_multipliers",
]


class GRUParams(NamedTuple):
    """Parameters of one GRU cell / one layer-direction of ``nn.GRU`` (torch layout).

    Attributes:
      w_ih: ``(3H, I)``, gate rows r, z, n.
      w_hh: ``(3H, H)``.
      b_ih: ``(3H,)`` (zeros for a bias-free layer).
      b_hh: ``(3H,)`` (zeros for a bias-free layer).
    All arrays share one floating dtype.
    """

    w_ih: jax.Array
    w_hh: jax.Array
    b_ih: jax.Array
    b_hh: jax.Array


class GRUContributions(NamedTuple):
    """Per-hidden-unit tables ``[k, j]``: input element ``j`` → output ``h1[k]``.

    Row ``k`` of ``h1_x`` plus row ``k`` of ``h1_h`` sums to ``Δh1[k]``. Also used for
    the multiplier tables of :func:`gru_cell_multiplier_tables`.

    Attributes:
      h1_x: ``(H, I)``.  h1_h: ``(H, H)``.
    """

    h1_x: jax.Array
    h1_h: jax.Array


# --------------------------------------------------------------------------- checks


def _check_params(params: GRUParams, name: str = "params") -> tuple[GRUParams, int, int]:
    if not isinstance(params, GRUParams):
        raise TypeError(f"{name} must be a GRUParams, got {type(params).__name__}")
    w_ih = _checks.array(f"{name}.w_ih", params.w_ih)
    dtype = w_ih.dtype
    _checks.rank(f"{name}.w_ih", w_ih, 2, ("3H", "I"))
    _checks.rows_divisible(f"{name}.w_ih", w_ih, 3, "gates r, z, n")
    three_h, i_dim = w_ih.shape
    h_dim = three_h // 3
    w_hh = _checks.array(f"{name}.w_hh", params.w_hh, dtype)
    _checks.shape(f"{name}.w_hh", w_hh, ("3H", "H"), (three_h, h_dim), f"{name}.w_ih")
    b_ih = _checks.array(f"{name}.b_ih", params.b_ih, dtype)
    _checks.shape(f"{name}.b_ih", b_ih, ("3H",), (three_h,), f"{name}.w_ih")
    b_hh = _checks.array(f"{name}.b_hh", params.b_hh, dtype)
    _checks.shape(f"{name}.b_hh", b_hh, ("3H",), (three_h,), f"{name}.w_ih")
    return GRUParams(w_ih, w_hh, b_ih, b_hh), i_dim, h_dim


def _check_data(params: GRUParams, x, state, x_ref, state_ref):
    """Validate one example; returns ``(params, x, h, x_ref, h_ref)`` as arrays."""
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


# --------------------------------------------------------------------------- forward


class _Pointwise(NamedTuple):
    a_r: jax.Array  # pre-activation of r
    a_z: jax.Array  # pre-activation of z
    a_n: jax.Array  # pre-activation of n: (W_in x + b_in) + r ⊙ hn
    r: jax.Array
    z: jax.Array
    hn: jax.Array
    n: jax.Array
    h1: jax.Array


def _pointwise(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h) -> _Pointwise:
    """From the six affine pieces (``gx_* = W_i* x + b_i*``, ``gh_* = W_h* h + b_h*``)."""
    a_r, a_z = gx_r + gh_r, gx_z + gh_z
    r, z = jax.nn.sigmoid(a_r), jax.nn.sigmoid(a_z)
    a_n = gx_n + r * gh_n
    n = jnp.tanh(a_n)
    h1 = (1.0 - z) * n + z * h
    return _Pointwise(a_r, a_z, a_n, r, z, gh_n, n, h1)


def _forward(params: GRUParams, x, h) -> _Pointwise:
    gx = jnp.split(params.w_ih @ x + params.b_ih, 3)
    gh = jnp.split(params.w_hh @ h + params.b_hh, 3)
    return _pointwise(*gx, *gh, h)


def _cell(params: GRUParams, x, state):
    """Unchecked step on the state tuple ``(h,)`` -> ``(h1,)``."""
    return (_forward(params, x, state[0]).h1,)


def gru_cell(params: GRUParams, x: jax.Array, state: tuple[jax.Array]) -> tuple[jax.Array]:
    """One ``nn.GRUCell`` step for one example.

    Args:
      params: :class:`GRUParams`.
      x: ``(I,)``.
      state: ``(h,)`` with ``h`` ``(H,)`` (a 1-tuple, like LSTM's ``(h, c)``).

    Returns:
      ``(h1,)``, ``h1`` ``(H,)``, dtype of ``params``.
    """
    params, x, h, _, _ = _check_data(params, x, state, x, state)
    return _cell(params, x, (h,))


# --------------------------------------------------------------------------- backward


def _gate_multipliers(fa: _Pointwise, fr: _Pointwise, h_a, h_r, m_h1):
    """The rule elementwise (vectors ``(H,)`` or scalars).

    Returns ``(m_ar, m_az, m_an, m_hn, m_h_direct)``.
    """
    # h1 = u ⊙ n + z ⊙ h with u = 1 − z (so Δu = −Δz); u evaluated as σ(−a_z), which keeps
    # its digits where z saturates at 1 (1.0 − z would cancel to a few correct bits).
    m_u, m_n = product_multipliers(m_h1, jax.nn.sigmoid(-fa.a_z), jax.nn.sigmoid(-fr.a_z), fa.n, fr.n)
    m_z_keep, m_h_direct = product_multipliers(m_h1, fa.z, fr.z, h_a, h_r)
    m_z = m_z_keep - m_u
    m_an = m_n * rescale("tanh", fa.a_n, fr.a_n, fa.n, fr.n)
    m_r, m_hn = product_multipliers(m_an, fa.r, fr.r, fa.hn, fr.hn)
    m_ar = m_r * rescale("sigmoid", fa.a_r, fr.a_r, fa.r, fr.r)
    m_az = m_z * rescale("sigmoid", fa.a_z, fr.a_z, fa.z, fr.z)
    return m_ar, m_az, m_an, m_hn, m_h_direct


def _cell_multipliers(params: GRUParams, x, state, x_ref, state_ref, m_out):
    """Unchecked rule on state tuples: ``(m_x, (m_h,))`` for ``m_out = (m_h1,)``."""
    (h,), (h_ref,), (m_h1,) = state, state_ref, m_out
    fa, fr = _forward(params, x, h), _forward(params, x_ref, h_ref)
    m_ar, m_az, m_an, m_hn, m_h_direct = _gate_multipliers(fa, fr, h, h_ref, m_h1)
    m_x = params.w_ih.T @ jnp.concatenate([m_ar, m_az, m_an])
    m_h = params.w_hh.T @ jnp.concatenate([m_ar, m_az, m_hn]) + m_h_direct
    return m_x, (m_h,)


def gru_cell_multipliers(
    params: GRUParams, x: jax.Array, state: tuple[jax.Array], x_ref: jax.Array,
    state_ref: tuple[jax.Array], m_out: tuple[jax.Array],
):
    """DeepLIFT multipliers of the inputs of one GRU step (vector–Jacobian form).

    Exact: ``m_x·Δx + m_h·Δh == m_h1·Δh1`` to rounding, and
    ``m_in * Δin == Σ_k m_h1[k] C.h1_*[k, :]`` for the tables of
    :func:`gru_cell_contributions`.

    Args:
      params: :class:`GRUParams`.
      x, x_ref: ``(I,)``.
      state, state_ref: ``(h,)`` and ``(h_ref,)``, ``(H,)`` each.
      m_out: ``(m_h1,)``, ``(H,)``: the multiplier of the output state.

    Returns:
      ``(m_x (I,), (m_h (H,),))``.
    """
    params, x, h, x_r, h_r = _check_data(params, x, state, x_ref, state_ref)
    (m_h1,) = _checks.state("m_out", m_out, ("m_h1",))
    m_h1 = _checks.array("m_h1", m_h1, params.w_ih.dtype)
    _checks.shape("m_h1", m_h1, ("H",), (h.shape[0],), "the h1 output (params.w_hh)")
    return _cell_multipliers(params, x, (h,), x_r, (h_r,), (m_h1,))


# --------------------------------------------------------------------------- tables


def _gate_rows(w: jax.Array) -> jax.Array:
    """``(3H, J)`` -> ``(H, 3, J)``: row ``k`` holds unit ``k``'s gate rows r, z, n."""
    return jnp.swapaxes(w.reshape(3, w.shape[0] // 3, w.shape[1]), 0, 1)


def _unit_rows(fa: _Pointwise, fr: _Pointwise, h_k, h_r_k, e_k, w_ih_k, w_hh_k):
    """Multiplier rows ``(M_x (I,), M_h (H,))`` of ONE hidden unit ``k``.

    Args:
      fa, fr: unit ``k``'s actual / reference forward values (scalar fields).
      h_k, h_r_k: ``h[k]`` and ``h_ref[k]`` (the operand of ``z ⊙ h``).
      e_k: ``(H,)`` one-hot of ``k`` (where the direct ``z ⊙ h`` path lands).
      w_ih_k, w_hh_k: its three gate rows, ``(3, I)`` and ``(3, H)``.
    """
    m_ar, m_az, m_an, m_hn, m_h_direct = _gate_multipliers(
        fa, fr, h_k, h_r_k, jnp.ones_like(h_k)
    )
    m_x = jnp.stack([m_ar, m_az, m_an]) @ w_ih_k
    m_h = jnp.stack([m_ar, m_az, m_hn]) @ w_hh_k + m_h_direct * e_k
    return m_x, m_h


def _multiplier_tables(params: GRUParams, x, h, x_ref, h_ref) -> GRUContributions:
    # Forward values of gru_cell; then the rule per hidden unit, vmapped over k.
    fa, fr = _forward(params, x, h), _forward(params, x_ref, h_ref)
    m_x, m_h = jax.vmap(_unit_rows)(
        fa, fr, h, h_ref, jnp.eye(h.shape[0], dtype=h.dtype),
        _gate_rows(params.w_ih), _gate_rows(params.w_hh),
    )
    return GRUContributions(m_x, m_h)


def gru_cell_multiplier_tables(params: GRUParams, x, state, x_ref, state_ref) -> GRUContributions:
    """Per-hidden-unit multiplier tables ``M[k, j]`` (forward values of :func:`gru_cell`,
    then ``vmap`` over units ``k``, each from its own scalars and three gate rows; no
    autodiff); ``contribution = M * Δinput[None, :]``.

    Args: as :func:`gru_cell_contributions`.  Returns: :class:`GRUContributions`.
    """
    params, x, h, x_r, h_r = _check_data(params, x, state, x_ref, state_ref)
    return _multiplier_tables(params, x, h, x_r, h_r)


def gru_cell_contributions(
    params: GRUParams, x: jax.Array, state: tuple[jax.Array], x_ref: jax.Array,
    state_ref: tuple[jax.Array],
) -> GRUContributions:
    """Contribution of every input element (x_j, h_j) to every output ``h1[k]``.

    ``C[k, j] = M[k, j] · Δinput[j]``; ``C.h1_x[k].sum() + C.h1_h[k].sum() ==
    h1[k] − h1_ref[k]`` to float rounding.

    Args:
      params: :class:`GRUParams`.
      x, x_ref: ``(I,)``.  state, state_ref: ``(h,)``, ``(h_ref,)``, ``(H,)`` each.

    Returns:
      :class:`GRUContributions` ``(h1_x (H, I), h1_h (H, H))``.
    """
    params, x, h, x_r, h_r = _check_data(params, x, state, x_ref, state_ref)
    m = _multiplier_tables(params, x, h, x_r, h_r)
    return GRUContributions(m.h1_x * (x - x_r), m.h1_h * (h - h_r))


# --------------------------------------------------------------------------- batched

batched_gru_cell = batched(
    gru_cell, ("x", "state"),
    doc="``jit(vmap(gru_cell))``: x ``(B, I)``, state ``((B, H),)`` -> ``((B, H),)``; "
    "params shared.",
)
batched_gru_cell_multipliers = batched(
    gru_cell_multipliers, ("x", "state", "x_ref", "state_ref", "m_out"),
    doc="``jit(vmap(gru_cell_multipliers))``: data ``(B, ...)`` (states and m_out as "
    "1-tuples) -> ``(m_x (B, I), (m_h (B, H),))``; params shared.",
)
batched_gru_cell_multiplier_tables = batched(
    gru_cell_multiplier_tables, ("x", "state", "x_ref", "state_ref"),
    doc="``jit(vmap(gru_cell_multiplier_tables))``: tables gain a leading batch axis B.",
)
batched_gru_cell_contributions = batched(
    gru_cell_contributions, ("x", "state", "x_ref", "state_ref"),
    doc="``jit(vmap(gru_cell_contributions))``: tables gain a leading batch axis B.",
)
