"""The oracle's op rules (reference_jax.ops): summation to delta for every op, per pair and
per half; binary ops against brute-force two-player Shapley values; composites against the
chain of their primitive rules; multipliers at actual == reference against jax's VJP; the
unary Rescale factors against a 60-digit quotient (tiny Δ included); argument checks.

Each op configuration compiles once (``batched_op_multipliers`` over a fixed batch).
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_jax as rj
from reference_jax import ops

EPS = float(np.finfo(np.float64).eps)
N_PAIRS = 8
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class Config(NamedTuple):
    """One case of the op table, at the shape these tests draw (the case's last)."""

    op: str
    operands: tuple[ops.Operand, ...]
    params: dict
    id: str


CONFIGS = [
    Config(name, case.shapes[-1], case.params, case.id) for name, spec in ops.OP_SPECS.items() for case in spec.cases
]
CONFIG_IDS = [c.id for c in CONFIGS]


def test_every_op_is_configured():
    assert {c.op for c in CONFIGS} == set(ops.OP_RULES)


# --------------------------------------------------------------------------- data


def _draw(rng, operand: ops.Operand, n: int) -> np.ndarray:
    shape = (n, *operand.shape)
    if operand.domain == "positive":
        return rng.uniform(0.2, 4.0, shape)
    if operand.domain == "away_from_zero":
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.3, 3.0, shape)
    if operand.domain == "wide":
        return 4.0 * rng.standard_normal(shape)
    return rng.standard_normal(shape)


def _reference(rng, operand: ops.Operand, actual: np.ndarray, scenario: str) -> np.ndarray:
    """References by scenario: dense, tiny deltas, or equal on about half the elements."""
    if scenario == "tiny":
        scale = rng.choice([1e-13, 1e-9, 1e-6, 1e-4], actual.shape)
        ref = actual * (1.0 + scale * rng.standard_normal(actual.shape))
    else:
        ref = _draw(rng, operand, actual.shape[0])
    if scenario == "some_equal":
        ref = np.where(rng.random(actual.shape) < 0.5, actual, ref)
    return ref


SCENARIOS = ("dense", "tiny", "some_equal")


def _data(config: Config, scenario: str, n: int = N_PAIRS):
    rng = np.random.default_rng(zlib.crc32(f"{config.id}-{scenario}".encode()))
    actual = tuple(_draw(rng, o, n) for o in config.operands)
    reference = tuple(_reference(rng, o, a, scenario) for o, a in zip(config.operands, actual, strict=True))
    out = jax.eval_shape(lambda *xs: ops.OP_FORWARDS[config.op](*xs, **config.params), *(a[0] for a in actual))
    m = rng.standard_normal((2, n, *out.shape))
    return m, actual, reference


@functools.cache
def _forward_batch(op: str, static: tuple):
    static = dict(static)
    return _jit(jax.vmap(lambda xs, arrays: ops.OP_FORWARDS[op](*xs, **static, **arrays), in_axes=(0, None)))


def _forward(config: Config, operands):
    arrays = {k: v for k, v in config.params.items() if isinstance(v, np.ndarray)}
    static = tuple(sorted((k, v) for k, v in config.params.items() if not isinstance(v, np.ndarray)))
    return np.asarray(_forward_batch(config.op, static)(tuple(operands), arrays))


def _multipliers(config: Config, m, actual, reference):
    return ops.batched_op_multipliers(config.op, m, actual, reference, **config.params)


