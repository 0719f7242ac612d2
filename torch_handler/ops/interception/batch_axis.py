"""Where the doubled batch lives in a tensor, and how that place moves through tensor plumbing.

DeepLIFT engines run ``cat([inputs, references])``: row ``j`` of the model input is paired
with row ``j + N``. A rule applied inside the model must pair the same rows in every
intermediate tensor, wherever reshapes, permutes and reductions have moved them. Sizes alone
cannot say where that is (a batch size equal to the sequence length, ``(batch * heads, L, d)``
merges, ``(L * batch, E)`` views), so the place is *tracked* from the model inputs.

An :class:`Axis` says: dimension ``dim`` of the tensor has size ``outer * size * inner``, and
the doubled batch (``size`` rows, actual half first) is the middle factor. The model input is
``Axis(0, B, 1)``; ``q.view(L, B * heads, d)`` of a time-major ``(L, B, E)`` tensor is
``Axis(1, B, heads)``; ``(L, B, E).reshape(L * B, E)`` is ``Axis(0, B, 1)`` with ``outer = L``.

All functions here are pure: shapes and axes in, axis (or ``None`` = not known) out.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Axis(NamedTuple):
    """The doubled batch inside dimension ``dim``: ``shape[dim] == outer * size * inner``."""

    dim: int
    size: int
    inner: int = 1


def outer_of(shape, axis: Axis) -> int:
    """The factor of ``shape[axis.dim]`` outside the batch."""
    return shape[axis.dim] // (axis.size * axis.inner)


def is_plain(shape, axis: Axis) -> bool:
    """Whether the batch fills its dimension alone (no merged factors)."""
    return axis.inner == 1 and outer_of(shape, axis) == 1


def valid(shape, axis: Axis | None) -> Axis | None:
    """``axis`` if it is consistent with ``shape``, else None."""
    if axis is None or not 0 <= axis.dim < len(shape):
        return None
    if not axis.size * axis.inner or shape[axis.dim] % (axis.size * axis.inner):
        return None  # an empty batch (size 0) has no rows to pair
    return axis


def after_reshape(in_shape, axis: Axis, out_shape) -> Axis | None:
    """The batch's place after ``reshape``/``view``/``flatten``/``squeeze``/... (row-major).

    The batch is a block of ``size`` consecutive indices with stride ``S`` (the elements inside
    it) in the flat layout; it survives a reshape iff that block lies inside one output dim.
    """
    stride = axis.inner * math.prod(in_shape[axis.dim + 1 :])
    block = stride * axis.size
    right = 1  # product of out_shape[j + 1:]
    for j in range(len(out_shape) - 1, -1, -1):
        span = right * out_shape[j]
        if span >= block and out_shape[j] > 1:
            if stride % right == 0 and span % block == 0:
                return Axis(j, axis.size, stride // right)
            return None
        right = span
    return None


def after_permute(axis: Axis, order) -> Axis:
    """``permute(order)``: output dim k is input dim order[k]."""
    return axis._replace(dim=list(order).index(axis.dim))


def after_transpose(axis: Axis, d0: int, d1: int, ndim: int) -> Axis:
    d0, d1 = d0 % ndim, d1 % ndim
    if axis.dim == d0:
        return axis._replace(dim=d1)
    if axis.dim == d1:
        return axis._replace(dim=d0)
    return axis


def after_movedim(axis: Axis, source, destination, ndim: int) -> Axis:
    source = [s % ndim for s in (source if isinstance(source, (tuple, list)) else [source])]
    destination = [d % ndim for d in (destination if isinstance(destination, (tuple, list)) else [destination])]
    order = [None] * ndim
    for s, d in zip(source, destination, strict=True):
        order[d] = s
    rest = iter(k for k in range(ndim) if k not in source)
    order = [o if o is not None else next(rest) for o in order]
    return after_permute(axis, order)


def after_broadcast(in_ndim: int, axis: Axis, out_ndim: int) -> Axis:
    """Broadcasting adds leading dims."""
    return axis._replace(dim=axis.dim + out_ndim - in_ndim)


def after_reduce(axis: Axis, dims, ndim: int, keepdim: bool) -> Axis | None:
    """A reduction over ``dims`` (None: all): None if it reduces over the batch."""
    if dims is None:
        return None
    dims = [d % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if not dims:  # amax(dim=()) and friends reduce over everything
        return None
    if axis.dim in dims:
        return None
    if keepdim:
        return axis
    return axis._replace(dim=axis.dim - sum(d < axis.dim for d in dims))


def after_insert(axis: Axis, dim: int, out_ndim: int) -> Axis:
    """A new dim at ``dim`` of the output (``stack``, ``unsqueeze``)."""
    dim = dim % out_ndim
    return axis._replace(dim=axis.dim + (dim <= axis.dim))


def after_remove(axis: Axis, dim: int, ndim: int) -> Axis | None:
    """Dim ``dim`` removed (``select``, ``unbind``): None if it is the batch."""
    dim = dim % ndim
    if dim == axis.dim:
        return None
    return axis._replace(dim=axis.dim - (dim < axis.dim))


def after_getitem(shape, axis: Axis, index) -> Axis | None:
    """Basic indexing: ints, slices, None and Ellipsis.

    None if the index picks rows of the batch dim (the result no longer holds whole pairs) or
    uses a tensor/list (advanced) index, whose result layout is not followed.
    """
    index = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        return None
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        expanded.extend([slice(None)] * (len(shape) - used) if i is Ellipsis else [i])
    out_dim = in_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == axis.dim:
            if isinstance(i, int) or not _full_slice(i, shape[in_dim]):
                return None
            return axis._replace(dim=out_dim)
        out_dim += isinstance(i, slice)
        in_dim += 1
    # The batch dim is past the index: it and everything after it pass through.
    return axis._replace(dim=out_dim + axis.dim - in_dim)


def _full_slice(s: slice, size: int) -> bool:
    return s.step in (None, 1) and s.start in (None, 0, -size) and (s.stop is None or s.stop >= size)
