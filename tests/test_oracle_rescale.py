"""The elementary rules: Rescale factor (threshold, accuracy, exactness, relu) and the
Shapley product (efficiency, symmetry, dummy; equal to brute-force Shapley values)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_jax as rj

EPS = float(np.finfo(np.float64).eps)
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_rescale = _jit(rj.rescale, static_argnums=0)
_act = _jit(rj.activation, static_argnums=0)

# Δz across the threshold and far from it, at several midpoints (flat, steep, saturated).
DZ = np.array([0.0, 1e-13, 1e-9, 1e-6, 8e-6, 1.7e-5, 1.8e-5, 3e-5, 1e-4, 1e-2, 0.5, 3.0, 40.0])
MID = np.array([-30.0, -4.0, -0.7, 0.0, 1e-7, 0.3, 2.5, 19.0])


def _grid():
    dz, mid = np.meshgrid(DZ, MID)
    dz, mid = dz.ravel(), mid.ravel()
    dz = np.concatenate([dz, -dz])
    mid = np.concatenate([mid, mid])
    return mid + dz / 2, mid - dz / 2


def test_threshold_values():
    tau = (24 * EPS) ** (1 / 3)
    assert rj.rescale_threshold("tanh", jnp.float64) == pytest.approx(tau, rel=1e-15)
    assert rj.rescale_threshold("sigmoid", np.float64) == pytest.approx(1.747e-5, rel=1e-3)
    assert rj.rescale_threshold("tanh", np.float32) == pytest.approx(
        (24 * float(np.finfo(np.float32).eps)) ** (1 / 3), rel=1e-12
    )
    assert rj.rescale_threshold("relu", np.float64) == 0.0
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        rj.rescale_threshold("gelu", np.float64)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_rescale_matches_high_precision_quotient(name):
    """R against the exact quotient of the float inputs (100 digits). Bound: what a plain
    quotient's rounding of φ(z_a), φ(z_r) over |Δz| would allow above τ; a few ulps of R below
    τ (R's closed form is within a few ulps everywhere: tests/test_jax_deeplift_rescale.py)."""
    import mpmath as mp
    mp.mp.dps = 100  # Δφ of saturated φ at tiny Δz cancels ~60 digits
    z_a, z_r = _grid()
    got = np.asarray(_rescale(name, z_a, z_r))
    assert np.all(np.isfinite(got))
    phi = (lambda v: 1 / (1 + mp.exp(-v))) if name == "sigmoid" else mp.tanh
    dphi = (lambda v: phi(v) * (1 - phi(v))) if name == "sigmoid" else (
        lambda v: 1 - mp.tanh(v) ** 2)
    tau = rj.rescale_threshold(name, np.float64)
    for za, zr, r in zip(z_a, z_r, got, strict=True):
        a, b = mp.mpf(float(za)), mp.mpf(float(zr))
        exact = dphi(a) if a == b else (phi(a) - phi(b)) / (a - b)
        err = abs(mp.mpf(float(r)) - exact)
        if abs(za - zr) > tau:
            bound = 4 * EPS * (abs(phi(a)) + abs(phi(b))) / abs(a - b) + 8 * EPS * abs(exact)
        else:
            bound = 16 * EPS * abs(exact) + 1e-300
        assert err <= bound, (name, za, zr, float(r), float(exact))


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu"])
def test_rescale_times_dz_is_the_output_difference(name):
    """R·Δz == φ(z_a) − φ(z_r) to rounding of the values, on both sides of τ."""
    z_a, z_r = _grid()
    r = np.asarray(_rescale(name, z_a, z_r))
    y_a, y_r = np.asarray(_act(name, z_a)), np.asarray(_act(name, z_r))
    err = np.abs(r * (z_a - z_r) - (y_a - y_r))
    np.testing.assert_array_less(err, 4 * EPS * (np.abs(y_a) + np.abs(y_r)) + 1e-300)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_rescale_is_continuous_across_the_threshold(name):
    """No jump at τ: within a plain quotient's rounding error eps·|φ| / (|φ'| τ) (large where
    φ saturates) across it (R's closed form has no branch there at all)."""
    tau = rj.rescale_threshold(name, np.float64)
    mid = np.array([-3.0, -0.5, 0.0, 0.2, 1.5])
    below = np.asarray(_rescale(name, mid + tau * (1 - 1e-6) / 2, mid - tau * (1 - 1e-6) / 2))
    above = np.asarray(_rescale(name, mid + tau * (1 + 1e-6) / 2, mid - tau * (1 + 1e-6) / 2))
    y = np.abs(np.asarray(_act(name, mid)))
    bound = 4 * EPS * 2 * y / tau + 1e-12 * np.abs(below)
    np.testing.assert_array_less(np.abs(below - above), bound)


def test_rescale_at_zero_delta_is_the_derivative():
    z = np.array([-5.0, -1.0, 0.0, 0.5, 3.0, 30.0])
    e = np.exp(-np.abs(z))
    np.testing.assert_allclose(np.asarray(_rescale("sigmoid", z, z)), e / (1 + e) ** 2,
                               rtol=4 * EPS)
    np.testing.assert_allclose(np.asarray(_rescale("tanh", z, z)), 1 / np.cosh(z) ** 2,
                               rtol=32 * EPS)
    np.testing.assert_array_equal(np.asarray(_rescale("relu", z, z)), (z > 0).astype(float))


def test_relu_rescale_is_exact_everywhere():
    z_a = np.array([2.0, -2.0, 3.0, -1e-7, 1e-7, 1e-300, 5.0, 0.0])
    z_r = np.array([1.0, -1.0, -1.0, 2e-7, -3e-7, -1e-300, 5.0, 0.0])
    want = np.array([1.0, 0.0, 0.75, 2 / 3, 0.25, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(np.asarray(_rescale("relu", z_a, z_r)), want, rtol=1e-15)


def test_rescale_float32_and_extremes_are_finite():
    z_a = np.array([0.0, 1e-3, 80.0, -800.0, 700.0], np.float32)
    z_r = np.array([0.0, -1e-3, 79.0, 800.0, -700.0], np.float32)
    for name in ("sigmoid", "tanh", "relu"):
        r = _rescale(name, z_a, z_r)
        assert r.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(r)))
        r64 = _rescale(name, z_a.astype(np.float64) * 1e300, -z_r.astype(np.float64) * 1e300)
        assert np.all(np.isfinite(np.asarray(r64)))
    # float32 at Δz = 2e-3, below the float32 threshold (~1.4e-2) of a plain quotient
    np.testing.assert_allclose(float(_rescale("tanh", z_a, z_r)[1]), 1.0, atol=1e-6)


# --------------------------------------------------------------------------- product


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(m=finite, u_a=finite, u_r=finite, v_a=finite, v_r=finite)
def test_product_efficiency(m, u_a, u_r, v_a, v_r):
    m_u, m_v = (float(t) for t in rj.product_multipliers(m, u_a, u_r, v_a, v_r))
    lhs = m_u * (u_a - u_r) + m_v * (v_a - v_r)
    rhs = m * (u_a * v_a - u_r * v_r)
    scale = abs(m) * (abs(u_a) + abs(u_r)) * (abs(v_a) + abs(v_r))
    assert abs(lhs - rhs) <= 8 * EPS * scale + 1e-300


@settings(max_examples=100, deadline=None)
@given(u_a=finite, u_r=finite, v_a=finite, v_r=finite)
def test_product_symmetry_and_dummy(u_a, u_r, v_a, v_r):
    m_u, m_v = rj.product_multipliers(1.0, u_a, u_r, v_a, v_r)
    # swapping the operands swaps the multipliers
    s_v, s_u = rj.product_multipliers(1.0, v_a, v_r, u_a, u_r)
    assert float(m_u) == float(s_u) and float(m_v) == float(s_v)
    # interchangeable players (same actual, same reference) get equal contributions
    e_u, e_v = rj.product_multipliers(1.0, u_a, u_r, u_a, u_r)
    assert float(e_u) * (u_a - u_r) == float(e_v) * (u_a - u_r)
    # a player that does not change (Δv = 0) contributes nothing; u gets all of Δy
    d_u, d_v = rj.product_multipliers(1.0, u_a, u_r, v_a, v_a)
    assert float(d_v) * (v_a - v_a) == 0.0
    assert float(d_u) * (u_a - u_r) == pytest.approx(u_a * v_a - u_r * v_a, rel=1e-14, abs=1e-9)


def test_product_equals_brute_force_shapley():
    rng = np.random.default_rng(0)
    for _ in range(5):
        (u_a, v_a), (u_r, v_r) = rng.normal(size=2), rng.normal(size=2)
        phi = rj.exact_shapley(lambda s: s[0] * s[1], np.array([u_a, v_a]), np.array([u_r, v_r]))
        m_u, m_v = rj.product_multipliers(1.0, u_a, u_r, v_a, v_r)
        np.testing.assert_allclose(
            np.asarray(phi), [float(m_u) * (u_a - u_r), float(m_v) * (v_a - v_r)], rtol=1e-14
        )
