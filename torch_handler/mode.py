"""``deeplift_mode``: the one switch every engine integration goes through.

Inside the context, the supported recurrent modules of the model run their DeepLIFT forward
(:mod:`torch_handler.recurrent.modules`), **for this explanation only**. Nothing is stored on the model
or its modules: which modules explain is per-context state (a :class:`contextvars.ContextVar`),
so

* another thread using the same model at the same time (a training loop, a server) gets
  torch's own forward and gradients, weight gradients included;
* ``copy.deepcopy(model)`` and ``torch.save(model)`` inside the context see a plain model, and
  the copy or the loaded model behaves natively;
* nested contexts, and ``register()``'s shap wrapper around a user's own context, just add to
  the active set and take it back on exit.

Mechanism. While at least one explanation is active anywhere in the process, each class of
:data:`torch_handler.recurrent.registry.REGISTRY` has its ``forward`` replaced by a small dispatcher
(installed by the first explanation to start, removed by the last to end, under a lock). The
dispatcher runs the DeepLIFT forward when the module is in the *current context's* active set
and gradients are enabled, and torch's own forward otherwise. A class-level dispatcher rather
than an instance attribute is what makes the choice per caller: an instance attribute is seen
by every thread and copied by every deepcopy / pickle. A context variable rather than a
thread-local follows the explanation into asyncio tasks and ``contextvars.copy_context()``.
Engines run the model's forward in the thread that entered the context (shap, Captum and
tangermeme all do); a forward run in another thread (``nn.DataParallel``) is not explained.

Integrations that need to know what the current context explains (for instance an operation
interception layer that must only act inside the explained model) use
:func:`current_explanation`; per-context state is entered and left in one place,
:func:`_explaining`.
"""

from __future__ import annotations

import functools
import sys
import threading
import types
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from torch_handler.engines import hooks as engine_hooks
from torch_handler.errors import UnsupportedConfigurationError
from torch_handler.explanation import Explanation, _current
from torch_handler.ops.interception.context import intercepting
from torch_handler.recurrent.modules import check_supported, deeplift_forward_for
from torch_handler.recurrent.registry import REGISTRY, SUPPORTED_MODULES, TORCH_FORWARD


def recurrent_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) that the rule handles."""
    return [m for m in model.modules() if isinstance(m, SUPPORTED_MODULES)]


# --------------------------------------------------------------------------------------
# The class-level dispatcher
# --------------------------------------------------------------------------------------

_install_lock = threading.Lock()
_install_count = 0  # explanations active in the whole process, every thread together


def _make_dispatcher(cls: type[nn.Module]):
    torch_handler_native = TORCH_FORWARD[cls]
    torch_handler_current = _current
    torch_handler_deeplift_for = deeplift_forward_for

    def forward(self, *args, **kwargs):
        explanation = torch_handler_current.get()
        if explanation is not None and self in explanation.modules:
            return torch_handler_deeplift_for(self)(self, *args, **kwargs)
        return torch_handler_native(self, *args, **kwargs)

    # torch.jit.script, run on an nn.LSTM by anyone while an explanation is active, reads the
    # source through __wrapped__ (torch's forward) but resolves its names in this function's
    # globals and closure: give it torch's globals (the closure names above cannot collide).
    forward = types.FunctionType(forward.__code__, torch_handler_native.__globals__, forward.__name__,
                                 forward.__defaults__, forward.__closure__)
    return functools.wraps(torch_handler_native)(forward)


_DISPATCHERS = {entry.cls: _make_dispatcher(entry.cls) for entry in REGISTRY}


def _check_class_forwards() -> None:
    """Refuse when another library replaced a supported class's forward at class level: the
    modules would not compute torch's equations, which is all the rule knows."""
    for cls, native in TORCH_FORWARD.items():
        current = vars(cls)["forward"]
        if current is not native and current is not _DISPATCHERS[cls]:
            raise UnsupportedConfigurationError(
                f"nn.{cls.__name__}.forward has been replaced at class level ({current!r}); the "
                "DeepLIFT rule only knows torch's own equations. Undo that patch before explaining."
            )


