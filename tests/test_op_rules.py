"""Op rules (torch_handler.ops): summation to delta, the Δ → 0 limit, Shapley values, composites.

* Elementwise ops: for random pairs, tiny deltas, pairs straddling a kink and large values, per
  half and per pair, Σ_k Σ m_k Δ_k equals Σ m Δf with Δf evaluated in 50-digit arithmetic
  (mpmath), relative to Σ |m Δf|: 1e-10 (float64), 1e-5 (float32).
* At actual == reference the multipliers equal torch.autograd's vector-Jacobian product.
* Binary ops: each operand's contribution equals the brute-force two-player Shapley value.
* Bilinear ops and composites: summation to delta against torch's own function (float64
  evaluation of the same inputs), the autograd limit, and composites equal the chain of the
  rules of their parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE

from torch_handler.ops import OP_RULES, rule_for

pytestmark = pytest.mark.usefixtures("one_thread")

mpmath.mp.dps = 50
TOL = TOLERANCE  # the project's one definition of "exact" (torch_handler.additivity)
DTYPES = [torch.float64, torch.float32]
N, S = 4, 12


# --------------------------------------------------------------------------------------
# Elementwise cases
# --------------------------------------------------------------------------------------


def mp_sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


def mp_softplus(x, beta, threshold):
    return x if beta * x > threshold else mpmath.log1p(mpmath.exp(beta * x)) / beta


def mp_gelu_tanh(x):
    k = mpmath.sqrt(2 / mpmath.pi)
    return x / 2 * (1 + mpmath.tanh(k * (x + mpmath.mpf(0.044715) * x**3)))


def mp_clamp(x, lo, hi):
    if lo is not None and x < lo:
        return mpmath.mpf(lo)
    if hi is not None and x > hi:
        return mpmath.mpf(hi)
    return x


@dataclass
class Elementwise:
    name: str
    torch_fn: Callable  # operands (torch) -> output
    mp_fn: Callable  # operands (mpf) -> mpf
    domains: tuple  # per operand: "real", "positive", "nonzero"
    params: dict = field(default_factory=dict)
    kinks: tuple = ()  # points where the function changes form (tested straddled)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or self.name


UNARY = [
    Elementwise("relu", torch.relu, lambda x: max(x, 0), ("real",), kinks=(0.0,)),
    Elementwise(
        "leaky_relu",
        lambda x: F.leaky_relu(x, 0.2),
        lambda x: x if x > 0 else mpmath.mpf(0.2) * x,
        ("real",),
        {"negative_slope": 0.2},
        kinks=(0.0,),
    ),
    Elementwise("relu6", F.relu6, lambda x: mp_clamp(x, 0.0, 6.0), ("real",), kinks=(0.0, 6.0)),
    Elementwise(
        "elu",
        lambda x: F.elu(x, 1.5),
        lambda x: x if x > 0 else mpmath.mpf(1.5) * mpmath.expm1(x),
        ("real",),
        {"alpha": 1.5},
        kinks=(0.0,),
    ),
    Elementwise("gelu", F.gelu, lambda x: x * mpmath.ncdf(x), ("real",)),
    Elementwise(
        "gelu",
        lambda x: F.gelu(x, approximate="tanh"),
        mp_gelu_tanh,
        ("real",),
        {"approximate": "tanh"},
        id="gelu_tanh",
    ),
    Elementwise("silu", F.silu, lambda x: x * mp_sigmoid(x), ("real",)),
    Elementwise(
        "softplus",
        lambda x: F.softplus(x, beta=2.0, threshold=5.0),
        lambda x: mp_softplus(x, 2, 5),
        ("real",),
        {"beta": 2.0, "threshold": 5.0},
        kinks=(2.5,),
    ),
    Elementwise("softplus", F.softplus, lambda x: mp_softplus(x, 1, 20), ("real",), id="softplus_default"),
    Elementwise("sigmoid", torch.sigmoid, mp_sigmoid, ("real",)),
    Elementwise("tanh", torch.tanh, mpmath.tanh, ("real",)),
    Elementwise("exp", torch.exp, mpmath.exp, ("real",)),
    Elementwise("log", torch.log, mpmath.log, ("positive",)),
    Elementwise("sqrt", torch.sqrt, mpmath.sqrt, ("positive",)),
    Elementwise("rsqrt", torch.rsqrt, lambda x: 1 / mpmath.sqrt(x), ("positive",)),
    Elementwise("reciprocal", torch.reciprocal, lambda x: 1 / x, ("nonzero",)),
    Elementwise("square", torch.square, lambda x: x * x, ("real",)),
    Elementwise(
        "clamp",
        lambda x: x.clamp(-0.5, 0.75),
        lambda x: mp_clamp(x, -0.5, 0.75),
        ("real",),
        {"min": -0.5, "max": 0.75},
        kinks=(-0.5, 0.75),
    ),
    Elementwise(
        "clamp",
        lambda x: x.clamp(min=0.25),
        lambda x: mp_clamp(x, 0.25, None),
        ("real",),
        {"min": 0.25},
        kinks=(0.25,),
        id="clamp_min",
    ),
    Elementwise("pow_scalar", lambda x: x**2.5, lambda x: x ** mpmath.mpf(2.5), ("positive",), {"exponent": 2.5}),
    Elementwise("pow_scalar", lambda x: x**0.5, mpmath.sqrt, ("positive",), {"exponent": 0.5}, id="pow_half"),
    Elementwise("pow_scalar", lambda x: x**3, lambda x: x**3, ("real",), {"exponent": 3.0}, id="pow_cube"),
    Elementwise("pow_scalar", lambda x: x**-2, lambda x: x**-2, ("nonzero",), {"exponent": -2.0}, id="pow_minus2"),
]

BINARY = [
    Elementwise("mul", torch.mul, lambda u, v: u * v, ("real", "real")),
    Elementwise("div", torch.div, lambda u, v: u / v, ("real", "nonzero")),
    Elementwise("maximum", torch.maximum, max, ("real", "real")),
    Elementwise("minimum", torch.minimum, min, ("real", "real")),
    Elementwise("pow", torch.pow, lambda u, v: u**v, ("positive", "real")),
    Elementwise("atan2", torch.atan2, mpmath.atan2, ("real", "real")),
]

LARGE_SCALE = {"exp": 20.0, "pow": 3.0}  # scale of the "large" draws (default 40; u ** v overflows above)


def draw(domain: str, shape, generator, scale=1.5) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if domain == "positive":  # e^±30 at most: representable in float32 with room for powers
        return torch.exp(x.clamp(-30 / 2.5, 30 / 2.5) if scale > 8 else x)
    if domain == "nonzero":
        return torch.sign(x + 1e-300) * (x.abs() + 0.2)
    return x


def nudge(x: torch.Tensor, dtype, generator) -> torch.Tensor:
    """A value a few units in the last place of ``dtype`` away from x (same sign)."""
    rel = 4 * torch.finfo(dtype).eps
    return x * (1 + rel * torch.randn(x.shape, generator=generator, dtype=torch.float64))


def pairs(case: Elementwise, kind: str, dtype, seed: int):
    """(actual, reference) tuples of (N, S) operands of the given dtype for one kind of pair."""
    g = torch.Generator().manual_seed(seed)
    scale = LARGE_SCALE.get(case.name, 40.0) if kind == "large" else 1.5
    reference = [draw(d, (N, S), g, scale) for d in case.domains]
    if kind in ("random", "large"):
        actual = [draw(d, (N, S), g, scale) for d in case.domains]
    elif kind == "mixed":  # random pairs with about half of the elements equal (a == r)
        equal = torch.rand((N, S), generator=g) < 0.5
        actual = [torch.where(equal, r, draw(d, (N, S), g)) for d, r in zip(case.domains, reference, strict=True)]
    elif kind == "tiny":
        actual = [nudge(r, dtype, g) for r in reference]
    elif kind == "near":  # relative deltas log-uniform in [1e-8, 1e-1]: every threshold regime
        rel = lambda r: 10 ** (-8 + 7 * torch.rand(r.shape, generator=g, dtype=torch.float64))  # noqa: E731
        actual = [r * (1 + rel(r) * torch.randn(r.shape, generator=g, dtype=torch.float64).sign()) for r in reference]
    elif kind == "kink":
        # both sides within 1e-6 of a kink: the pair straddles it (or sits on one side)
        k = torch.tensor(case.kinks, dtype=torch.float64)[torch.randint(len(case.kinks), (N, S), generator=g)]
        reference = [k + 1e-6 * torch.randn((N, S), generator=g, dtype=torch.float64)]
        actual = [k + 1e-6 * torch.randn((N, S), generator=g, dtype=torch.float64)]
    else:
        raise ValueError(kind)
    cast = lambda ts: tuple(t.to(dtype) for t in ts)  # noqa: E731
    return cast(actual), cast(reference)


def mp_apply(fn, operands, params=None) -> np.ndarray:
    """fn applied elementwise in 50-digit arithmetic: (N, S) float arrays -> object array of mpf."""
    arrays = [np.asarray(t.double().numpy(), dtype=float) for t in operands]
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fn(*(mpmath.mpf(a[idx]) for a in arrays))
    return out


def output_multiplier(shape, dtype, seed=123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2,) + tuple(shape), generator=g, dtype=torch.float64).to(dtype)


def assert_sums_to_delta(multipliers, actual, reference, m, delta_f: np.ndarray, tol: float):
    """Per half and per pair: Σ_k Σ m_k Δ_k == Σ m Δf (mpmath Δf), relative to the magnitude of
    what is summed: max(Σ |m Δf|, Σ_k Σ |m_k Δ_k|). (For binary ops the two Shapley terms can
    be far larger than Δf, e.g. u ** v with cross terms u_a ** v_r; rounding is relative to them.)"""
    m64 = m.double().numpy()
    lhs = np.zeros(m64.shape[:2])
    terms = np.zeros(m64.shape[:2])
    for m_k, a, r in zip(multipliers, actual, reference, strict=True):
        contribution = m_k.double().numpy() * (a.double() - r.double()).numpy()
        lhs = lhs + contribution.reshape(2, N, -1).sum(-1)
        terms = terms + np.abs(contribution).reshape(2, N, -1).sum(-1)
    exact = m64.astype(object) * delta_f[None]
    rhs = np.array([[float(mpmath.fsum(exact[h, n].ravel())) for n in range(N)] for h in range(2)])
    scale = np.array([[float(mpmath.fsum(abs(e) for e in exact[h, n].ravel())) for n in range(N)] for h in range(2)])
    scale = np.maximum(scale, terms)
    err = np.abs(lhs - rhs)
    assert (err <= tol * scale + 1e-300).all(), f"max relative error {np.max(err / np.maximum(scale, 1e-300)):.3e}"


KINDS = ["random", "mixed", "near", "tiny", "large"]


def elementwise_params():
    for case in UNARY + BINARY:
        kinds = KINDS + (["kink"] if case.kinks else [])
        for kind in kinds:
            for dtype in DTYPES:
                yield pytest.param(case, kind, dtype, id=f"{case.id}-{kind}-{str(dtype)[6:]}")


@pytest.mark.parametrize("case,kind,dtype", list(elementwise_params()))
def test_elementwise_sums_to_delta(case, kind, dtype):
    actual, reference = pairs(case, kind, dtype, seed=hash((case.id, kind)) % 2**31)
    m = output_multiplier((N, S), dtype)
    multipliers = OP_RULES[case.name](m, actual, reference, **case.params)
    assert len(multipliers) == len(actual)
    for m_k in multipliers:
        assert m_k.shape == (2, N, S) and m_k.dtype == dtype
        assert torch.isfinite(m_k).all()
    delta_f = mp_apply(case.mp_fn, actual) - mp_apply(case.mp_fn, reference)
    assert_sums_to_delta(multipliers, actual, reference, m, delta_f, TOL[dtype])


def autograd_vjp(fn, operands, m):
    """Per half: the vector-Jacobian product of fn at operands (float64), (2, *shape) each."""
    leaves = [t.detach().double().requires_grad_() for t in operands]
    out = fn(*leaves)
    grads = [torch.autograd.grad(out, leaves, m_h.double(), retain_graph=True, allow_unused=True) for m_h in m]
    return [
        torch.stack([g[k] if g[k] is not None else torch.zeros_like(leaves[k]) for g in grads])
        for k in range(len(operands))
    ]


def assert_close_normwise(got, expected, tol, what=""):
    got, expected = got.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-300)
    err = ((got - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: normwise error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", UNARY + BINARY, ids=lambda c: c.id)
def test_elementwise_limit_is_the_derivative(case, dtype):
    """At actual == reference the multiplier is torch.autograd's derivative there."""
    g = torch.Generator().manual_seed(7)
    operands = tuple(draw(d, (N, S), g).to(dtype) for d in case.domains)
    m = output_multiplier((N, S), dtype)
    multipliers = OP_RULES[case.name](m, operands, operands, **case.params)
    expected = autograd_vjp(case.torch_fn, operands, m)
    for k, (got, want) in enumerate(zip(multipliers, expected, strict=True)):
        assert_close_normwise(got, want, TOL[dtype] / 10, f"{case.id} operand {k}")


