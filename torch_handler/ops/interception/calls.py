"""How a call of an op with a rule is read: its operands and parameters, where their doubled
batches sit, and the :class:`~.function.Plan` its Function runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from torch_handler.errors import DoubledBatchError
from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception._shared import (
    UNKNOWN,
    _agree,
    _as_tensor,
    _broadcast_axis,
    _broadcast_shapes,
    _copy_into,
    _is_scalar,
    _native,
    _with_tracked_copy,
    arg,
    const,
    dim_of,
)
from torch_handler.ops.interception.batch_axis import Axis
from torch_handler.ops.interception.function import Plan, RuleFunction, pair_dim

if TYPE_CHECKING:
    from torch_handler.ops.interception.function_mode import InterceptMode
from torch_handler.ops.interception.tracking import (
    _halves_equal,
    _linear_einsum,
    _linear_elementwise,
    _linear_generic,
    _linear_matmul,
)


def _run_rule(mode: InterceptMode, plan: Plan, varying: list) -> Tensor:
    """Apply the RuleFunction and track its output."""
    plan.rule = mode.rules[plan.name]
    out = RuleFunction.apply(plan, *varying)
    mode.mark(out, plan.out_axis)
    return out


# Position of the ``inplace`` argument of the functional forms (F.relu(x, inplace), ...).
_INPLACE_POSITION = {"relu": 1, "relu6": 1, "silu": 1, "leaky_relu": 2, "elu": 2, "hardtanh": 3}


def _without_inplace(name, args, kwargs):
    """(args, kwargs, inplace?) with a functional ``inplace=True`` switched off: the rule's
    Function computes out of place, and the result is then copied into the input."""
    position = _INPLACE_POSITION.get(name)
    if position is None:
        return args, kwargs, False
    if kwargs.get("inplace"):
        return args, {**kwargs, "inplace": False}, True
    if len(args) > position and args[position]:
        return (*args[:position], False, *args[position + 1 :]), kwargs, True
    return args, kwargs, False


def _unary(mode, func, name, rule, spec, args, kwargs):
    x = args[0]
    params = {p: arg(args, kwargs, i, p, d) for p, i, d in spec}
    args, kwargs, inplace = _without_inplace(name, args, kwargs)
    if inplace:
        args = _with_tracked_copy(mode, args)
        result = _elementwise(mode, func, name, rule, (args[0],), [args[0]], args, kwargs, params)
        return _copy_into(mode, x, result)
    return _elementwise(mode, func, name, rule, (x,), [x], args, kwargs, params)


def read_clamp(mode, func, name, args, kwargs):
    x = args[0]
    if name == "hardtanh":
        lo, hi = arg(args, kwargs, 1, "min_val", -1.0), arg(args, kwargs, 2, "max_val", 1.0)
    elif name == "clamp_min":
        lo, hi = arg(args, kwargs, 1, "min"), None
    elif name == "clamp_max":
        lo, hi = None, arg(args, kwargs, 1, "max")
    else:
        lo, hi = arg(args, kwargs, 1, "min"), arg(args, kwargs, 2, "max")
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        if mode.axis_of(lo) is None and mode.axis_of(hi) is None and _is_scalar(lo) and _is_scalar(hi):
            lo, hi = (None if v is None else float(v) for v in (lo, hi))
        else:
            return mode._unknown(func, name, args, kwargs)
    args, kwargs, inplace = _without_inplace(name, args, kwargs)
    if inplace:
        args = _with_tracked_copy(mode, args)
        result = _elementwise(mode, func, name, "clamp", (args[0],), [args[0]], args, kwargs, {"min": lo, "max": hi})
        return _copy_into(mode, x, result)
    return _elementwise(mode, func, name, "clamp", (x,), [x], args, kwargs, {"min": lo, "max": hi})


def read_pow(mode, func, name, args, kwargs):
    if name == "__rpow__":
        u, v = args[1], args[0]
    else:
        u, v = args[0], arg(args, kwargs, 1, "exponent")
    if not isinstance(v, Tensor) and isinstance(u, Tensor):
        return _elementwise(mode, func, name, "pow_scalar", (u,), [u], args, kwargs, {"exponent": float(v)})
    like = u if isinstance(u, Tensor) else v
    return _binary(mode, func, name, "pow", _as_tensor(u, like), _as_tensor(v, like), args, kwargs, always=True)


def read_mul(mode, func, name, args, kwargs):
    u, v = args[0], arg(args, kwargs, 1, "other")
    return _binary(mode, func, name, "mul", u, v, args, kwargs, always=False)


def read_div(mode, func, name, args, kwargs):
    if name in ("__rtruediv__", "__rdiv__"):
        u, v = args[1], args[0]
    else:
        u, v = args[0], arg(args, kwargs, 1, "other")
        if arg(args, kwargs, 2, "rounding_mode") is not None:
            return mode._unknown(func, name, args, kwargs)
    like = u if isinstance(u, Tensor) else v
    u, v = _as_tensor(u, like), _as_tensor(v, like)
    if not mode.varies(v):  # division by a constant (or by a mask's count) is linear
        return _linear_elementwise(mode, func, args, kwargs)
    return _binary(mode, func, name, "div", u, v, args, kwargs, always=True)


def _two_player(rule):
    def handler(mode, func, name, args, kwargs):
        u, v = args[0], arg(args, kwargs, 1, "other")
        like = u if isinstance(u, Tensor) else v
        return _binary(mode, func, name, rule, _as_tensor(u, like), _as_tensor(v, like), args, kwargs, always=True)

    return handler


def _binary(mode, func, name, rule, u, v, args, kwargs, always: bool):
    if not isinstance(u, Tensor) or not isinstance(v, Tensor):
        return _linear_elementwise(mode, func, args, kwargs)
    varying = [t for t in (u, v) if mode.axis_of(t) is not None]
    if not always and sum(mode.varies(t) for t in varying) < 2:  # a product with a constant (or a mask)
        return _linear_elementwise(mode, func, args, kwargs)
    return _elementwise(mode, func, name, rule, (u, v), varying, args, kwargs, {})


def _elementwise(mode, func, name, rule, operands, varying, args, kwargs, params):
    if rule not in mode.rules:
        return mode._unknown(func, name, args, kwargs)
    out = _native(func, args, kwargs)
    out_axis = _broadcast_axis(mode, operands, out, name)
    plan = Plan(
        name=rule,
        kind="elementwise",
        operands=[op.detach() for op in operands],
        axes=[mode.axis_of(op) for op in operands],
        out=out,
        out_axis=out_axis,
        params=params,
        shapes=[op.shape for op in operands],
    )
    return _run_rule(mode, plan, [op for op in operands if mode.axis_of(op) is not None])


def _single(rule, parse):
    """Ops with one varying operand and dim-like params: softmax, layer_norm, amax, ..."""

    def handler(mode, func, name, args, kwargs):
        x = args[0]
        if rule not in mode.rules:
            return mode._unknown(func, name, args, kwargs)
        parsed = parse(x, args, kwargs)
        if parsed is None:
            return mode._unknown(func, name, args, kwargs)
        params, reduced, keepdim, constants = parsed
        for c in constants:
            if mode.axis_of(c) is not None:
                return mode._unknown(func, name, args, kwargs)
        axis = mode.known_axis(x, name)
        shape = tuple(x.shape)
        for k in reduced:
            pair_dim(k, shape, axis)  # raises on the batch dim
        params = {k: (pair_dim(v, shape, axis) if k == "dim" else v) for k, v in params.items()}
        out = _native(func, args, kwargs)
        values = out[0] if isinstance(out, tuple) else out
        # Reductions without keepdim drop their dims; glu halves its dim, which is not the batch.
        out_axis = ba.after_reduce(axis, reduced, x.dim(), keepdim) if reduced and not keepdim else axis
        plan = Plan(rule, "single", [x.detach()], [axis], values, out_axis, params, [x.shape])
        result = _run_rule(mode, plan, [x])
        if isinstance(out, tuple):
            # max(dim)'s indices depend on the input as argmax's do: followed, so that picking
            # values with them is checked (see tracking._report_varying_index)
            for extra in out[1:]:
                mode.mark(extra, out_axis)
            return type(out)((result, *out[1:]))
        return result

    return handler


def _parse_max(x, args, kwargs):
    dim = dim_of(args, kwargs)
    if not isinstance(dim, int):
        return None
    keepdim = arg(args, kwargs, 2, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def read_max(mode, func, name, args, kwargs):
    other = arg(args, kwargs, 1, "other") if len(args) > 1 and isinstance(args[1], Tensor) else kwargs.get("other")
    if isinstance(other, Tensor):
        return _two_player("maximum" if name == "max" else "minimum")(mode, func, name, args, kwargs)
    if name == "min":
        return mode._unknown(func, name, args, kwargs)
    if dim_of(args, kwargs) is None:
        return mode._unknown(func, name, args, kwargs)
    return _single("amax", _parse_max)(mode, func, name, args, kwargs)


def _batched(mode, func, name, rule, operands, params, args, kwargs):
    """matmul / bmm / baddbmm / sdpa: operands broadcast over their leading (batch) dims."""
    if rule not in mode.rules:
        return mode._unknown(func, name, args, kwargs)
    if any(op.dim() < 2 for op in operands):
        return mode._unknown(func, name, args, kwargs)
    lead = _broadcast_shapes(*(op.shape[:-2] for op in operands))
    ndim = len(lead) + 2
    expanded, axes = [], []
    for op in operands:
        e = op.expand(*lead, *op.shape[-2:])
        axis = mode.axis_of(op)
        if axis is not None:
            axis = mode.known_axis(op, name)
            axis = ba.after_broadcast(op.dim(), axis, ndim)
            if axis.dim >= len(lead) or op.shape[axis.dim - (ndim - op.dim())] != lead[axis.dim]:
                raise DoubledBatchError(
                    f"`{name}` contracts or broadcasts over the doubled batch of an operand of shape "
                    f"{tuple(op.shape)}: the product would mix rows of different pairs. Keep the "
                    "batch in a leading (batch) dim of every input-dependent operand."
                )
        expanded.append(e)
        axes.append(axis)
    axis = _agree(axes)
    if axis is UNKNOWN:
        raise DoubledBatchError(f"`{name}`: the operands' doubled batches sit in different dims.")
    out = _native(func, args, kwargs)
    # Constants, expanded over the leading dims, are paired like the varying operands: their
    # halves are equal, which is what the rule expects of an input-independent operand.
    plan = Plan(
        name=rule,
        kind="batched",
        operands=[e.detach() for e in expanded],
        axes=[axis if a is not None else None for a in axes],
        out=out,
        out_axis=axis,
        params=params,
        shapes=[op.shape for op in operands],
        pair_axes=[axis] * len(operands),
    )
    return _run_rule(mode, plan, [op for op, a in zip(operands, axes, strict=True) if a is not None])


def read_matmul(mode, func, name, args, kwargs):
    u, v = args[0], arg(args, kwargs, 1, "other" if name != "bmm" else "mat2")
    if name == "__rmatmul__":
        u, v = v, u
    if not mode.varies(u) or not mode.varies(v):
        return _linear_matmul(mode, func, name, u, v, args, kwargs)
    rule = "bmm" if name == "bmm" and "bmm" in mode.rules else "matmul"
    return _batched(mode, func, name, rule, [u, v], {}, args, kwargs)


def read_baddbmm(mode, func, name, args, kwargs):
    c, u, v = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if mode.axis_of(u) is None or mode.axis_of(v) is None:
        return _linear_generic(mode, func, name, args, kwargs)
    expanded = c.expand(*_broadcast_shapes(u.shape[:-2], v.shape[:-2]), u.shape[-2], v.shape[-1])
    if mode.axis_of(c) is not None:  # an input-dependent c: its batch place, after the broadcast
        mode.mark(expanded, ba.after_broadcast(c.dim(), mode.known_axis(c, name), expanded.dim()))
    c = expanded
    return _batched(mode, func, name, "baddbmm", [c, u, v], {"beta": beta, "alpha": alpha}, args, kwargs)


def read_sdpa(mode, func, name, args, kwargs):
    q, k, v = args[0], args[1], args[2]
    mask = arg(args, kwargs, 3, "attn_mask")
    dropout = arg(args, kwargs, 4, "dropout_p", 0.0)
    causal = arg(args, kwargs, 5, "is_causal", False)
    scale = arg(args, kwargs, 6, "scale")
    if dropout or kwargs.get("enable_gqa"):
        return mode._unknown(func, name, args, kwargs)
    if mode.axis_of(mask) is not None and not _halves_equal(mode, mask, name):
        # A mask computed from the input that differs within a pair selects different keys.
        return mode._unknown(func, name, args, kwargs)
    if mode.axis_of(q) is None and mode.axis_of(k) is None:
        return _linear_generic(mode, func, name, args, kwargs)  # linear in v
    params = {"attn_mask": None, "is_causal": causal, "scale": scale}
    if mask is not None:
        scores_lead = _broadcast_shapes(q.shape[:-2], k.shape[:-2], mask.shape[:-2])
        params["attn_mask"] = mask.detach().expand(*scores_lead, q.shape[-2], k.shape[-2])
    return _batched(mode, func, name, "scaled_dot_product_attention", [q, k, v], params, args, kwargs)


def read_einsum(mode, func, name, args, kwargs):
    equation = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else list(args[1:])
    varying = [op for op in operands if mode.varies(op)]
    if len(varying) < 2:
        return _linear_einsum(mode, func, equation, operands, args, kwargs)
    if len(operands) != 2 or "..." in equation or "einsum" not in mode.rules:
        return mode._unknown(func, name, args, kwargs)
    lhs, rhs = equation.replace(" ", "").split("->") if "->" in equation else (equation.replace(" ", ""), None)
    subs = lhs.split(",")
    if rhs is None:
        return mode._unknown(func, name, args, kwargs)
    letters = []
    for op, sub in zip(operands, subs, strict=True):
        axis = mode.known_axis(op, name)
        if not ba.is_plain(tuple(op.shape), axis):
            return mode._unknown(func, name, args, kwargs)
        letters.append(sub[axis.dim])
    letter = letters[0]
    if letters[1] != letter or letter not in rhs:
        raise DoubledBatchError(
            f"einsum '{equation}' does not keep the doubled batch as one index shared by both "
            "operands and the output: it would mix rows of different pairs."
        )
    reduced_eq = ",".join(s.replace(letter, "") for s in subs) + "->" + rhs.replace(letter, "")
    out = _native(func, args, kwargs)
    axes = [mode.axis_of(op) for op in operands]
    out_axis = Axis(rhs.index(letter), axes[0].size)
    plan = Plan(
        "einsum",
        "einsum",
        [op.detach() for op in operands],
        axes,
        out,
        out_axis,
        {"equation": reduced_eq},
        [op.shape for op in operands],
    )
    return _run_rule(mode, plan, operands)


def read_linear(mode, func, name, args, kwargs):
    """F.linear with a constant weight: linear in x (and in a varying bias)."""
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if mode.axis_of(w) is not None:
        return mode._unknown(func, name, args, kwargs)
    out = func(*args, **kwargs)
    axis = mode.axis_of(x)
    if axis is not None and axis is not UNKNOWN and axis.dim == x.dim() - 1:
        axis = UNKNOWN  # the batch was contracted over
    if axis is None and isinstance(b, Tensor) and mode.axis_of(b) is not None:
        axis = UNKNOWN if mode.axis_of(b) is UNKNOWN else ba.after_broadcast(b.dim(), mode.axis_of(b), out.dim())
    mode.mark(out, axis)
    return out


__all__ = [  # what the op table uses: the readers, the handlers that read a call themselves,
    # and the argument helpers of its parse functions
    "Reader", "arg", "binary_call", "call", "const", "dim_of", "read_baddbmm", "read_clamp", "read_div",
    "read_einsum", "read_linear", "read_matmul", "read_max", "read_mul", "read_pow", "read_sdpa", "single_call",
    "unary_call",
]


# ---------------------------------------------------------------------------------------------
# Readers: how the op table (torch_handler/ops/table.py) says a call of an op is read. A reader
# takes the op's name in the table and returns the handler(mode, func, name, args, kwargs)
# that the function mode runs for that call.

Handler = Callable[..., Any]
Reader = Callable[[str], Handler]


def unary_call(*params: tuple[str, int, Any]) -> Reader:
    """A unary elementwise op ``f(x, ...)``: ``x`` is the first argument; each parameter is
    ``(name, position after x, default)`` and reaches the rule under that name."""

    def reader(rule: str) -> Handler:
        def handler(mode, func, name, args, kwargs):
            return _unary(mode, func, name, rule, params, args, kwargs)

        return handler

    return reader


def binary_call() -> Reader:
    """A binary elementwise op ``f(u, other)`` with a two-player Shapley rule."""
    return _two_player


def single_call(parse: Callable) -> Reader:
    """An op with one varying operand ``x`` and dim-like parameters read by ``parse(x, args,
    kwargs) -> (params, reduced dims, keepdim, constant tensors)`` (None: not this form)."""
    return lambda rule: _single(rule, parse)


def call(handler: Handler) -> Reader:
    """A handler that reads the call itself (and picks among several ops' rules, as ``pow``
    picks ``pow`` or ``pow_scalar``)."""
    return lambda rule: handler
