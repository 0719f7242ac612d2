"""Small shared pieces of the op rules: float64 coefficients, Shapley means, safe quotients,
and moving multipliers between the pair frame and the operands' shapes."""

from __future__ import annotations

import torch
from torch import Tensor

Multipliers = tuple  # tuple[Tensor | None, ...]


def _f64(t: Tensor) -> Tensor:
    """float64 copy of a floating tensor (coefficients are always computed in float64)."""
    return t if t.dtype == torch.float64 else t.to(torch.float64)


def _mean(a: Tensor, r: Tensor) -> Tensor:
    """Shapley mean ``(a + r) / 2`` (float64)."""
    return (_f64(a) + _f64(r)) * 0.5


def _native_mean(a: Tensor, r: Tensor) -> Tensor:
    """``(a + r) / 2`` in the operands' dtype: the sum is rounded once and halving is exact, so
    this is the correctly rounded mean, the same value as the float64 mean rounded back."""
    return (a + r) * 0.5


def _scaled(m: Tensor, coefficient: Tensor, like: Tensor) -> Tensor:
    """``m * coefficient`` in float64, returned in ``like``'s dtype.

    m (2, N, *s); coefficient (N, *s) (or broadcastable to it): broadcasts over both halves.
    """
    return (_f64(m) * coefficient).to(like.dtype)


def _where_zero(d: Tensor, value: Tensor | float, other: Tensor) -> Tensor:
    return torch.where(d == 0, value, other)


def _safe(d: Tensor) -> Tensor:
    """``d`` with zeros replaced by 1, so a quotient never produces 0/0 (those entries are
    overwritten by the derivative)."""
    return torch.where(d == 0, torch.ones_like(d), d)


def _expm1_ratio(x: Tensor) -> Tensor:
    """``expm1(x) / x``, 1 at x = 0; accurate for every x (expm1 has no cancellation)."""
    s = _safe(x)
    return _where_zero(x, 1.0, torch.expm1(s) / s)


def _log1p_ratio(x: Tensor) -> Tensor:
    """``log1p(x) / x``, 1 at x = 0; accurate for every x > −1."""
    s = _safe(x)
    return _where_zero(x, 1.0, torch.log1p(s) / s)


def _lo_hi(a: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lo = torch.minimum(a, r)
    hi = torch.maximum(a, r)
    return lo, hi, hi - lo


def _pair_dims(dim, ndim_pair: int) -> tuple[int, ...]:
    """Normalise a ``dim`` parameter (negative int, tuple of them, or None = every axis after the
    pair axis) for operands of ``ndim_pair`` dimensions including the pair axis."""
    if dim is None or dim == ():
        return tuple(range(-(ndim_pair - 1), 0))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    for d in dims:
        if not -(ndim_pair - 1) <= d < 0:
            raise ValueError(
                f"op rules take negative dims counted from the last axis (so they mean the same "
                f"axis with and without the leading pair axis); got dim={dim!r} for operands "
                f"with {ndim_pair - 1} dims per pair. Pass dim - ndim instead."
            )
    return tuple(sorted(set(dims)))


def _unsqueeze_dims(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Re-insert reduced axes: ``dims`` are negative and refer to the tensor after insertion."""
    full = t.ndim + len(dims)
    for p in sorted(full + d for d in dims):
        t = t.unsqueeze(p)
    return t


def _reduce_to(mult: Tensor, shape: torch.Size) -> Tensor:
    """Sum a (2, N, *s_out) multiplier over the axes that ``shape`` = (N, *s_k) broadcast
    (torch broadcasting of the per-pair shapes, right-aligned) and return (2, N, *s_k)."""
    per_pair = tuple(shape[1:])
    lead = mult.ndim - 2 - len(per_pair)
    if lead > 0:
        mult = mult.sum(dim=tuple(range(2, 2 + lead)))
    dims = [2 + i for i, size in enumerate(per_pair) if size == 1 and mult.shape[2 + i] != 1]
    if dims:
        mult = mult.sum(dim=dims, keepdim=True)
    return mult.reshape((2,) + tuple(shape))


def _pad_after_pair(t: Tensor, ndim: int) -> Tensor:
    """(N, *s) -> (N, 1, ..., 1, *s) with ``ndim`` dims: per-pair batch broadcasting of matmul
    then lines up with the batched call's."""
    extra = ndim - t.ndim
    return t.reshape(t.shape[:1] + (1,) * extra + t.shape[1:]) if extra > 0 else t
