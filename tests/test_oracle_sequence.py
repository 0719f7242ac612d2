"""Sequence oracles (nn.LSTM / nn.GRU / nn.RNN stacks): the forward against numpy hand
loops, exact summation over whole sequences, and the scan backward against plain Python
loops over an independent numpy version of the rule. No torch here either.

The oracle is called through its exported ``batched_*`` functions (batch first), so these
tests check them too; ``test_single_step_sequence_is_the_cell`` calls the per-example
form."""

from __future__ import annotations

import functools
import zlib
from typing import NamedTuple

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_jax as rj

RTOL = 1e-12
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class Config(NamedTuple):
    kind: str  # "lstm", "gru", "rnn_tanh", "rnn_relu"
    layers: int
    directions: int
    inputs: int
    hidden: int
    proj: int | None  # LSTM only
    bias: bool
    steps: int


CONFIGS = {
    "lstm-1x1": Config("lstm", 1, 1, 3, 4, None, True, 5),
    "lstm-2x2-proj": Config("lstm", 2, 2, 3, 4, 2, True, 4),
    "lstm-3x2-nobias": Config("lstm", 3, 2, 2, 3, None, False, 3),
    "gru-1x1": Config("gru", 1, 1, 3, 4, None, True, 5),
    "gru-2x2-nobias": Config("gru", 2, 2, 2, 3, None, False, 4),
    "rnn_tanh-2x2": Config("rnn_tanh", 2, 2, 3, 4, None, True, 4),
    "rnn_relu-3x1-nobias": Config("rnn_relu", 3, 1, 2, 3, None, False, 5),
}
BATCH = 3


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


# --------------------------------------------------------------------------- data


def _gates(kind):
    return {"lstm": 4, "gru": 3}.get(kind, 1)


def make_params(rng, cfg: Config):
    g, h = _gates(cfg.kind), cfg.hidden
    p = cfg.proj or h
    params = []
    for layer in range(cfg.layers):
        in_dim = cfg.inputs if layer == 0 else cfg.directions * p
        row = []
        for _ in range(cfg.directions):
            arrays = [rng.normal(size=(g * h, in_dim)), rng.normal(size=(g * h, p))]
            arrays += [rng.normal(size=g * h) if cfg.bias else np.zeros(g * h) for _ in "ih"]
            if cfg.kind == "lstm":
                row.append(rj.LSTMParams(*arrays, None if cfg.proj is None
                                         else rng.normal(size=(cfg.proj, h))))
            elif cfg.kind == "gru":
                row.append(rj.GRUParams(*arrays))
            else:
                row.append(rj.RNNParams(*arrays))
        params.append(row)
    return params


def make_data(rng, cfg: Config, batch=BATCH, regime="random"):
    """Batch-first (x, states, x_ref, states_ref, m_out); states is a tuple."""
    ld, p = cfg.layers * cfg.directions, cfg.proj or cfg.hidden
    sizes = (p, cfg.hidden) if cfg.kind == "lstm" else (p,)
    x = rng.normal(size=(batch, cfg.steps, cfg.inputs))
    states = tuple(rng.normal(size=(batch, ld, s)) for s in sizes)
    if regime == "equal":
        x_ref, states_ref = x.copy(), tuple(s.copy() for s in states)
    elif regime == "zero":
        x_ref, states_ref = np.zeros_like(x), tuple(np.zeros_like(s) for s in states)
    else:
        x_ref = rng.normal(size=x.shape)
        states_ref = tuple(rng.normal(size=s.shape) for s in states)
    m_out = (rng.normal(size=(batch, cfg.steps, cfg.directions * p)),) + tuple(
        rng.normal(size=(batch, ld, s)) for s in sizes
    )
    return x, states, x_ref, states_ref, m_out


# --------------------------------------------------------------------------- numpy loops


def _sig(v):
    return 1 / (1 + np.exp(-v))


