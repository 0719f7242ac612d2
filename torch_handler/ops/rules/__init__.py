"""DeepLIFT / DeepSHAP rules for the torch ops that models put around recurrent layers, one
module per family (unary, binary, bilinear, softmax, norms, reductions, attention) and the
shared pieces in ``_common``. The op table, :mod:`torch_handler.ops.table`, names them.

Each rule has the signature

    rule(m, actual, reference, **params) -> tuple[multiplier | None, ...]   (one per operand)

* ``actual`` / ``reference``: tuples of the op's tensor operands for ``N`` (input, reference)
  pairs, pair axis first: operand ``k`` has shape ``(N, *s_k)``. An operand that does not depend
  on the explained input is the same tensor in both.
* Elementwise ops (unary and binary): the operands are already broadcast to the output's shape
  (the caller reduces multipliers back over broadcast dimensions).
* ``m``: the output multiplier for both halves of the doubled batch, ``(2, N, *s_out)``; half 0
  belongs to the actual rows, half 1 to the reference rows, and both get the same rule.
* Returns one multiplier per operand, ``(2, N, *s_k)``, in the operand's dtype.
* Every ``dim`` parameter is a negative int (counted from the last axis), so it names the same
  axis in the ``(N, ...)`` and ``(2, N, ...)`` frames.
* Rules are linear in ``m``: the coefficients depend on ``(actual, reference)`` only.
* float32 (and other non-float64) operands: coefficients are computed in float64 and the
  multipliers returned in the operand's dtype, which keeps summation-to-delta within 1e-5.

Exactness, for every op and per half: ``Σ_k Σ m_k (actual_k − reference_k) = Σ m (f(actual) −
f(reference))`` up to rounding. At ``actual == reference`` the multiplier is the derivative there
(torch's convention at kinks: relu/relu6 0 at their corners, clamp 1 at its bounds, maximum and
minimum ½ on ties).

Notation: ``Δu = u_a − u_r``, ``mean(u) = (u_a + u_r) / 2``, ``lo = min(u_a, u_r)``,
``hi = max(u_a, u_r)``, ``d = hi − lo ≥ 0``. ``R_f(a, r) = (f(a) − f(r)) / (a − r)`` is the Rescale
factor of a unary ``f``. Every Rescale factor below is evaluated in a form that keeps full
relative accuracy as ``d → 0`` (closed forms, or a series below a threshold), so no factor falls
back to a plain gradient at a tolerance.
"""