def mp_shapley(fn, u_a, v_a, u_r, v_r):
    """Brute-force two-player Shapley values (φ_u, φ_v), object arrays of mpf."""
    f = lambda u, v: mp_apply(fn, (u, v))  # noqa: E731
    f_aa, f_rr, f_ar, f_ra = f(u_a, v_a), f(u_r, v_r), f(u_a, v_r), f(u_r, v_a)
    phi_u = (f_ar - f_rr + f_aa - f_ra) / 2
    phi_v = (f_ra - f_rr + f_aa - f_ar) / 2
    return phi_u, phi_v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "near", "tiny"])
@pytest.mark.parametrize("case", BINARY, ids=lambda c: c.id)
def test_binary_multipliers_are_the_shapley_values(case, kind, dtype):
    """m_k Δ_k == m φ_k for each operand separately (not only their sum)."""
    actual, reference = pairs(case, kind, dtype, seed=11)
    m = torch.ones((2, N, S), dtype=dtype)
    m_u, m_v = OP_RULES[case.name](m, actual, reference)
    phi_u, phi_v = mp_shapley(case.mp_fn, actual[0], actual[1], reference[0], reference[1])
    for m_k, phi, k in ((m_u, phi_u, 0), (m_v, phi_v, 1)):
        delta = (actual[k].double() - reference[k].double()).numpy()
        got = m_k[0].double().numpy() * delta
        want = phi.astype(float)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= TOL[dtype] * scale, f"operand {k}"
        assert torch.equal(m_k[0], m_k[1])  # both halves get the same rule