# --------------------------------------------------------------------------- summation


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_summation_to_delta_per_pair_and_half(config, scenario):
    """Σ_k Σ m_k Δ_k == Σ m Δy for every pair and each half of m. The bound is rounding:
    1e-12 of the magnitudes summed, plus the forward's own rounding of Δy (64 eps |y|)."""
    m, actual, reference = _data(config, scenario)
    mults = _multipliers(config, m, actual, reference)
    assert len(mults) == len(actual)
    y_a, y_r = _forward(config, actual), _forward(config, reference)
    dy = y_a - y_r
    for half in range(2):
        for i in range(N_PAIRS):
            terms = [np.asarray(mk[half, i]) * (a[i] - r[i]) for mk, a, r in zip(mults, actual, reference, strict=True)]
            lhs = sum(t.sum() for t in terms)
            rhs = (m[half, i] * dy[i]).sum()
            magnitude = sum(np.abs(t).sum() for t in terms) + np.abs(m[half, i] * dy[i]).sum()
            rounding = 64 * EPS * (np.abs(m[half, i]) * (np.abs(y_a[i]) + np.abs(y_r[i]))).sum()
            assert abs(lhs - rhs) <= 1e-12 * magnitude + rounding, (half, i, lhs, rhs)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_rules_are_linear_in_m_and_shaped_like_operands(config):
    m, actual, reference = _data(config, "dense")
    mults = _multipliers(config, m, actual, reference)
    for mk, a in zip(mults, actual, strict=True):
        assert mk.shape == (2, *a.shape) and mk.dtype == jnp.float64
    twice = _multipliers(config, 2.0 * m[::-1], actual, reference)
    for mk, tk in zip(mults, twice, strict=True):
        want = 2.0 * np.asarray(mk)[::-1]
        assert np.abs(np.asarray(tk) - want).max() <= 1e-14 * np.abs(want).max()


# --------------------------------------------------------------------------- derivative limit


@functools.cache
def _vjp_batch(op: str, static: tuple):
    """jax.vjp of the forward, vmapped over pairs and then over the two halves of m."""
    static = dict(static)

    def one(xs, m, arrays):
        _, vjp = jax.vjp(lambda *ys: ops.OP_FORWARDS[op](*ys, **static, **arrays), *xs)
        return vjp(m)

    per_pair = jax.vmap(one, in_axes=(0, 0, None))
    return _jit(jax.vmap(per_pair, in_axes=(None, 0, None)))


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_multiplier_at_equal_inputs_is_the_vjp(config):
    """actual == reference: every multiplier is the vector–Jacobian product of f (jax.vjp),
    normwise per operand, pair and half."""
    m, actual, _ = _data(config, "dense")
    mults = _multipliers(config, m, actual, actual)
    arrays = {k: v for k, v in config.params.items() if isinstance(v, np.ndarray)}
    static = tuple(sorted((k, v) for k, v in config.params.items() if not isinstance(v, np.ndarray)))
    expected = _vjp_batch(config.op, static)(tuple(actual), m, arrays)
    for k, (got, want) in enumerate(zip(mults, expected, strict=True)):
        got, want = np.asarray(got), np.asarray(want)
        error = np.abs(got - want).reshape(2, N_PAIRS, -1).max(-1)
        scale = np.abs(want).reshape(2, N_PAIRS, -1).max(-1)
        assert (error <= 1e-12 * scale).all(), (k, error.max(), scale.max())


BINARY = tuple(ops.BINARY)


@pytest.mark.parametrize("op", BINARY)
def test_binary_limit_is_the_mean_partial_derivative(op):
    """u_a == u_r, v_a != v_r: m_u = m · ½[∂_u f(u, v_r) + ∂_u f(u, v_a)] (jax.grad)."""
    rng = np.random.default_rng(zlib.crc32(op.encode()))
    u = rng.uniform(0.3, 2.0, 16) if op == "pow" else rng.standard_normal(16)
    signs = 1.0 if op == "pow" else rng.choice([-1.0, 1.0], (2, 16))
    v_a, v_r = rng.uniform(0.3, 2.0, (2, 16)) * signs
    f = ops.OP_FORWARDS[op]
    d_u = jax.vmap(jax.grad(f, argnums=0))
    expected = 0.5 * (np.asarray(d_u(u, v_r)) + np.asarray(d_u(u, v_a)))
    m_u, _ = ops.OP_RULES[op](np.ones(16), (u, v_a), (u, v_r))
    np.testing.assert_allclose(np.asarray(m_u), expected, rtol=1e-13, atol=1e-15)


