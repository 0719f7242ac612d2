"""Exact DeepLIFT for the ops a model runs around its recurrent layers.

While a model that contains a recurrent module is explained (``deeplift_mode``, which
``register()``'s shap wrapper also enters), every torch function the model's *own* forward
calls with gradients enabled passes through :class:`InterceptMode`, a
``torch.overrides.TorchFunctionMode``:

* An op with a rule in :data:`torch_handler.ops.OP_RULES` whose operands vary with the explained
  input (and that is nonlinear in them: a product of two varying tensors, a varying divisor,
  any varying input of a unary op, ...) runs an autograd Function. Its forward returns torch's
  own value; its backward splits the doubled batch into (actual, reference) halves where the
  batch really is (:mod:`torch_handler.batch_axis`) and returns the rule's multipliers.
* Linear ops (add, sum, mean, reshape, cat, indexing, a product with a constant, ...) run
  natively: plain autograd is exact for them. Their outputs' batch place is followed.
* Python composites (``F.multi_head_attention_forward``, ``F.normalize``) are stepped into so
  their inner ops are seen (``torch.overrides.redispatch_function``, torch >= 2.13; with an
  older torch they run natively and are reported like an op without a rule).
* An op without a rule whose operands vary (sort, topk, cumprod, a ``where`` whose condition
  differs between input and reference, ...) is named in a warning, or raises
  :class:`UnsupportedOpError` with ``strict=True``.

Nothing is stored on the user's model: two process-wide module hooks
(``register_module_forward_pre_hook`` / ``register_module_forward_hook``) are installed while
at least one explanation is active and act only for the root model of the explanation active
in the *current* context (a ``ContextVar``; torch function modes are thread-local too), so
other threads, ``no_grad`` passes and engine code outside the model always run natively.
Inside the recurrent modules (their autograd Function applies the cell rule) and inside
modules whose engine rule is kept (see :mod:`torch_handler.engine_hooks`) interception is off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.weak import WeakIdKeyDictionary, WeakTensorKeyDictionary

from . import batch_axis as ba
from .batch_axis import Axis
from .errors import DoubledBatchError, UnsupportedOpError, UnsupportedOpWarning

MINIMUM_TORCH = "2.13"
_HAS_REDISPATCH = hasattr(torch.overrides, "redispatch_function")


# ---------------------------------------------------------------------------------------------
# The rule table (resolved lazily so that this module imports without torch_handler.ops).


def rule_table() -> dict:
    """``ops.OP_RULES``: rule name -> rule(m, actual, reference, **params)."""
    from .ops import OP_RULES

    return OP_RULES


# ---------------------------------------------------------------------------------------------
# Pairs: (..., B at axis, ...) <-> (2, N, *per-pair shape).


def to_pairs(t: Tensor, axis: Axis) -> Tensor:
    """View ``t`` as (2, N', *s): actual half, reference half, batch factors moved to the front.

    N' = N; the batch dim's outer/inner factors stay in place as separate axes (dropped when 1).
    """
    shape = tuple(t.shape)
    d, size, inner = axis
    outer = ba.outer_of(shape, axis)
    split = t.reshape(*shape[:d], outer, size, inner, *shape[d + 1 :])
    moved = split.movedim(d + 1, 0)
    keep = [k for k, n in ((outer, outer), (inner, inner)) if n != 1]
    return moved.reshape(2, size // 2, *shape[:d], *keep, *shape[d + 1 :])


def from_pairs(p: Tensor, shape, axis: Axis) -> Tensor:
    """Inverse of :func:`to_pairs` for a tensor of shape ``shape``."""
    shape = tuple(shape)
    d, size, inner = axis
    outer = ba.outer_of(shape, axis)
    full = p.reshape(size, *shape[:d], outer, inner, *shape[d + 1 :])
    return full.movedim(0, d + 1).reshape(shape)


def pair_dim(k: int, shape, axis: Axis) -> int:
    """Original dim ``k`` as a negative dim of the per-pair shape (what rules receive)."""
    ndim = len(shape)
    k = k % ndim
    if k == axis.dim:
        raise DoubledBatchError(
            f"an op reduces over dim {k} of a tensor of shape {tuple(shape)}, which holds the "
            "doubled batch (inputs and references): it would mix rows of different pairs. "
            "Reduce over the other dims."
        )
    kept = (ba.outer_of(shape, axis) != 1) + (axis.inner != 1)  # batch factors left in place
    return k - ndim if k > axis.dim else k - (ndim - 1 + kept)


# ---------------------------------------------------------------------------------------------
# The autograd Function every ruled op runs.


@dataclass
class Plan:
    """One intercepted call: what backward needs to apply the rule."""

    name: str  # the rule's name in OP_RULES
    kind: str  # "elementwise" | "single" | "batched" | "einsum"
    operands: list  # rule operands (detached tensors), constants included
    axes: list  # per operand: Axis or None (constant)
    out: Tensor  # torch's own output value
    out_axis: Axis
    params: dict = field(default_factory=dict)
    shapes: list = field(default_factory=list)  # per operand: its shape before any broadcast
    pair_axes: list | None = None  # per operand: where to split it (default: ``axes``)
    versions: list = field(default_factory=list)  # operands' version counters when saved

    def __post_init__(self):
        self.versions = [op._version for op in self.operands]

    def check_unmodified(self) -> None:
        """Like autograd's saved tensors: an operand written in place after the op would make
        the rule read the wrong values."""
        for op, version in zip(self.operands, self.versions, strict=True):
            if op._version != version:
                raise RuntimeError(
                    f"an operand of `{self.name}` was modified by an in-place operation after the "
                    "op used it; its DeepLIFT rule needs the original values. Use the out-of-place "
                    "form (e.g. x = x + y instead of x += y) for that tensor."
                )


class RuleFunction(torch.autograd.Function):
    """``apply(plan, *varying) -> plan.out``; backward: the rule's multipliers per varying operand."""

    @staticmethod
    def forward(ctx, plan, *varying):
        ctx.plan = plan
        return plan.out

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        # The plan stays on ctx: shap differentiates once per model input over a retained graph,
        # and every pass needs it (it goes with the graph, as autograd's saved tensors do).
        multipliers = apply_rule(plan, grad)
        return (None, *(m for m, a in zip(multipliers, plan.axes, strict=True) if a is not None))


def apply_rule(plan: Plan, grad: Tensor) -> list:
    """Multipliers for every operand of ``plan`` (None for constants), in the operands' shapes."""
    plan.check_unmodified()
    rule = rule_table()[plan.name]
    m = to_pairs(grad, plan.out_axis)
    if plan.kind == "elementwise":
        shape = tuple(plan.out.shape)
        pairs = [to_pairs(op.expand(shape), plan.out_axis) for op in plan.operands]
        result = rule(m, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), **plan.params)
        return [
            None if a is None or r is None else from_pairs(r, shape, plan.out_axis).sum_to_size(s)
            for r, a, s in zip(result, plan.axes, plan.shapes, strict=True)
        ]
    pair_axes = plan.pair_axes or plan.axes
    pairs = [to_pairs(op, a) for op, a in zip(plan.operands, pair_axes, strict=True)]
    params = dict(plan.params)
    if params.get("attn_mask") is not None:
        # A constant mask, expanded to the scores' shape: one half of it, in the per-pair frame.
        params["attn_mask"] = to_pairs(params["attn_mask"], plan.out_axis)[0]
    result = rule(m, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), **params)
    out = []
    for r, op, a, pa, s in zip(result, plan.operands, plan.axes, pair_axes, plan.shapes, strict=True):
        out.append(None if a is None or r is None else from_pairs(r, op.shape, pa).sum_to_size(s))
    return out