@pytest.mark.parametrize("case", BINARY, ids=lambda c: c.id)
def test_binary_limit_with_one_operand_fixed(case):
    """u_a == u_r, v varying: m_u = m · ½[∂_u f(u, v_r) + ∂_u f(u, v_a)]."""
    g = torch.Generator().manual_seed(3)
    u = draw(case.domains[0], (N, S), g)
    v_a, v_r = draw(case.domains[1], (N, S), g), draw(case.domains[1], (N, S), g)
    m = output_multiplier((N, S), torch.float64)
    m_u, _ = OP_RULES[case.name](m, (u, v_a), (u, v_r))
    d_a = autograd_vjp(case.torch_fn, (u, v_a), m)[0]
    d_r = autograd_vjp(case.torch_fn, (u, v_r), m)[0]
    assert_close_normwise(m_u, (d_a + d_r) / 2, 1e-12, case.id)


# --------------------------------------------------------------------------------------
# Bilinear ops and composites
# --------------------------------------------------------------------------------------


def per_pair(fn):
    """vmap of a per-pair function over the pair axis."""
    return torch.func.vmap(fn)


# Scale of the composites' "large" draws: softmax logits and attention scores whose two halves
# differ in level by tens (the softmax rule goes through log_softmax so that stays accurate).
COMPOSITE_LARGE_SCALE = 8.0