def test_kink_conventions_follow_torch():
    """At a == r on a kink: relu 0, relu6 0, leaky_relu the slope, clamp 1 at its bounds,
    maximum / minimum ½ on ties (torch's autograd conventions)."""
    zero = np.zeros(1)
    assert float(ops.OP_RULES["relu"](np.ones(1), (zero,), (zero,))[0][0]) == 0.0
    assert float(ops.OP_RULES["relu6"](np.ones(1), (zero + 6,), (zero + 6,))[0][0]) == 0.0
    assert float(ops.OP_RULES["leaky_relu"](np.ones(1), (zero,), (zero,), negative_slope=0.3)[0][0]) == 0.3
    assert float(ops.OP_RULES["clamp"](np.ones(1), (zero + 1,), (zero + 1,), min=-1.0, max=1.0)[0][0]) == 1.0
    m_u, m_v = ops.OP_RULES["maximum"](np.ones(1), (zero, zero), (zero, zero))
    assert float(m_u[0]) == float(m_v[0]) == 0.5


# --------------------------------------------------------------------------- Shapley


def _binary_points(op):
    """(u_a, v_a, u_r, v_r) rows: generic, one side equal, crossing kinks / branch cuts."""
    rng = np.random.default_rng(zlib.crc32(f"shapley-{op}".encode()))
    rows = rng.standard_normal((24, 4))
    if op == "pow":
        rows[:, [0, 2]] = np.abs(rows[:, [0, 2]]) + 0.2
    if op == "div":
        rows[:, [1, 3]] = np.sign(rows[:, [1, 3]]) * (np.abs(rows[:, [1, 3]]) + 0.3)
    rows[3, 2] = rows[3, 0]  # u_a == u_r
    rows[4, 3] = rows[4, 1]  # v_a == v_r
    rows[5, 2] = rows[5, 0] + 1e-9  # tiny Δu
    if op == "atan2":
        rows[6] = [0.5, -1.0, -0.5, -2.0]  # u crosses 0 at v < 0 (the branch cut)
        rows[7] = [1e-3, -1.0, 2e-3, 3.0]  # v changes sign near u ~ 0
    return rows


@pytest.mark.parametrize("op", BINARY)
def test_binary_rules_are_the_two_player_shapley_values(op):
    """m_u Δu and m_v Δv equal reference_jax.exact_shapley of the game on {u, v}."""
    rows = _binary_points(op)
    f = ops.OP_FORWARDS[op]
    u_a, v_a, u_r, v_r = (jnp.asarray(rows[:, k]) for k in range(4))

    def game(x):  # x = (1, 1) actual, (0, 0) reference: each player picks its value
        return f(jnp.where(x[0] > 0.5, u_a, u_r), jnp.where(x[1] > 0.5, v_a, v_r))

    phi = np.asarray(rj.exact_shapley(game, jnp.ones(2), jnp.zeros(2)))  # (K, 2)
    m_u, m_v = ops.OP_RULES[op](jnp.ones(len(rows)), (u_a, v_a), (u_r, v_r))
    got = np.stack([np.asarray(m_u) * (rows[:, 0] - rows[:, 2]), np.asarray(m_v) * (rows[:, 1] - rows[:, 3])], 1)
    scale = np.abs(phi).max(axis=1, keepdims=True)
    assert (np.abs(got - phi) <= 1e-12 * scale).all(), np.abs(got - phi).max()


# --------------------------------------------------------------------------- composites


def _rule(name, m, a, r, **params):
    return ops.OP_RULES[name](m, a, r, **params)


def _softmax_chain(m, x_a, x_r, dim):
    """softmax = exp(u), u = log_softmax(x): the exp rule, then the log_softmax chain."""
    u_a, u_r = jax.nn.log_softmax(x_a, axis=dim), jax.nn.log_softmax(x_r, axis=dim)
    (m_u,) = _rule("exp", m, (u_a,), (u_r,))
    return _log_softmax_chain(m_u, x_a, x_r, dim)


