"""Registering the rule in shap's DeepExplainer (PyTorch backend).

``register()`` changes five things in ``shap.explainers._deep.deep_pytorch``, and
``unregister()`` puts each back exactly as it found it:

1. ``op_handler[name]`` for each class of :data:`torch_handler.recurrent.registry.REGISTRY` (LSTM,
   LSTMCell, GRU, GRUCell, RNN, RNNCell), so shap recognises the modules (no "unrecognized
   nn.Module" warning). The handlers pass gradients through: the multipliers are already
   DeepLIFT multipliers, computed by the autograd Function the module runs while shap explains.
2. ``PyTorchDeep.__init__`` first checks what shap's constructor would otherwise fail on with
   shap's or torch's own message: half-precision recurrent weights
   (UnsupportedConfigurationError) and a background of another dtype (TypeError) or device
   (ValueError) than the recurrent weights; and refuses, as ``deeplift_mode`` does, a
   TorchScript submodule running a recurrent op (UnsupportedConfigurationError), which shap
   would otherwise explain with plain gradients.
3. ``PyTorchDeep.shap_values`` runs inside :func:`torch_handler.deeplift_mode` when the
   model has a recurrent module, and then checks additivity with a dtype-aware tolerance
   (stricter than shap's absolute 0.01), with a message that tells an operation without a
   rule from float32 rounding of the model itself. Models without recurrent modules take
   shap's own code path untouched, so their values are bit-identical with and without
   ``register()``. The model is put back as found whether shap succeeds or raises.
4. ``PyTorchDeep.add_handles`` attaches no shap hooks to a recurrent module that runs the
   rule: its forward hook asserts on the ``hx`` tuple, and its backward hook would only see
   ``x`` (a module hook cannot return multipliers for the state). Every other module gets
   shap's hooks as before.
5. ``PyTorchDeep.gradient``, during a ``shap_values`` call of 3., answers shap's per-sample
   calls from one pass over a chunk of samples (:mod:`torch_handler.engines.shap_batches`):
   the same pairs and values, in a fraction of the passes. Any other call is shap's own.
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import torch

from torch_handler.additivity import Diagnosis, check_additivity
from torch_handler.engines import shap_batches
from torch_handler.engines.versions import TESTED, shap_deep_pytorch
from torch_handler.explanation import is_active
from torch_handler.mode import ModelSnapshot, check_torchscript, deeplift_mode, recurrent_modules
from torch_handler.recurrent.modules import check_finite, check_supported
from torch_handler.recurrent.registry import REGISTRY, SUPPORTED_MODULES

SUPPORTED_SHAP = TESTED["shap"].specifier
_MISSING = object()
_lock = threading.RLock()
_saved: dict | None = None


def _pass_multipliers(module, grad_input, grad_output):
    """Shared body of the op_handler entries: the module's own autograd Function already
    applied the rule, so the incoming gradients are the DeepLIFT multipliers.

    Registered shap never attaches its hooks to a module that runs the rule (see
    ``add_handles`` below), so this body only runs for a ``shap_values`` call that started
    before :func:`register` took effect (``register()`` from another thread while shap
    explains) or that bypassed the wrapper. Such a call is shap without the handler: it gets
    shap's own treatment of an unknown module (a warning, the gradient passed on), with a
    warning that says so. Raising here instead would escape shap's ``shap_values`` before it
    removes its hooks, leaving them on every module of the model for good.
    """
    if not is_active(module):
        warnings.warn(
            f"shap's backward hook reached {type(module).__name__} while it was not running the "
            "DeepLIFT rule (this shap_values call did not go through torch_handler.register(), "
            "e.g. it began before register() took effect): it gets plain gradients, as in shap "
            "without the handler. Call shap_values after torch_handler.register() returns, or "
            "inside torch_handler.deeplift_mode(model).",
            UserWarning,
            stacklevel=2,
        )
    return None


def _op_handler(module_name: str, function_name: str):
    """The shap op_handler registered for ``nn.<module_name>``: a named function (shap keys its
    behaviour on ``__name__``) that passes the already-computed multipliers through."""

    def handler(module, grad_input, grad_output):
        return _pass_multipliers(module, grad_input, grad_output)

    handler.__name__ = handler.__qualname__ = function_name
    handler.__module__ = __name__
    handler.__doc__ = f"shap op_handler for nn.{module_name} (registered as ``op_handler[{module_name!r}]``)."
    return handler


# shap looks handlers up by the module's class name; one per registry entry.
OP_HANDLERS = {entry.cls.__name__: _op_handler(entry.cls.__name__, entry.handler) for entry in REGISTRY}
_BY_NAME = {handler.__name__: handler for handler in OP_HANDLERS.values()}
lstm_cell_handler = _BY_NAME["lstm_cell_handler"]
lstm_handler = _BY_NAME["lstm_handler"]
gru_cell_handler = _BY_NAME["gru_cell_handler"]
gru_handler = _BY_NAME["gru_handler"]
rnn_cell_handler = _BY_NAME["rnn_cell_handler"]
rnn_handler = _BY_NAME["rnn_handler"]


def _deep_pytorch():
    """shap's PyTorch backend after the version policy of :mod:`torch_handler.engines.versions`."""
    return shap_deep_pytorch()