# ---------------------------------------------------------------------------------------------
# The explanation context and the process-wide module hooks.


class _Explanation:
    """One active explanation in the current context."""

    def __init__(self, root: nn.Module, recurrent, strict: bool):
        self.root = root
        self.recurrent = WeakIdKeyDictionary({m: True for m in recurrent})
        self.members = WeakIdKeyDictionary({m: True for m in root.modules()})
        self.strict = strict
        self.engine_ruled = WeakIdKeyDictionary()  # module -> True: the engine's rule is kept
        self.mode: InterceptMode | None = None
        self.frames: list = []  # (module, kind) per intercepted module call, innermost last
        self.warned: set = set()
        self.reported: dict = {}  # "op in Where" -> advice, per op reported (see last_reported)


_current: ContextVar[_Explanation | None] = ContextVar("torch_handler_explanation", default=None)
# What the last explanation entered in this context reported (kept after it ends, so that a
# failed additivity check afterwards can name the ops that lacked a rule).
_last_reported: ContextVar[dict | None] = ContextVar("torch_handler_last_reported", default=None)
_hooks_lock = threading.Lock()
_hooks_users = 0
_hook_handles: list = []


def current() -> _Explanation | None:
    """The explanation active in this context, if any."""
    return _current.get()


def last_reported() -> dict:
    """``{"gt in MaskedMean.forward": advice}``: the ops the last explanation
    entered in this context reported (UnsupportedOpWarning), in order; empty if none."""
    return dict(_last_reported.get() or {})


def _pre_hook(module, args):
    ex = _current.get()
    if ex is None:
        return None
    if module is ex.root:
        if ex.mode is None:
            if not torch.is_grad_enabled():
                return None
            ex.mode = InterceptMode(ex, args)
            ex.mode.__enter__()
            ex.frames.append((module, "root"))
        else:
            ex.frames.append((module, "nested-root"))
        return None
    if ex.mode is None:
        return None
    if module in ex.recurrent:
        _check_recurrent_input(module, ex.mode, args)
        packed = args[0] if args else None
        if isinstance(packed, PackedSequence) and packed.sorted_indices is None and packed.data in ex.mode.packed_order:
            # packed sorted by _pack_padded (enforce_sorted=True, doubled batch): hand over the order
            order = ex.mode.packed_order[packed.data]
            args = (PackedSequence(packed.data, packed.batch_sizes, order), *args[1:])
            ex.frames.append((module, ("recurrent", args, _pause(ex.mode))))
            return args
        ex.frames.append((module, ("recurrent", args, _pause(ex.mode))))
    elif module in ex.engine_ruled:
        _check_engine_input(module, ex.mode, args)
        ex.frames.append((module, ("engine", args, _pause(ex.mode))))
    return None


def _pause(mode: InterceptMode) -> bool:
    """Switch interception off until :func:`_resume`. Pops the mode off torch's stack when it is
    on top (the recurrent loop then pays nothing per op), else only raises its pause count.
    Returns whether it was popped."""
    current_mode = getattr(torch.overrides, "_get_current_function_mode", lambda: None)()
    if mode.paused == 0 and current_mode is mode:
        mode.__exit__(None, None, None)
        return True
    mode.paused += 1
    return False


def _resume(mode: InterceptMode, popped: bool) -> None:
    if popped:
        mode.__enter__()
    else:
        mode.paused -= 1


def _post_hook(module, args, output):
    ex = _current.get()
    if ex is None or not ex.frames or ex.frames[-1][0] is not module:
        return None
    _, kind = ex.frames.pop()
    if kind == "root":
        mode, ex.mode = ex.mode, None
        mode.__exit__(None, None, None)
    elif kind == "nested-root":
        pass
    else:
        what, call_args, popped = kind
        _resume(ex.mode, popped)
        if output is None:  # the forward raised (always_call): nothing to follow
            return None
        if what == "recurrent":
            _mark_recurrent_outputs(ex.mode, module, call_args, output)
        else:
            _mark_engine_output(ex.mode, module, call_args, output)
    return None


def _install_hooks() -> None:
    global _hooks_users
    with _hooks_lock:
        if _hooks_users == 0:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            _hook_handles.append(register_module_forward_pre_hook(_pre_hook))
            _hook_handles.append(register_module_forward_hook(_post_hook, always_call=True))
        _hooks_users += 1


def _uninstall_hooks() -> None:
    global _hooks_users
    with _hooks_lock:
        _hooks_users -= 1
        if _hooks_users == 0:
            while _hook_handles:
                _hook_handles.pop().remove()


@contextlib.contextmanager
def intercepting(model: nn.Module, recurrent, strict: bool = False):
    """Intercept ``model``'s own forward calls in this context (see the module docstring).

    ``recurrent``: the model's recurrent modules (interception is off inside them). For a
    model without any, nothing is entered: its values stay exactly the engine's own; nor for a
    model that is itself a recurrent module (nothing around it).
    """
    if not recurrent or any(module is model for module in recurrent):
        # No recurrent module, or the model *is* one: nothing around it to intercept.
        _last_reported.set({})
        yield None
        return
    from . import engine_hooks

    engine_hooks.install()
    explanation = _Explanation(model, recurrent, strict)
    token = _current.set(explanation)
    _last_reported.set(explanation.reported)
    _install_hooks()
    try:
        yield explanation
    finally:
        _uninstall_hooks()
        engine_hooks.uninstall()
        if explanation.mode is not None:  # a forward that raised before its hook could close it
            with contextlib.suppress(Exception):
                explanation.mode.__exit__(None, None, None)
            explanation.mode = None
        _current.reset(token)


# ---------------------------------------------------------------------------------------------
# Recurrent and engine-ruled module outputs.