def _lse_pieces(x_a, x_r, dim):
    c = jnp.maximum(x_a.max(dim, keepdims=True), x_r.max(dim, keepdims=True))
    z_a, z_r = x_a - c, x_r - c
    return z_a, z_r, jnp.exp(z_a).sum(dim, keepdims=True), jnp.exp(z_r).sum(dim, keepdims=True)


def _log_softmax_chain(m, x_a, x_r, dim):
    z_a, z_r, big_a, big_r = _lse_pieces(x_a, x_r, dim)
    (m_big,) = _rule("log", -m.sum(dim, keepdims=True), (big_a,), (big_r,))
    (m_z,) = _rule("exp", jnp.broadcast_to(m_big, z_a.shape), (z_a,), (z_r,))
    return m + m_z


def _logsumexp_chain(m, x_a, x_r, dim):
    z_a, z_r, big_a, big_r = _lse_pieces(x_a, x_r, dim)
    (m_big,) = _rule("log", jnp.expand_dims(m, dim), (big_a,), (big_r,))
    (m_z,) = _rule("exp", jnp.broadcast_to(m_big, z_a.shape), (z_a,), (z_r,))
    return m_z


def _norm_chain(m, x_a, x_r, weight, eps, center):
    """(layer | rms) norm over the last axis from mean / square / rsqrt / mul rules."""
    n = x_a.shape[-1]
    xc_a = x_a - x_a.mean(-1, keepdims=True) if center else x_a
    xc_r = x_r - x_r.mean(-1, keepdims=True) if center else x_r
    v_a, v_r = (xc_a**2).mean(-1, keepdims=True) + eps, (xc_r**2).mean(-1, keepdims=True) + eps
    s_a, s_r = jax.lax.rsqrt(v_a), jax.lax.rsqrt(v_r)
    m_y0 = m * weight
    m_xc, m_s = _rule("mul", m_y0, (xc_a, jnp.broadcast_to(s_a, xc_a.shape)), (xc_r, jnp.broadcast_to(s_r, xc_r.shape)))
    (m_v,) = _rule("rsqrt", m_s.sum(-1, keepdims=True), (v_a,), (v_r,))
    (m_sq,) = _rule("square", jnp.broadcast_to(m_v / n, xc_a.shape), (xc_a,), (xc_r,))
    m_xc = m_xc + m_sq
    return m_xc - m_xc.mean(-1, keepdims=True) if center else m_xc


def _vector_norm_chain(m, x_a, x_r):
    q_a, q_r = (x_a**2).sum(-1), (x_r**2).sum(-1)
    (m_q,) = _rule("sqrt", m, (q_a,), (q_r,))
    (m_x,) = _rule("square", jnp.broadcast_to(m_q[..., None], x_a.shape), (x_a,), (x_r,))
    return m_x


def _glu_chain(m, x_a, x_r):
    a_a, b_a = jnp.split(x_a, 2, -1)
    a_r, b_r = jnp.split(x_r, 2, -1)
    m_a, m_sig = _rule("mul", m, (a_a, jax.nn.sigmoid(b_a)), (a_r, jax.nn.sigmoid(b_r)))
    (m_b,) = _rule("sigmoid", m_sig, (b_a,), (b_r,))
    return jnp.concatenate([m_a, m_b], -1)


def _sdpa_chain(m, q, k, v, scale):
    """S = (q kᵀ)·scale by the matmul rule, softmax rule, P v by the matmul rule."""
    (q_a, q_r), (k_a, k_r), (v_a, v_r) = q, k, v
    p_a = jax.nn.softmax(q_a @ k_a.T * scale, -1)
    p_r = jax.nn.softmax(q_r @ k_r.T * scale, -1)
    m_p, m_v = _rule("matmul", m, (p_a, v_a), (p_r, v_r))
    (m_s,) = _rule("softmax", m_p, (q_a @ k_a.T * scale,), (q_r @ k_r.T * scale,), dim=-1)
    m_q, m_kt = _rule("matmul", m_s * scale, (q_a, k_a.T), (q_r, k_r.T))
    return m_q, m_kt.T, m_v