@dataclass
class Composite:
    id: str
    name: str
    torch_fn: Callable  # (N, ...) operands -> (N, ...) output
    shapes: tuple  # per-pair operand shapes
    params: dict = field(default_factory=dict)
    domains: tuple = ()

    def draw(self, g, scale=1.0):
        domains = self.domains or ("real",) * len(self.shapes)
        return tuple(draw(d, (N,) + s, g, scale) for d, s in zip(domains, self.shapes, strict=True))


_w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
_b = torch.linspace(-0.3, 0.4, 6, dtype=torch.float64)
_w45 = torch.linspace(0.5, 1.5, 20, dtype=torch.float64).reshape(4, 5)
_bool_mask = torch.tensor([[True, False, True, True, False, True]] * 5)
_float_mask = torch.linspace(-1, 1, 30, dtype=torch.float64).reshape(5, 6)

COMPOSITES = [
    Composite("matmul", "matmul", per_pair(torch.matmul), ((3, 5, 4), (4, 6))),
    Composite("matmul_bcast", "matmul", per_pair(torch.matmul), ((1, 5, 4), (3, 4, 6))),
    Composite("bmm", "bmm", per_pair(torch.bmm), ((3, 5, 4), (3, 4, 6))),
    Composite("mm", "mm", per_pair(torch.mm), ((5, 4), (4, 6))),
    Composite(
        "einsum",
        "einsum",
        per_pair(lambda u, v: torch.einsum("tk,sk->ts", u, v)),
        ((5, 4), (6, 4)),
        {"equation": "tk,sk->ts"},
    ),
    Composite(
        "einsum_implicit",
        "einsum",
        per_pair(lambda u, v: torch.einsum("bij,jk", u, v)),
        ((2, 5, 4), (4, 3)),
        {"equation": "bij,jk"},
    ),
    Composite(
        "baddbmm",
        "baddbmm",
        per_pair(lambda c, u, v: torch.baddbmm(c, u, v, beta=0.5, alpha=2.0)),
        ((1, 5, 6), (3, 5, 4), (3, 4, 6)),
        {"beta": 0.5, "alpha": 2.0},
    ),
    Composite("linear", "linear", per_pair(F.linear), ((7, 4), (6, 4), (6,))),
    Composite("linear_nobias", "linear", per_pair(lambda x, w: F.linear(x, w)), ((2, 7, 4), (6, 4))),
    Composite("softmax", "softmax", lambda x: torch.softmax(x, -1), ((5, 6),), {"dim": -1}),
    Composite("softmax_dim0", "softmax", lambda x: torch.softmax(x, -2), ((5, 6),), {"dim": -2}),
    Composite("log_softmax", "log_softmax", lambda x: torch.log_softmax(x, -1), ((5, 6),), {"dim": -1}),
    Composite("logsumexp", "logsumexp", lambda x: torch.logsumexp(x, -1), ((5, 6),), {"dim": -1}),
    Composite(
        "logsumexp_keep",
        "logsumexp",
        lambda x: torch.logsumexp(x, (-1, -2), keepdim=True),
        ((5, 6),),
        {"dim": (-1, -2), "keepdim": True},
    ),
    Composite(
        "layer_norm",
        "layer_norm",
        lambda x: F.layer_norm(x, (6,), _w.to(x.dtype), _b.to(x.dtype)),
        ((5, 6),),
        {"normalized_shape": (6,), "weight": _w, "bias": _b},
    ),
    Composite(
        "layer_norm_2d",
        "layer_norm",
        lambda x: F.layer_norm(x, (4, 5), eps=1e-3),
        ((3, 4, 5),),
        {"normalized_shape": (4, 5), "eps": 1e-3},
    ),
    Composite(
        "rms_norm",
        "rms_norm",
        lambda x: F.rms_norm(x, (6,), _w.to(x.dtype)),
        ((5, 6),),
        {"normalized_shape": (6,), "weight": _w},
    ),
    Composite(
        "rms_norm_eps",
        "rms_norm",
        lambda x: F.rms_norm(x, (4, 5), eps=1e-2),
        ((3, 4, 5),),
        {"normalized_shape": (4, 5), "eps": 1e-2},
    ),
    Composite("vector_norm", "vector_norm", lambda x: torch.linalg.vector_norm(x, dim=-1), ((5, 6),), {"dim": -1}),
    Composite(
        "vector_norm_all", "vector_norm", lambda x: torch.linalg.vector_norm(x, dim=(1, 2)), ((5, 6),), {"dim": None}
    ),
    Composite("glu", "glu", lambda x: F.glu(x, -1), ((5, 6),), {"dim": -1}),
    Composite("glu_dim0", "glu", lambda x: F.glu(x, -2), ((6, 5),), {"dim": -2}),
    Composite("amax", "amax", lambda x: x.amax(-1), ((5, 6),), {"dim": -1}),
    Composite("amax_keep", "amax", lambda x: x.amax(-2, keepdim=True), ((5, 6),), {"dim": -2, "keepdim": True}),
    Composite("amax_dims", "amax", lambda x: x.amax((-1, -3)), ((3, 5, 6),), {"dim": (-1, -3)}),
    Composite("max_values", "amax", lambda x: x.max(-1).values, ((5, 6),), {"dim": -1}),
    Composite(
        "sdpa",
        "scaled_dot_product_attention",
        F.scaled_dot_product_attention,
        ((2, 5, 4), (2, 6, 4), (2, 6, 3)),
    ),
    Composite(
        "sdpa_causal",
        "scaled_dot_product_attention",
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ((2, 5, 4), (2, 6, 4), (2, 6, 3)),
        {"is_causal": True},
    ),
    Composite(
        "sdpa_bool_mask",
        "scaled_dot_product_attention",
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask, scale=0.7),
        ((2, 5, 4), (2, 6, 4), (2, 6, 3)),
        {"attn_mask": _bool_mask, "scale": 0.7},
    ),
    Composite(
        "sdpa_float_mask",
        "scaled_dot_product_attention",
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_float_mask.to(q.dtype)),
        ((2, 5, 4), (2, 6, 4), (2, 6, 3)),
        {"attn_mask": _float_mask},
    ),
]


