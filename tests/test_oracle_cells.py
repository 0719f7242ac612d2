"""Single-cell oracle: per-unit summation-to-delta, multiplier/table consistency,
Shapley axioms of the cell tables, a hand-computed 1x1 LSTM, and argument checks.

Many random cells per jit call: the cell functions are vmapped over params AND data here,
so every shape compiles once. Tolerances are relative to the magnitude of the quantities
the rounding acts on (see ``_check_rows``).
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_jax as rj

RTOL = 1e-12
# The checks run tiny graphs once per shape: compile time dominates, so skip LLVM's
# optimisation passes (numerics are IEEE either way).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
REGIMES = ("normal", "saturated", "zero_bias", "equal", "single", "tiny", "zero_ref")
LSTM_SHAPES = ((1, 1, None), (3, 5, None), (8, 8, 3))
GRU_SHAPES = ((1, 1), (3, 2), (8, 8))
RNN_SHAPES = ((1, 1), (4, 3), (8, 8))
N_CELLS = 12  # cells per jit call

# Everything about a batch of cells in one jit(vmap) over params AND data: one compile
# per shape (XLA shares the common subexpressions).


def _lstm_all_one(params, x, s, xr, sr, m_out):
    return (rj.lstm_cell(params, x, s), rj.lstm_cell(params, xr, sr),
            rj.lstm_cell_multiplier_tables(params, x, s, xr, sr),
            rj.lstm_cell_contributions(params, x, s, xr, sr),
            rj.lstm_cell_multipliers(params, x, s, xr, sr, m_out))


# GRU and RNN cells share the LSTM signature with 1-tuples; these helpers unwrap them so the
# checks below can treat h and m_h1 as plain arrays.
def _gru_all_one(params, x, h, xr, hr, m_h1):
    (h1,), (h1r,) = rj.gru_cell(params, x, (h,)), rj.gru_cell(params, xr, (hr,))
    m_x, (m_h,) = rj.gru_cell_multipliers(params, x, (h,), xr, (hr,), (m_h1,))
    return (h1, h1r, rj.gru_cell_multiplier_tables(params, x, (h,), xr, (hr,)),
            rj.gru_cell_contributions(params, x, (h,), xr, (hr,)), (m_x, m_h))


def _rnn_all_one(params, x, h, xr, hr, m_h1, nonlinearity):
    kw = dict(nonlinearity=nonlinearity)
    (h1,), (h1r,) = rj.rnn_cell(params, x, (h,), **kw), rj.rnn_cell(params, xr, (hr,), **kw)
    m_x, (m_h,) = rj.rnn_cell_multipliers(params, x, (h,), xr, (hr,), (m_h1,), **kw)
    return (h1, h1r, rj.rnn_cell_multiplier_tables(params, x, (h,), xr, (hr,), **kw),
            rj.rnn_cell_contributions(params, x, (h,), xr, (hr,), **kw), (m_x, m_h))


_lstm_all = _jit(jax.vmap(_lstm_all_one))
_gru_all = _jit(jax.vmap(_gru_all_one))
_rnn_all = {
    nl: _jit(jax.vmap(functools.partial(_rnn_all_one, nonlinearity=nl)))
    for nl in ("tanh", "relu")
}


# --------------------------------------------------------------------------- data


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _scale(regime):
    return (8.0, 4.0) if regime == "saturated" else (1.0, 1.0)


def _refs(rng, regime, actual, single_index_of=0):
    """References for the arrays in ``actual`` (a list of (n, d) arrays) by regime."""
    if regime == "equal":
        return [a.copy() for a in actual]
    if regime == "tiny":
        return [a + 1e-7 * rng.normal(size=a.shape) for a in actual]
    if regime == "zero_ref":
        return [np.zeros_like(a) for a in actual]
    if regime == "single":  # one feature of actual[single_index_of] differs, nothing else
        refs = [a.copy() for a in actual]
        a = refs[single_index_of]
        cols = rng.integers(0, a.shape[1], size=a.shape[0])
        a[np.arange(a.shape[0]), cols] += rng.normal(size=a.shape[0]) * 2.0
        return refs
    _, xs = _scale(regime)
    return [xs * rng.normal(size=a.shape) for a in actual]


def _bias(rng, regime, shape):
    return np.zeros(shape) if regime == "zero_bias" else rng.normal(size=shape)


def lstm_batch(rng, n, i_dim, h_dim, p_dim, regime):
    ws, xs = _scale(regime)
    p = p_dim or h_dim
    params = rj.LSTMParams(
        ws * rng.normal(size=(n, 4 * h_dim, i_dim)),
        ws * rng.normal(size=(n, 4 * h_dim, p)),
        _bias(rng, regime, (n, 4 * h_dim)),
        _bias(rng, regime, (n, 4 * h_dim)),
        None if p_dim is None else rng.normal(size=(n, p_dim, h_dim)),
    )
    actual = [xs * rng.normal(size=(n, i_dim)), xs * rng.normal(size=(n, p)),
              xs * rng.normal(size=(n, h_dim))]
    return params, actual, _refs(rng, regime, actual)


def gru_batch(rng, n, i_dim, h_dim, regime, gates=3):
    ws, xs = _scale(regime)
    cls = rj.GRUParams if gates == 3 else rj.RNNParams
    params = cls(
        ws * rng.normal(size=(n, gates * h_dim, i_dim)),
        ws * rng.normal(size=(n, gates * h_dim, h_dim)),
        _bias(rng, regime, (n, gates * h_dim)),
        _bias(rng, regime, (n, gates * h_dim)),
    )
    actual = [xs * rng.normal(size=(n, i_dim)), xs * rng.normal(size=(n, h_dim))]
    return params, actual, _refs(rng, regime, actual)


# --------------------------------------------------------------------------- checks


def _check_rows(contribs, mults, actual, refs, out_a, out_r):
    """Rows of the tables sum to Δout, to ``RTOL`` relative.

    The rounding errors of the forward pass (Δout = out_a − out_r itself) and of the
    pre-activations scale with the *values*, not with their differences, so the error is
    measured against ``|out_a| + |out_r| + Σ_j |M_kj| (|a_j| + |r_j|)``; where Δ is not
    tiny this is within a small factor of ``|Δout_k| + Σ_j |C_kj|``.
    """
    total = sum(np.asarray(c).sum(-1) for c in contribs)
    delta = np.asarray(out_a) - np.asarray(out_r)
    scale = np.abs(out_a) + np.abs(out_r)
    for m, a, r in zip(mults, actual, refs, strict=True):
        scale = scale + np.einsum("nkj,nj->nk", np.abs(m), np.abs(a) + np.abs(r))
    err = np.abs(total - delta)
    worst = np.unravel_index(np.argmax(err - RTOL * scale), err.shape)
    assert np.all(err <= RTOL * scale), (
        f"row sum off by {err[worst]:.3g} (scale {scale[worst]:.3g}, Δ {delta[worst]:.3g})"
    )
    return err, delta


def _check_tables_are_m_times_delta(contribs, mults, actual, refs):
    for c, m, a, r in zip(contribs, mults, actual, refs, strict=True):
        np.testing.assert_array_equal(np.asarray(c), np.asarray(m) * (a - r)[:, None, :])


def _check_multipliers(m_ins, m_outs, tables, mults, actual, refs, outs_a, outs_r):
    """m_in * Δin == Σ_k m_out[k] C[k, :] per input element, and Σ m_in Δin == Σ m_out Δout.

    Both forms share the forward values and factors; they differ in how the sums over
    units k and gates are ordered, hence the scale per input element j:
    Σ_k |m_out[k]| |M[k, j]| (|a_j| + |r_j|).
    """
    lhs_total = 0.0
    out_mag = [np.abs(m_o) * (np.abs(np.asarray(oa)) + np.abs(np.asarray(orr)))
               for m_o, oa, orr in zip(m_outs, outs_a, outs_r, strict=True)]
    for i, (m_in, a, r) in enumerate(zip(m_ins, actual, refs, strict=True)):
        per_elem = np.asarray(m_in) * (a - r)
        from_tables = sum(
            np.einsum("nk,nkj->nj", m_o, np.asarray(t[i]))
            for m_o, t in zip(m_outs, tables, strict=True)
        )
        scale = sum(
            np.einsum("nk,nkj->nj", np.abs(m_o), np.abs(np.asarray(m[i])))
            for m_o, m in zip(m_outs, mults, strict=True)
        ) * (np.abs(a) + np.abs(r))
        err = np.abs(per_elem - from_tables)
        assert np.all(err <= RTOL * scale + 1e-300), (
            f"input {i}: m_in*Δin vs tables off by {err.max():.3g}"
        )
        lhs_total = lhs_total + per_elem.sum(-1)
    rhs_total = sum(
        (m_o * (np.asarray(oa) - np.asarray(orr))).sum(-1)
        for m_o, oa, orr in zip(m_outs, outs_a, outs_r, strict=True)
    )
    scale = sum(om.sum(-1) for om in out_mag) + sum(
        (np.abs(np.asarray(m)) * (np.abs(a) + np.abs(r))).sum(-1)
        for m, a, r in zip(m_ins, actual, refs, strict=True)
    )
    err = np.abs(lhs_total - rhs_total)
    assert np.all(err <= RTOL * scale), f"Σ m_in Δin − Σ m_out Δout = {err.max():.3g}"


# --------------------------------------------------------------------------- LSTM


def _lstm_case(seed, shape, regime, n=N_CELLS):
    rng = np.random.default_rng(seed)
    i_dim, h_dim, p_dim = shape
    params, (x, h, c), (xr, hr, cr) = lstm_batch(rng, n, i_dim, h_dim, p_dim, regime)
    m_h1, m_c1 = rng.normal(size=h.shape), rng.normal(size=c.shape)
    (h1, c1), (h1r, c1r), m, ct, (m_x, (m_h, m_c)) = _lstm_all(
        params, x, (h, c), xr, (hr, cr), (m_h1, m_c1)
    )
    actual, refs = [x, h, c], [xr, hr, cr]
    _check_tables_are_m_times_delta(ct, m, actual * 2, refs * 2)
    _check_rows(ct[:3], m[:3], actual, refs, h1, h1r)
    _check_rows(ct[3:], m[3:], actual, refs, c1, c1r)
    # c1 does not depend on the other units' c: its c table is diagonal.
    off_diag = np.asarray(ct.c1_c) * (1 - np.eye(h_dim))
    assert np.all(off_diag == 0)
    # multipliers (vector–Jacobian form) against the tables
    _check_multipliers([m_x, m_h, m_c], [m_h1, m_c1], [ct[:3], ct[3:]], [m[:3], m[3:]],
                       actual, refs, [h1, c1], [h1r, c1r])
    if regime == "equal":
        for t in ct:
            assert np.all(np.asarray(t) == 0)


@pytest.mark.parametrize("shape", LSTM_SHAPES)
@pytest.mark.parametrize("regime", REGIMES)
def test_lstm_rows_sum_to_delta_sweep(shape, regime):
    _lstm_case(_seed(shape, regime, "lstm"), shape, regime)


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from(LSTM_SHAPES), regime=st.sampled_from(REGIMES),
       seed=st.integers(0, 2**32 - 1))
def test_lstm_rows_sum_to_delta_random(shape, regime, seed):
    _lstm_case(seed, shape, regime)


def _lstm_tables_for(params, x, h, c, xr, hr, cr):
    n, h_dim = c.shape
    m_out = (np.ones((n, h.shape[1])), np.ones((n, h_dim)))
    _, _, _, ct, (m_x, (m_h, _)) = _lstm_all(params, x, (h, c), xr, (hr, cr), m_out)
    return ct, m_x, m_h


def test_lstm_dummy_column_gives_zero_contribution():
    rng = np.random.default_rng(7)
    params, (x, h, c), (xr, hr, cr) = lstm_batch(rng, N_CELLS, 3, 5, None, "normal")
    w_ih, w_hh = params.w_ih.copy(), params.w_hh.copy()
    w_ih[:, :, 2] = 0.0  # x_2 feeds no gate
    w_hh[:, :, 4] = 0.0  # h_4 feeds no gate
    ct, m_x, m_h = _lstm_tables_for(params._replace(w_ih=w_ih, w_hh=w_hh), x, h, c, xr, hr, cr)
    for t in (ct.h1_x, ct.c1_x):
        assert np.all(np.asarray(t)[:, :, 2] == 0)
    for t in (ct.h1_h, ct.c1_h):
        assert np.all(np.asarray(t)[:, :, 4] == 0)
    assert np.all(np.asarray(m_x)[:, 2] == 0) and np.all(np.asarray(m_h)[:, 4] == 0)


def test_lstm_symmetric_inputs_get_equal_contributions():
    """Two inputs with identical weight columns and identical (actual, reference) values
    are interchangeable players: they get identical contributions in every row."""
    rng = np.random.default_rng(11)
    params, (x, h, c), (xr, hr, cr) = lstm_batch(rng, N_CELLS, 8, 8, 3, "normal")
    w_ih = params.w_ih.copy()
    w_ih[:, :, 3] = w_ih[:, :, 1]
    x, xr = x.copy(), xr.copy()
    x[:, 3], xr[:, 3] = x[:, 1], xr[:, 1]
    ct, _, _ = _lstm_tables_for(params._replace(w_ih=w_ih), x, h, c, xr, hr, cr)
    for t in (ct.h1_x, ct.c1_x):
        np.testing.assert_array_equal(np.asarray(t)[:, :, 3], np.asarray(t)[:, :, 1])


def test_lstm_batched_api_matches_per_example():
    """The exported jit(vmap) forms (params shared) agree with per-example calls."""
    rng = np.random.default_rng(3)
    params, (x, h, c), (xr, hr, cr) = lstm_batch(rng, N_CELLS, 8, 8, 3, "normal")
    p0 = rj.LSTMParams(*(a[0] for a in params))
    shared = rj.LSTMParams(*(np.broadcast_to(a, (N_CELLS, *a.shape)) for a in p0))
    m_out = (rng.normal(size=h.shape), rng.normal(size=c.shape))
    (h1, c1), _, _, ct, (m_x, (m_h, m_c)) = _lstm_all(shared, x, (h, c), xr, (hr, cr), m_out)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-12, atol=1e-14)
    got_h1, got_c1 = rj.batched_lstm_cell(p0, x, (h, c))
    close(got_h1, h1)
    close(got_c1, c1)
    for g, w in zip(rj.batched_lstm_cell_contributions(p0, x, (h, c), xr, (hr, cr)), ct,
                    strict=True):
        close(g, w)
    got_x, (got_h, got_c) = rj.batched_lstm_cell_multipliers(p0, x, (h, c), xr, (hr, cr), m_out)
    close(got_x, m_x)
    close(got_h, m_h)
    close(got_c, m_c)


def test_gru_and_rnn_batched_api_match_per_example():
    rng = np.random.default_rng(4)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-12, atol=1e-14)
    for gates, shape, all_fn, batched_fn, extra in (
        (3, GRU_SHAPES[1], _gru_all, rj.batched_gru_cell_multipliers, ()),
        (1, RNN_SHAPES[1], _rnn_all["relu"], rj.batched_rnn_cell_multipliers, ("relu",)),
    ):
        params, (x, h), (xr, hr) = gru_batch(rng, N_CELLS, *shape, "normal", gates=gates)
        p0 = type(params)(*(a[0] for a in params))
        shared = type(params)(*(np.broadcast_to(a, (N_CELLS, *a.shape)) for a in p0))
        m_h1 = rng.normal(size=h.shape)
        *_, (m_x, m_h) = all_fn(shared, x, h, xr, hr, m_h1)
        got_x, (got_h,) = batched_fn(p0, x, (h,), xr, (hr,), (m_h1,), *extra)  # nonlinearity by position
        close(got_x, m_x)
        close(got_h, m_h)


# --------------------------------------------------------------------------- hand-computed


def _tile(*trees):
    """One cell repeated N_CELLS times (reuses the checkers compiled per shape)."""
    return jax.tree_util.tree_map(lambda a: np.broadcast_to(a, (N_CELLS, *np.shape(a))),
                                  trees)


def _first(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[0], tree)


def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_lstm_one_by_one_by_hand():
    """I = H = 1: every step of the rule written out with math.exp, no oracle code."""
    wi, wf, wg, wo = 0.7, -1.3, 0.9, 0.4  # W_ih rows (gates i, f, g, o)
    ui, uf, ug, uo = -0.5, 0.8, 1.1, -0.6  # W_hh rows
    bi, bf, bg, bo = 0.1, 0.3, -0.2, 0.05  # b_ih + b_hh (split 0.6 / 0.4 below)
    x, h, c = 1.5, -0.4, 0.8
    xr, hr, cr = -0.2, 0.3, -0.5

    def forward(x, h, c):
        zi, zf, zg, zo = wi * x + ui * h + bi, wf * x + uf * h + bf, wg * x + ug * h + bg, \
            wo * x + uo * h + bo
        i, f, g, o = _sig(zi), _sig(zf), math.tanh(zg), _sig(zo)
        c1 = f * c + i * g
        return (zi, zf, zg, zo), (i, f, g, o), c1, o * math.tanh(c1)

    (zi, zf, zg, zo), (i, f, g, o), c1, h1 = forward(x, h, c)
    (zir, zfr, zgr, zor), (ir, fr, gr, or_), c1r, h1r = forward(xr, hr, cr)
    # Rescale factors: Δφ / Δz (all Δz here are far above the threshold)
    r_i, r_f, r_g, r_o = (i - ir) / (zi - zir), (f - fr) / (zf - zfr), (g - gr) / (zg - zgr), \
        (o - or_) / (zo - zor)
    r_c = (math.tanh(c1) - math.tanh(c1r)) / (c1 - c1r)
    # output h1 = o * tanh(c1): Shapley product of o and t = tanh(c1)
    m_o = (math.tanh(c1) + math.tanh(c1r)) / 2
    m_c1_from_h = (o + or_) / 2 * r_c
    # c1 = f*c + i*g, with m_c1 = 1 (for the c1 table) or m_c1_from_h (for the h1 table)
    def below_c1(m_c1):
        m_f, m_c = m_c1 * (c + cr) / 2, m_c1 * (f + fr) / 2
        m_i, m_g = m_c1 * (g + gr) / 2, m_c1 * (i + ir) / 2
        return m_i * r_i, m_f * r_f, m_g * r_g, m_c

    mzi, mzf, mzg, mc = below_c1(1.0)
    c1_x = (mzi * wi + mzf * wf + mzg * wg) * (x - xr)
    c1_h = (mzi * ui + mzf * uf + mzg * ug) * (h - hr)
    c1_c = mc * (c - cr)
    mzi, mzf, mzg, mc = below_c1(m_c1_from_h)
    mzo = m_o * r_o
    h1_x = (mzi * wi + mzf * wf + mzg * wg + mzo * wo) * (x - xr)
    h1_h = (mzi * ui + mzf * uf + mzg * ug + mzo * uo) * (h - hr)
    h1_c = mc * (c - cr)
    assert abs(c1_x + c1_h + c1_c - (c1 - c1r)) < 1e-15
    assert abs(h1_x + h1_h + h1_c - (h1 - h1r)) < 1e-15

    b_all = np.array([bi, bf, bg, bo])
    params = rj.LSTMParams(
        np.array([[wi], [wf], [wg], [wo]]), np.array([[ui], [uf], [ug], [uo]]),
        0.6 * b_all, 0.4 * b_all,
    )
    arr = np.array
    # through the vmapped checker compiled for shape (1, 1, None): one cell, tiled
    (h1_o, c1_o), _, _, got, (m_x, (m_h, m_c)) = _first(_lstm_all(*_tile(
        params, arr([x]), (arr([h]), arr([c])), arr([xr]), (arr([hr]), arr([cr])),
        (arr([2.0]), arr([-3.0])),
    )))
    want = dict(h1_x=h1_x, h1_h=h1_h, h1_c=h1_c, c1_x=c1_x, c1_h=c1_h, c1_c=c1_c)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(getattr(got, name)), [[value]], rtol=1e-13,
                                   atol=1e-16, err_msg=name)
    np.testing.assert_allclose([float(h1_o[0]), float(c1_o[0])], [h1, c1], rtol=1e-14)
    # multipliers for m_h1 = 2, m_c1 = -3 equal the same combination of the table entries
    np.testing.assert_allclose(float(m_x[0]) * (x - xr), 2 * h1_x - 3 * c1_x, rtol=1e-13)
    np.testing.assert_allclose(float(m_h[0]) * (h - hr), 2 * h1_h - 3 * c1_h, rtol=1e-13)
    np.testing.assert_allclose(float(m_c[0]) * (c - cr), 2 * h1_c - 3 * c1_c, rtol=1e-13)


def test_gru_one_by_one_by_hand():
    wr, wz, wn = 0.6, -0.9, 1.2
    ur, uz, un = 0.5, 0.7, -0.8
    bir, biz, bin_ = 0.1, -0.2, 0.3
    bhr, bhz, bhn = -0.1, 0.25, 0.4
    x, h, xr, hr = 0.9, -0.7, -0.3, 0.2

    def forward(x, h):
        ar, az = wr * x + bir + ur * h + bhr, wz * x + biz + uz * h + bhz
        r, z = _sig(ar), _sig(az)
        hn = un * h + bhn
        an = wn * x + bin_ + r * hn
        n = math.tanh(an)
        return (ar, az, an), (r, z, hn, n), (1 - z) * n + z * h

    (ar, az, an), (r, z, hn, n), h1 = forward(x, h)
    (arr_, azr, anr), (rr, zr, hnr, nr), h1r = forward(xr, hr)
    m_u, m_n = (n + nr) / 2, ((1 - z) + (1 - zr)) / 2
    m_z = (h + hr) / 2 - m_u
    m_h_direct = (z + zr) / 2
    m_an = m_n * (n - nr) / (an - anr)
    m_r, m_hn = m_an * (hn + hnr) / 2, m_an * (r + rr) / 2
    m_ar, m_az = m_r * (r - rr) / (ar - arr_), m_z * (z - zr) / (az - azr)
    c_x = (m_ar * wr + m_az * wz + m_an * wn) * (x - xr)
    c_h = (m_ar * ur + m_az * uz + m_hn * un + m_h_direct) * (h - hr)
    assert abs(c_x + c_h - (h1 - h1r)) < 1e-15
    params = rj.GRUParams(np.array([[wr], [wz], [wn]]), np.array([[ur], [uz], [un]]),
                          np.array([bir, biz, bin_]), np.array([bhr, bhz, bhn]))
    a = np.array
    _, _, _, got, _ = _first(_gru_all(*_tile(params, a([x]), a([h]), a([xr]), a([hr]),
                                             a([1.0]))))
    np.testing.assert_allclose(np.asarray(got.h1_x), [[c_x]], rtol=1e-13)
    np.testing.assert_allclose(np.asarray(got.h1_h), [[c_h]], rtol=1e-13)


# --------------------------------------------------------------------------- GRU / RNN


def _gru_case(seed, shape, regime):
    rng = np.random.default_rng(seed)
    params, (x, h), (xr, hr) = gru_batch(rng, N_CELLS, *shape, regime)
    m_h1 = rng.normal(size=h.shape)
    h1, h1r, m, ct, (m_x, m_h) = _gru_all(params, x, h, xr, hr, m_h1)
    _check_tables_are_m_times_delta(ct, m, [x, h], [xr, hr])
    _check_rows(ct, m, [x, h], [xr, hr], h1, h1r)
    _check_multipliers([m_x, m_h], [m_h1], [ct], [m], [x, h], [xr, hr], [h1], [h1r])


@pytest.mark.parametrize("shape", GRU_SHAPES)
@pytest.mark.parametrize("regime", REGIMES)
def test_gru_rows_sum_to_delta_sweep(shape, regime):
    _gru_case(_seed(shape, regime, "gru"), shape, regime)


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from(GRU_SHAPES), regime=st.sampled_from(REGIMES),
       seed=st.integers(0, 2**32 - 1))
def test_gru_rows_sum_to_delta_random(shape, regime, seed):
    _gru_case(seed, shape, regime)


def test_gru_dummy_column_gives_zero_contribution():
    rng = np.random.default_rng(5)
    params, (x, h), (xr, hr) = gru_batch(rng, N_CELLS, 3, 2, "normal")
    w_ih = params.w_ih.copy()
    w_ih[:, :, 1] = 0.0
    _, _, _, ct, (m_x, _) = _gru_all(params._replace(w_ih=w_ih), x, h, xr, hr, np.ones_like(h))
    assert np.all(np.asarray(ct.h1_x)[:, :, 1] == 0)
    assert np.all(np.asarray(m_x)[:, 1] == 0)


def _rnn_case(seed, shape, regime, nonlinearity):
    rng = np.random.default_rng(seed)
    params, (x, h), (xr, hr) = gru_batch(rng, N_CELLS, *shape, regime, gates=1)
    m_h1 = rng.normal(size=h.shape)
    h1, h1r, m, ct, (m_x, m_h) = _rnn_all[nonlinearity](params, x, h, xr, hr, m_h1)
    _check_tables_are_m_times_delta(ct, m, [x, h], [xr, hr])
    _check_rows(ct, m, [x, h], [xr, hr], h1, h1r)
    _check_multipliers([m_x, m_h], [m_h1], [ct], [m], [x, h], [xr, hr], [h1], [h1r])


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("shape", RNN_SHAPES)
@pytest.mark.parametrize("regime", REGIMES)
def test_rnn_rows_sum_to_delta_sweep(shape, regime, nonlinearity):
    _rnn_case(_seed(shape, regime, nonlinearity), shape, regime, nonlinearity)


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from(RNN_SHAPES), regime=st.sampled_from(REGIMES),
       nonlinearity=st.sampled_from(["tanh", "relu"]), seed=st.integers(0, 2**32 - 1))
def test_rnn_rows_sum_to_delta_random(shape, regime, nonlinearity, seed):
    _rnn_case(seed, shape, regime, nonlinearity)


def test_rnn_relu_straddling_zero_is_exact():
    """relu with z_a, z_r on both sides of 0 within the smooth-φ threshold: still exact."""
    params = rj.RNNParams(np.array([[1.0]]), np.zeros((1, 1)), np.zeros(1), np.zeros(1))
    for za, zr in ((3e-6, -2e-6), (-1e-9, 4e-9), (1e-300, -1e-300)):
        ct = rj.rnn_cell_contributions(params, np.array([za]), (np.zeros(1),), np.array([zr]),
                                       (np.zeros(1),), nonlinearity="relu")
        want = max(za, 0.0) - max(zr, 0.0)
        np.testing.assert_allclose(float(ct.h1_x[0, 0]), want, rtol=1e-15)


# --------------------------------------------------------------------------- checks


def test_argument_errors_name_the_argument():
    p = rj.LSTMParams(np.zeros((8, 3)), np.zeros((8, 2)), np.zeros(8), np.zeros(8))
    x, h, c = np.zeros(3), np.zeros(2), np.zeros(2)
    with pytest.raises(AssertionError, match=r"x must have shape \(I,\)=\(3,\) to match "
                                             r"params.w_ih, got \(4,\)"):
        rj.lstm_cell_contributions(p, np.zeros(4), (h, c), x, (h, c))
    with pytest.raises(AssertionError, match=r"c_ref must have shape \(H,\)=\(2,\)"):
        rj.lstm_cell_multipliers(p, x, (h, c), x, (h, np.zeros(3)), (h, c))
    with pytest.raises(AssertionError, match=r"m_c1 must have shape"):
        rj.lstm_cell_multipliers(p, x, (h, c), x, (h, c), (h, np.zeros(5)))
    with pytest.raises(AssertionError, match=r"params.w_hh must have shape \(4H, P\)"):
        rj.lstm_cell(p._replace(w_hh=np.zeros((8, 3))), x, (h, c))
    with pytest.raises(AssertionError, match=r"params.w_ih must have 4\*H rows"):
        rj.lstm_cell(p._replace(w_ih=np.zeros((7, 3))), x, (h, c))
    with pytest.raises(AssertionError, match=r"x must have dtype float64"):
        rj.lstm_cell(p, x.astype(np.float32), (h, c))
    with pytest.raises(AssertionError, match=r"h_ref must have shape \(H,\)=\(2,\)"):
        gp = rj.GRUParams(np.zeros((6, 3)), np.zeros((6, 2)), np.zeros(6), np.zeros(6))
        rj.gru_cell_contributions(gp, x, (h,), x, (np.zeros(1),))
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        rp = rj.RNNParams(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros(2), np.zeros(2))
        rj.rnn_cell(rp, x, (h,), nonlinearity="sigmoid")
    with pytest.raises(AssertionError, match=r"state\[0\] must have batch size B=3 \(the "
                                             r"leading axis of x\), got shape \(2, 2\)"):
        rj.batched_lstm_cell_multipliers(p, np.zeros((3, 3)), (np.zeros((2, 2)), np.zeros((2, 2))),
                                    np.zeros((2, 3)), (np.zeros((2, 2)), np.zeros((2, 2))),
                                    (np.zeros((2, 2)), np.zeros((2, 2))))


def test_every_cell_has_one_signature():
    """LSTM, GRU and RNN cells: state and output multipliers are tuples, in the same
    argument positions and under the same names; a bare array where a tuple belongs is an
    error that names the argument."""
    import inspect

    names = {kind: [p for p in inspect.signature(getattr(rj, f"{kind}_cell_multipliers")).parameters
                    if p != "nonlinearity"] for kind in ("lstm", "gru", "rnn")}
    assert names["lstm"] == names["gru"] == names["rnn"] == [
        "params", "x", "state", "x_ref", "state_ref", "m_out"]
    for kind in ("lstm", "gru", "rnn"):
        for fn in ("cell", "cell_contributions", "cell_multiplier_tables"):
            params = list(inspect.signature(getattr(rj, f"{kind}_{fn}")).parameters)
            assert params[:3] == ["params", "x", "state"], (kind, fn, params)
    assert not hasattr(rj, "cell_multipliers") and not hasattr(rj, "batched_cell_multipliers")
    gp = rj.GRUParams(np.zeros((6, 3)), np.zeros((6, 2)), np.zeros(6), np.zeros(6))
    x, h = np.zeros(3), np.zeros(2)
    (h1,) = rj.gru_cell(gp, x, (h,))
    assert h1.shape == (2,)
    with pytest.raises(AssertionError, match=r"state must be a tuple \(h,\), got a ndarray"):
        rj.gru_cell(gp, x, h)
    with pytest.raises(AssertionError, match=r"m_out must be a tuple \(m_h1,\)"):
        rp = rj.RNNParams(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros(2), np.zeros(2))
        rj.rnn_cell_multipliers(rp, x, (h,), x, (h,), h)


def test_float32_cells_run_and_sum():
    rng = np.random.default_rng(0)
    params, (x, h, c), (xr, hr, cr) = lstm_batch(rng, N_CELLS, 3, 5, None, "normal")
    f32 = jax.tree_util.tree_map(lambda a: a.astype(np.float32),
                                 (params, x, (h, c), xr, (hr, cr), (h, c)))
    (h1, _), (h1r, _), _, ct, _ = _lstm_all(*f32)
    assert ct.h1_x.dtype == np.float32 and h1.dtype == np.float32
    total = sum(np.asarray(t).sum(-1) for t in ct[:3])
    np.testing.assert_allclose(total, np.asarray(h1) - np.asarray(h1r), atol=2e-5)