def np_lstm_cell(p, x, state):
    h, c = state
    z = p.w_ih @ x + p.b_ih + p.w_hh @ h + p.b_hh
    zi, zf, zg, zo = np.split(z, 4)
    c1 = _sig(zf) * c + _sig(zi) * np.tanh(zg)
    h1 = _sig(zo) * np.tanh(c1)
    return (h1 if p.w_hr is None else p.w_hr @ h1, c1)


def np_gru_cell(p, x, state):
    (h,) = state
    xr, xz, xn = np.split(p.w_ih @ x + p.b_ih, 3)
    hr, hz, hn = np.split(p.w_hh @ h + p.b_hh, 3)
    r, z = _sig(xr + hr), _sig(xz + hz)
    n = np.tanh(xn + r * hn)
    return ((1 - z) * n + z * h,)


def np_rnn_cell(p, x, state, relu=False):
    a = p.w_ih @ x + p.b_ih + p.w_hh @ state[0] + p.b_hh
    return (np.maximum(a, 0) if relu else np.tanh(a),)


NP_CELLS = {
    "lstm": np_lstm_cell,
    "gru": np_gru_cell,
    "rnn_tanh": np_rnn_cell,
    "rnn_relu": functools.partial(np_rnn_cell, relu=True),
}


def np_stack(kind, params, x, states):
    """Plain loops, torch semantics. x (T, I); states tuple of (L*D, .)."""
    cell = NP_CELLS[kind]
    n_dir = len(params[0])
    finals = [None] * (len(params) * n_dir)
    layer_in = x
    for layer, row in enumerate(params):
        outs = []
        for d, p in enumerate(row):
            s = tuple(a[layer * n_dir + d] for a in states)
            out = [None] * x.shape[0]
            for t in range(x.shape[0]) if d == 0 else reversed(range(x.shape[0])):
                s = cell(p, layer_in[t], s)
                out[t] = s[0]
            finals[layer * n_dir + d] = s
            outs.append(np.stack(out))
        layer_in = np.concatenate(outs, axis=-1)
    return layer_in, tuple(np.stack(parts) for parts in zip(*finals, strict=True))


# --------------------------------------------------------------------------- oracle calls


def _nl(kind):
    return {"rnn_tanh": "tanh", "rnn_relu": "relu"}.get(kind)


def _forward_fn(kind):
    """The exported batched forward, (params, x, states) -> (out, states tuple): one
    signature for every kind (RNN adds its nonlinearity)."""
    if kind == "lstm":
        return rj.batched_lstm_sequence
    if kind == "gru":
        return rj.batched_gru_sequence
    return functools.partial(rj.batched_rnn_sequence, nonlinearity=_nl(kind))


def _multipliers_fn(kind):
    """The exported batched multipliers, (params, x, s, x_ref, s_ref, m_out) ->
    (m_x, m_states tuple)."""
    if kind == "lstm":
        return rj.batched_lstm_sequence_multipliers
    if kind == "gru":
        return rj.batched_gru_sequence_multipliers
    return functools.partial(rj.batched_rnn_sequence_multipliers, nonlinearity=_nl(kind))


def _run(cfg, params, data):
    x, states, x_ref, states_ref, m_out = data
    fwd = _forward_fn(cfg.kind)
    out_a, fin_a = fwd(params, x, states)
    out_r, fin_r = fwd(params, x_ref, states_ref)
    m_x, m_states = _multipliers_fn(cfg.kind)(params, x, states, x_ref, states_ref, m_out)
    return (out_a, fin_a), (out_r, fin_r), (m_x, m_states)


def _dot_delta(m, a, r):
    m, a, r = (np.asarray(v) for v in (m, a, r))
    axes = tuple(range(1, m.ndim))
    return (m * (a - r)).sum(axes), (np.abs(m) * (np.abs(a) + np.abs(r))).sum(axes)


