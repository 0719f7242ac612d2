"""Whole ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` stacks for ONE example, and their exact
DeepLIFT / DeepSHAP multipliers (``jax.lax.scan`` over time, cell rule applied backwards).

Stack layout (torch semantics):

* ``params[l][d]`` are the cell params of layer ``l``, direction ``d`` (``D = 1`` or ``2``
  directions, the same in every layer). Layer 0 takes ``I`` inputs; layer ``l > 0`` takes
  ``D·P`` inputs: the concatenation ``[forward output, reverse output]`` of layer ``l−1``.
* Direction 1 processes the sequence backwards in time; its output at step ``t`` is the
  state it reached at ``t`` (so ``out[t] = [h_fwd_t, h_rev_t]``).
* Initial / final states are stacked along a leading axis of size ``L·D`` in torch
  order: index ``l·D + d``. They are tuples for every kind, as for the cells:
  ``state0 = (h0, c0)`` for LSTM, ``(h0,)`` for GRU and RNN (likewise the final states and
  the multipliers of both).

Backward: layer by layer from the top, each direction scanned against its own time order,
the step's output multiplier ``m_out[t]`` added to the multiplier carried from step
``t+1`` (a value used twice gets the sum of both multipliers), and the directions'
input multipliers summed into the multiplier of the layer input. Since every step is
exact, so is the whole sequence::

    Σ m_x Δx + Σ m_h0 Δh0 (+ Σ m_c0 Δc0) == Σ m_out Δout + Σ m_hn Δh_n (+ Σ m_cn Δc_n)

to float rounding. ``batched_*`` are ``jit(vmap(...))`` over a leading batch axis of
every data argument (batch first: ``x`` ``(B, T, I)``, ``h0`` ``(B, L·D, P)``, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from reference_jax import _checks, gru, lstm, rnn
from reference_jax._checks import batched
from reference_jax.gru import GRUParams
from reference_jax.lstm import LSTMParams
from reference_jax.rnn import RNNNonlinearity, RNNParams

__all__ = [
    "batched_gru_sequence",
    "batched_gru_sequence_multipliers",
    "batched_lstm_sequence",
    "batched_lstm_sequence_multipliers",
    "batched_rnn_sequence",
    "batched_rnn_sequence_multipliers",
    "gru_sequence",
    "gru_sequence_multipliers",
    "lstm_sequence",
    "lstm_sequence_multipliers",
    "rnn_sequence",
    "rnn_sequence_multipliers",
]

State = tuple[jax.Array, ...]  # (h,) or (h, c); the output of a step is state[0]


class _Kind(NamedTuple):
    """How one recurrent family plugs into the generic stack code."""

    name: str
    params_cls: type
    check: Callable  # (p, name) -> (p, I, H, P)
    step: Callable  # (p, x, state) -> state
    multipliers: Callable  # (p, x, state, x_ref, state_ref, m_state) -> (m_x, m_state_prev)


def _lstm_check(p, name):
    p, d = lstm._check_params(p, name)
    return p, d.I, d.H, d.P


def _gru_check(p, name):
    p, i_dim, h_dim = gru._check_params(p, name)
    return p, i_dim, h_dim, h_dim


def _rnn_check(p, name):
    p, i_dim, h_dim = rnn._check_params(p, name)
    return p, i_dim, h_dim, h_dim


_LSTM = _Kind("LSTM", LSTMParams, _lstm_check, lstm._cell, lstm._cell_multipliers)
_GRU = _Kind("GRU", GRUParams, _gru_check, gru._cell, gru._cell_multipliers)


def _rnn_kind(nonlinearity: str) -> _Kind:
    rnn._check_nonlinearity(nonlinearity)
    return _Kind(
        "RNN", RNNParams, _rnn_check,
        functools.partial(rnn._cell, nonlinearity=nonlinearity),
        functools.partial(rnn._cell_multipliers, nonlinearity=nonlinearity),
    )


# --------------------------------------------------------------------------- checks


class _StackDims(NamedTuple):
    L: int
    D: int
    I: int
    H: int
    P: int


def _is_params(value) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")  # a *Params NamedTuple


def _check_stack(kind: _Kind, params) -> tuple[list[list], _StackDims]:
    """Validate a ``list[list[Params]]`` stack; return it (as arrays) and its sizes."""
    if not isinstance(params, Sequence) or _is_params(params) or not params:
        raise TypeError(
            f"params must be a non-empty list over layers of lists over directions of "
            f"{kind.params_cls.__name__}, got {type(params).__name__}"
        )
    checked, dims = [], None
    for l, layer in enumerate(params):
        if not isinstance(layer, Sequence) or _is_params(layer):
            raise TypeError(
                f"params[{l}] must be a list over directions of {kind.params_cls.__name__}, "
                f"got {type(layer).__name__}"
            )
        if len(layer) not in (1, 2):
            raise ValueError(f"params[{l}] must have 1 or 2 directions, got {len(layer)}")
        row = []
        for d, p in enumerate(layer):
            name = f"params[{l}][{d}]"
            p, i_dim, h_dim, p_dim = kind.check(p, name)
            if dims is None:
                dims = _StackDims(len(params), len(layer), i_dim, h_dim, p_dim)
                dtype = p.w_ih.dtype
            if len(layer) != dims.D:
                raise ValueError(
                    f"params[{l}] must have D={dims.D} directions like params[0], "
                    f"got {len(layer)}"
                )
            if (h_dim, p_dim) != (dims.H, dims.P):
                raise AssertionError(
                    f"{name} must have hidden size H={dims.H} and output size P={dims.P} "
                    f"like params[0][0], got H={h_dim}, P={p_dim}"
                )
            want_in = dims.I if l == 0 else dims.D * dims.P
            if i_dim != want_in:
                src = "params[0][0]" if l == 0 else f"D*P={dims.D}*{dims.P} (layer {l - 1})"
                raise AssertionError(
                    f"{name}.w_ih must have {want_in} input columns to match {src}, "
                    f"got {i_dim}"
                )
            if p.w_ih.dtype != dtype:
                raise AssertionError(
                    f"{name} must have dtype {dtype.name} like params[0][0], "
                    f"got {p.w_ih.dtype}"
                )
            row.append(p)
        checked.append(row)
    return checked, dims


def _check_x(name, x, dims: _StackDims, dtype, length: int | None = None):
    x = _checks.array(name, x, dtype)
    _checks.rank(name, x, 2, ("T", "I"))
    if length is None:
        _checks.shape(name, x, ("T", "I"), (x.shape[0], dims.I), "params[0][0].w_ih")
    else:
        _checks.shape(name, x, ("T", "I"), (length, dims.I),
                      f"x (T={length}) and params[0][0].w_ih")
    return x


def _check_states(names, values, sizes, symbols, dims: _StackDims, dtype):
    n = len(names)
    if len(values) != n:
        raise AssertionError(f"expected {n} state arrays ({', '.join(names)}), got {len(values)}")
    out = []
    for name, value, size, sym in zip(names, values, sizes[:n], symbols[:n], strict=True):
        value = _checks.array(name, value, dtype)
        _checks.shape(name, value, ("L*D", sym), (dims.L * dims.D, size),
                      f"params (L={dims.L}, D={dims.D}, {sym}={size})")
        out.append(value)
    return tuple(out)


def _pair(name, value, n):
    if not isinstance(value, tuple | list) or len(value) != n:
        raise AssertionError(f"{name} must be a tuple of {n} arrays")
    return tuple(value)


# --------------------------------------------------------------------------- generic stack
#
# Layout inside: the directions of a layer share parameter shapes, so they are stacked
# (leading axis D) and run by ONE vmapped scan, the reverse direction on the time-reversed
# sequence ("processing order"). Actual and reference forward passes are vmapped too.
# States are tuples: (h,) or (h, c); the output of a step is state[0].


class _Record(NamedTuple):
    """What the backward pass needs from one forward pass, per layer."""

    inputs: list  # per layer: its input in processing order, (D, T, in)
    incoming: list  # per layer: the incoming state of every step, tuple of (D, T, .)
    out: jax.Array  # (T, D*P): output of the top layer, time order
    final: tuple  # final states, tuple of (L*D, .)


def _by_direction(a: jax.Array, n_dir: int) -> jax.Array:
    """``(D, T, ...)`` time order <-> processing order: flip the reverse direction."""
    return a if n_dir == 1 else jnp.stack([a[0], a[1, ::-1]])


def _stack_layers(params) -> list:
    """``params[l][d]`` -> per layer, the D directions stacked on a leading axis."""
    return [jax.tree_util.tree_map(lambda *a: jnp.stack(a), *row) for row in params]


def _layer_slice(states: tuple, layer: int, n_dir: int) -> tuple:
    return tuple(s[layer * n_dir:(layer + 1) * n_dir] for s in states)


def _direction_forward(kind: _Kind, p, xs, s0: State):
    """One direction over ``xs`` ``(T, in)`` in processing order."""

    def body(s, x_t):
        s1 = kind.step(p, x_t, s)
        return s1, (s, s1[0])

    s_final, (s_in, out) = jax.lax.scan(body, s0, xs)
    return out, s_final, s_in


def _stack_forward(kind: _Kind, layers: list, x, init: tuple) -> _Record:
    """Forward of the stack; ``layers`` from :func:`_stack_layers`, ``init`` tuple of
    ``(L*D, .)``."""
    n_dir = jax.tree_util.tree_leaves(layers[0])[0].shape[0]
    inputs, incoming, final = [], [], []
    layer_in = x
    for l, p in enumerate(layers):
        xs = _by_direction(jnp.broadcast_to(layer_in, (n_dir, *layer_in.shape)), n_dir)
        out, s_final, s_in = jax.vmap(functools.partial(_direction_forward, kind))(
            p, xs, _layer_slice(init, l, n_dir)
        )
        inputs.append(xs)
        incoming.append(s_in)
        final.append(s_final)
        out = _by_direction(out, n_dir)  # (D, T, P), time order
        layer_in = jnp.concatenate(list(out), axis=-1)  # [forward, reverse] features
    final = tuple(jnp.concatenate(parts) for parts in zip(*final, strict=True))
    return _Record(inputs, incoming, layer_in, final)


def _direction_backward(kind: _Kind, p, xs_a, xs_r, s_a, s_r, m_o, m_final: State):
    """Backward through one direction, in reverse processing order.

    The multiplier carried from step t+1 and the output multiplier of step t add up
    (h_t is used twice); the cell rule then gives the multipliers of x_t and of the
    incoming state, which is carried on to step t−1.
    """

    def body(m_s, inp):
        x_a, x_r, st_a, st_r, m_o_t = inp
        m_s1 = (m_s[0] + m_o_t, *m_s[1:])
        m_x_t, m_s_prev = kind.multipliers(p, x_a, st_a, x_r, st_r, m_s1)
        return m_s_prev, m_x_t

    m_s0, m_x = jax.lax.scan(body, m_final, (xs_a, xs_r, s_a, s_r, m_o), reverse=True)
    return m_x, m_s0


def _stack_multipliers(kind: _Kind, params, x, init, x_ref, init_ref, m_out, m_final):
    """Multipliers of ``x`` ``(T, I)`` and of the initial states (tuple of ``(L*D, .)``)."""
    layers = _stack_layers(params)
    n_dir = len(params[0])
    both = jax.vmap(functools.partial(_stack_forward, kind, layers))(
        jnp.stack([x, x_ref]), tuple(jnp.stack(pair) for pair in zip(init, init_ref,
                                                                       strict=True))
    )
    m_init = [None] * len(layers)
    m_next = m_out  # multiplier of the current layer's output, (T, D*P)
    for l in reversed(range(len(layers))):
        m_o = _by_direction(jnp.stack(jnp.split(m_next, n_dir, axis=-1)), n_dir)
        m_x, m_init[l] = jax.vmap(functools.partial(_direction_backward, kind))(
            layers[l], both.inputs[l][0], both.inputs[l][1],
            tuple(s[0] for s in both.incoming[l]), tuple(s[1] for s in both.incoming[l]),
            m_o, _layer_slice(m_final, l, n_dir),
        )
        m_next = _by_direction(m_x, n_dir).sum(axis=0)  # directions add up, (T, in)
    return m_next, tuple(jnp.concatenate(parts) for parts in zip(*m_init, strict=True))


def _sequence(kind: _Kind, params, x, state0: tuple):
    params, dims = _check_stack(kind, params)
    dtype = params[0][0].w_ih.dtype
    x = _check_x("x", x, dims, dtype)
    names = ("h0", "c0")[: len(state0)]
    state0 = _check_states(names, state0, (dims.P, dims.H), ("P", "H"), dims, dtype)
    rec = _stack_forward(kind, _stack_layers(params), x, state0)
    return rec.out, rec.final


def _sequence_multipliers(kind: _Kind, params, x, state0, x_ref, state0_ref, m_out):
    params, dims = _check_stack(kind, params)
    dtype = params[0][0].w_ih.dtype
    n_state = len(state0)
    x = _check_x("x", x, dims, dtype)
    x_ref = _check_x("x_ref", x_ref, dims, dtype, length=x.shape[0])
    sizes, symbols = (dims.P, dims.H), ("P", "H")
    names = ("h0", "c0")[:n_state]
    state0 = _check_states(names, state0, sizes, symbols, dims, dtype)
    state0_ref = _check_states(tuple(n + "_ref" for n in names), state0_ref, sizes, symbols,
                               dims, dtype)
    m_o = _checks.array("m_out", m_out[0], dtype)
    width = dims.D * dims.P
    _checks.shape("m_out", m_o, ("T", "D*P"), (x.shape[0], width),
                  f"x (T={x.shape[0]}) and params (D={dims.D}, P={dims.P})")
    m_final = _check_states(("m_hn", "m_cn")[:n_state], m_out[1:], sizes, symbols, dims, dtype)
    return _stack_multipliers(kind, params, x, state0, x_ref, state0_ref, m_o, m_final)


# --------------------------------------------------------------------------- LSTM


def lstm_sequence(
    params: Sequence[Sequence[LSTMParams]], x: jax.Array, state0: tuple[jax.Array, jax.Array]
):
    """Forward of a whole ``nn.LSTM`` stack (``batch_first`` irrelevant: one example).

    Args:
      params: ``params[l][d]`` :class:`LSTMParams` (see module docstring).
      x: ``(T, I)``.
      state0: ``(h0 (L*D, P), c0 (L*D, H))``.

    Returns:
      ``(out (T, D*P), (h_n (L*D, P), c_n (L*D, H)))``.
    """
    return _sequence(_LSTM, params, x, _pair("state0", state0, 2))


def lstm_sequence_multipliers(
    params: Sequence[Sequence[LSTMParams]],
    x: jax.Array,
    state0: tuple[jax.Array, jax.Array],
    x_ref: jax.Array,
    state0_ref: tuple[jax.Array, jax.Array],
    m_out: tuple[jax.Array, jax.Array, jax.Array],
):
    """Exact DeepLIFT multipliers of the inputs of a whole ``nn.LSTM`` stack.

    Args:
      params: ``params[l][d]`` :class:`LSTMParams`.
      x, x_ref: ``(T, I)``.
      state0, state0_ref: ``(h0 (L*D, P), c0 (L*D, H))`` and its reference.
      m_out: ``(m_out (T, D*P), m_hn (L*D, P), m_cn (L*D, H))``: multipliers of the
        outputs ``out``, ``h_n`` and ``c_n``.

    Returns:
      ``(m_x (T, I), (m_h0 (L*D, P), m_c0 (L*D, H)))``.
    """
    return _sequence_multipliers(
        _LSTM, params, x, _pair("state0", state0, 2), x_ref, _pair("state0_ref", state0_ref, 2),
        _pair("m_out", m_out, 3),
    )


# --------------------------------------------------------------------------- GRU


def gru_sequence(params: Sequence[Sequence[GRUParams]], x: jax.Array, state0: tuple[jax.Array]):
    """Forward of a whole ``nn.GRU`` stack for one example.

    Args:
      params: ``params[l][d]`` :class:`GRUParams`.  x: ``(T, I)``.
      state0: ``(h0,)``, ``h0`` ``(L*D, H)``.

    Returns:
      ``(out (T, D*H), (h_n (L*D, H),))``.
    """
    return _sequence(_GRU, params, x, _pair("state0", state0, 1))


def gru_sequence_multipliers(
    params: Sequence[Sequence[GRUParams]], x: jax.Array, state0: tuple[jax.Array],
    x_ref: jax.Array, state0_ref: tuple[jax.Array], m_out: tuple[jax.Array, jax.Array],
):
    """Exact DeepLIFT multipliers of the inputs of a whole ``nn.GRU`` stack.

    Args:
      params: ``params[l][d]`` :class:`GRUParams`.  x, x_ref: ``(T, I)``.
      state0, state0_ref: ``(h0,)``, ``(h0_ref,)``, ``(L*D, H)`` each.
      m_out: ``(m_out (T, D*H), m_hn (L*D, H))``.

    Returns:
      ``(m_x (T, I), (m_h0 (L*D, H),))``.
    """
    return _sequence_multipliers(
        _GRU, params, x, _pair("state0", state0, 1), x_ref, _pair("state0_ref", state0_ref, 1),
        _pair("m_out", m_out, 2),
    )


# --------------------------------------------------------------------------- RNN


def rnn_sequence(
    params: Sequence[Sequence[RNNParams]], x: jax.Array, state0: tuple[jax.Array],
    nonlinearity: RNNNonlinearity = "tanh",
):
    """Forward of a whole ``nn.RNN`` stack for one example.

    Args:
      params: ``params[l][d]`` :class:`RNNParams`.  x: ``(T, I)``.
      state0: ``(h0,)``, ``h0`` ``(L*D, H)``.
      nonlinearity: ``"tanh"`` or ``"relu"`` (static, every layer).

    Returns:
      ``(out (T, D*H), (h_n (L*D, H),))``.
    """
    return _sequence(_rnn_kind(nonlinearity), params, x, _pair("state0", state0, 1))


def rnn_sequence_multipliers(
    params: Sequence[Sequence[RNNParams]], x: jax.Array, state0: tuple[jax.Array],
    x_ref: jax.Array, state0_ref: tuple[jax.Array], m_out: tuple[jax.Array, jax.Array],
    nonlinearity: RNNNonlinearity = "tanh",
):
    """Exact DeepLIFT multipliers of the inputs of a whole ``nn.RNN`` stack.

    Args:
      params: ``params[l][d]`` :class:`RNNParams`.  x, x_ref: ``(T, I)``.
      state0, state0_ref: ``(h0,)``, ``(h0_ref,)``, ``(L*D, H)`` each.
      m_out: ``(m_out (T, D*H), m_hn (L*D, H))``.
      nonlinearity: ``"tanh"`` or ``"relu"`` (static).

    Returns:
      ``(m_x (T, I), (m_h0 (L*D, H),))``.
    """
    return _sequence_multipliers(
        _rnn_kind(nonlinearity), params, x, _pair("state0", state0, 1), x_ref,
        _pair("state0_ref", state0_ref, 1), _pair("m_out", m_out, 2),
    )


# --------------------------------------------------------------------------- batched

_NL = ("nonlinearity",)

batched_lstm_sequence = batched(
    lstm_sequence, ("x", "state0"),
    doc="``jit(vmap(lstm_sequence))``, batch first: x ``(B, T, I)``, state0 "
    "``(h0 (B, L*D, P), c0 (B, L*D, H))`` -> ``(out (B, T, D*P), (h_n, c_n))``.",
)
batched_lstm_sequence_multipliers = batched(
    lstm_sequence_multipliers, ("x", "state0", "x_ref", "state0_ref", "m_out"),
    doc="``jit(vmap(lstm_sequence_multipliers))``, batch first: x ``(B, T, I)``, "
    "state0 ``((B, L*D, P), (B, L*D, H))``, m_out ``((B, T, D*P), (B, L*D, P), "
    "(B, L*D, H))`` -> ``(m_x (B, T, I), (m_h0, m_c0))``.",
)
batched_gru_sequence = batched(
    gru_sequence, ("x", "state0"),
    doc="``jit(vmap(gru_sequence))``, batch first: x ``(B, T, I)``, state0 ``((B, L*D, H),)`` "
    "-> ``(out (B, T, D*H), (h_n (B, L*D, H),))``.",
)
batched_gru_sequence_multipliers = batched(
    gru_sequence_multipliers, ("x", "state0", "x_ref", "state0_ref", "m_out"),
    doc="``jit(vmap(gru_sequence_multipliers))``, batch first; m_out "
    "``((B, T, D*H), (B, L*D, H))`` -> ``(m_x (B, T, I), (m_h0 (B, L*D, H),))``.",
)
batched_rnn_sequence = batched(
    rnn_sequence, ("x", "state0"), static_argnames=_NL,
    doc="``jit(vmap(rnn_sequence))``, batch first, as :data:`batched_gru_sequence`; "
    "``nonlinearity=`` keyword (static).",
)
batched_rnn_sequence_multipliers = batched(
    rnn_sequence_multipliers, ("x", "state0", "x_ref", "state0_ref", "m_out"), static_argnames=_NL,
    doc="``jit(vmap(rnn_sequence_multipliers))``, batch first, as "
    ":data:`batched_gru_sequence_multipliers`; ``nonlinearity=`` keyword (static).",
)
