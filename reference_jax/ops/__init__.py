"""Exact DeepLIFT / DeepSHAP multipliers of the tensor ops around recurrent layers, in
float64, for ONE (actual, reference) pair at a time: the oracle twin of the op rules.

Protocol (shared with the torch engine, which is written independently)::

    rule(m, actual, reference, **params) -> tuple[multiplier | None, ...]

* ``actual``, ``reference``: tuples of the op's operands for one pair (no pair axis),
  float64; an operand that does not depend on the explained input is the same array in
  both. Elementwise operands are already broadcast to the output's shape.
* ``m``: the multiplier of the output, shape of the output.
* The result holds one multiplier per operand, shaped like it (``None`` for an absent
  operand, e.g. ``linear`` without bias).

Every rule is linear in ``m`` and exact: ``Σ_k Σ m_k (actual_k − reference_k) ==
Σ m (f(actual) − f(reference))`` to rounding. At ``actual == reference`` the multiplier
is the derivative there (torch's convention at kinks, stated per op).

The rules (``Δ = a − r``, ``mean(u) = (u_a + u_r)/2``):

* Unary elementwise ``y = f(x)`` (Rescale): ``m_x = m · (f(x_a) − f(x_r)) / Δx``.
* Binary elementwise ``y = f(u, v)`` (two-player Shapley):
  ``φ_u = ½ [f(u_a, v_r) − f(u_r, v_r) + f(u_a, v_a) − f(u_r, v_a)]`` and
  ``m_u = m · φ_u / Δu``, i.e. the mean over ``v ∈ {v_r, v_a}`` of the partial quotient
  ``Q_u(u_a, u_r; v) = (f(u_a, v) − f(u_r, v)) / Δu``; symmetric for ``v``.
* Bilinear ``y = B(u, v)``: ``m_u`` is the vector–Jacobian product of ``u ↦ B(u, mean(v))``
  at ``m`` (and vice versa); exact because ``B(u_a, v_a) − B(u_r, v_r) =
  B(Δu, mean(v)) + B(mean(u), Δv)``.
* Composites (softmax, log_softmax, logsumexp, layer_norm, rms_norm, vector_norm, glu,
  scaled_dot_product_attention) are the stated compositions of the rules above, applied
  backwards by the chain rule (softmax as ``exp ∘ log_softmax``, see
  :func:`_softmax_backward`); amax routes its change through the two arg-maxima.

Accuracy for tiny ``Δ``: no quotient is formed from two rounded function values when they
cancel. Each Rescale factor has a cancellation-free closed form (``sqrt``:
``1/(√a + √r)``; ``exp``: ``e^r expm1(Δ)/Δ``; ``log``: ``log1p(Δ/r)/Δ``; ``x·g(x)``
functions through the product identity ``(a g_a − r g_r)/Δ = mean(g) + mean(x)·Δg/Δ``;
sigmoid / tanh through :func:`reference_jax.rescale.rescale`, i.e.
:func:`~reference_jax.rescale.sigmoid_quotient` / ``tanh_quotient``) or, for the Gaussian CDF of
gelu, a midpoint series for small ``Δ``.

:data:`OP_RULES` maps each op name to its rule, :data:`OP_FORWARDS` to its forward ``f``;
:func:`batched_op_multipliers` runs a rule on ``(2, N, ...)`` multipliers of both halves of
a doubled batch and ``(N, ...)`` operands (``vmap`` over pairs, then over halves, ``jit``).

Layout, one module per idea: :mod:`~reference_jax.ops.table` (one entry per op: its twin,
its operands, the cases its tests draw; everything else is derived from it),
:mod:`~reference_jax.ops.checked` (the checked and batched rules), and the rules by family:
:mod:`~reference_jax.ops.unary`, :mod:`~reference_jax.ops.binary`,
:mod:`~reference_jax.ops.bilinear`, :mod:`~reference_jax.ops.softmax`,
:mod:`~reference_jax.ops.norms`, :mod:`~reference_jax.ops.glu`, :mod:`~reference_jax.ops.amax`,
:mod:`~reference_jax.ops.attention`, with the shared quotients in ``_numerics``.
"""


from __future__ import annotations

import importlib

from reference_jax.ops.checked import OP_RULES, batched_op_multipliers
from reference_jax.ops.table import (
    BINARY,
    OP_FORWARDS,
    OP_SPECS,
    UNARY,
    Binary,
    Case,
    MpCheck,
    Operand,
    OpSpec,
    Unary,
    binary_quotients,
    unary_rescale_factor,
)

_Unary, _Binary = Unary, Binary  # the names these had in the single module

__all__ = [
    "BINARY",
    "OP_FORWARDS",
    "OP_RULES",
    "OP_SPECS",
    "UNARY",
    "Binary",
    "Case",
    "MpCheck",
    "OpSpec",
    "Operand",
    "Unary",
    "batched_op_multipliers",
    "binary_quotients",
    "unary_rescale_factor",
]

# The helpers of the single module this package replaces (``_exp_quotient``,
# ``_softmax_backward``, ``_bilinear_multipliers``, ...) stay reachable as
# ``reference_jax.ops.<name>``, looked up in the family modules on first use.
_FAMILIES = ("_numerics", "unary", "binary", "bilinear", "softmax", "norms", "glu", "amax", "attention", "checked")


def __getattr__(name: str):
    for family in _FAMILIES:
        module = importlib.import_module(f"{__name__}.{family}")
        if name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
