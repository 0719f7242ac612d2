"""Exact DeepLIFT for the ops a model runs around its recurrent layers.

While a model that contains a recurrent module is explained (``deeplift_mode``, which
``register()``'s shap wrapper also enters), every torch function the model's *own* forward
calls with gradients enabled passes through :class:`InterceptMode`, a
``torch.overrides.TorchFunctionMode``:

* An op with a rule in :data:`torch_handler.ops.OP_RULES` whose operands vary with the explained
  input (and that is nonlinear in them: a product of two varying tensors, a varying divisor,
  any varying input of a unary op, ...) runs an autograd Function. Its forward returns torch's
  own value; its backward splits the doubled batch into (actual, reference) halves where the
  batch really is (:mod:`torch_handler.ops.interception.batch_axis`) and returns the rule's multipliers.
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
modules whose engine rule is kept (see :mod:`torch_handler.engines.hooks`) interception is off.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.weak import WeakIdKeyDictionary

from torch_handler.errors import DoubledBatchError
from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception._shared import _IN_ORDER, UNKNOWN
from torch_handler.ops.interception.batch_axis import Axis
from torch_handler.ops.interception.function_mode import InterceptMode


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
def intercepting(model: nn.Module, recurrent, strict: bool = False, engine_hooks=None):
    """Intercept ``model``'s own forward calls in this context (see the module docstring).

    ``recurrent``: the model's recurrent modules (interception is off inside them). For a
    model without any, nothing is entered: its values stay exactly the engine's own; nor for a
    model that is itself a recurrent module (nothing around it). ``engine_hooks``: what keeps
    the engines' own module rules off handled modules (:mod:`torch_handler.engines.hooks`,
    passed in by :func:`torch_handler.deeplift_mode`), installed while this runs.
    """
    if not recurrent or any(module is model for module in recurrent):
        # No recurrent module, or the model *is* one: nothing around it to intercept.
        _last_reported.set({})
        yield None
        return
    if engine_hooks is not None:
        engine_hooks.install()
    explanation = _Explanation(model, recurrent, strict)
    token = _current.set(explanation)
    _last_reported.set(explanation.reported)
    _install_hooks()
    try:
        yield explanation
    finally:
        _uninstall_hooks()
        if engine_hooks is not None:
            engine_hooks.uninstall()
        if explanation.mode is not None:  # a forward that raised before its hook could close it
            with contextlib.suppress(Exception):
                explanation.mode.__exit__(None, None, None)
            explanation.mode = None
        _current.reset(token)


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