def _install_dispatchers() -> None:
    global _install_count
    with _install_lock:
        _check_class_forwards()  # at every entry: a patch may come while others explain
        if _install_count == 0:
            for cls, dispatcher in _DISPATCHERS.items():
                cls.forward = dispatcher
        _install_count += 1


def _remove_dispatchers() -> None:
    global _install_count
    with _install_lock:
        _install_count -= 1
        if _install_count == 0:
            for cls, native in TORCH_FORWARD.items():
                if vars(cls)["forward"] is _DISPATCHERS[cls]:  # never undo someone else's patch
                    cls.forward = native


@contextmanager
def _explaining(model: nn.Module, names: Mapping[nn.Module, str], options: Mapping[str, object]):
    """Enter and leave one explanation's per-context state: the single place to extend."""
    parent = _current.get()
    modules = dict(parent.modules) if parent is not None else {}
    for module, name in names.items():
        modules.setdefault(module, name)
    explanation = Explanation(model, types.MappingProxyType(modules), types.MappingProxyType(dict(options)), parent)
    _install_dispatchers()
    token = _current.set(explanation)
    try:
        yield explanation
    finally:
        _current.reset(token)
        _remove_dispatchers()


# --------------------------------------------------------------------------------------
# Checks before anything is changed
# --------------------------------------------------------------------------------------


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)

# torch's recurrent ops as they appear in a TorchScript graph (traced or scripted).
_RECURRENT_OPS = ("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu", "aten::lstm_cell",
                  "aten::gru_cell", "aten::rnn_tanh_cell", "aten::rnn_relu_cell")


def _label(name: str, module: nn.Module, model: nn.Module) -> str:
    return f"{name} ({type(module).__name__})" if name else type(model).__name__