@pytest.mark.parametrize("scenario", ("dense", "tiny"))
def test_composites_equal_the_chain_of_their_parts(scenario):
    rng = np.random.default_rng(7 if scenario == "dense" else 8)
    x_a = 2.0 * rng.standard_normal((3, 6))
    x_r = x_a * (1 + 1e-7 * rng.standard_normal(x_a.shape)) if scenario == "tiny" else 2.0 * rng.standard_normal((3, 6))
    m = rng.standard_normal((3, 6))
    w = rng.standard_normal(6)

    def close(got, want):
        got, want = np.asarray(got), np.asarray(want)
        assert np.abs(got - want).max() <= 1e-13 * np.abs(want).max(), np.abs(got - want).max()

    for dim in (-1, -2):
        close(_rule("softmax", m, (x_a,), (x_r,), dim=dim)[0], _softmax_chain(m, x_a, x_r, dim))
        close(_rule("log_softmax", m, (x_a,), (x_r,), dim=dim)[0], _log_softmax_chain(m, x_a, x_r, dim))
    close(_rule("logsumexp", m[:, 0], (x_a,), (x_r,), dim=-1)[0], _logsumexp_chain(m[:, 0], x_a, x_r, -1))
    close(_rule("layer_norm", m, (x_a,), (x_r,), normalized_shape=(6,), weight=w, eps=1e-5)[0],
          _norm_chain(m, x_a, x_r, w, 1e-5, center=True))
    close(_rule("rms_norm", m, (x_a,), (x_r,), normalized_shape=(6,), weight=w, eps=1e-6)[0],
          _norm_chain(m, x_a, x_r, w, 1e-6, center=False))
    close(_rule("vector_norm", m[:, 0], (x_a,), (x_r,), dim=-1)[0], _vector_norm_chain(m[:, 0], x_a, x_r))
    close(_rule("glu", m[:, :3], (x_a,), (x_r,), dim=-1)[0], _glu_chain(m[:, :3], x_a, x_r))
    q = (x_a[:, :4], x_r[:, :4])
    k = (rng.standard_normal((5, 4)), rng.standard_normal((5, 4)))
    v = (rng.standard_normal((5, 2)), rng.standard_normal((5, 2)))
    got = _rule("scaled_dot_product_attention", m[:, :2], (q[0], k[0], v[0]), (q[1], k[1], v[1]), scale=0.4)
    for g, want in zip(got, _sdpa_chain(m[:, :2], q, k, v, 0.4), strict=True):
        close(g, want)


def test_amax_routes_half_of_the_change_through_each_argmax():
    x_a = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 5.0, 1.0]])
    x_r = np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 0.5], [0.0, 1.0, 5.0]])
    (m_x,) = _rule("amax", np.ones(3), (x_a,), (x_r,), dim=-1)
    # row 0: j* = 0, k* = 1, Δy = 1: half through each: 0.5/3 and 0.5/(1 − 2).
    # row 1: j* = 1, k* = 0 with Δx_{k*} = 0: the whole Δy = 1 through j*: 1/2.
    # row 2: j* = 1, k* = 2: Δy = 0: both routes carry 0.
    np.testing.assert_allclose(np.asarray(m_x), [[0.5 / 3, -0.5, 0], [0, 0.5, 0], [0, 0, 0]], rtol=1e-15)


# --------------------------------------------------------------------------- accuracy


class _Unary(NamedTuple):
    op: str
    check: ops.MpCheck


UNARY_GRID = [_Unary(name, check) for name, spec in ops.OP_SPECS.items() for check in spec.mp_checks]
DELTAS = (1e-13, 1e-9, 1e-6, 1.7e-5, 1.8e-5, 1e-3, 0.3, 2.5)