def _first_tensor(args):
    for a in args:
        if isinstance(a, Tensor):
            return a
    return None


def _mark_recurrent_outputs(mode: InterceptMode, module, args, output) -> None:
    x = args[0] if args else None
    if isinstance(module, nn.RNNBase):
        if not isinstance(x, Tensor):  # PackedSequence: followed up to pad_packed_sequence
            packed, state = output
            order = packed.unsorted_indices
            mode.packed_outputs[packed.data] = _IN_ORDER if order is None else order
            # The final states come back in the original row order (torch and the rule alike).
            for s in state if isinstance(state, tuple) else (state,):
                mode.mark(s, Axis(1, s.shape[1]))
            return
        batch_dim = 0 if module.batch_first else 1
        size = x.shape[batch_dim]
        out, state = output
        mode.mark(out, Axis(batch_dim, size))
        for s in state if isinstance(state, tuple) else (state,):
            mode.mark(s, Axis(1, size))
    else:
        size = x.shape[0]
        for s in output if isinstance(output, tuple) else (output,):
            mode.mark(s, Axis(0, size))


def _check_recurrent_input(module, mode: InterceptMode, args) -> None:
    """A recurrent module pairs rows along its own batch dim (dim 1 of a time-major input):
    refuse an input whose doubled batch is known to sit in another dim, typically a time-major
    model input (T, N, F), which the engines double along dim 0, its time."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or x.dim() < 2:
        return  # a PackedSequence is checked when unpacked; unbatched input by the module
    batch_dim = 1 if isinstance(module, nn.RNNBase) and not module.batch_first and x.dim() == 3 else 0
    axis = mode.axis_of(x)
    if axis is None or axis is UNKNOWN or axis.dim == batch_dim:
        return
    layout = "batch_first=False: (time, batch, features)" if batch_dim == 1 else "its batch in dim 0"
    raise DoubledBatchError(
        f"{type(module).__name__} ({layout}) receives a tensor of shape {tuple(x.shape)} whose "
        f"doubled batch (inputs and references) is dim {axis.dim}, not its batch dim {batch_dim}: "
        "the rule would pair the wrong rows. A time-major model input? The engines double dim 0 "
        "of every model input, so pass the batch first (N, T, F) and move it inside forward "
        "(e.g. x.transpose(0, 1) before this module, or batch_first=True)."
    )


def _check_engine_input(module, mode: InterceptMode, args) -> None:
    x = _first_tensor(args)
    if x is None:
        return
    axis = mode.axis_of(x)
    if axis is None:
        return
    if axis is UNKNOWN or axis.dim != 0 or not ba.is_plain(tuple(x.shape), axis):
        raise DoubledBatchError(
            f"{type(module).__name__} receives a tensor of shape {tuple(x.shape)} whose doubled "
            "batch is not dim 0, and the engine's own rule for it pairs rows by splitting dim 0 "
            "in half: the attributions would pair the wrong rows. Move the batch to dim 0 before "
            "this module (e.g. batch_first=True) or use its functional form."
        )


def _mark_engine_output(mode: InterceptMode, module, args, output) -> None:
    x = _first_tensor(args)
    if x is None or mode.axis_of(x) is None:
        return
    for o in output if isinstance(output, tuple) else (output,):
        if isinstance(o, Tensor) and o.dim() and o.shape[0] == x.shape[0]:
            mode.mark(o, Axis(0, x.shape[0]))


# ---------------------------------------------------------------------------------------------
# The mode.

UNKNOWN = Axis(-1, 0, 0)  # varies with the input, but where its batch is could not be followed
_IN_ORDER = object()  # a packed recurrent output whose rows were never sorted

# Calls that never produce an input-dependent float tensor.
_PASS = frozenset(
    """__get__ __set__ dim size numel __len__ stride is_floating_point is_complex data_ptr
    element_size is_contiguous storage_offset get_device __format__ __repr__ __bool__ __index__
    __int__ __float__ tolist item __hash__ nelement ndimension has_names _is_view __iter__
    __contains__ requires_grad_ register_hook retain_grad backward _version _set_grad_enabled
    is_grad_enabled equal allclose isclose isnan isinf isfinite detach_ new_zeros
    new_ones new_empty new_full zeros_like ones_like empty_like full_like rand_like randn_like
    new_tensor __setstate__ __reduce_ex__ __deepcopy__ __array__ cpu cuda numpy __dlpack__
    untyped_storage _make_subclass""".split()
)
# Comparisons and logic: no gradient, but their results (masks) are followed so that a
# ``where`` / ``masked_fill`` can tell whether its condition differs within a pair.
_MASKS = frozenset(
    """__eq__ __ne__ __lt__ __le__ __gt__ __ge__ eq ne lt le gt ge greater less greater_equal
    less_equal logical_not logical_and logical_or logical_xor __and__ __or__ __invert__
    __xor__ __rand__ __ror__ bitwise_not bitwise_and bitwise_or""".split()
)

_TRANSPOSING_PROPERTIES = frozenset({"T", "mT", "H", "mH"})
_STEP_INTO = frozenset({"multi_head_attention_forward", "normalize"})


class InterceptMode(torch.overrides.TorchFunctionMode):
    """The torch function mode of one forward call of an explained model."""

    def __init__(self, explanation: _Explanation, root_args):
        super().__init__()
        self.explanation = explanation
        self.paused = 0
        self.axes = WeakTensorKeyDictionary()
        self.seeds = WeakTensorKeyDictionary()
        for a in root_args:
            for t in a if isinstance(a, (tuple, list)) else (a,):
                if isinstance(t, Tensor):
                    self.seeds[t] = True
        self._reaches: dict = {}
        self.by_node: dict = {}
        self.packed_outputs = WeakTensorKeyDictionary()  # recurrent PackedSequence.data -> order
        self.sorted_rows = WeakTensorKeyDictionary()  # padded in sorted order -> (dim, unsorted)
        self.packed_order = WeakTensorKeyDictionary()  # data packed sorted by _pack_padded -> order
        # Input-dependent tensors without a gradient (masks, indices, integer casts) -> the op
        # that made one from the input, ("gt", "MaskedMean.forward").
        self.constants = WeakTensorKeyDictionary()
        self.halves_differ = WeakTensorKeyDictionary()  # constant -> (its _version, differs?)
        self.lost = WeakTensorKeyDictionary()  # tensor whose batch place is not known -> the op that lost it

    # -- tracking ---------------------------------------------------------------------------

    def mark(self, t, axis: Axis | None) -> None:
        if isinstance(t, Tensor) and axis is not None:
            if axis is not UNKNOWN:
                axis = ba.valid(tuple(t.shape), axis) or UNKNOWN
            self.axes[t] = axis
            if t.grad_fn is not None:
                # Also by autograd node: a module's full backward hook hands its forward a new
                # tensor object (BackwardHookFunction) that shares the node we record here.
                self.by_node[(id(t.grad_fn), t.output_nr)] = (t.grad_fn, axis)

    def axis_of(self, t) -> Axis | None:
        """Where ``t``'s doubled batch is; None if ``t`` does not vary with the input."""
        if not isinstance(t, Tensor):
            return None
        axis = self.axes.get(t)
        if axis is not None:
            return axis
        # The model's arguments, and (passed by keyword, which the global hook does not see)
        # any other leaf that requires grad without being a Parameter: an explained input, batch
        # on dim 0 as every engine passes it.
        is_input = t.requires_grad and t.grad_fn is None and not isinstance(t, nn.Parameter)
        if t in self.seeds or is_input:
            axis = Axis(0, t.shape[0]) if t.dim() else UNKNOWN
            self.axes[t] = axis
            return axis
        node = t.grad_fn
        if node is not None and type(node).__name__ == "BackwardHookFunctionBackward":
            source, nr = node.next_functions[t.output_nr]
            if source is not None:
                variable = getattr(source, "variable", None)
                found = (
                    self.axis_of(variable)
                    if variable is not None
                    else self.by_node.get((id(source), nr), (None, None))[1]
                )
                if found is not None:
                    self.mark(t, found)
                    return found
        if t.requires_grad and t.grad_fn is not None and self._reaches_input(t.grad_fn):
            return UNKNOWN
        return None

    def _reaches_input(self, node) -> bool:
        """Whether an autograd node's graph reaches a leaf that is not a Parameter."""
        known = self._reaches.get(id(node))
        if known is not None:
            return known[1]
        stack, seen, found = [node], set(), False
        while stack and not found:
            n = stack.pop()
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            cached = self._reaches.get(id(n))
            if cached is not None:
                found = cached[1]
                continue
            variable = getattr(n, "variable", None)
            if variable is not None and not isinstance(variable, nn.Parameter):
                found = True
            stack.extend(next_node for next_node, _ in n.next_functions)
        self._reaches[id(node)] = (node, found)  # the node is kept so that its id stays unique
        return found

    # -- dispatch ---------------------------------------------------------------------------

    def __torch_function__(self, func, types, args, kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: only the transposing ones move the batch
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            if name not in _TRANSPOSING_PROPERTIES or self.axis_of(args[0]) is None:
                return func(*args, **kwargs)
            return _permute(self, func, name, args, kwargs)
        if name in _PASS:
            return func(*args, **kwargs)
        if name in _STEP_INTO:
            if _HAS_REDISPATCH:
                with self:
                    return torch.overrides.redispatch_function(func, types, args, kwargs)
            out = func(*args, **kwargs)
            if any(self.axis_of(t) is not None for t in _tensors(args, kwargs)):
                self.report_if_used(
                    out,
                    name,
                    f"stepping into this Python composite needs torch >= {MINIMUM_TORCH} "
                    f"(torch.overrides.redispatch_function; found {torch.__version__}), so its "
                    "inner ops run without rules. Upgrade torch",
                )
            return self._follow_same_shape(out, args, kwargs)
        if not any(self.axis_of(t) is not None for t in _tensors(args, kwargs)):
            return func(*args, **kwargs)
        handler = _HANDLERS.get(name)
        if handler is None and name.endswith("_") and not name.startswith("_"):
            base = _HANDLERS.get(name[:-1])
            if base is not None:
                return self._follow_constants(_inplace(self, func, name, base, args, kwargs), name, args, kwargs)
        if handler is None:
            return self._follow_constants(self._unknown(func, name, args, kwargs), name, args, kwargs)
        return self._follow_constants(handler(self, func, name, args, kwargs), name, args, kwargs)

    # -- input-dependent tensors without a gradient, and where the batch was lost ------------

    def _follow_constants(self, out, name, args, kwargs):
        """After an op on input-dependent tensors: record which op made each result without a
        gradient (a mask, indices, an integer cast) and which op lost a result's batch place;
        report a gradient-free input-dependent operand that differs within a pair and enters a
        differentiable result (the part of the output difference it causes gets no attribution)."""
        outs = [o for o in _flat(out) if isinstance(o, Tensor) and self.axes.get(o) is not None]
        if not outs:
            return out
        inputs = list(_tensors(args, kwargs))
        # (A tensor made without a gradient can gain one later: a custom autograd Function's
        # forward runs without grad and its outputs get one. It is then no constant.)
        constants = [t for t in inputs if not t.requires_grad and t in self.constants]
        where = None
        for o in outs:
            if self.axes[o] is UNKNOWN and o not in self.lost:
                lost = next((self.lost[t] for t in inputs if t in self.lost), None)
                if lost is None:
                    where = where or _caller()
                    lost = (name, where)
                self.lost[o] = lost
            if not o.requires_grad and o not in self.constants and o not in self.seeds:
                if constants:
                    self.constants[o] = self.constants[constants[0]]
                else:
                    where = where or _caller()
                    # x != 0 arrives as __ne__, x > 0 as gt: name both as torch does (ne, gt)
                    self.constants[o] = (name[2:-2] if name.startswith("__") else name, where)
        if constants and _rows_by_index(self, name, args, kwargs):
            # The index only reorders the doubled batch's rows (pack_padded_sequence sorting by
            # length): the result's pairs are lost (UNKNOWN), so whatever needs them refuses
            # by name, and the recurrent module puts packed rows back in order itself.
            constants = []
        if constants and name not in _INDEX_CONSUMERS and any(o.requires_grad for o in outs):
            for c in constants:
                if self.differs(c):
                    origin, origin_where = self.constants[c]
                    self.report_if_used(out, origin, _constant_advice(name, self.axes.get(c) is UNKNOWN, origin),
                                        where=origin_where)
                    break
        return out

    def differs(self, t: Tensor) -> bool:
        """Whether a gradient-free input-dependent ``t`` differs between an input and its
        reference somewhere (True where its batch place is not known: it cannot be checked)."""
        known = self.halves_differ.get(t)
        if known is not None and known[0] == t._version:
            return known[1]
        differs = not _halves_equal(self, t, "")
        self.halves_differ[t] = (t._version, differs)
        return differs

    def varies(self, t) -> bool:
        """Whether ``t`` varies within a pair as far as a rule is concerned: input-dependent,
        and not a gradient-free tensor (a mask, indices) equal in both halves of every pair,
        which is a constant for the rule."""
        if self.axis_of(t) is None:
            return False
        return t.requires_grad or t not in self.constants or self.differs(t)

    def lost_note(self, tensors, otherwise: str = " Keep the batch as its own dim until this op.") -> str:
        """Where the batch place of the first of ``tensors`` that lost it was lost, and why
        (``otherwise`` where none did)."""
        for t in tensors:
            lost = self.lost.get(t) if isinstance(t, Tensor) else None
            if lost is not None:
                name, where = lost
                if name in _HANDLERS:
                    why = ("it reduces over, indexes into or merges the dim that holds the batch, "
                           "or combines tensors whose batches sit in different dims. Keep the batch "
                           "as its own dim there")
                else:
                    why = ("the library does not follow the batch through it (it has no rule). "
                           "Write that step with ops that have rules (see the README's support "
                           "table), or compute it from input-independent tensors")
                return f" The batch place was lost at `{name}` in {where}: {why}."
        return otherwise

    def _unknown(self, func, name, args, kwargs):
        out = func(*args, **kwargs)
        self.report_if_used(out, name, _no_rule_advice(name))
        return self._follow_same_shape(out, args, kwargs)

    def _follow_same_shape(self, out, args, kwargs):
        """Best effort after an op without a rule: a result shaped like its first varying input
        keeps that input's batch place; any other result is marked as not followed."""
        first = next((t for t in _tensors(args, kwargs) if self.axis_of(t) is not None), None)
        if first is None:
            return out
        for o in _flat(out):
            if isinstance(o, Tensor):
                self.mark(o, self.axis_of(first) if o.shape == first.shape else UNKNOWN)
        return out

    def report_if_used(self, out, name: str, why: str, where: str | None = None) -> None:
        """:meth:`report` once a gradient reaches ``out`` (its first backward): an op whose
        result only feeds masks, shapes or comparisons does not matter to the attributions.
        ``where``: the user's code that called the op (default: the caller of this op)."""
        used = [o for o in _flat(out) if isinstance(o, Tensor) and o.requires_grad and o.is_floating_point()]
        if used:
            where = where or _caller()
        for o in used:
            o.register_hook(lambda grad: self.report(name, why, where))

    def report(self, name: str, why: str, where: str | None = None) -> None:
        label = f"{name} in {where}" if where else name
        self.explanation.reported.setdefault(label, why)
        message = f"deeplift_mode: `{name}`{' in ' + where if where else ''} on input-dependent tensors: {why}."
        if self.explanation.strict:
            raise UnsupportedOpError(message + " (strict=True turns this warning into this error.)")
        if label not in self.explanation.warned:
            self.explanation.warned.add(label)
            warnings.warn(message, UnsupportedOpWarning, stacklevel=3)

    def known_axis(self, t: Tensor, op: str) -> Axis:
        """``t``'s batch place, or DoubledBatchError where it could not be followed."""
        axis = self.axis_of(t)
        if axis is UNKNOWN:
            raise DoubledBatchError(
                f"`{op}` gets an input-dependent tensor of shape {tuple(t.shape)} whose doubled "
                "batch (inputs and references) could not be followed through the ops before it "
                "(an index that picks batch rows, a merge of the batch with a dim outside it, a "
                "reduction over the batch, or an op without a rule): its rows cannot be paired."
                + self.lost_note([t])
            )
        return axis


# ---------------------------------------------------------------------------------------------
# Helpers.

_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))