def _model_inputs(explainer, X) -> list[torch.Tensor]:
    inputs = X if explainer.multi_input else [X]
    return [x.detach().to(explainer.device) for x in inputs]


def _float32_rounding(model, inputs, background, outputs, expected, scale) -> float | None:
    """How far the model's own float32 forward is from its float64 forward on these inputs,
    relative to ``scale``: the rounding an ill-conditioned model shows without any
    attribution. Computed on a float64 deep copy; None if the model cannot be copied or cast."""
    try:
        exact = copy.deepcopy(model).double()
        promote = lambda ts: [t.double() if t.is_floating_point() else t for t in ts]  # noqa: E731
        with torch.no_grad():
            f64 = exact(*promote(inputs)).cpu().numpy()
            e64 = exact(*promote(background)).mean(0).cpu().numpy()
    except Exception:  # a model that cannot be deep-copied or run in float64
        return None
    worst = max(np.abs(f64 - outputs).max(), np.abs(e64 - expected).max())
    return float(worst / scale)


# Torch functions with no DeepLIFT rule in shap when called functionally: nonlinearities, and
# products / quotients of two tensors (linear when one side is a constant; reported when
# neither side is a Parameter, which is the common linear case).
_NONLINEAR_CALLS = frozenset(
    "relu relu_ relu6 leaky_relu elu selu celu gelu silu mish softplus hardtanh hardswish hardsigmoid "
    "sigmoid sigmoid_ tanh tanh_ softmax log_softmax softmin logsumexp glu exp exp_ log log_ log1p "
    "sqrt rsqrt reciprocal square pow __pow__ abs clamp clip max min amax amin maximum minimum "
    "layer_norm group_norm norm prod cumprod std var sort topk median".split()
)
_PRODUCT_CALLS = frozenset(
    "mul mul_ __mul__ __rmul__ div div_ __truediv__ __rtruediv__ matmul __matmul__ bmm einsum".split()
)


def _is_varying_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.numel() > 1


def _functional_calls(model, inputs, op_handler) -> list[str]:
    """``"tanh in Classifier.forward"`` (or ``"tanh in block (Block)"``) for each nonlinear
    torch function the model calls outside any module shap has a rule for, found by one
    forward of a deep copy under a TorchFunctionMode (the user's model gets no hook)."""
    from torch.overrides import TorchFunctionMode

    shadow = copy.deepcopy(model)
    handled = lambda m: isinstance(m, SUPPORTED_MODULES) or (  # noqa: E731
        not any(True for _ in m.children()) and type(m).__name__ in op_handler
    )
    stack: list[str] = []
    found: dict[str, None] = {}  # ordered set

    # --- calls that run a rule inside an explained recurrent model are not culprits
    from torch_handler.ops.interception.function_mode import handles_call

    ruled = handles_call if any(isinstance(m, SUPPORTED_MODULES) for m in model.modules()) else (lambda name: False)
    # --- end

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if stack and stack[-1] is not None and not ruled(name):
                varying = [a for a in args if _is_varying_tensor(a)]
                if name in _NONLINEAR_CALLS or (name in _PRODUCT_CALLS and len(varying) >= 2):
                    found[f"{name} in {stack[-1]}"] = None
            return func(*args, **(kwargs or {}))

    def enter(label):
        return lambda module, args: stack.append(label)

    for name, module in shadow.named_modules():
        # Inside a handled module nothing is reported (None on the stack).
        where = f"{name} ({type(module).__name__})" if name else f"{type(module).__name__}.forward"
        label = None if handled(module) else where
        module.register_forward_pre_hook(enter(label))
        module.register_forward_hook(lambda module, args, output: stack.pop())
    with torch.no_grad(), Record():
        shadow(*inputs)
    return list(found)