@pytest.mark.parametrize("case", UNARY_GRID, ids=lambda c: c.op + "".join(f"_{v}" for v in c.check.params.values()))
def test_unary_factor_matches_a_60_digit_quotient(case):
    """R(a, r) against (f(a) − f(r))/(a − r) in 60 digits of the same float inputs, from
    Δ = 1e-13 (where a float quotient keeps no digit) to Δ = 2.5, both signs. Bound: 1e-12
    relative, plus 1e-15 of the largest |R| of the op's grid (where R crosses 0)."""
    import mpmath as mp

    mp.mp.dps = 60
    check = case.check
    mids, deltas = np.meshgrid(np.array(check.mids), np.array(DELTAS + tuple(-d for d in DELTAS)))
    scale_mid = np.abs(mids) if check.relative else np.maximum(1.0, np.abs(mids))
    a = (mids + deltas * scale_mid / 2).ravel()
    r = (mids - deltas * scale_mid / 2).ravel()
    keep = (a != r) & ((np.minimum(a, r) > 0) | (not check.positive))
    a, r = a[keep], r[keep]
    got = np.asarray(ops.unary_rescale_factor(case.op, jnp.asarray(a), jnp.asarray(r), **check.params))
    f = ops.OP_SPECS[case.op].mp_function(mp, check.params)
    want = np.array([float((f(mp.mpf(x)) - f(mp.mpf(y))) / (mp.mpf(x) - mp.mpf(y))) for x, y in zip(a, r, strict=True)])
    bound = 1e-12 * np.abs(want) + 1e-15 * np.abs(want).max()
    bad = np.abs(got - want) > bound
    assert not bad.any(), list(zip(a[bad], r[bad], got[bad], want[bad], strict=True))[:5]


def test_softplus_factor_is_exact_across_the_threshold_switch():
    """torch's softplus jumps by log1p(e^-t)/β at βx = t: R is still the exact quotient."""
    a, r = np.array([10.2, 9.0]), np.array([9.9, 11.0])
    got = np.asarray(ops.unary_rescale_factor("softplus", a, r, beta=2.0, threshold=20.0))
    f = lambda x: x if 2 * x > 20 else math.log1p(math.exp(2 * x)) / 2  # noqa: E731
    want = [(f(x) - f(y)) / (x - y) for x, y in zip(a, r, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-13)


# --------------------------------------------------------------------------- checks


def test_argument_errors_name_the_problem():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="op must be one of"):
        ops.batched_op_multipliers("cumprod", np.ones((2, 1, 3)), (x[:1],), (x[:1],))
    with pytest.raises(AssertionError, match="m must have the output's shape"):
        ops.OP_RULES["tanh"](np.ones(4), (x,), (x,))
    with pytest.raises(AssertionError, match="must be float64"):
        ops.OP_RULES["tanh"](np.ones((2, 3)), (x.astype(np.float32),), (x,))
    with pytest.raises(AssertionError, match="must have the shape of actual"):
        ops.OP_RULES["tanh"](np.ones((2, 3)), (x,), (np.ones((3, 2)),))
    with pytest.raises(AssertionError, match="tuple of its operands"):
        ops.OP_RULES["mul"](np.ones((2, 3)), (x,), (x,))
    with pytest.raises(AssertionError, match="both halves"):
        ops.batched_op_multipliers("tanh", np.ones((3, 2, 3)), (x,), (x,))
    with pytest.raises(AssertionError, match="pair axis N=2"):
        ops.batched_op_multipliers("tanh", np.ones((2, 2, 3)), (np.ones((3, 3)),), (np.ones((3, 3)),))
    with pytest.raises(AssertionError, match="rank 2"):
        ops.OP_RULES["mm"](np.ones((2, 2, 2)), (np.ones((2, 2, 3)), np.ones((2, 3, 2))),
                           (np.ones((2, 2, 3)), np.ones((2, 3, 2))))
