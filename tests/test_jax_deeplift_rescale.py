"""The Rescale factors of sigmoid and tanh (``rescale.sigmoid_quotient`` / ``tanh_quotient``,
the one definition used by the transformation, ``rescale.rescale`` and the ops) against the
exact quotient of the float inputs at 100 digits, on the oracle's grid
(tests/test_oracle_rescale.py) and at its extremes, and against what ``rescale.rescale``
returns."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import reference_jax as rj
from reference_jax.rescale import sigmoid_quotient, tanh_quotient

EPS = float(np.finfo(np.float64).eps)
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
QUOTIENTS = {"sigmoid": _jit(sigmoid_quotient), "tanh": _jit(tanh_quotient)}
_rescale = _jit(rj.rescale, static_argnums=0)

# Δz across the oracle's threshold and the series' switch (1/4, 1/8 for tanh), at midpoints
# flat, steep and saturated (the oracle's grid, plus the series boundary).
DZ = np.array([0.0, 1e-13, 1e-9, 1e-6, 8e-6, 1.7e-5, 1.8e-5, 3e-5, 1e-4, 1e-2, 0.12, 0.125, 0.13,
               0.2499, 0.25, 0.2501, 0.5, 3.0, 40.0])
MID = np.array([-30.0, -4.0, -0.7, 0.0, 1e-7, 0.3, 2.5, 19.0])


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_quotient_is_within_a_few_ulps_of_the_exact_one(name):
    """Cancellation-free everywhere: a relative bound of 16 ulps on every point (the bound of
    tests/test_oracle_rescale.py allows a plain quotient's ``eps·|φ|/|Δz|``; this needs none)."""
    import mpmath as mp
    mp.mp.dps = 100
    dz, mid = np.meshgrid(DZ, MID)
    dz = np.concatenate([dz.ravel(), -dz.ravel()])
    mid = np.concatenate([mid.ravel(), mid.ravel()])
    z_a, z_r = mid + dz / 2, mid - dz / 2
    got = np.asarray(QUOTIENTS[name](z_a, z_r))
    phi = (lambda v: 1 / (1 + mp.exp(-v))) if name == "sigmoid" else mp.tanh
    dphi = (lambda v: phi(v) * (1 - phi(v))) if name == "sigmoid" else (lambda v: 1 - mp.tanh(v) ** 2)
    for za, zr, r in zip(z_a, z_r, got, strict=True):
        a, b = mp.mpf(float(za)), mp.mpf(float(zr))
        exact = dphi(a) if a == b else (phi(a) - phi(b)) / (a - b)
        assert abs(mp.mpf(float(r)) - exact) <= 16 * EPS * abs(exact), (name, za, zr, float(r), float(exact))
    # and it is what the oracle's rescale returns
    want = np.asarray(_rescale(name, z_a, z_r))
    np.testing.assert_allclose(got, want, rtol=2e-11, atol=0)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_quotient_is_finite_and_right_at_the_extremes(name):
    z_a = np.array([0.0, 80.0, -800.0, 700.0, 1e300, -1e300, 1e308, 746.0, -746.0])
    z_r = np.array([0.0, 79.0, 800.0, -700.0, -1e300, -1e300, 1e308, 747.0, -745.0])
    got = np.asarray(QUOTIENTS[name](z_a, z_r))
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    assert got[0] == (0.25 if name == "sigmoid" else 1.0)
    want = np.asarray(_rescale(name, z_a, z_r))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-300)
    z32 = np.array([0.0, 1e-3, 80.0, -800.0], np.float32)
    r32 = QUOTIENTS[name](z32, z32[::-1].copy())
    assert r32.dtype == np.float32 and np.all(np.isfinite(np.asarray(r32)))