def _unhandled_modules(model, inputs, op_handler) -> list[str]:
    """What in the model likely computes without a DeepLIFT rule in shap: functional
    nonlinear calls (``_functional_calls``) and leaf modules of a class shap does not know.
    Where the forward cannot be replayed, modules with their own forward code are named."""
    culprits = [
        f"{name or type(model).__name__} ({type(module).__name__}): no shap rule"
        for name, module in model.named_modules()
        if not isinstance(module, SUPPORTED_MODULES)
        and not any(True for _ in module.children())
        and type(module).__name__ not in op_handler
    ]
    try:
        calls = _functional_calls(model, inputs, op_handler)
    except Exception:  # a model that cannot be deep-copied or replayed: name what may hold calls
        calls = [
            f"{name or type(model).__name__} ({type(module).__name__}): own forward code"
            for name, module in model.named_modules()
            if not type(module).__module__.startswith("torch.nn")
        ]
    return [f"functional {call}" if " in " in call else call for call in calls] + culprits


def _strict_additivity(explainer, X, result, ranked_outputs) -> None:
    inputs = _model_inputs(explainer, X)
    with torch.no_grad():
        outputs = explainer.model(*inputs)
    dtype = outputs.dtype
    outputs = outputs.detach().cpu().double().numpy()
    if ranked_outputs is not None:
        phis, ranks = result
        ranks = np.asarray(ranks.cpu() if hasattr(ranks, "cpu") else ranks)
    else:
        phis = result
        ranks = np.broadcast_to(np.arange(outputs.shape[1]), outputs.shape)
    phis = phis if isinstance(phis, list) else [phis]
    sums = sum(p.sum(axis=tuple(range(1, p.ndim - 1))) for p in phis)
    expected = np.asarray(explainer.expected_value, np.float64)
    deltas = np.take_along_axis(outputs, ranks, axis=1) - expected[ranks]
    scale = max(np.abs(outputs).max(), np.abs(expected).max())

    def diagnose() -> Diagnosis:
        from shap.explainers._deep import deep_pytorch

        rounding = None
        if dtype != torch.float64:
            rounding = _float32_rounding(explainer.model, inputs, explainer.data, outputs, expected, scale)
        return Diagnosis(rounding, _unhandled_modules(explainer.model, inputs, deep_pytorch.op_handler))

    check_additivity(sums, deltas, scale, str(dtype).removeprefix("torch."), "shap.DeepExplainer",
                     diagnose=diagnose)


def _validate_inputs(explainer, X) -> None:
    """Input and background must be finite and agree in trailing shape, dtype and device."""
    inputs = X if isinstance(X, list) else [X]
    if len(inputs) != len(explainer.data):
        raise ValueError(
            f"shap_values got {len(inputs)} model inputs but the background has "
            f"{len(explainer.data)}; pass one tensor per model input, in the same order."
        )
    for k, (x, background) in enumerate(zip(inputs, explainer.data, strict=True)):
        name = f"input {k}" if len(inputs) > 1 else "input"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if tuple(x.shape[1:]) != tuple(background.shape[1:]):
            raise ValueError(
                f"{name} has per-sample shape {tuple(x.shape[1:])} but its background has "
                f"{tuple(background.shape[1:])}; both must describe the same model input."
            )
        if x.dtype != background.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but its background has {background.dtype}; cast "
                f"one to match (e.g. X.to({background.dtype}))."
            )
        if x.device != background.device:
            raise ValueError(
                f"{name} is on {x.device} but its background is on {background.device}; move "
                "both to the model's device."
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"{name} is an empty batch (0 rows): there is nothing to explain. Skip empty "
                "batches before calling shap_values."
            )
        check_finite(x, name)
        check_finite(background, f"the background of {name}")


def _make_shap_values(original):
    def shap_values(self, X, ranked_outputs=None, output_rank_order="max", check_additivity=True):
        if not recurrent_modules(self.model):
            # A recurrent layer hidden in TorchScript would get plain gradients: refuse it, as
            # deeplift_mode does (also here: the explainer may predate register()).
            check_torchscript(self.model)
            return original(self, X, ranked_outputs, output_rank_order, check_additivity)
        _validate_inputs(self, X)
        snapshot = ModelSnapshot(self.model)
        try:
            with deeplift_mode(self.model), shap_batches.batched(self, X, ranked_outputs):
                result = original(self, X, ranked_outputs, output_rank_order, check_additivity=False)
        finally:
            # shap removes its hooks only when it succeeds, and leaves _is_full_backward_hook set
            # on every leaf even then: put the model back as found either way.
            snapshot.restore()
        if check_additivity:
            _strict_additivity(self, X, result, ranked_outputs)
        return result

    shap_values.__wrapped__ = original
    shap_values.__doc__ = original.__doc__
    return shap_values


