"""Following the doubled batch through linear and shape ops (add, reshape, permute, indexing,
cat, reductions, masks, ...): they run natively (plain autograd is exact for them) and their
outputs' batch place is recorded."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torch_handler.errors import DoubledBatchError
from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception._shared import (
    _MASKS,
    UNKNOWN,
    _agree,
    _broadcast_axis,
    _flat,
    _tensors,
    arg,
)
from torch_handler.ops.interception.advice import _no_rule_advice
from torch_handler.ops.interception.batch_axis import Axis
from torch_handler.ops.interception.function import to_pairs
from torch_handler.ops.interception.rows import _index_select, _pack_padded, _pad_packed, _sort


def _linear_elementwise_op(mode, func, name, args, kwargs):
    """add, sub, neg, ...: linear; the output's batch place follows broadcasting."""
    return _linear_elementwise(mode, func, args, kwargs)


def _product_terms(mode, func, name, args, kwargs):
    """addcmul / addcdiv (input + value·t1·t2, input + value·t1/t2) and lerp (start + weight·(end −
    start)): linear while the product has at most one input-dependent factor (a constant or
    parameter weight, a constant divisor); a product of two, or a division by one, has no rule."""
    if name == "lerp":
        weight = arg(args, kwargs, 2, "weight")
        nonlinear = isinstance(weight, Tensor) and mode.varies(weight)
    else:
        t1, t2 = arg(args, kwargs, 1, "tensor1"), arg(args, kwargs, 2, "tensor2")
        nonlinear = mode.varies(t2) and (name == "addcdiv" or mode.varies(t1))
    if nonlinear:
        return mode._unknown(func, name, args, kwargs)
    return _linear_elementwise(mode, func, args, kwargs)