def composite_pairs(case: Composite, kind: str, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    reference = case.draw(g)
    if kind == "random":
        actual = case.draw(g)
    elif kind == "mixed":  # about half of the elements equal (a == r), the others random
        actual = tuple(
            torch.where(torch.rand(r.shape, generator=g) < 0.5, r, a)
            for r, a in zip(reference, case.draw(g), strict=True)
        )
    elif kind == "near":  # relative deltas 1e-4: the Rescale factors near their limits
        actual = tuple(r + 1e-4 * torch.randn(r.shape, generator=g, dtype=torch.float64) for r in reference)
    elif kind == "large":
        reference, actual = case.draw(g, COMPOSITE_LARGE_SCALE), case.draw(g, COMPOSITE_LARGE_SCALE)
    else:
        raise ValueError(kind)
    return tuple(t.to(dtype) for t in actual), tuple(t.to(dtype) for t in reference)


def output_scale(values) -> torch.Tensor:
    return values.abs().reshape(values.shape[0], -1).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "mixed", "near", "large"])
@pytest.mark.parametrize("case", COMPOSITES, ids=lambda c: c.id)
def test_composite_sums_to_delta(case, kind, dtype):
    """Per half and pair: Σ_k Σ m_k Δ_k == Σ m (f(a) − f(r)), relative to Σ |m| (|f(a)| + |f(r)|)
    (f evaluated by torch in float64 on the same inputs)."""
    actual, reference = composite_pairs(case, kind, dtype)
    f_a = case.torch_fn(*(t.double() for t in actual))
    f_r = case.torch_fn(*(t.double() for t in reference))
    m = output_multiplier(f_a.shape, dtype)
    multipliers = rule_for(case.name)(m, actual, reference, **case.params)
    assert len(multipliers) == len(actual)
    lhs = 0
    for m_k, a, r in zip(multipliers, actual, reference, strict=True):
        assert m_k.shape == (2,) + a.shape and m_k.dtype == dtype
        lhs = lhs + (m_k.double() * (a.double() - r.double())).reshape(2, N, -1).sum(-1)
    m64 = m.double()
    rhs = (m64 * (f_a - f_r)).reshape(2, N, -1).sum(-1)
    scale = (m64.abs() * (f_a.abs() + f_r.abs())).reshape(2, N, -1).sum(-1)
    err = ((lhs - rhs).abs() / scale).max().item()
    assert err <= TOL[dtype], f"relative error {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", COMPOSITES, ids=lambda c: c.id)