def _caller() -> str:
    """``"MaskedMean.forward"``: the function of the innermost frame outside torch and this
    package, i.e. the user's code that called the op being handled."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
    if frame is None:
        return "an unknown place"
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


# Exact rewrites, with ops that have rules, of common ops without one (named in the advice).
_REWRITES = {
    "abs": "relu(x) + relu(-x)",
    "amin": "-amax(-x, dim)",
    "min": "-amax(-x, dim) (over a dim) or torch.minimum(x, y) (of two tensors)",
    "var": "mean(square(x - x.mean(dim, keepdim=True)), dim)",
    "std": "sqrt(mean(square(x - x.mean(dim, keepdim=True)), dim))",
    "hardswish": "x * clamp(x + 3, 0, 6) / 6",
    "hardsigmoid": "clamp(x + 3, 0, 6) / 6",
    "mish": "x * tanh(softplus(x))",
    "softsign": "x / (1 + relu(x) + relu(-x))",
    "log1p": "log(1 + x)",
    "expm1": "exp(x) - 1",
}


def _no_rule_advice(name: str) -> str:
    """The UnsupportedOpWarning text for an op without a rule: an exact rewrite where one is
    known, else the general fix."""
    rewrite = _REWRITES.get(name.strip("_"))
    fix = (
        f"Write it as {rewrite}: ops with exact rules"
        if rewrite
        else "Replace it by ops with rules (see the README's support table) or keep it out of the "
        "input-dependent path"
    )
    return (
        "it has no DeepLIFT rule, so its plain gradient is used and the attributions may not sum "
        f"to the output difference. {fix}"
    )


def _constant_advice(consumer: str, unfollowed: bool, origin: str = "") -> str:
    """The UnsupportedOpWarning text for a gradient-free input-dependent tensor (a mask,
    indices, an integer cast) that reaches a differentiable result through ``consumer``."""
    if unfollowed:
        what = ("its result has no gradient, and its rows could not be followed back to the "
                "doubled batch, so it cannot be checked to be the same for each input and its "
                "reference")
    else:
        what = "its result has no gradient and differs between an input and its reference"
    return (
        f"{what}; it reaches the output through `{consumer}`, so the part of the output "
        "difference it causes gets no attribution. Use references that give the same result "
        "(e.g. padded like their input: see docs/masks.md), or compute it from "
        "input-independent tensors"
        + (" (or drop the `.detach()`: DeepLIFT then attributes through the value, e.g. "
           "RevIN statistics)" if origin == "detach" else "")
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


def _arg(args, kwargs, i, name, default=None):
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


def _run_rule(mode: InterceptMode, plan: Plan, varying: list) -> Tensor:
    """Apply the RuleFunction and track its output."""
    out = RuleFunction.apply(plan, *varying)
    mode.mark(out, plan.out_axis)
    return out


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


# ---------------------------------------------------------------------------------------------
# Ruled ops.

_UNARY_PARAMS = {
    # name: (rule, [(param, position after input, default)], inplace-kw?)
    "relu": ("relu", []),
    "leaky_relu": ("leaky_relu", [("negative_slope", 1, 0.01)]),
    "relu6": ("relu6", []),
    "elu": ("elu", [("alpha", 1, 1.0)]),
    "gelu": ("gelu", [("approximate", 1, "none")]),
    "silu": ("silu", []),
    "softplus": ("softplus", [("beta", 1, 1.0), ("threshold", 2, 20.0)]),
    "sigmoid": ("sigmoid", []),
    "expit": ("sigmoid", []),
    "tanh": ("tanh", []),
    "exp": ("exp", []),
    "log": ("log", []),
    "sqrt": ("sqrt", []),
    "rsqrt": ("rsqrt", []),
    "reciprocal": ("reciprocal", []),
    "square": ("square", []),
}


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


def _unary(mode, func, name, args, kwargs):
    rule, spec = _UNARY_PARAMS[name]
    x = args[0]
    params = {p: _arg(args, kwargs, i, p, d) for p, i, d in spec}
    args, kwargs, inplace = _without_inplace(name, args, kwargs)
    if inplace:
        args = _with_tracked_copy(mode, args)
        result = _elementwise(mode, func, name, rule, (args[0],), [args[0]], args, kwargs, params)
        return _copy_into(mode, x, result)
    return _elementwise(mode, func, name, rule, (x,), [x], args, kwargs, params)


def _clamp(mode, func, name, args, kwargs):
    x = args[0]
    if name == "hardtanh":
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    elif name == "clamp_min":
        lo, hi = _arg(args, kwargs, 1, "min"), None
    elif name == "clamp_max":
        lo, hi = None, _arg(args, kwargs, 1, "max")
    else:
        lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
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


def _is_scalar(v) -> bool:
    return v is None or not isinstance(v, Tensor) or v.numel() == 1


def _pow(mode, func, name, args, kwargs):
    if name == "__rpow__":
        u, v = args[1], args[0]
    else:
        u, v = args[0], _arg(args, kwargs, 1, "exponent")
    if not isinstance(v, Tensor) and isinstance(u, Tensor):
        return _elementwise(mode, func, name, "pow_scalar", (u,), [u], args, kwargs, {"exponent": float(v)})
    like = u if isinstance(u, Tensor) else v
    return _binary(mode, func, name, "pow", _as_tensor(u, like), _as_tensor(v, like), args, kwargs, always=True)


def _mul(mode, func, name, args, kwargs):
    u, v = args[0], _arg(args, kwargs, 1, "other")
    return _binary(mode, func, name, "mul", u, v, args, kwargs, always=False)


def _div(mode, func, name, args, kwargs):
    if name in ("__rtruediv__", "__rdiv__"):
        u, v = args[1], args[0]
    else:
        u, v = args[0], _arg(args, kwargs, 1, "other")
        if _arg(args, kwargs, 2, "rounding_mode") is not None:
            return mode._unknown(func, name, args, kwargs)
    like = u if isinstance(u, Tensor) else v
    u, v = _as_tensor(u, like), _as_tensor(v, like)
    if not mode.varies(v):  # division by a constant (or by a mask's count) is linear
        return _linear_elementwise(mode, func, args, kwargs)
    return _binary(mode, func, name, "div", u, v, args, kwargs, always=True)


def _two_player(rule):
    def handler(mode, func, name, args, kwargs):
        u, v = args[0], _arg(args, kwargs, 1, "other")
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
    if rule not in rule_table():
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


def _single(rule, parse):
    """Ops with one varying operand and dim-like params: softmax, layer_norm, amax, ..."""

    def handler(mode, func, name, args, kwargs):
        x = args[0]
        if rule not in rule_table():
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
            return type(out)((result, *out[1:]))
        return result

    return handler


def _dim_of(args, kwargs, i=1, name="dim", default=None):
    return _arg(args, kwargs, i, name, default)


def _parse_softmax(x, args, kwargs):
    dim = _dim_of(args, kwargs)
    if dim is None or _arg(args, kwargs, 3 if len(args) > 3 else 2, "dtype") is not None:
        return None
    return {"dim": dim}, [], True, []


def _parse_logsumexp(x, args, kwargs):
    dim = _dim_of(args, kwargs)
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def _parse_amax(x, args, kwargs):
    dim = _dim_of(args, kwargs, default=())
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    if not isinstance(dim, int):
        return None
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def _parse_glu(x, args, kwargs):
    return {"dim": _dim_of(args, kwargs, default=-1)}, [], True, []


def _parse_layer_norm(x, args, kwargs):
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    dims = list(range(x.dim() - len(shape), x.dim()))
    params = {"normalized_shape": shape, "weight": _const(weight), "bias": _const(bias), "eps": eps}
    return params, dims, True, [t for t in (weight, bias) if isinstance(t, Tensor)]


def _parse_rms_norm(x, args, kwargs):
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    weight = _arg(args, kwargs, 2, "weight")
    eps = _arg(args, kwargs, 3, "eps")
    dims = list(range(x.dim() - len(shape), x.dim()))
    params = {"normalized_shape": shape, "weight": _const(weight), "eps": eps}
    return params, dims, True, [t for t in (weight,) if isinstance(t, Tensor)]


def _parse_vector_norm(x, args, kwargs):
    ord_ = _arg(args, kwargs, 1, "ord" if "ord" in kwargs or len(args) > 1 else "p", 2)
    if "p" in kwargs:
        ord_ = kwargs["p"]
    if ord_ not in (2, 2.0, "fro") or _arg(args, kwargs, 4, "dtype") is not None:
        return None
    dim = _arg(args, kwargs, 2, "dim")
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    if dim is None:
        return None
    keepdim = _arg(args, kwargs, 3, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def _parse_max(x, args, kwargs):
    dim = _dim_of(args, kwargs)
    if not isinstance(dim, int):
        return None
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def _const(t):
    return t.detach() if isinstance(t, Tensor) else t


def _max(mode, func, name, args, kwargs):
    other = _arg(args, kwargs, 1, "other") if len(args) > 1 and isinstance(args[1], Tensor) else kwargs.get("other")
    if isinstance(other, Tensor):
        return _two_player("maximum" if name == "max" else "minimum")(mode, func, name, args, kwargs)
    if name == "min":
        return mode._unknown(func, name, args, kwargs)
    if _dim_of(args, kwargs) is None:
        return mode._unknown(func, name, args, kwargs)
    return _single("amax", _parse_max)(mode, func, name, args, kwargs)


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


def _batched(mode, func, name, rule, operands, params, args, kwargs):
    """matmul / bmm / baddbmm / sdpa: operands broadcast over their leading (batch) dims."""
    if rule not in rule_table():
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


def _matmul(mode, func, name, args, kwargs):
    u, v = args[0], _arg(args, kwargs, 1, "other" if name != "bmm" else "mat2")
    if name == "__rmatmul__":
        u, v = v, u
    if not mode.varies(u) or not mode.varies(v):
        return _linear_matmul(mode, func, name, u, v, args, kwargs)
    rule = "bmm" if name == "bmm" and "bmm" in rule_table() else "matmul"
    return _batched(mode, func, name, rule, [u, v], {}, args, kwargs)


def _baddbmm(mode, func, name, args, kwargs):
    c, u, v = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if mode.axis_of(u) is None or mode.axis_of(v) is None:
        return _linear_generic(mode, func, name, args, kwargs)
    c = c.expand(*_broadcast_shapes(u.shape[:-2], v.shape[:-2]), u.shape[-2], v.shape[-1])
    return _batched(mode, func, name, "baddbmm", [c, u, v], {"beta": beta, "alpha": alpha}, args, kwargs)


def _sdpa(mode, func, name, args, kwargs):
    q, k, v = args[0], args[1], args[2]
    mask = _arg(args, kwargs, 3, "attn_mask")
    dropout = _arg(args, kwargs, 4, "dropout_p", 0.0)
    causal = _arg(args, kwargs, 5, "is_causal", False)
    scale = _arg(args, kwargs, 6, "scale")
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


def _einsum(mode, func, name, args, kwargs):
    equation = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else list(args[1:])
    varying = [op for op in operands if mode.varies(op)]
    if len(varying) < 2:
        return _linear_einsum(mode, func, equation, operands, args, kwargs)
    if len(operands) != 2 or "..." in equation or "einsum" not in rule_table():
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


def _linear_fn(mode, func, name, args, kwargs):
    """F.linear with a constant weight: linear in x (and in a varying bias)."""
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
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


# ---------------------------------------------------------------------------------------------
# Linear ops: native autograd, batch place followed.


def _linear_elementwise_op(mode, func, name, args, kwargs):
    """add, sub, neg, ...: linear; the output's batch place follows broadcasting."""
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
                axis, _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination"), x.dim()
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
    dim = _arg(args, kwargs, 1, "dim")
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    if name in ("std", "var") and not isinstance(dim, (int, tuple, list)):
        dim = None
    if axis is not UNKNOWN:
        axis = ba.after_reduce(axis, dim, x.dim(), keepdim) or UNKNOWN
    for o in _flat(out):
        mode.mark(o, axis)
    if name in ("std", "var", "prod"):  # reductions without a rule
        mode.report_if_used(out, name, _no_rule_advice(name))
    return out