def _linear_elementwise(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    tensors = [t for t in _tensors(args, kwargs) if mode.axis_of(t) is not None]
    try:
        axis = _broadcast_axis(mode, tensors, out, getattr(func, "__name__", "op"))
    except DoubledBatchError:
        axis = UNKNOWN
    mode.mark(out, axis)
    return out


def _linear_matmul(mode, func, name, u, v, args, kwargs):
    """A matmul with one constant operand (linear), torch.matmul's shape rules incl. vectors."""
    out = func(*args, **kwargs)
    is_left = mode.varies(u) or mode.axis_of(v) is None
    varying = u if is_left else v
    axis = mode.axis_of(varying)
    nd = varying.dim()
    if axis is UNKNOWN or nd < 2:
        mode.mark(out, UNKNOWN)
        return out
    other = v if is_left else u
    if axis.dim < nd - 2:  # a batch dim: broadcast against the other's, or kept as is by a vector
        mode.mark(out, ba.after_broadcast(nd, axis, out.dim()) if other.dim() >= 2 else axis)
    elif axis.dim == (nd - 1 if is_left else nd - 2):  # contracted over
        mode.mark(out, UNKNOWN)
    else:  # u's row dim or v's column dim: the output's last dim, or the one before it
        last = not is_left or other.dim() == 1
        mode.mark(out, axis._replace(dim=out.dim() - (1 if last else 2)))
    return out


def _linear_einsum(mode, func, equation, operands, args, kwargs):
    out = func(*args, **kwargs)
    axis = UNKNOWN
    eq = equation.replace(" ", "")
    if "->" in eq and "..." not in eq:
        lhs, rhs = eq.split("->")
        for op, sub in zip(operands, lhs.split(","), strict=False):
            a = mode.axis_of(op)
            if a is not None and a is not UNKNOWN and sub[a.dim] in rhs:
                axis = a._replace(dim=rhs.index(sub[a.dim]))
    mode.mark(out, axis)
    return out


def _linear_generic(mode, func, name, args, kwargs):
    """A linear op whose output keeps the first varying operand's layout (same shape) or loses it."""
    out = func(*args, **kwargs)
    first = next(t for t in _tensors(args, kwargs) if mode.axis_of(t) is not None)
    axis = mode.axis_of(first)
    for o in _flat(out):
        if isinstance(o, Tensor):
            mode.mark(o, axis if o.shape == first.shape or name == "scaled_dot_product_attention" else UNKNOWN)
    return out


def _same(mode, func, name, args, kwargs):
    """Same-layout ops: contiguous, clone, to, float, dropout (eval), ..."""
    out = func(*args, **kwargs)
    x = args[0] if args and isinstance(args[0], Tensor) else next(_tensors(args, kwargs))
    mode.mark(out, mode.axis_of(x) if isinstance(out, Tensor) and out.shape == x.shape else UNKNOWN)
    return out


def _reshape_like(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x = args[0]
    axis = mode.axis_of(x)
    if axis is not UNKNOWN:
        axis = ba.after_reshape(tuple(x.shape), axis, tuple(out.shape)) or UNKNOWN
    mode.mark(out, axis)
    return out


def _permute(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    if axis is not UNKNOWN:
        if name == "permute":
            order = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
            order = [d % x.dim() for d in (kwargs.get("dims", order))]
            axis = ba.after_permute(axis, order)
        elif name in ("transpose", "swapaxes", "swapdims"):
            axis = ba.after_transpose(axis, args[1], args[2], x.dim())
        elif name in ("T", "H"):  # all dims reversed
            axis = ba.after_permute(axis, list(range(x.dim() - 1, -1, -1)))
        elif name in ("t", "mT", "mH", "adjoint"):
            axis = ba.after_transpose(axis, -2, -1, x.dim()) if x.dim() >= 2 else axis
        else:  # movedim / moveaxis
            axis = ba.after_movedim(
                axis, arg(args, kwargs, 1, "source"), arg(args, kwargs, 2, "destination"), x.dim()
            )
    mode.mark(out, axis)
    return out


def _expand(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    if axis is not UNKNOWN:
        axis = ba.after_broadcast(x.dim(), axis, out.dim())
        if out.shape[axis.dim] != x.shape[axis.dim - (out.dim() - x.dim())]:
            axis = UNKNOWN
    mode.mark(out, axis)
    return out


def _reduce(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    dim = arg(args, kwargs, 1, "dim")
    keepdim = arg(args, kwargs, 2, "keepdim", False)
    if axis is not UNKNOWN:
        axis = ba.after_reduce(axis, dim, x.dim(), keepdim) or UNKNOWN
    for o in _flat(out):
        mode.mark(o, axis)
    if name == "prod":  # a reduction without a rule (std and var over one dim have theirs)
        mode.report_if_used(out, name, _no_rule_advice(name))
    return out


def _getitem(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    _report_varying_index(mode, out, args[1], "__getitem__", "which values are picked", skip_constants=True)
    if axis is not UNKNOWN and axis is not None:
        axis = ba.after_getitem(tuple(x.shape), axis, args[1]) or _rows_in_order(x, axis, index) or UNKNOWN
    if axis is not None and not isinstance(out, Tensor):
        return out
    mode.mark(out, axis)
    return out


def _report_varying_index(mode, out, index, name: str, what: str, skip_constants: bool = False) -> None:
    """Report ``name`` when a tensor in ``index`` depends on the input and differs between an
    input and its reference: ``what`` then depends on the input, and no rule covers that (a mask
    ``h < 0`` writing zeros is a ReLU without its rule). Gradient-free index tensors made in the
    model are left to :meth:`InterceptMode._follow_constants` where ``skip_constants``."""
    for i in index if isinstance(index, tuple) else (index,):
        if not isinstance(i, Tensor) or (skip_constants and i in mode.constants):
            continue
        if mode.axis_of(i) is not None and not _halves_equal(mode, i, name):
            mode.report_if_used(
                out, name,
                f"its index tensor differs between the input and its reference, so {what} depends on "
                "the input and no rule covers that; index with input-independent positions, or write it "
                "with an op that has a rule (torch.where, clamp, relu)",
            )
            return


def _select(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    if axis is not UNKNOWN:
        if name == "narrow":
            dim, start, length = args[1] % x.dim(), args[2], args[3]
            axis = axis if dim != axis.dim or (start == 0 and length == x.shape[dim]) else UNKNOWN
        else:
            axis = ba.after_remove(axis, arg(args, kwargs, 1, "dim"), x.dim()) or UNKNOWN
    mode.mark(out, axis)
    return out


def _split(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    dim = arg(args, kwargs, 1 if name == "unbind" else 2, "dim", 0) % x.dim()
    for o in out:
        if axis is UNKNOWN or dim == axis.dim:
            mode.mark(o, UNKNOWN)
        elif name == "unbind":
            mode.mark(o, ba.after_remove(axis, dim, x.dim()))
        else:
            mode.mark(o, axis)
    return out


def _cat(mode, func, name, args, kwargs):
    tensors = list(args[0])
    dim = arg(args, kwargs, 1, "dim", 0)
    out = func(*args, **kwargs)
    ndim = out.dim()
    dim = dim % ndim if ndim else 0
    if (
        name in ("cat", "concat", "concatenate")
        and dim == 0
        and len(tensors) > 1
        and all(t in mode.seeds for t in tensors)
    ):
        # An engine building the doubled batch cat([inputs, references]) from the model's
        # arguments (Captum's forward pre-hook): the explained input, not a value made from it.
        mode.mark(out, Axis(0, out.shape[0]))
        mode.seeds[out] = True
        return out
    axes = [mode.axis_of(t) for t in tensors]
    if name == "stack":
        axes = [None if a is None else (a if a is UNKNOWN else ba.after_insert(a, dim, ndim)) for a in axes]
        axis = _agree(axes)
    else:
        axis = _agree(axes)
        if axis is not UNKNOWN and axis.dim == dim:
            axis = UNKNOWN
        if axis is not UNKNOWN and any(
            a is None and t.dim() > axis.dim and t.shape[axis.dim] != out.shape[axis.dim]
            for a, t in zip(axes, tensors, strict=True)
        ):
            axis = UNKNOWN
    mode.mark(out, axis)
    return out


def _where(mode, func, name, args, kwargs):
    if name == "where":
        condition, operands = args[0], args[1:]
    else:  # masked_fill(x, mask, value)
        condition, operands = args[1], (args[0], args[2])
    # A condition computed in the model is reported by _follow_constants, naming the op that made it.
    made_here = not condition.requires_grad and condition in mode.constants
    differs = not made_here and mode.axis_of(condition) is not None and not _halves_equal(mode, condition, name)
    out = func(*args, **kwargs)
    if differs:
        mode.report_if_used(
            out,
            name,
            "its condition differs between the input and its reference, so which branch a value "
            "takes depends on the input and no rule covers that; compute the condition from "
            "input-independent tensors, or replace the selection by arithmetic with rules",
        )
    tensors = [t for t in (condition, *operands) if isinstance(t, Tensor)]
    try:
        axis = _broadcast_axis(mode, [t for t in tensors if mode.axis_of(t) is not None], out, name)
    except DoubledBatchError:
        axis = UNKNOWN
    mode.mark(out, axis)
    return out


def _halves_equal(mode, t: Tensor, name: str) -> bool:
    """Whether an input-dependent ``t`` is the same for each input and its reference (False
    where its batch place is not known)."""
    axis = mode.axis_of(t)
    if axis is UNKNOWN:
        return False
    actual, reference = to_pairs(t.detach(), axis)
    if not t.is_floating_point() or torch.equal(actual, reference):
        return bool(torch.equal(actual, reference))
    # Values computed without a gradient (a recurrent layer's output for an input that is not
    # attributed, repeated in both halves) can differ in the last bits between the halves:
    # batched kernels round rows differently. That is the same value for the rule.
    finite = torch.isfinite(actual) & torch.isfinite(reference)
    if not torch.equal(actual[~finite], reference[~finite]):
        return False
    scale = float(torch.maximum(actual[finite].abs(), reference[finite].abs()).max()) if finite.any() else 0.0
    return bool(((actual - reference)[finite].abs() <= _ROUNDING_ULPS * torch.finfo(t.dtype).eps * scale).all())


# How many units in the last place (of the largest magnitude) two halves of a tensor computed
# without a gradient may differ by and still count as equal (rows rounded by different kernels).
_ROUNDING_ULPS = 32


def _batch_first_linear(mode, func, name, args, kwargs):
    """conv / avg-pool / eval-mode batch_norm: linear, batch dim 0 in and out."""
    if name == "batch_norm" and arg(args, kwargs, 5, "training", False):
        return mode._unknown(func, name, args, kwargs)  # batch statistics mix the pairs
    if name.startswith("conv") and mode.varies(arg(args, kwargs, 1, "weight")):
        return mode._unknown(func, name, args, kwargs)  # input-dependent kernels: a product of two
    out = func(*args, **kwargs)
    x = args[0]
    axis = mode.axis_of(x)
    ok = axis is not UNKNOWN and axis.dim == 0 and ba.is_plain(tuple(x.shape), axis) and out.shape[0] == x.shape[0]
    mode.mark(out, axis if ok else UNKNOWN)
    return out


def _pad(mode, func, name, args, kwargs):
    """F.pad in any mode copies or fills values within the padded (trailing) dims: linear."""
    return _same_trailing(mode, func, args, kwargs, len(arg(args, kwargs, 1, "pad")) // 2)


def _same_trailing(mode, func, args, kwargs, trailing: int):
    """An op that changes only the last ``trailing`` dims: the batch must lie before them."""
    out = func(*args, **kwargs)
    x = args[0]
    axis = mode.axis_of(x)
    if axis is not UNKNOWN and axis.dim >= x.dim() - trailing:
        axis = UNKNOWN
    mode.mark(out, axis)
    return out


def _along_dim(mode, func, name, args, kwargs):
    """Linear ops acting along one dim (cumsum, flip, roll, diff, tril, triu): the batch is kept
    unless that dim is the batch."""
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    if axis is not UNKNOWN:
        if name in ("tril", "triu"):
            dims = [x.dim() - 2, x.dim() - 1]
        elif name == "flip":
            dims = args[1:] if len(args) > 1 and isinstance(args[1], int) else arg(args, kwargs, 1, "dims")
            dims = list(dims)
        elif name == "roll":
            dims = arg(args, kwargs, 2, "dims")
            dims = [None] if dims is None else list(dims) if isinstance(dims, (tuple, list)) else [dims]
        else:
            dims = [arg(args, kwargs, 1, "dim", -1)]
        if any(d is None or d % x.dim() == axis.dim for d in dims) or out.shape != x.shape and name != "diff":
            axis = UNKNOWN
    mode.mark(out, axis)
    return out


def _repeat(mode, func, name, args, kwargs):
    """repeat / tile / repeat_interleave: copies, linear; the batch is kept if it is not repeated."""
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    if axis is not UNKNOWN:
        if name == "repeat_interleave":
            dim = arg(args, kwargs, 2, "dim")
            axis = axis if dim is not None and dim % x.dim() != axis.dim else UNKNOWN
        else:
            moved = ba.after_broadcast(x.dim(), axis, out.dim())
            axis = moved if out.shape[moved.dim] == x.shape[axis.dim] else UNKNOWN
    mode.mark(out, axis)
    return out


def _rows_in_order(x: Tensor, axis: Axis, index: tuple) -> Axis | None:
    """``x[arange(B), positions]``-style advanced indexing (the last valid step per row): the
    batch dim indexed by exactly ``arange(size)`` and every other tensor index 1-D of that
    length, all tensor indices adjacent and no Ellipsis/None. The picked rows stay in order, at
    the place torch puts the advanced block."""
    if not ba.is_plain(tuple(x.shape), axis) or any(i is None or i is Ellipsis for i in index):
        return None
    tensor_at = [k for k, i in enumerate(index) if isinstance(i, Tensor)]
    if not tensor_at or axis.dim not in tensor_at or tensor_at != list(range(tensor_at[0], tensor_at[-1] + 1)):
        return None
    rows = index[axis.dim]
    if rows.dim() != 1 or rows.dtype.is_floating_point or rows.numel() != axis.size:
        return None
    if not torch.equal(rows.cpu(), torch.arange(axis.size)):
        return None
    if any(index[k].shape != rows.shape for k in tensor_at):
        return None
    before = sum(1 for i in index[: tensor_at[0]] if isinstance(i, slice))
    return Axis(before, axis.size)


def _setitem(mode, func, name, args, kwargs):
    """``target[index] = value``: linear (autograd's CopySlices). The target keeps its batch
    place; a constant target (``torch.zeros`` filled with input-dependent values) takes the
    place whose indexed view matches the value's."""
    target, index, value = args[0], args[1], args[2]
    axis = mode.axis_of(target)  # before the write gives a constant target a graph
    value_axis = mode.axis_of(value)
    func(*args, **kwargs)
    if axis is not None:
        _report_varying_index(mode, target, index, "__setitem__", "which values are overwritten")
    if axis is None and value_axis is not None:
        axis = UNKNOWN
        if value_axis is not UNKNOWN and isinstance(value, Tensor):
            view_shape = tuple(target[index].shape)
            for d in range(target.dim()):
                candidate = Axis(d, value_axis.size, value_axis.inner)
                if ba.valid(tuple(target.shape), candidate) is None:
                    continue
                seen = ba.after_getitem(tuple(target.shape), candidate, index)
                wanted = ba.after_broadcast(value.dim(), value_axis, len(view_shape))
                if seen == wanted:
                    axis = candidate
                    break
    elif axis is not None and axis is not UNKNOWN and value_axis is not None:
        seen = ba.after_getitem(tuple(target.shape), axis, index)
        wanted = None if value_axis is UNKNOWN else ba.after_broadcast(value.dim(), value_axis, target[index].dim())
        axis = axis if seen is not None and seen == wanted else UNKNOWN
    if axis is not None:
        mode.axes[target] = axis  # the same tensor object, its autograd node is new
        if target.grad_fn is not None:
            mode.by_node[(id(target.grad_fn), target.output_nr)] = (target.grad_fn, axis)
    return None


def _embedding(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    ids = args[0]
    axis = mode.axis_of(ids)
    mode.mark(out, axis)
    return out


#: Linear and shape ops (and ops followed only to report them): call name -> handler.
TRACKED: dict[str, Any] = {
        "add": _linear_elementwise_op,
        "__add__": _linear_elementwise_op,
        "__radd__": _linear_elementwise_op,
        "__iadd__": _linear_elementwise_op,
        "sub": _linear_elementwise_op,
        "subtract": _linear_elementwise_op,
        "__sub__": _linear_elementwise_op,
        "__rsub__": _linear_elementwise_op,
        "rsub": _linear_elementwise_op,
        "neg": _linear_elementwise_op,
        "__neg__": _linear_elementwise_op,
        "negative": _linear_elementwise_op,
        "__pos__": _linear_elementwise_op,
        "lerp": _product_terms,
        "addcmul": _product_terms,
        "addcdiv": _product_terms,
        **{n: _linear_elementwise_op for n in _MASKS},
        "masked_fill": _where,
        "where": _where,
        "reshape": _reshape_like,
        "view": _reshape_like,
        "view_as": _reshape_like,
        "reshape_as": _reshape_like,
        "flatten": _reshape_like,
        "unflatten": _reshape_like,
        "squeeze": _reshape_like,
        "unsqueeze": _reshape_like,
        "atleast_2d": _reshape_like,
        "atleast_3d": _reshape_like,
        "permute": _permute,
        "transpose": _permute,
        "swapaxes": _permute,
        "swapdims": _permute,
        "t": _permute,
        "mT": _permute,
        "movedim": _permute,
        "moveaxis": _permute,
        "expand": _expand,
        "expand_as": _expand,
        "broadcast_to": _expand,
        "sum": _reduce,
        "argmax": _reduce,
        "argmin": _reduce,
        "any": _reduce,
        "all": _reduce,
        "count_nonzero": _reduce,
        "mean": _reduce,
        "nansum": _reduce,
        "prod": _reduce,
        "__getitem__": _getitem,
        "__setitem__": _setitem,
        "select": _select,
        "narrow": _select,
        "chunk": _split,
        "split": _split,
        "unbind": _split,
        "tensor_split": _split,
        "cat": _cat,
        "concat": _cat,
        "concatenate": _cat,
        "stack": _cat,
        "contiguous": _same,
        "clone": _same,
        # detach() of an input-dependent tensor: followed as a gradient-free constant (see
        # _follow_constants), like a mask; engines' own detaches of stored values never reach
        # a differentiable op inside the model, so they are never reported.
        "detach": _same,
        "to": _same,
        "type": _same,
        "type_as": _same,
        "float": _same,
        "double": _same,
        **{n: _same for n in "half bfloat16 long int short char byte bool".split()},
        "dropout": _same,
        "alpha_dropout": _same,
        "feature_alpha_dropout": _same,
        "dropout1d": _same,
        "dropout2d": _same,
        "embedding": _embedding,
        "pad": _pad,
        "repeat": _repeat,
        "tile": _repeat,
        "repeat_interleave": _repeat,
        "sort": _sort,
        "argsort": _sort,
        "index_select": _index_select,
        "gather": _index_select,
        "take_along_dim": _index_select,
        "_pack_padded_sequence": _pack_padded,
        "_pad_packed_sequence": _pad_packed,
        **{n: _along_dim for n in ("cumsum", "flip", "roll", "diff", "tril", "triu")},
        **{
            n: _batch_first_linear
            for n in (
                "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d avg_pool1d "
                "avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
                "batch_norm"
            ).split()
        },
}
