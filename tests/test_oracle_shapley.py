"""Brute-force Shapley values: textbook games, axioms, output shapes, the player limit."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_jax as rj


def _phi(f, x, r):
    return np.asarray(rj.exact_shapley(f, np.asarray(x, float), np.asarray(r, float)))


def test_two_player_product():
    # v(∅)=0, v({0})=0, v({1})=0, v({0,1})=6: the surplus is split evenly.
    np.testing.assert_allclose(_phi(lambda s: s[0] * s[1], [2, 3], [0, 0]), [3, 3])
    # with reference (1, 1): v(∅)=1, v({0})=2, v({1})=3, v(N)=6
    # φ0 = ½(2−1) + ½(6−3) = 2,  φ1 = ½(3−1) + ½(6−2) = 3
    np.testing.assert_allclose(_phi(lambda s: s[0] * s[1], [2, 3], [1, 1]), [2, 3])


def test_two_player_max():
    # v(∅)=0, v({0})=1, v({1})=2, v(N)=2: φ0 = ½·1 + ½·0, φ1 = ½·2 + ½·1
    np.testing.assert_allclose(_phi(jnp.max, [1, 2], [0, 0]), [0.5, 1.5])


def test_three_player_product():
    x = [2.0, -3.0, 5.0]
    np.testing.assert_allclose(_phi(jnp.prod, x, [0, 0, 0]), [-10, -10, -10])
    # reference (1, 1, 1), by hand: v(S) = Π_{i∈S} x_i.  For player 0 (x0 = 2):
    # S=∅: (2−1)·1/3; S={1}: (−6+3)·1/6; S={2}: (10−5)·1/6; S={1,2}: (−30+15)·1/3
    phi0 = 1 / 3 - 3 / 6 + 5 / 6 - 15 / 3
    got = _phi(jnp.prod, x, [1, 1, 1])
    assert got[0] == pytest.approx(phi0, rel=1e-14)
    assert got.sum() == pytest.approx(-30 - 1, rel=1e-14)


def test_glove_game():
    # one left glove (player 0), two right gloves: v(S) = 1 iff 0 ∈ S and S ∩ {1,2} ≠ ∅
    f = lambda s: jnp.minimum(s[0], jnp.maximum(s[1], s[2]))  # noqa: E731
    np.testing.assert_allclose(_phi(f, [1, 1, 1], [0, 0, 0]), [2 / 3, 1 / 6, 1 / 6],
                               rtol=1e-15)


def test_linear_function_gets_weight_times_delta():
    rng = np.random.default_rng(0)
    w, x, r = rng.normal(size=(3, 7))
    np.testing.assert_allclose(_phi(lambda s: jnp.dot(w, s), x, r), w * (x - r), rtol=1e-13,
                               atol=1e-15)


def _random_f(rng, n, k=None):
    """A random smooth non-additive function: a tiny tanh network with products."""
    w1 = jnp.asarray(rng.normal(size=(5, n)))
    w2 = jnp.asarray(rng.normal(size=(5,) if k is None else (k, 5)))
    pair = jnp.asarray(rng.normal(size=(n, n)))

    def f(s):
        s = s.reshape(-1)
        return w2 @ jnp.tanh(w1 @ s) + s @ pair @ s * (1.0 if k is None else jnp.ones(k))

    return f


@settings(max_examples=10, deadline=None)
@given(n=st.sampled_from([1, 2, 5, 8]), seed=st.integers(0, 2**32 - 1))
def test_efficiency_on_random_functions(n, seed):
    rng = np.random.default_rng(seed)
    f = _random_f(rng, n)
    x, r = rng.normal(size=n), rng.normal(size=n)
    phi = _phi(f, x, r)
    assert phi.shape == (n,)
    delta = float(f(jnp.asarray(x)) - f(jnp.asarray(r)))
    assert phi.sum() == pytest.approx(delta, rel=1e-12, abs=1e-13)


def test_symmetry_and_dummy_axioms():
    rng = np.random.default_rng(1)
    x, r = rng.normal(size=4), rng.normal(size=4)
    x[1], r[1] = x[0], r[0]  # players 0 and 1 are interchangeable
    f = lambda s: jnp.sin(s[0] + s[1]) * s[2] + s[0] * s[1]  # noqa: E731  (s[3] is a dummy)
    phi = _phi(f, x, r)
    assert phi[0] == pytest.approx(phi[1], rel=1e-13)
    assert phi[3] == 0.0


def test_vector_output_and_array_shaped_input():
    rng = np.random.default_rng(2)
    f = _random_f(rng, 6, k=3)
    x, r = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    phi = _phi(f, x, r)
    assert phi.shape == (3, 2, 3)
    delta = np.asarray(f(jnp.asarray(x)) - f(jnp.asarray(r)))
    np.testing.assert_allclose(phi.reshape(3, -1).sum(-1), delta, rtol=1e-12, atol=1e-13)
    # each output separately equals the scalar game
    for k in range(3):
        np.testing.assert_allclose(phi[k], _phi(lambda s, k=k: f(s)[k], x, r), rtol=1e-13,
                                   atol=1e-15)


def test_sixteen_players_work():
    x, r = np.arange(1.0, 17.0), np.zeros(16)
    w = np.linspace(-1, 1, 16)
    phi = _phi(lambda s: jnp.dot(w, s) + s[0] * s[15], x, r)
    want = w * x
    want[[0, 15]] += 16 / 2
    np.testing.assert_allclose(phi, want, rtol=1e-12, atol=1e-13)


def test_too_many_players_is_a_clear_error():
    with pytest.raises(ValueError, match=r"at most 16 players; x has 17 elements"):
        rj.exact_shapley(jnp.sum, np.zeros(17), np.zeros(17))
    with pytest.raises(ValueError, match=r"scalar or a 1-D array"):
        rj.exact_shapley(lambda s: jnp.outer(s, s), np.zeros(3), np.zeros(3))
    with pytest.raises(AssertionError, match=r"x_ref must have the shape of x"):
        rj.exact_shapley(jnp.sum, np.zeros(3), np.zeros(4))