def _getitem(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    for i in index:
        if not isinstance(i, Tensor) or i in mode.constants:  # made in the model: see _follow_constants
            continue
        if mode.axis_of(i) is not None and not _halves_equal(mode, i, name):
            mode.report_if_used(
                out,
                "__getitem__",
                "its index tensor differs between the input and its reference, so which values "
                "are picked depends on the input and no rule covers that; index with "
                "input-independent positions",
            )
    if axis is not UNKNOWN and axis is not None:
        axis = ba.after_getitem(tuple(x.shape), axis, args[1]) or _rows_in_order(x, axis, index) or UNKNOWN
    if axis is not None and not isinstance(out, Tensor):
        return out
    mode.mark(out, axis)
    return out


def _select(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    if axis is not UNKNOWN:
        if name == "narrow":
            dim, start, length = args[1] % x.dim(), args[2], args[3]
            axis = axis if dim != axis.dim or (start == 0 and length == x.shape[dim]) else UNKNOWN
        else:
            axis = ba.after_remove(axis, _arg(args, kwargs, 1, "dim"), x.dim()) or UNKNOWN
    mode.mark(out, axis)
    return out


def _split(mode, func, name, args, kwargs):
    out = func(*args, **kwargs)
    x, axis = args[0], mode.axis_of(args[0])
    dim = _arg(args, kwargs, 1 if name == "unbind" else 2, "dim", 0) % x.dim()
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
    dim = _arg(args, kwargs, 1, "dim", 0)
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


# Ops whose gradient-free input is token ids: the layer variants of the engines attribute at
# their output (docs/masks.md), where the ids' difference is carried. Packing reads its lengths
# only to lay the rows out; the recurrent module refuses a pair whose lengths differ.
_INDEX_CONSUMERS = frozenset({"embedding", "embedding_bag", "_pack_padded_sequence"})

# How many units in the last place (of the largest magnitude) two halves of a tensor computed
# without a gradient may differ by and still count as equal (rows rounded by different kernels).
_ROUNDING_ULPS = 32


def _batch_first_linear(mode, func, name, args, kwargs):
    """conv / avg-pool / eval-mode batch_norm: linear, batch dim 0 in and out."""
    if name == "batch_norm" and _arg(args, kwargs, 5, "training", False):
        return mode._unknown(func, name, args, kwargs)  # batch statistics mix the pairs
    out = func(*args, **kwargs)
    x = args[0]
    axis = mode.axis_of(x)
    ok = axis is not UNKNOWN and axis.dim == 0 and ba.is_plain(tuple(x.shape), axis) and out.shape[0] == x.shape[0]
    mode.mark(out, axis if ok else UNKNOWN)
    return out


def _pad(mode, func, name, args, kwargs):
    """F.pad in any mode copies or fills values within the padded (trailing) dims: linear."""
    return _same_trailing(mode, func, args, kwargs, len(_arg(args, kwargs, 1, "pad")) // 2)


def _same_trailing(mode, func, args, kwargs, trailing: int):
    """An op that changes only the last ``trailing`` dims: the batch must lie before them."""
    out = func(*args, **kwargs)
    x = args[0]
    axis = mode.axis_of(x)
    if axis is not UNKNOWN and axis.dim >= x.dim() - trailing:
        axis = UNKNOWN
    mode.mark(out, axis)
    return out


def _index_select(mode, func, name, args, kwargs):
    """index_select / gather / take_along_dim along a dim other than the batch: linear, rows kept.

    Along the batch dim only one case is followed: ``pad_packed_sequence`` putting its sorted
    rows back in the original order (the index is the packed sequence's ``unsorted_indices``).
    """
    out = func(*args, **kwargs)
    x, dim = args[0], _arg(args, kwargs, 1, "dim")
    index = _arg(args, kwargs, 2, "index", None if name != "take_along_dim" else args[1])
    if name == "take_along_dim":
        dim, index = _arg(args, kwargs, 2, "dim"), args[1]
    sorted_rows = mode.sorted_rows.get(x)
    if sorted_rows is not None and name == "index_select":
        batch_dim, unsorted = sorted_rows
        if dim % x.dim() == batch_dim and torch.equal(index.cpu(), unsorted.cpu()):
            mode.mark(out, Axis(batch_dim, x.shape[batch_dim]))
            return out
    axis = mode.axis_of(x)
    if axis is not UNKNOWN and axis is not None:
        same = dim is not None and dim % x.dim() != axis.dim and out.dim() == x.dim()
        same = same and out.shape[axis.dim] == x.shape[axis.dim]
        axis = axis if same else UNKNOWN
    mode.mark(out, axis)
    return out


def _rows_by_index(mode, name, args, kwargs) -> bool:
    """Whether this ``index_select`` picks rows of the dim that holds its input's batch."""
    if name != "index_select":
        return False
    axis = mode.axis_of(args[0])
    dim = _arg(args, kwargs, 1, "dim")
    sorted_rows = mode.sorted_rows.get(args[0])
    if sorted_rows is not None:  # pad_packed_sequence putting its sorted rows back in order
        batch_dim, unsorted = sorted_rows
        index = _arg(args, kwargs, 2, "index")
        return dim % args[0].dim() == batch_dim and torch.equal(index.cpu(), unsorted.cpu())
    return axis not in (None, UNKNOWN) and dim is not None and args[0].dim() > 0 and dim % args[0].dim() == axis.dim


def _sort(mode, func, name, args, kwargs):
    """sort / argsort: rows are kept unless the sort runs along the batch dim, which mixes the
    pairs (pack_padded_sequence sorts the lengths of the whole doubled batch)."""
    out = func(*args, **kwargs)
    axis = mode.axis_of(args[0])
    dim = _arg(args, kwargs, 1, "dim", -1)
    if isinstance(dim, bool):  # torch.sort(x, descending) written positionally: dim is -1
        dim = -1
    if axis is not UNKNOWN and args[0].dim() and dim % args[0].dim() == axis.dim:
        axis = UNKNOWN
    for o in _flat(out):
        if isinstance(o, Tensor):
            if o.is_floating_point():
                mode.report_if_used(o, name, _no_rule_advice(name))
            mode.mark(o, axis)
    return out


def _pack_padded(mode, func, name, args, kwargs):
    """The packed data interleaves rows by time: not pairable; the recurrent module unpacks it.

    Unsorted lengths here mean ``enforce_sorted=True`` (otherwise torch sorted them already): a
    batch sorted by length, whose doubled batch cat([x, refs]) is not. It is packed sorted, as
    ``enforce_sorted=False`` would, and the order is kept (``packed_order``) for the recurrent
    module (see ``_pre_hook``), which returns its rows in the original order, as torch does."""
    x, lengths = args[0], args[1]
    axis = mode.axis_of(x)
    batch_dim = 0 if _arg(args, kwargs, 2, "batch_first") else 1
    order = None
    if (axis not in (None, UNKNOWN) and axis.dim == batch_dim and ba.is_plain(tuple(x.shape), axis)
            and lengths.dim() == 1 and bool((lengths[1:] > lengths[:-1]).any())):
        order = torch.sort(lengths, descending=True, stable=True).indices
        args = (x.index_select(batch_dim, order.to(x.device)), lengths[order], *args[2:])
    out = func(*args, **kwargs)
    if order is not None:
        mode.packed_order[out[0]] = order.to(x.device)
    for o in _flat(out):
        mode.mark(o, UNKNOWN if isinstance(o, Tensor) and o.is_floating_point() else None)
    return out


def _pad_packed(mode, func, name, args, kwargs):
    """``_pad_packed_sequence(data, batch_sizes, batch_first, ...)`` of a recurrent output."""
    out = func(*args, **kwargs)
    padded = out[0]
    source = mode.packed_outputs.get(args[0])
    batch_dim = 0 if _arg(args, kwargs, 2, "batch_first") else 1
    if source is None:
        mode.mark(padded, UNKNOWN)
    elif source is _IN_ORDER:
        mode.mark(padded, Axis(batch_dim, padded.shape[batch_dim]))
    else:
        mode.sorted_rows[padded] = (batch_dim, source)
        mode.mark(padded, UNKNOWN)
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
            dims = args[1:] if len(args) > 1 and isinstance(args[1], int) else _arg(args, kwargs, 1, "dims")
            dims = list(dims)
        elif name == "roll":
            dims = _arg(args, kwargs, 2, "dims")
            dims = [None] if dims is None else list(dims) if isinstance(dims, (tuple, list)) else [dims]
        else:
            dims = [_arg(args, kwargs, 1, "dim", -1)]
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
            dim = _arg(args, kwargs, 2, "dim")
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


_HANDLERS: dict[str, Any] = {}
for _name in _UNARY_PARAMS:
    _HANDLERS[_name] = _unary
for _name in ("clamp", "clip", "clamp_min", "clamp_max", "hardtanh"):
    _HANDLERS[_name] = _clamp
_HANDLERS.update(
    {
        "pow": _pow,
        "__pow__": _pow,
        "__rpow__": _pow,
        "float_power": _pow,
        "mul": _mul,
        "__mul__": _mul,
        "__rmul__": _mul,
        "multiply": _mul,
        "div": _div,
        "divide": _div,
        "true_divide": _div,
        "__truediv__": _div,
        "__div__": _div,
        "__rtruediv__": _div,
        "__rdiv__": _div,
        "maximum": _two_player("maximum"),
        "minimum": _two_player("minimum"),
        "fmax": _two_player("maximum"),
        "fmin": _two_player("minimum"),
        "atan2": _two_player("atan2"),
        "arctan2": _two_player("atan2"),
        "softmax": _single("softmax", _parse_softmax),
        "log_softmax": _single("log_softmax", _parse_softmax),
        "logsumexp": _single("logsumexp", _parse_logsumexp),
        "amax": _single("amax", _parse_amax),
        "max": _max,
        "glu": _single("glu", _parse_glu),
        "layer_norm": _single("layer_norm", _parse_layer_norm),
        "rms_norm": _single("rms_norm", _parse_rms_norm),
        "linalg_vector_norm": _single("vector_norm", _parse_vector_norm),
        "norm": _single("vector_norm", _parse_vector_norm),
        "matmul": _matmul,
        "__matmul__": _matmul,
        "__rmatmul__": _matmul,
        "bmm": _matmul,
        "baddbmm": _baddbmm,
        "einsum": _einsum,
        "scaled_dot_product_attention": _sdpa,
        "linear": _linear_fn,
        # linear plumbing
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
        "lerp": _linear_elementwise_op,
        "addcmul": _linear_elementwise_op,
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
        "std": _reduce,
        "var": _reduce,
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
)

# Handlers whose op has no DeepLIFT rule: they follow the batch and report the op.
_REPORTING_HANDLERS = {"std", "var", "prod"}


def handles_call(name: str) -> bool:
    """Whether a torch function named ``name`` (``tanh``, ``__mul__``, ``relu_``, ...) runs an
    exact rule, or is linear, when it meets input-dependent tensors inside an explained model.

    For diagnostics that name the calls a model makes without a rule.
    """
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    return name in _STEP_INTO or (base in _HANDLERS and base not in _REPORTING_HANDLERS)