def test_composite_limit_is_the_derivative(case, dtype):
    g = torch.Generator().manual_seed(9)
    operands = tuple(t.to(dtype) for t in case.draw(g))
    out = case.torch_fn(*(t.double() for t in operands))
    m = output_multiplier(out.shape, dtype)
    multipliers = rule_for(case.name)(m, operands, operands, **case.params)
    expected = autograd_vjp(case.torch_fn, operands, m)
    for k, (got, want) in enumerate(zip(multipliers, expected, strict=True)):
        assert_close_normwise(got, want, TOL[dtype] / 10, f"{case.id} operand {k}")


# --- composites equal the chain of their parts -------------------------------------------

R = OP_RULES


def mean(a, r):
    return (a + r) / 2


def chain_softmax(m, x_a, x_r, dim):
    # softmax = exp(log_softmax(x))
    u_a, u_r = x_a.log_softmax(dim), x_r.log_softmax(dim)
    (m_u,) = R["exp"](m, (u_a,), (u_r,))
    return chain_log_softmax(m_u, x_a, x_r, dim)


def chain_log_softmax(m, x_a, x_r, dim):
    c = torch.maximum(x_a.amax(dim, keepdim=True), x_r.amax(dim, keepdim=True))
    z_a, z_r = x_a - c, x_r - c
    S_a, S_r = z_a.exp().sum(dim, keepdim=True), z_r.exp().sum(dim, keepdim=True)
    (m_S,) = R["log"](-m.sum(dim, keepdim=True), (S_a,), (S_r,))
    return m + R["exp"](m_S.expand_as(m), (z_a,), (z_r,))[0]


def chain_layer_norm(m, x_a, x_r, dims, weight, eps, center=True):
    n = math.prod(x_a.shape[d] for d in dims)
    xc_a = x_a - x_a.mean(dims, keepdim=True) if center else x_a
    xc_r = x_r - x_r.mean(dims, keepdim=True) if center else x_r
    v_a, v_r = (xc_a**2).mean(dims, keepdim=True) + eps, (xc_r**2).mean(dims, keepdim=True) + eps
    s_a, s_r = v_a.rsqrt().expand_as(x_a), v_r.rsqrt().expand_as(x_r)
    m_y0 = m * weight if weight is not None else m
    m_xc, m_s = R["mul"](m_y0, (xc_a, s_a), (xc_r, s_r))
    (m_v,) = R["rsqrt"](m_s.sum(dims, keepdim=True), (v_a,), (v_r,))
    (m_sq,) = R["square"]((m_v / n).expand_as(m), (xc_a,), (xc_r,))
    m_xc = m_xc + m_sq
    return m_xc - m_xc.mean(dims, keepdim=True) if center else m_xc


def chain_sdpa(m, q_a, k_a, v_a, q_r, k_r, v_r, scale):
    S_a, S_r = q_a @ k_a.transpose(-1, -2) * scale, q_r @ k_r.transpose(-1, -2) * scale
    P_a, P_r = S_a.softmax(-1), S_r.softmax(-1)
    m_P, m_v = R["matmul"](m, (P_a, v_a), (P_r, v_r))
    (m_S,) = R["softmax"](m_P, (S_a,), (S_r,), dim=-1)
    m_q, m_kt = R["matmul"](m_S * scale, (q_a, k_a.transpose(-1, -2)), (q_r, k_r.transpose(-1, -2)))
    return m_q, m_kt.transpose(-1, -2), m_v