def _check_model_and_background(model, data) -> None:
    """What shap's constructor would otherwise trip over first, with shap's or torch's own
    message: half-precision recurrent weights (shap: "Got unsupported ScalarType"), and a
    background whose dtype or device differs from the recurrent weights (torch's error from
    inside the layer)."""
    check_torchscript(model)
    modules = recurrent_modules(model)
    for module in modules:
        check_supported(module)
    weight = next(modules[0].parameters(), None) if modules else None
    if weight is None:
        return
    tensors = data if isinstance(data, list) else [data]
    for k, background in enumerate(tensors):
        name = f"background {k}" if len(tensors) > 1 else "the background"
        if not isinstance(background, torch.Tensor) or not background.is_floating_point():
            continue  # token ids and other integer inputs feed embeddings, not the layer
        if background.dtype != weight.dtype:
            raise TypeError(
                f"{name} has dtype {background.dtype} but the model's recurrent weights are "
                f"{weight.dtype}; cast one to match (e.g. background.to({weight.dtype}), or "
                f"model.to({background.dtype}))."
            )
        if background.device != weight.device:
            raise ValueError(
                f"{name} is on {background.device} but the model's recurrent weights are on "
                f"{weight.device}; move both to the same device."
            )


def _make_init(original):
    def __init__(self, model, data):
        _check_model_and_background(model[0] if isinstance(model, tuple) else model, data)
        original(self, model, data)

    __init__.__wrapped__ = original
    __init__.__doc__ = original.__doc__
    return __init__


def _make_add_handles(original):
    def add_handles(self, model, forward_handle, backward_handle):
        if isinstance(model, SUPPORTED_MODULES) and is_active(model):
            return []
        return original(self, model, forward_handle, backward_handle)

    add_handles.__wrapped__ = original
    return add_handles


def register() -> None:
    """Make ``shap.DeepExplainer`` exact for PyTorch models with recurrent layers.

    Idempotent and thread-safe. Raises ImportError without shap and
    :class:`~torch_handler.engines.versions.UnsupportedVersionError` (a RuntimeError) for a shap older
    than tested or without the internals it patches; warns for a newer one
    (:mod:`torch_handler.engines.versions`). Undo with :func:`unregister`.
    """
    global _saved
    with _lock:
        if _saved is not None:
            return
        deep_pytorch = _deep_pytorch()
        cls = deep_pytorch.PyTorchDeep
        saved = {
            "op_handler": {name: deep_pytorch.op_handler.get(name, _MISSING) for name in OP_HANDLERS},
            "__init__": cls.__dict__["__init__"],
            "shap_values": cls.__dict__["shap_values"],
            "add_handles": cls.__dict__["add_handles"],
            "gradient": cls.__dict__["gradient"],
        }
        deep_pytorch.op_handler.update(OP_HANDLERS)
        cls.__init__ = _make_init(saved["__init__"])
        cls.shap_values = _make_shap_values(saved["shap_values"])
        cls.add_handles = _make_add_handles(saved["add_handles"])
        cls.gradient = shap_batches.gradient(saved["gradient"])
        _saved = saved


def unregister() -> None:
    """Put shap back exactly as it was before :func:`register`. Idempotent and thread-safe."""
    global _saved
    with _lock:
        if _saved is None:
            return
        from shap.explainers._deep import deep_pytorch

        for name, previous in _saved["op_handler"].items():
            if previous is _MISSING:
                deep_pytorch.op_handler.pop(name, None)
            else:
                deep_pytorch.op_handler[name] = previous
        deep_pytorch.PyTorchDeep.__init__ = _saved["__init__"]
        deep_pytorch.PyTorchDeep.shap_values = _saved["shap_values"]
        deep_pytorch.PyTorchDeep.add_handles = _saved["add_handles"]
        deep_pytorch.PyTorchDeep.gradient = _saved["gradient"]
        _saved = None


def is_registered() -> bool:
    """Whether :func:`register` is in effect."""
    with _lock:
        return _saved is not None
