"""reference_jax.deeplift(fn): summation to delta on random compositions of primitives,
products against exact Shapley values, composition with jit / vmap, deep_shap, and the named
errors for what has no exact rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

import reference_jax
from reference_jax.transform import DeepLiftError, covered_primitives, rules
from torch_handler.additivity import tolerance_for

TOL = tolerance_for("float64")


def attribution_error(fn, x, r) -> float:
    """|Σ (x − r)·m − (fn(x) − fn(r))| / max(|fn(x)|, |fn(r)|)."""
    m = reference_jax.deeplift(fn)(x, r)
    total = sum(jnp.sum((a - b) * c) for a, b, c in zip(*map(jax.tree.leaves, (x, r, m)), strict=True))
    fx, fr = fn(x), fn(r)
    scale = max(abs(float(fx)), abs(float(fr)), np.finfo(np.float64).tiny)
    return abs(float(total) - float(fx - fr)) / scale


# --------------------------------------------------------------------------- random programs

N = 4  # vector length of every value in a random program

_UNARY = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
    "gelu_erf": lambda v: jax.nn.gelu(v, approximate=False),
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "exp": lambda v: jnp.exp(0.5 * v),
    "log": lambda v: jnp.log(1.0 + v * v),
    "log1p": lambda v: jnp.log1p(v * v),
    "expm1": lambda v: jnp.expm1(0.3 * v),
    "sqrt": lambda v: jnp.sqrt(1.0 + v * v),
    "rsqrt": lambda v: jax.lax.rsqrt(1.0 + v * v),
    "abs": jnp.abs,
    "square": jnp.square,
    "cube": lambda v: v**3,
    "erf": jax.lax.erf,
    "erfc": jax.lax.erfc,
    "max_const": lambda v: jnp.maximum(v, 0.3),
    "min_const": lambda v: jnp.minimum(v, -0.2),
    "clip": lambda v: jnp.clip(v, -0.5, 0.7),
    "recip": lambda v: 1.0 / (1.5 + jnp.tanh(v)),
    "pow_const": lambda v: (1.0 + v * v) ** 1.3,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "layer_norm": lambda v: (v - v.mean()) * jax.lax.rsqrt(jnp.mean(jnp.square(v - v.mean())) + 1e-5),
    "cumsum": jnp.cumsum,
    "reverse": lambda v: v[::-1],
    "logsumexp": lambda v: jnp.full((N,), jax.nn.logsumexp(v)),
    "max_reduce": lambda v: jnp.full((N,), jnp.max(v)),
}
_BINARY = {
    "add": jnp.add,
    "sub": jnp.subtract,
    "mul": jnp.multiply,
    "div": lambda u, v: u / (1.0 + v * v),
    "maximum": jnp.maximum,
    "minimum": jnp.minimum,
    "pow": lambda u, v: (1.0 + u * u) ** jnp.tanh(v),
    # Away from (0, 0), where atan2 has no derivative (ops' rule, like torch, gives NaN there
    # when both halves sit on it: a constant vector through layer_norm is exactly 0).
    "atan2": lambda u, v: jnp.arctan2(u, 1.0 + v * v),
    # Weights of one sign: a symmetric read-out of a constant outer product would be 0 up to
    # rounding, and an error relative to that output is meaningless.
    "outer": lambda u, v: jnp.outer(u, v) @ jnp.linspace(0.5, 1.5, N),
    "dot": lambda u, v: jnp.full((N,), u @ v),
}


def _program(seed: int):
    """A random straight-line program of 4–9 steps over a pool of (N,) values."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(int(rng.integers(4, 10))):
        if rng.random() < 0.6:
            steps.append(("u", str(rng.choice(list(_UNARY))), int(rng.integers(0, 1 << 30))))
        else:
            steps.append(("b", str(rng.choice(list(_BINARY))), int(rng.integers(0, 1 << 30))))
    weights = rng.standard_normal(N)
    mix = rng.standard_normal((N, N))

    def fn(inputs):
        pool = [inputs["a"], inputs["b"], jnp.tanh(mix @ inputs["a"])]
        for kind, name, pick in steps:
            if kind == "u":
                pool.append(_UNARY[name](pool[pick % len(pool)]))
            else:
                u, v = pool[pick % len(pool)], pool[(pick // 7) % len(pool)]
                pool.append(_BINARY[name](u, v))
        return jnp.sum(pool[-1] * weights) + 0.1 * jnp.sum(pool[-2])

    return fn, steps


def _pair(seed: int):
    rng = np.random.default_rng(seed + 10_000)
    x = {"a": rng.standard_normal(N), "b": rng.standard_normal(N)}
    r = {"a": rng.standard_normal(N), "b": rng.standard_normal(N)}
    return x, r


SEEDS = range(300)


@pytest.mark.parametrize("block", range(6))
def test_random_compositions_sum_to_delta(block):
    """300 random programs (50 per block): attributions sum to fn(x) − fn(r) to 1e-10."""
    failures = []
    for seed in SEEDS[block::6]:
        fn, steps = _program(seed)
        x, r = _pair(seed)
        error = attribution_error(fn, x, r)
        if not error <= TOL:
            failures.append((seed, error, steps))
    assert not failures, failures[:3]


def test_random_compositions_cover_every_menu_entry():
    used = {name for seed in SEEDS for _, name, _ in _program(seed)[1]}
    assert used == set(_UNARY) | set(_BINARY)


# --------------------------------------------------------------------------- Shapley values

_GAMES = {
    "mul": lambda u, v: u * v,
    "div": lambda u, v: u / (2.0 + v * v),
    "maximum": jnp.maximum,
    "minimum": jnp.minimum,
    "pow": lambda u, v: (1.0 + u * u) ** v,
    "atan2": jnp.arctan2,
}


@pytest.mark.parametrize("name", sorted(_GAMES))
def test_elementwise_binaries_are_the_exact_shapley_values(name):
    """Σ_i w_i g(u_i, v_i) is a sum of two-player games: DeepLIFT's attributions are the
    exact Shapley values of the 2n players (u, v)."""
    rng = np.random.default_rng(len(name))
    w = rng.standard_normal(5)
    game = _GAMES[name]

    def f(z):
        return jnp.sum(w * game(z[:5], z[5:]))

    z, z_ref = rng.standard_normal(10), rng.standard_normal(10)
    attributions = (z - z_ref) * reference_jax.deeplift(f)(z, z_ref)
    expected = reference_jax.exact_shapley(f, z, z_ref)
    np.testing.assert_allclose(attributions, expected, rtol=0, atol=TOL * np.abs(expected).max())


def test_matmul_of_two_varying_operands_is_the_exact_shapley_value():
    """u^T A v (dot_general of two varying operands, bilinear rule) against exact Shapley."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 5))

    def f(z):
        return jnp.sum(jnp.outer(z[:6], z[6:11]) * a) + z[:6] @ (a @ z[6:11])

    z, z_ref = rng.standard_normal(11), rng.standard_normal(11)
    attributions = (z - z_ref) * reference_jax.deeplift(f)(z, z_ref)
    expected = reference_jax.exact_shapley(f, z, z_ref)
    np.testing.assert_allclose(attributions, expected, rtol=0, atol=TOL * np.abs(expected).max())


# --------------------------------------------------------------------------- transformations


def _rnn(x):
    w = jnp.linspace(-1.0, 1.0, 9).reshape(3, 3)

    def step(h, xt):
        h = jnp.tanh(w @ h + xt)
        return h, jax.nn.sigmoid(h)

    h, ys = jax.lax.scan(step, jnp.zeros(3), x)
    return jnp.sum(ys) + jnp.sum(h * h)


def test_jit_and_vmap_over_pairs_give_the_eager_multipliers():
    rng = np.random.default_rng(0)
    xs, rs = rng.standard_normal((4, 6, 3)), rng.standard_normal((4, 6, 3))
    explain = reference_jax.deeplift(_rnn)
    eager = np.stack([explain(x, r) for x, r in zip(xs, rs, strict=True)])
    np.testing.assert_allclose(jax.vmap(explain)(xs, rs), eager, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(jax.jit(jax.vmap(explain))(xs, rs), eager, rtol=1e-13, atol=1e-14)
    for x, r, m in zip(xs, rs, eager, strict=True):
        assert abs(np.sum((x - r) * m) - (_rnn(x) - _rnn(r))) <= TOL * max(abs(_rnn(x)), abs(_rnn(r)))


def test_vmap_over_outputs_through_a_selecting_lambda():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 5))

    def logits(x):
        return w @ jnp.tanh(x)

    x, r = rng.standard_normal(5), rng.standard_normal(5)
    per_output = jax.vmap(lambda k: reference_jax.deeplift(lambda v: logits(v)[k])(x, r))(jnp.arange(3))
    for k in range(3):
        np.testing.assert_allclose(per_output[k], reference_jax.deeplift(lambda v, k=k: logits(v)[k])(x, r), rtol=1e-14)
    np.testing.assert_allclose(((x - r) * per_output).sum(1), logits(x) - logits(r), rtol=0, atol=1e-13)


def test_deeplift_inside_a_jitted_function():
    rng = np.random.default_rng(2)
    x, r = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))

    @jax.jit
    def attributions(x, r):
        return (x - r) * reference_jax.deeplift(_rnn)(x, r)

    np.testing.assert_allclose(jnp.sum(attributions(x, r)), _rnn(x) - _rnn(r), rtol=1e-11)


def test_deep_shap_is_the_mean_over_references():
    rng = np.random.default_rng(3)
    x, refs = rng.standard_normal((6, 3)), rng.standard_normal((3, 6, 3))
    phi = reference_jax.deep_shap(_rnn, x, refs)
    each = [(x - r) * reference_jax.deeplift(_rnn)(x, r) for r in refs]
    np.testing.assert_allclose(phi, np.mean(each, axis=0), rtol=1e-12, atol=1e-15)
    expected = _rnn(x) - np.mean([_rnn(r) for r in refs])
    assert abs(float(jnp.sum(phi)) - float(expected)) <= TOL * abs(float(_rnn(x)))


def test_pytree_inputs_keep_their_structure_and_dtype():
    x = {"seq": jnp.ones((2, 3)), "bias": (jnp.zeros(3), 0.5 * jnp.ones(3))}
    r = jax.tree.map(jnp.zeros_like, x)

    def f(t):
        return jnp.sum(jnp.tanh(t["seq"] + t["bias"][0]) * t["bias"][1])

    m = reference_jax.deeplift(f)(x, r)
    assert jax.tree.structure(m) == jax.tree.structure(x)
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(x), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert attribution_error(f, x, r) <= TOL


def test_fixed_trip_count_while_and_same_branch_cond():
    w = jnp.array([[0.5, -0.3], [0.2, 0.9]])

    def f(x):
        def body(carry):
            i, h = carry
            return i + 1, jnp.tanh(w @ h + x)

        _, h = jax.lax.while_loop(lambda c: c[0] < 4, body, (0, jnp.zeros(2)))
        return jax.lax.cond(jnp.sum(x) > -100.0, lambda v: jnp.sum(jnp.exp(v)), lambda v: jnp.sum(v), h)

    x, r = jnp.array([0.3, -1.2]), jnp.array([-0.7, 0.4])
    assert attribution_error(f, x, r) <= TOL


def test_checkpoint_custom_vjp_and_fori_loop_use_their_inner_jaxprs():
    """``jax.checkpoint`` (primitive ``remat2``), a ``custom_vjp`` closing over a constant and a
    ``fori_loop`` (a scan with a consts group, jax 0.12's ``ft_in``): their primal jaxprs."""
    w = jnp.array([0.5, -0.3, 1.2])

    @jax.custom_vjp
    def scaled_tanh(v):
        return jnp.tanh(v) * w

    scaled_tanh.defvjp(lambda v: (scaled_tanh(v), v), lambda v, g: (g * w / jnp.cosh(v) ** 2,))

    def f(x):
        h = jax.checkpoint(lambda v: jnp.exp(v) * w)(x)
        h = jax.lax.fori_loop(0, 3, lambda i, s: jnp.tanh(s * w + x), h)
        return jnp.sum(scaled_tanh(h))

    x, r = jnp.array([0.3, -1.2, 2.0]), jnp.array([0.1, 0.4, -0.5])
    assert attribution_error(f, x, r) <= TOL


def test_float32_inputs_sum_to_delta_at_float32_rounding():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    r = rng.standard_normal((6, 3)).astype(np.float32)
    m = reference_jax.deeplift(_rnn)(x, r)
    assert m.dtype == jnp.float32
    error = abs(float(jnp.sum((x - r) * m)) - float(_rnn(x) - _rnn(r))) / abs(float(_rnn(x)))
    assert error <= tolerance_for("float32")


# --------------------------------------------------------------------------- errors


def _raises(fn, x, r, *words):
    with pytest.raises(DeepLiftError) as info:
        reference_jax.deeplift(fn)(x, r)
    for word in words:
        assert word in str(info.value), str(info.value)
    return str(info.value)


def test_a_primitive_without_a_rule_is_named_with_its_line():
    x, r = jnp.ones(3), jnp.zeros(3)
    message = _raises(lambda v: jnp.sum(jnp.sin(v)), x, r, "'sin'", "test_jax_deeplift.py", "no DeepLIFT rule")
    assert "covered_primitives" in message


def test_a_mask_that_differs_between_halves_is_refused():
    _raises(lambda v: jnp.sum(jnp.where(v > 0, v, 0.0)), jnp.array([1.0, -1.0]), jnp.array([1.0, 1.0]), "differs")


def test_a_mask_equal_in_both_halves_is_linear():
    f = lambda v: jnp.sum(jnp.where(v > 0, v * v, 0.0))  # noqa: E731
    assert attribution_error(f, jnp.array([1.0, -1.0]), jnp.array([2.0, -3.0])) <= TOL


def test_a_mask_that_differs_under_jit_fails_at_run_time_with_the_message():
    explain = jax.jit(reference_jax.deeplift(lambda v: jnp.sum(jnp.where(v > 0, v, 0.0))))
    with pytest.raises(Exception, match="differs between the actual input and the reference"):
        jax.block_until_ready(explain(jnp.array([1.0, -1.0]), jnp.array([1.0, 1.0])))


def test_stop_gradient_of_an_input_dependent_value_is_refused():
    # A float under the transformation's own grad is checked by a host callback: its error
    # arrives wrapped in a JaxRuntimeError that carries the message.
    f = lambda v: jnp.sum(v * jax.lax.stop_gradient(v))  # noqa: E731
    with pytest.raises((DeepLiftError, jax.errors.JaxRuntimeError), match="'stop_gradient' at .*would drop"):
        reference_jax.deeplift(f)(jnp.ones(2), jnp.zeros(2))
    assert attribution_error(f, jnp.ones(2), jnp.ones(2)) == 0.0  # equal halves: nothing dropped


def test_a_while_loop_whose_trip_count_depends_on_the_input_is_refused():
    def f(x):
        return jax.lax.while_loop(lambda c: c < 10.0, lambda c: c * 2.0, x)

    _raises(f, jnp.array(1.0), jnp.array(3.0), "'while'", "number of iterations")


def test_a_cond_taking_different_branches_is_refused():
    def f(x):
        return jax.lax.cond(x > 0, jnp.exp, jnp.tanh, x)

    _raises(f, jnp.array(1.0), jnp.array(-1.0), "'cond'", "differs")


def _norms():
    import equinox
    import flax.linen

    rng = np.random.default_rng(7)
    w, b = rng.uniform(0.5, 1.5, 5), rng.standard_normal(5)
    eqx_norm = equinox.tree_at(lambda n: (n.weight, n.bias), equinox.nn.LayerNorm(5, eps=1e-6),
                               (jnp.asarray(w), jnp.asarray(b)))
    layer_norm = dict(normalized_shape=(5,), weight=w, bias=b, eps=1e-6)
    return {  # name -> (the JAX form, its ops rule and parameters)
        "flax_layer_norm": (lambda v: flax.linen.LayerNorm(epsilon=1e-6).apply({"params": {"scale": w, "bias": b}}, v),
                            "layer_norm", layer_norm),
        "equinox_layer_norm": (jax.vmap(eqx_norm), "layer_norm", layer_norm),
        "standardize": (lambda v: jax.nn.standardize(v, epsilon=1e-6) * w + b, "layer_norm", layer_norm),
        "flax_rms_norm": (lambda v: flax.linen.RMSNorm(epsilon=1e-6).apply({"params": {"scale": w}}, v),
                          "rms_norm", dict(normalized_shape=(5,), weight=w, eps=1e-6)),
    }


@pytest.mark.parametrize("name", ["flax_layer_norm", "equinox_layer_norm", "standardize", "flax_rms_norm"])
def test_layer_and_rms_norms_get_the_ops_rule(name):
    """flax / equinox LayerNorm, jax.nn.standardize (variance E[x²] − E[x]²: the same multiplier) and
    flax RMSNorm give ops' layer_norm / rms_norm multipliers element-wise."""
    norm, kind, params = _norms()[name]
    rng = np.random.default_rng(len(name))
    x, r, m_out = (rng.standard_normal((3, 5)) for _ in range(3))
    ours = reference_jax.deeplift(lambda v: jnp.sum(m_out * norm(v)))(x, r)
    want = reference_jax.ops.OP_SPECS[kind].rule(m_out, (x,), (r,), **params)[0]
    assert np.max(np.abs(np.asarray(ours) - want)) <= TOL * np.max(np.abs(want))


def test_a_non_finite_multiplier_is_refused_naming_the_leaf():
    # atan2 at (0, 0) in both halves has no derivative: the multipliers would be NaN.
    f = lambda t: jnp.arctan2(t["y"][0], t["x"][0])  # noqa: E731
    zeros = {"x": jnp.zeros(1), "y": jnp.zeros(1)}
    with pytest.raises(DeepLiftError, match=r"1 of the 1 multipliers of input leaf \['x'\] are not finite"):
        reference_jax.deeplift(f)(zeros, zeros)
    explain = jax.jit(jax.vmap(reference_jax.deeplift(f)))
    batch = jax.tree.map(lambda v: jnp.stack([v + 1.0, v]), zeros)
    with pytest.raises(jax.errors.JaxRuntimeError, match="multipliers of input leaf .* are not finite.*atan2 at"):
        jax.block_until_ready(explain(batch, batch))
    ones = jax.tree.map(lambda v: v + 1.0, zeros)
    m = jax.block_until_ready(explain(jax.tree.map(lambda v: v[None], ones), jax.tree.map(lambda v: v[None], zeros)))
    assert np.isfinite(float(m["x"][0, 0])) and np.isfinite(float(m["y"][0, 0]))


def test_an_infinite_input_is_refused_even_where_its_multiplier_is_finite():
    # tanh saturates: the multiplier of an inf input is 0, its attribution inf · 0 = NaN.
    f = lambda v: jnp.sum(jnp.tanh(v) * jnp.array([1.0, 2.0, 3.0]))  # noqa: E731
    x, r = jnp.array([jnp.inf, 1.0, 2.0]), jnp.zeros(3)
    with pytest.raises(DeepLiftError, match=r"the input leaf <root> holds 1 NaN or inf element\(s\) of 3"):
        reference_jax.deeplift(f)(x, r)
    with pytest.raises(DeepLiftError, match="the reference leaf <root> holds 1 NaN or inf"):
        reference_jax.deeplift(lambda v: jnp.sum(jax.nn.relu(v)))(jnp.ones(2), jnp.array([-jnp.inf, 0.0]))
    with pytest.raises(jax.errors.JaxRuntimeError, match="the input leaf <root> holds 1 NaN or inf"):
        jax.block_until_ready(jax.jit(reference_jax.deeplift(f))(x, r))


@pytest.mark.parametrize("narrow", ["bfloat16", "float16", "reduce_precision"])
def test_rounding_below_float32_inside_fn_is_refused(narrow):
    # A bfloat16 cast rounds by up to 4e-3: taken as linear it missed fn(x) - fn(r) by 5e-3.
    cast = {"bfloat16": lambda v: v.astype(jnp.bfloat16).astype(v.dtype),
            "float16": lambda v: v.astype(jnp.float16).astype(v.dtype),
            "reduce_precision": lambda v: jax.lax.reduce_precision(v, 8, 7)}[narrow]
    f = lambda v: jnp.sum(jnp.tanh(cast(v)) * jnp.arange(1.0, 5.0))  # noqa: E731
    x, r = jnp.array([0.3, -1.2, 2.0, 0.7]), jnp.array([-0.5, 0.4, 0.1, 0.2])
    with pytest.raises(DeepLiftError, match="rounds an input-dependent value to fewer than float32"):
        reference_jax.deeplift(f)(x, r)
    # casts that keep float32's bits, and a narrowing cast of a constant, stay linear
    keep = lambda v: jnp.sum(jnp.tanh(v.astype(jnp.float32)) * jnp.arange(1.0, 5.0, dtype=jnp.float32))  # noqa: E731
    m = reference_jax.deeplift(keep)(x.astype(jnp.float32), r.astype(jnp.float32))
    assert abs(float(jnp.sum((x - r).astype(jnp.float32) * m) - (keep(x) - keep(r)))) <= 1e-5 * float(
        jnp.abs(keep(x)) + 1)
    constant = lambda v: jnp.sum(jnp.tanh(v) * jnp.arange(1.0, 5.0).astype(jnp.bfloat16).astype(v.dtype))  # noqa: E731
    m = reference_jax.deeplift(constant)(x, r)
    assert abs(float(jnp.sum((x - r) * m) - (constant(x) - constant(r)))) <= tolerance_for(x.dtype) * 10


def test_bad_arguments_are_named():
    f = lambda v: jnp.sum(jnp.tanh(v))  # noqa: E731
    with pytest.raises(ValueError, match="pytree structure"):
        reference_jax.deeplift(f)({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    with pytest.raises(ValueError, match="must match"):
        reference_jax.deeplift(f)(jnp.ones(2), jnp.ones(3))
    with pytest.raises(TypeError, match="floating"):
        reference_jax.deeplift(f)(jnp.ones(2, int), jnp.ones(2, int))
    with pytest.raises(TypeError, match="one floating scalar"):
        reference_jax.deeplift(jnp.tanh)(jnp.ones(2), jnp.zeros(2))


def test_covered_primitives_names_the_rules():
    names = set(covered_primitives())
    for name in ("dot_general", "tanh", "logistic", "exp", "log", "max", "mul", "div", "scan", "while",
                 "cond", "jit", "remat2", "custom_jvp_call", "custom_vjp_call", "erf", "integer_pow", "reduce_max"):
        assert name in names


# --------------------------------------------------------------------------- the erf rule


@pytest.mark.parametrize(
    "a,r", [(0.3, 0.3 + 1e-9), (2.5, 2.5 - 1e-6), (-4.0, -3.5), (5.0, 6.0), (-0.2, 0.4), (1e-3, -1e-3)]
)
def test_erf_quotient_against_mpmath(a, r):
    mpmath.mp.dps = 50
    a_mp, r_mp = mpmath.mpf(a), mpmath.mpf(r)
    expected = float((mpmath.erf(a_mp) - mpmath.erf(r_mp)) / (a_mp - r_mp))
    got = float(rules.erf_quotient(jnp.float64(a), jnp.float64(r)))
    assert abs(got - expected) <= 1e-13 * abs(expected)
