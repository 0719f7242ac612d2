"""Registering the rule in shap's DeepExplainer (PyTorch backend).

``register()`` changes three things in ``shap.explainers._deep.deep_pytorch``, and
``unregister()`` puts each back exactly as it found it:

1. ``op_handler[name]`` for LSTM, LSTMCell, GRU, GRUCell, RNN, RNNCell, so shap recognises
   the modules (no "unrecognized nn.Module" warning). The handlers pass gradients through:
   the multipliers are already DeepLIFT multipliers, computed by the autograd Function the
   module runs while shap explains.
2. ``PyTorchDeep.shap_values`` runs inside :func:`torch_handler.deeplift_mode` when the
   model has a recurrent module, and then checks additivity with a dtype-aware tolerance
   (stricter than shap's absolute 0.01). Models without recurrent modules take shap's own
   code path untouched, so their values are bit-identical with and without ``register()``.
3. ``PyTorchDeep.add_handles`` attaches no shap hooks to a recurrent module that runs the
   rule: its forward hook asserts on the ``hx`` tuple, and its backward hook would only see
   ``x`` (RULES.md §3). Every other module gets shap's hooks as before.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .additivity import check_additivity
from .errors import UnsupportedConfigurationError
from .mode import ModelSnapshot, deeplift_mode, is_active, recurrent_modules
from .modules import SUPPORTED_MODULES, check_finite
from .versions import TESTED, shap_deep_pytorch

SUPPORTED_SHAP = TESTED["shap"].specifier
_MISSING = object()
_lock = threading.RLock()
_saved: dict | None = None


def _pass_multipliers(module, grad_input, grad_output):
    """Shared body of the op_handler entries: the module's own autograd Function already
    applied the rule, so the incoming gradients are the DeepLIFT multipliers."""
    if not is_active(module):
        raise UnsupportedConfigurationError(
            f"shap's backward hook reached {type(module).__name__} while it was not running the "
            "DeepLIFT rule; its gradients would be plain gradients. Explain through "
            "shap.DeepExplainer after torch_handler.register(), or inside "
            "torch_handler.deeplift_mode(model)."
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


lstm_cell_handler = _op_handler("LSTMCell", "lstm_cell_handler")
lstm_handler = _op_handler("LSTM", "lstm_handler")
gru_cell_handler = _op_handler("GRUCell", "gru_cell_handler")
gru_handler = _op_handler("GRU", "gru_handler")
rnn_cell_handler = _op_handler("RNNCell", "rnn_cell_handler")
rnn_handler = _op_handler("RNN", "rnn_handler")

OP_HANDLERS = {
    "LSTMCell": lstm_cell_handler,
    "LSTM": lstm_handler,
    "GRUCell": gru_cell_handler,
    "GRU": gru_handler,
    "RNNCell": rnn_cell_handler,
    "RNN": rnn_handler,
}


def _deep_pytorch():
    """shap's PyTorch backend after the version policy of :mod:`torch_handler.versions`."""
    return shap_deep_pytorch()


def _strict_additivity(explainer, X, result, ranked_outputs) -> None:
    inputs = X if explainer.multi_input else [X]
    inputs = [x.detach().to(explainer.device) for x in inputs]
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
    check_additivity(sums, deltas, scale, str(dtype).removeprefix("torch."), "shap.DeepExplainer")


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
        check_finite(x, name)
        check_finite(background, f"the background of {name}")


def _make_shap_values(original):
    def shap_values(self, X, ranked_outputs=None, output_rank_order="max", check_additivity=True):
        if not recurrent_modules(self.model):
            return original(self, X, ranked_outputs, output_rank_order, check_additivity)
        _validate_inputs(self, X)
        snapshot = ModelSnapshot(self.model)
        with deeplift_mode(self.model):
            result = original(self, X, ranked_outputs, output_rank_order, check_additivity=False)
        # shap leaves _is_full_backward_hook set on every leaf even after success.
        snapshot.restore()
        if check_additivity:
            _strict_additivity(self, X, result, ranked_outputs)
        return result

    shap_values.__wrapped__ = original
    shap_values.__doc__ = original.__doc__
    return shap_values


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
    :class:`~torch_handler.versions.UnsupportedVersionError` (a RuntimeError) for a shap older
    than tested or without the internals it patches; warns for a newer one
    (:mod:`torch_handler.versions`). Undo with :func:`unregister`.
    """
    global _saved
    with _lock:
        if _saved is not None:
            return
        deep_pytorch = _deep_pytorch()
        cls = deep_pytorch.PyTorchDeep
        saved = {
            "op_handler": {name: deep_pytorch.op_handler.get(name, _MISSING) for name in OP_HANDLERS},
            "shap_values": cls.__dict__["shap_values"],
            "add_handles": cls.__dict__["add_handles"],
        }
        deep_pytorch.op_handler.update(OP_HANDLERS)
        cls.shap_values = _make_shap_values(saved["shap_values"])
        cls.add_handles = _make_add_handles(saved["add_handles"])
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
        deep_pytorch.PyTorchDeep.shap_values = _saved["shap_values"]
        deep_pytorch.PyTorchDeep.add_handles = _saved["add_handles"]
        _saved = None


def is_registered() -> bool:
    """Whether :func:`register` is in effect."""
    with _lock:
        return _saved is not None
