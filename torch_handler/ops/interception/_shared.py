"""Small pieces shared by the handlers: reading call arguments, the "not followed" axis."""

from __future__ import annotations

import torch
from torch import Tensor

from torch_handler.errors import DoubledBatchError
from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception.batch_axis import Axis

UNKNOWN = Axis(-1, 0, 0)  # varies with the input, but where its batch is could not be followed


_IN_ORDER = object()  # a packed recurrent output whose rows were never sorted


# Comparisons and logic: no gradient, but their results (masks) are followed so that a
# ``where`` / ``masked_fill`` can tell whether its condition differs within a pair.
_MASKS = frozenset(
    """__eq__ __ne__ __lt__ __le__ __gt__ __ge__ eq ne lt le gt ge greater less greater_equal
    less_equal logical_not logical_and logical_or logical_xor __and__ __or__ __invert__
    __xor__ __rand__ __ror__ bitwise_not bitwise_and bitwise_or""".split()
)


def _flat(x):
    if isinstance(x, (tuple, list)):
        for item in x:
            yield from _flat(item)
    else:
        yield x


def _tensors(args, kwargs):
    for a in _flat(list(args) + list(kwargs.values())):
        if isinstance(a, Tensor):
            yield a


def arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _as_tensor(x, like: Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _agree(axes) -> Axis:
    """The common batch place of several operands (UNKNOWN if they disagree or one is unknown)."""
    axes = [a for a in axes if a is not None]
    if not axes:
        return None
    if any(a is UNKNOWN for a in axes) or len(set(axes)) > 1:
        return UNKNOWN
    return axes[0]


def _native(func, args, kwargs) -> Tensor:
    with torch.no_grad():
        return func(*args, **kwargs)


def _inplace(mode, func, name, handler, args, kwargs):
    """``x.relu_()``, ``x.mul_(y)``, ``x.add_(y)``, ...: the out-of-place op, then copied into x
    (autograd sees the copy). In-place ops that change the shape run natively."""
    target = args[0]
    out_of_place = getattr(torch.Tensor, name[:-1], None)
    if out_of_place is None or name in ("unsqueeze_", "squeeze_", "transpose_", "t_", "resize_", "as_strided_"):
        return mode._unknown(func, name, args, kwargs)
    result = handler(mode, out_of_place, name[:-1], _with_tracked_copy(mode, args), kwargs)
    if not isinstance(result, Tensor) or result.shape != target.shape:
        return mode._unknown(func, name, args, kwargs)
    return _copy_into(mode, target, result)


def _with_tracked_copy(mode, args):
    """``args`` with ``args[0]`` replaced by a clone that keeps its batch place: the rule's
    Function must save the input's value, which the in-place write would overwrite."""
    copy = args[0].clone()
    mode.mark(copy, mode.axis_of(args[0]))
    return (copy, *args[1:])


def _copy_into(mode, target: Tensor, result: Tensor) -> Tensor:
    target.copy_(result)
    mode.mark(target, mode.axis_of(result))
    return target


def _is_scalar(v) -> bool:
    return v is None or not isinstance(v, Tensor) or v.numel() == 1


def _broadcast_axis(mode, operands, out, name) -> Axis:
    axes = []
    for op in operands:
        axis = mode.axis_of(op) if isinstance(op, Tensor) else None
        if axis is None:
            continue
        axis = mode.known_axis(op, name)
        moved = ba.after_broadcast(op.dim(), axis, out.dim())
        if op.shape[axis.dim] != out.shape[moved.dim]:
            moved = UNKNOWN
        axes.append(moved)
    axis = _agree(axes)
    if axis is UNKNOWN:
        raise DoubledBatchError(
            f"`{name}` combines input-dependent tensors whose doubled batches sit in different "
            f"places ({', '.join(str(tuple(op.shape)) for op in operands if isinstance(op, Tensor))}): "
            "their rows cannot be paired. Bring the batch to the same dim in both."
            + mode.lost_note([op for op in operands if isinstance(op, Tensor)], otherwise="")
        )
    return axis


def dim_of(args, kwargs, i=1, name="dim", default=None):
    return arg(args, kwargs, i, name, default)


def const(t):
    return t.detach() if isinstance(t, Tensor) else t


def _broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` for concrete shapes, in plain Python: torch's goes through
    ``torch._refs``, whose first use imports sympy (seconds, on an explanation's first call).
    Raises RuntimeError on shapes that do not broadcast, as torch's does."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for k, shape in enumerate(shapes):
        for d, n in enumerate(shape, start=ndim - len(shape)):
            if n != 1 and out[d] not in (1, n):
                raise RuntimeError(
                    f"Attempting to broadcast a dimension of length {n} at {d - ndim}! Mismatching "
                    f"argument at index {k} had {tuple(shape)}; but expected shape should be "
                    f"broadcastable to {out}"
                )
            out[d] = n if out[d] == 1 else out[d]
    return torch.Size(out)