def _check_summation(cfg, data, fwd_a, fwd_r, mults):
    x, states, x_ref, states_ref, m_out = data
    (out_a, fin_a), (out_r, fin_r), (m_x, m_states) = fwd_a, fwd_r, mults
    lhs, scale = _dot_delta(m_x, x, x_ref)
    for m, a, r in zip(m_states, states, states_ref, strict=True):
        d, s = _dot_delta(m, a, r)
        lhs, scale = lhs + d, scale + s
    rhs, s = _dot_delta(m_out[0], out_a, out_r)
    scale = scale + s
    for m, a, r in zip(m_out[1:], fin_a, fin_r, strict=True):
        d, s = _dot_delta(m, a, r)
        rhs, scale = rhs + d, scale + s
    err = np.abs(lhs - rhs)
    assert np.all(err <= RTOL * scale), (cfg, err, scale)
    return err / scale


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_numpy_loops(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(_seed(name))
    params = make_params(rng, cfg)
    x, states, *_ = make_data(rng, cfg)
    out, fin = _forward_fn(cfg.kind)(params, x, states)
    for b in range(BATCH):
        want_out, want_fin = np_stack(cfg.kind, params, x[b], tuple(s[b] for s in states))
        np.testing.assert_allclose(np.asarray(out)[b], want_out, rtol=1e-12, atol=1e-13)
        for g, w in zip(fin, want_fin, strict=True):
            np.testing.assert_allclose(np.asarray(g)[b], w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("regime", ["random", "zero", "equal"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequence_summation(name, regime):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(_seed(name, regime))
    params = make_params(rng, cfg)
    data = make_data(rng, cfg, regime=regime)
    fwd_a, fwd_r, mults = _run(cfg, params, data)
    _check_summation(cfg, data, fwd_a, fwd_r, mults)
    if regime == "equal":
        m_x, m_states = mults
        assert np.all(np.asarray(m_x) * (data[0] - data[2]) == 0)


@settings(max_examples=16, deadline=None)
@given(name=st.sampled_from(list(CONFIGS)), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_sequence_summation_random(name, seed, scale):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda a: a * scale, make_params(rng, cfg))
    data = make_data(rng, cfg)
    _check_summation(cfg, data, *_run(cfg, params, data))


# ---- the scan backward against plain loops over an independent numpy version of the rule


def np_rescale(fn, d1, z_a, z_r):
    """Rescale factor, numpy: the quotient, or φ'(midpoint) where |Δz| < 1e-6 (error
    below 1e-13 there, far inside these tests' tolerance)."""
    dz = z_a - z_r
    small = np.abs(dz) < 1e-6
    return np.where(small, d1((z_a + z_r) / 2), (fn(z_a) - fn(z_r)) / np.where(small, 1, dz))


def _np_d1_sig(z):
    return _sig(z) * _sig(-z)


def _np_d1_tanh(z):
    return 1 / np.cosh(z) ** 2


R_SIG = functools.partial(np_rescale, _sig, _np_d1_sig)
R_TANH = functools.partial(np_rescale, np.tanh, _np_d1_tanh)
R_RELU = functools.partial(np_rescale, lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0)


def _mean(a, r):
    return (a + r) / 2


def np_lstm_mult(p, x, s, xr, sr, m):
    za = np.split(p.w_ih @ x + p.b_ih + p.w_hh @ s[0] + p.b_hh, 4)
    zr = np.split(p.w_ih @ xr + p.b_ih + p.w_hh @ sr[0] + p.b_hh, 4)
    (ia, fa, ga, oa), (ir, fr, gr, or_) = ([_sig(z[0]), _sig(z[1]), np.tanh(z[2]),
                                            _sig(z[3])] for z in (za, zr))
    c1a, c1r = fa * s[1] + ia * ga, fr * sr[1] + ir * gr
    m_p = m[0] if p.w_hr is None else p.w_hr.T @ m[0]
    m_o, m_t = m_p * _mean(np.tanh(c1a), np.tanh(c1r)), m_p * _mean(oa, or_)
    m_c1 = m[1] + m_t * R_TANH(c1a, c1r)
    m_z = np.concatenate([
        m_c1 * _mean(ga, gr) * R_SIG(za[0], zr[0]),
        m_c1 * _mean(s[1], sr[1]) * R_SIG(za[1], zr[1]),
        m_c1 * _mean(ia, ir) * R_TANH(za[2], zr[2]),
        m_o * R_SIG(za[3], zr[3]),
    ])
    return p.w_ih.T @ m_z, (p.w_hh.T @ m_z, m_c1 * _mean(fa, fr))


def np_gru_mult(p, x, s, xr, sr, m):
    def parts(x, h):
        gx, gh = np.split(p.w_ih @ x + p.b_ih, 3), np.split(p.w_hh @ h + p.b_hh, 3)
        a_r, a_z = gx[0] + gh[0], gx[1] + gh[1]
        a_n = gx[2] + _sig(a_r) * gh[2]
        return a_r, a_z, a_n, gh[2]

    (ar_a, az_a, an_a, hn_a), (ar_r, az_r, an_r, hn_r) = parts(x, s[0]), parts(xr, sr[0])
    za, zr = _sig(az_a), _sig(az_r)
    m_u, m_n = m[0] * _mean(np.tanh(an_a), np.tanh(an_r)), m[0] * _mean(1 - za, 1 - zr)
    m_z = m[0] * _mean(s[0], sr[0]) - m_u
    m_an = m_n * R_TANH(an_a, an_r)
    m_ar = m_an * _mean(hn_a, hn_r) * R_SIG(ar_a, ar_r)
    m_hn = m_an * _mean(_sig(ar_a), _sig(ar_r))
    m_az = m_z * R_SIG(az_a, az_r)
    m_x = p.w_ih.T @ np.concatenate([m_ar, m_az, m_an])
    m_h = p.w_hh.T @ np.concatenate([m_ar, m_az, m_hn]) + m[0] * _mean(za, zr)
    return m_x, (m_h,)


def np_rnn_mult(p, x, s, xr, sr, m, relu=False):
    a = p.w_ih @ x + p.b_ih + p.w_hh @ s[0] + p.b_hh
    a_r = p.w_ih @ xr + p.b_ih + p.w_hh @ sr[0] + p.b_hh
    m_a = m[0] * (R_RELU if relu else R_TANH)(a, a_r)
    return p.w_ih.T @ m_a, (p.w_hh.T @ m_a,)


NP_MULTS = {
    "lstm": np_lstm_mult,
    "gru": np_gru_mult,
    "rnn_tanh": np_rnn_mult,
    "rnn_relu": functools.partial(np_rnn_mult, relu=True),
}


def loop_multipliers(kind, params, x, states, x_ref, states_ref, m_out):
    """Backward through the stack with Python loops over layers, directions and time."""
    step, step_mult = NP_CELLS[kind], NP_MULTS[kind]
    n_dir, n_t = len(params[0]), x.shape[0]
    # forward, keeping every layer input and every incoming state
    inputs, incoming = [[], []], [{}, {}]
    for side, (xs, st0) in enumerate(((x, states), (x_ref, states_ref))):
        layer_in = xs
        for layer, row in enumerate(params):
            inputs[side].append(layer_in)
            outs = []
            for d, p in enumerate(row):
                s = tuple(a[layer * n_dir + d] for a in st0)
                out = [None] * n_t
                for t in range(n_t) if d == 0 else reversed(range(n_t)):
                    incoming[side][layer, d, t] = s
                    s = step(p, layer_in[t], s)
                    out[t] = s[0]
                outs.append(np.stack(out))
            layer_in = np.concatenate(outs, axis=-1)
    # backward: layers from the top, each direction against its own time order
    m_top, m_fin = m_out[0], m_out[1:]
    m_init = [None] * (len(params) * n_dir)
    for layer in reversed(range(len(params))):
        m_in = np.zeros_like(inputs[0][layer])
        for d, p in enumerate(params[layer]):
            idx = layer * n_dir + d
            width = m_fin[0].shape[-1]
            m_s = tuple(a[idx] for a in m_fin)
            for t in reversed(range(n_t)) if d == 0 else range(n_t):
                m_s = (m_s[0] + m_top[t, d * width:(d + 1) * width], *m_s[1:])
                m_x_t, m_s = step_mult(p, inputs[0][layer][t], incoming[0][layer, d, t],
                                       inputs[1][layer][t], incoming[1][layer, d, t], m_s)
                m_in[t] += m_x_t
            m_init[idx] = m_s
        m_top = m_in
    return m_top, tuple(np.stack([s[i] for s in m_init]) for i in range(len(m_init[0])))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scan_backward_matches_numpy_loops(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(_seed(name, 1))
    params = make_params(rng, cfg)
    data = make_data(rng, cfg)
    _, _, (m_x, m_states) = _run(cfg, params, data)
    for b in range(BATCH):
        x, states, x_ref, states_ref, m_out = (
            jax.tree_util.tree_map(lambda a, b=b: a[b], d) for d in data
        )
        want_x, want_states = loop_multipliers(cfg.kind, params, x, states, x_ref,
                                               states_ref, m_out)
        np.testing.assert_allclose(np.asarray(m_x)[b], want_x, rtol=1e-10, atol=1e-12)
        for g, w in zip(m_states, want_states, strict=True):
            np.testing.assert_allclose(np.asarray(g)[b], w, rtol=1e-10, atol=1e-12)


def test_single_step_sequence_is_the_cell():
    cfg = Config("lstm", 1, 1, 3, 4, 2, True, 1)
    rng = np.random.default_rng(5)
    params = make_params(rng, cfg)
    x, (h0, c0), xr, (h0r, c0r), (m_o, m_hn, m_cn) = (
        jax.tree_util.tree_map(lambda a: a[0], d) for d in make_data(rng, cfg, batch=1)
    )
    m_x, (m_h0, m_c0) = _jit(rj.lstm_sequence_multipliers)(
        params, x, (h0, c0), xr, (h0r, c0r), (m_o, m_hn, m_cn))
    c_x, (c_h, c_c) = _jit(rj.lstm_cell_multipliers)(
        params[0][0], x[0], (h0[0], c0[0]), xr[0], (h0r[0], c0r[0]), (m_o[0] + m_hn[0], m_cn[0]))
    np.testing.assert_allclose(np.asarray(m_x)[0], np.asarray(c_x), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.asarray(m_h0)[0], np.asarray(c_h), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.asarray(m_c0)[0], np.asarray(c_c), rtol=1e-13, atol=1e-15)


def test_sequence_argument_errors():
    rng = np.random.default_rng(0)
    cfg = CONFIGS["lstm-2x2-proj"]
    params = make_params(rng, cfg)
    x = np.zeros((4, 3))
    h0, c0 = np.zeros((4, 2)), np.zeros((4, 4))
    with pytest.raises(AssertionError, match=r"h0 must have shape \(L\*D, P\)=\(4, 2\)"):
        rj.lstm_sequence(params, x, (np.zeros((2, 2)), c0))
    with pytest.raises(AssertionError, match=r"x must have shape \(T, I\)=\(4, 3\)"):
        rj.lstm_sequence(params, np.zeros((4, 5)), (h0, c0))
    bad = [params[0], [params[1][0]]]
    with pytest.raises(ValueError, match=r"params\[1\] must have D=2 directions"):
        rj.lstm_sequence(bad, x, (h0, c0))
    bad = [params[0], [params[0][0], params[0][1]]]
    with pytest.raises(AssertionError, match=r"params\[1\]\[0\].w_ih must have 4 input "
                                             r"columns"):
        rj.lstm_sequence(bad, x, (h0, c0))
    with pytest.raises(AssertionError, match=r"m_out must have shape \(T, D\*P\)=\(4, 4\)"):
        rj.lstm_sequence_multipliers(params, x, (h0, c0), x, (h0, c0),
                                     (np.zeros((4, 2)), h0, c0))
    with pytest.raises(TypeError, match=r"params must be a non-empty list"):
        rj.gru_sequence(params[0][0], x, (h0,))