def _mixes_batch_rows(module: nn.Module) -> bool:
    """Whether ``module`` computes with statistics over the batch (or updates running
    statistics from it) as configured: its output for one row depends on the other rows, so
    inputs and references would be normalised together and the model would change."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # BatchNorm uses batch statistics in training mode, and also in eval mode when it
        # tracks no running statistics (torch's own rule for `bn_training`).
        return module.training or module.running_mean is None
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        # Per-sample statistics, but in training mode with track_running_stats it writes the
        # batch's statistics into running_mean / running_var.
        return module.training and module.track_running_stats
    return False


def _scripted_recurrent_ops(module: torch.jit.ScriptModule) -> list[str]:
    """The recurrent aten ops in any method of a TorchScript module, submodules inlined.

    Every method, not just ``forward``: a scripted nn.LSTM compiles its overloads as
    ``forward__0`` / ``forward__1``. Uses TorchScript's (private, stable since torch 1.x)
    method table; any failure to read it propagates, and the caller refuses the module.
    """
    found = set()
    for method in module._c._method_names():
        graph = module._c._get_method(method).graph.copy()
        torch._C._jit_pass_inline(graph)
        found.update(node.kind() for op in _RECURRENT_OPS for node in graph.findAllNodes(op, True))
    return sorted(found)


def _scripted_recurrent_classes(module: torch.jit.ScriptModule) -> list[str]:
    """``nn.<Class>`` for each module inside a TorchScript module (itself included) that was a
    supported recurrent module before scripting or tracing (TorchScript keeps the class name
    as ``original_name``). Needed beside the graph's ops: tracing an nn.LSTMCell / GRUCell /
    RNNCell records its equations as elementary ops (linear, sigmoid, tanh, mul), no cell op."""
    names = {cls.__name__ for cls in SUPPORTED_MODULES}
    return sorted({f"nn.{m.original_name}" for m in module.modules() if getattr(m, "original_name", None) in names})


def _check_script_module(name: str, module: nn.Module, model: nn.Module) -> None:
    """TorchScript submodules (torch.jit.trace / torch.jit.script) hide their modules: the
    recurrent ones inside cannot run the rule and would get plain gradients. Refused when
    their graph holds a recurrent op (or cannot be read); accepted otherwise (their other
    operations are handled, or not, by the engine exactly like any other module's)."""
    label = _label(name, module, model)
    try:
        ops = _scripted_recurrent_ops(module) + _scripted_recurrent_classes(module)
    except Exception as error:  # no forward graph to read: we cannot know what it computes
        raise UnsupportedConfigurationError(
            f"{label} is a TorchScript module whose graph cannot be inspected ({error}); it may "
            "hide a recurrent layer that would get plain gradients. Explain the eager "
            "(non-scripted, non-traced) model instead."
        ) from error
    if ops:
        raise UnsupportedConfigurationError(
            f"{label} is a TorchScript (traced or scripted) module running {', '.join(ops)}: "
            "the DeepLIFT rule cannot reach inside TorchScript, so that layer would get plain "
            "gradients and the attributions would miss f(x) − E f. Explain the eager model "
            "(the nn.Module before torch.jit.trace / torch.jit.script) instead."
        )


def check_compiled(model: nn.Module) -> None:
    """Refuse ``model`` if it is, or holds, a ``torch.compile``'d module (``OptimizedModule``)
    with a recurrent module inside: TorchDynamo re-traces its forward and fails inside its own
    tracer on the rule's interception (an ``AssertionError`` about "tracked for mutation")."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if eval_frame is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, eval_frame.OptimizedModule) and recurrent_modules(module):
            raise UnsupportedConfigurationError(
                f"{_label(name, module, model)} is a torch.compile'd module holding a recurrent "
                "layer: TorchDynamo re-traces its forward and cannot run the DeepLIFT rule. "
                "Explain the original module instead, `compiled._orig_mod` (it shares the weights)."
            )


def check_torchscript(model: nn.Module) -> None:
    """Refuse ``model`` if it is, or holds, a TorchScript module running a recurrent op (see
    :func:`_check_script_module`), or a torch.compile'd module holding one (see
    :func:`check_compiled`). For integrations that otherwise hand a model without visible
    recurrent modules to the engine unchanged (``register()``'s shap path)."""
    check_compiled(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            _check_script_module(name, module, model)


def _check_model(model: nn.Module, names: Mapping[nn.Module, str]) -> None:
    """Raise UnsupportedConfigurationError for anything the explanation cannot serve exactly,
    before anything is changed."""
    for module, name in names.items():
        check_supported(module, name)
    check_compiled(model)
    for name, module in model.named_modules():
        label = _label(name, module, model)
        if isinstance(module, torch.jit.ScriptModule):
            _check_script_module(name, module, model)
        elif isinstance(module, _DROPOUT) and module.training and module.p > 0:
            raise UnsupportedConfigurationError(
                f"{label} is a {type(module).__name__}(p={module.p}) in "
                "training mode: inputs and references would get different random masks and the "
                "attributions would be random. Call model.eval() before explaining."
            )
        elif _mixes_batch_rows(module):
            raise UnsupportedConfigurationError(
                f"{label} computes batch statistics as configured (training mode, or no running "
                "statistics): inputs and references would be normalised together, the "
                "attributions would not explain the model, and its running statistics would be "
                "overwritten. Call model.eval() (with track_running_stats=True) before explaining."
            )


class ModelSnapshot:
    """What an engine may leave on a model's modules, to put back after an exception.

    Engines register hooks and store tensors on modules during a call and clean up only when
    the call succeeds (shap removes its hooks at the end of shap_values; Captum deletes the
    ``input``/``output`` it stores on nn.ReLU in its backward hook). Taken before the call,
    ``restore()`` removes hook ids, Parameters (shap stores ``module.x`` as one) and
    attributes added since, and resets the training and full-backward-hook flags.
    TorchScript modules are left alone: their hooks and attributes live in C++ tables that
    engines cannot add Python entries to.
    """

    _ADDED = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_parameters")

    def __init__(self, model: nn.Module):
        self._modules = {
            module: (
                {name: set(getattr(module, name)) for name in self._ADDED},
                set(vars(module)),
                module._is_full_backward_hook,
                module.training,
            )
            for module in model.modules()
            if not isinstance(module, torch.jit.ScriptModule)
        }

    def restore(self) -> None:
        for module, (entries, attributes, full_backward, training) in self._modules.items():
            for name in self._ADDED:
                table = getattr(module, name)
                for key in set(table) - entries[name]:
                    del table[key]
            for key in set(vars(module)) - attributes:
                delattr(module, key)
            module._is_full_backward_hook = full_backward
            module.training = training


@contextmanager
def deeplift_mode(model: nn.Module, strict: bool = False) -> Iterator[nn.Module]:
    """Make every recurrent module of ``model`` apply the exact DeepLIFT rule, for the calling
    context only (other threads, copies and saved models stay native).

    For any engine that runs the doubled batch ``cat([inputs, references])`` (shap's
    DeepExplainer, Captum's DeepLift / DeepLiftShap, tangermeme's deep_lift_shap)::

        with torch_handler.deeplift_mode(model):
            attributions = DeepLift(model).attribute(x, baselines=x_ref)

    Supported: nn.LSTM, nn.GRU, nn.RNN (any layers, bidirectional, batch_first, proj_size,
    bias, packed sequences) and nn.LSTMCell, nn.GRUCell, nn.RNNCell, in float32 and float64.
    Raises UnsupportedConfigurationError, before changing anything, for a configuration the
    rule does not cover: a recurrent module overriding forward (by subclass or on the
    instance), half precision, dropout active in training mode, a module computing batch
    statistics (BatchNorm in training mode), a TorchScript submodule running a recurrent op
    or holding a traced recurrent module. While explaining, a recurrent module whose values
    (pre-activations, input projection included), states or multipliers become NaN / Inf
    raises NonFiniteError naming it, and one given an empty batch raises DoubledBatchError
    (a ValueError) saying so. Warns if the model has no recurrent module. Yields the model.

    If the body raises, the model also loses whatever hooks, attributes and flags the engine
    had added to it before failing (see :class:`ModelSnapshot`).

    Around the recurrent modules, the ops of the model's own forward (functional calls,
    nn.MultiheadAttention, norms, gates) run exact rules too
    (:mod:`torch_handler.ops.interception`); an op without a rule on input-dependent tensors is
    named in an ``UnsupportedOpWarning``, or raises ``UnsupportedOpError`` with
    ``strict=True`` (an enclosing explanation's ``strict=True`` carries into nested ones, such
    as ``register()``'s shap wrapper). A model without recurrent modules is left to the
    engine's own rules.
    """
    names = {m: name for name, m in model.named_modules() if isinstance(m, SUPPORTED_MODULES)}
    _check_model(model, names)
    if not names:
        warnings.warn(
            f"deeplift_mode: {type(model).__name__} has no nn.LSTM/GRU/RNN or cell module; "
            "nothing to change (the engine's own rules apply).",
            UserWarning,
            stacklevel=3,
        )
    parent = _current.get()
    strict = strict or bool(parent is not None and parent.options.get("strict"))
    with _explaining(model, names, {"strict": True} if strict else {}):
        snapshot = ModelSnapshot(model)
        try:
            # --- interception of the ops around the recurrent modules (torch_handler.ops.interception)
            with intercepting(model, list(names), strict=strict, engine_hooks=engine_hooks):
                yield model
            # --- end interception
        except BaseException:
            snapshot.restore()
            raise