def test_composites_equal_the_chain_of_their_parts():
    g = torch.Generator().manual_seed(21)
    x = lambda *s: torch.randn((N,) + s, generator=g, dtype=torch.float64)  # noqa: E731
    m = lambda *s: torch.randn((2, N) + s, generator=g, dtype=torch.float64)  # noqa: E731
    close = lambda got, want, what: assert_close_normwise(got, want, 1e-13, what)  # noqa: E731

    x_a, x_r, m5 = x(5, 6), x(5, 6), m(5, 6)
    for dim in (-1, -2):
        close(R["softmax"](m5, (x_a,), (x_r,), dim=dim)[0], chain_softmax(m5, x_a, x_r, dim), "softmax")
        close(R["log_softmax"](m5, (x_a,), (x_r,), dim=dim)[0], chain_log_softmax(m5, x_a, x_r, dim), "log_softmax")

    # logsumexp = log(S) of the same sum: m_x = R_exp(R_log(m))
    m1 = m(5)
    c = torch.maximum(x_a.amax(-1, keepdim=True), x_r.amax(-1, keepdim=True))
    S_a, S_r = (x_a - c).exp().sum(-1, keepdim=True), (x_r - c).exp().sum(-1, keepdim=True)
    (m_S,) = R["log"](m1.unsqueeze(-1), (S_a,), (S_r,))
    want = R["exp"](m_S.expand_as(m5), (x_a - c,), (x_r - c,))[0]
    close(R["logsumexp"](m1, (x_a,), (x_r,), dim=-1)[0], want, "logsumexp")

    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    close(
        R["layer_norm"](m5, (x_a,), (x_r,), normalized_shape=(6,), weight=w, bias=w, eps=1e-5)[0],
        chain_layer_norm(m5, x_a, x_r, (-1,), w, 1e-5),
        "layer_norm",
    )
    close(
        R["rms_norm"](m5, (x_a,), (x_r,), normalized_shape=(6,), weight=w, eps=1e-6)[0],
        chain_layer_norm(m5, x_a, x_r, (-1,), w, 1e-6, center=False),
        "rms_norm",
    )

    # vector_norm = sqrt(sum(square(x)))
    S_a, S_r = (x_a**2).sum(-1, keepdim=True), (x_r**2).sum(-1, keepdim=True)
    (m_S,) = R["sqrt"](m1.unsqueeze(-1), (S_a,), (S_r,))
    close(
        R["vector_norm"](m1, (x_a,), (x_r,), dim=-1)[0],
        R["square"](m_S.expand_as(m5), (x_a,), (x_r,))[0],
        "vector_norm",
    )

    # glu = a * sigmoid(b)
    m3 = m(5, 3)
    a_a, b_a = x_a.chunk(2, -1)
    a_r, b_r = x_r.chunk(2, -1)
    sg_a, sg_r = b_a.sigmoid(), b_r.sigmoid()
    m_a, m_sg = R["mul"](m3, (a_a, sg_a), (a_r, sg_r))
    (m_b,) = R["sigmoid"](m_sg, (b_a,), (b_r,))
    close(R["glu"](m3, (x_a,), (x_r,), dim=-1)[0], torch.cat((m_a, m_b), -1), "glu")

    # scaled dot-product attention = matmul, softmax, matmul
    q_a, k_a, v_a, q_r, k_r, v_r = x(2, 5, 4), x(2, 6, 4), x(2, 6, 3), x(2, 5, 4), x(2, 6, 4), x(2, 6, 3)
    m_out = m(2, 5, 3)
    got = R["scaled_dot_product_attention"](m_out, (q_a, k_a, v_a), (q_r, k_r, v_r))
    want = chain_sdpa(m_out, q_a, k_a, v_a, q_r, k_r, v_r, 0.5)
    for k, (gk, wk) in enumerate(zip(got, want, strict=True)):
        close(gk, wk, f"sdpa operand {k}")

    # bmm / mm / einsum / linear are the matmul rule on the same contraction
    u_a, u_r, w_a, w_r, mb = x(3, 5, 4), x(3, 5, 4), x(3, 4, 6), x(3, 4, 6), m(3, 5, 6)
    ref = R["matmul"](mb, (u_a, w_a), (u_r, w_r))
    for got, want in zip(R["bmm"](mb, (u_a, w_a), (u_r, w_r)), ref, strict=True):
        close(got, want, "bmm")
    for got, want in zip(R["einsum"](mb, (u_a, w_a), (u_r, w_r), equation="bik,bkj->bij"), ref, strict=True):
        close(got, want, "einsum")


def test_linear_weight_multiplier_is_the_matmul_one():
    g = torch.Generator().manual_seed(4)
    x = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    x_a, x_r, w_a, w_r = x(N, 7, 4), x(N, 7, 4), x(N, 6, 4), x(N, 6, 4)
    m = x(2, N, 7, 6)
    m_x, m_w, m_b = R["linear"](m, (x_a, w_a, w_a[:, 0]), (x_r, w_r, w_r[:, 0]))
    m_x_mm, m_wt = R["matmul"](m, (x_a, w_a.transpose(-1, -2)), (x_r, w_r.transpose(-1, -2)))
    assert_close_normwise(m_x, m_x_mm, 1e-14, "m_x")
    assert_close_normwise(m_w, m_wt.transpose(-1, -2), 1e-14, "m_w")
    assert_close_normwise(m_b, m.sum(-2), 1e-14, "m_b")
    _, _, none = R["linear"](m, (x_a, w_a, None), (x_r, w_r, None))
    assert none is None


# --- amax routing --------------------------------------------------------------------


def test_amax_routes_through_both_maxima():
    x_a = torch.tensor([[1.0, 5.0, 2.0]], dtype=torch.float64)  # j* = 1
    x_r = torch.tensor([[4.0, 1.0, 0.0]], dtype=torch.float64)  # k* = 0
    m = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    (m_x,) = R["amax"](m, (x_a,), (x_r,), dim=-1)
    dy = 5.0 - 4.0  # half through j* (dx = 4), half through k* (dx = -3)
    expected = torch.tensor([[(dy / 2) / -3.0, (dy / 2) / 4.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(m_x, m.unsqueeze(-1) * expected, rtol=1e-15, atol=0)


def test_amax_same_argmax_passes_m_through():
    x_a = torch.tensor([[1.0, 5.0, 2.0]], dtype=torch.float64)
    x_r = torch.tensor([[0.0, 3.0, 2.5]], dtype=torch.float64)
    m = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    (m_x,) = R["amax"](m, (x_a,), (x_r,), dim=-1)
    assert torch.equal(m_x, torch.tensor([[[0.0, 2.0, 0.0]], [[0.0, 3.0, 0.0]]], dtype=torch.float64))


def test_amax_route_with_zero_delta_gives_its_half_to_the_other():
    x_a = torch.tensor([[4.0, 5.0]], dtype=torch.float64)  # j* = 1, dx_j = 5 − 1 = 4
    x_r = torch.tensor([[4.0, 1.0]], dtype=torch.float64)  # k* = 0, dx_k = 0
    m = torch.ones(2, 1, dtype=torch.float64)
    (m_x,) = R["amax"](m, (x_a,), (x_r,), dim=-1)
    assert torch.equal(m_x[0], torch.tensor([[0.0, 0.25]], dtype=torch.float64))  # dy / dx_j = 1/4
    assert ((m_x * (x_a - x_r)).sum(-1) == 1.0).all()


# --- protocol -------------------------------------------------------------------------


def test_positive_dims_are_refused_with_the_fix():
    x = torch.randn(N, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="negative dims"):
        R["softmax"](torch.ones(2, N, 5, 6, dtype=torch.float64), (x,), (x,), dim=1)


def test_unknown_op_names_the_supported_ones():
    with pytest.raises(KeyError, match="no DeepLIFT rule for op 'sort'.*softmax"):
        rule_for("sort")


def test_rules_are_linear_in_m():
    g = torch.Generator().manual_seed(8)
    for case in COMPOSITES + UNARY + BINARY:
        ops_g = torch.Generator().manual_seed(1)
        if isinstance(case, Composite):
            actual, reference = case.draw(ops_g), case.draw(ops_g)
            out = case.torch_fn(*actual)
        else:
            actual = tuple(draw(d, (N, S), ops_g) for d in case.domains)
            reference = tuple(draw(d, (N, S), ops_g) for d in case.domains)
            out = case.torch_fn(*actual)
        m1 = torch.randn((2,) + out.shape, generator=g, dtype=torch.float64)
        m2 = torch.randn((2,) + out.shape, generator=g, dtype=torch.float64)
        rule = rule_for(case.name)
        both = rule(2.0 * m1 - m2, actual, reference, **case.params)
        first, second = rule(m1, actual, reference, **case.params), rule(m2, actual, reference, **case.params)
        parts = zip(first, second, strict=True)
        for got, (p1, p2) in zip(both, parts, strict=True):
            assert_close_normwise(got, 2.0 * p1 - p2, 1e-13, case.id)
