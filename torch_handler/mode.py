"""``deeplift_mode``: the one switch every engine integration goes through.

Inside the context, each supported recurrent module of the model runs its DeepLIFT forward
(:mod:`torch_handler.modules`); on exit, normally or by an exception, each module gets back
exactly the ``forward`` it had (an instance-level override included), with no extra
attributes, hooks or changed flags. Entering twice (nested contexts, or ``register()``'s shap
wrapper around a user's own context) is counted per module, so only the outermost exit
restores.
"""

from __future__ import annotations

import threading
import types
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from . import interception
from .errors import UnsupportedConfigurationError
from .modules import SUPPORTED_MODULES, check_supported, deeplift_forward_for

_MISSING = object()
_lock = threading.RLock()
# module -> [depth, the instance-level forward it had before (or _MISSING)]. Weak keys: a
# model dropped inside the context leaves nothing behind here.
_active: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


def recurrent_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) that the rule handles."""
    return [m for m in model.modules() if isinstance(m, SUPPORTED_MODULES)]


def is_active(module: nn.Module) -> bool:
    """Whether ``module`` currently runs its DeepLIFT forward."""
    with _lock:
        return module in _active


class ModelSnapshot:
    """What an engine may leave on a model's modules, to put back after an exception.

    Engines register hooks and store tensors on modules during a call and clean up only when
    the call succeeds (shap removes its hooks at the end of shap_values; Captum deletes the
    ``input``/``output`` it stores on nn.ReLU in its backward hook). Taken before the call,
    ``restore()`` removes hook ids, Parameters (shap stores ``module.x`` as one) and
    attributes added since, and resets the training and full-backward-hook flags.
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


def _check_model(model: nn.Module, modules: list[nn.Module]) -> None:
    for module in modules:
        check_supported(module)
    for name, module in model.named_modules():
        if isinstance(module, _DROPOUT) and module.training and module.p > 0:
            raise UnsupportedConfigurationError(
                f"{name or type(model).__name__} is a {type(module).__name__}(p={module.p}) in "
                "training mode: inputs and references would get different random masks and the "
                "attributions would be random. Call model.eval() before explaining."
            )


@contextmanager
def deeplift_mode(model: nn.Module, strict: bool = False) -> Iterator[nn.Module]:
    """Make every recurrent module of ``model`` apply the exact DeepLIFT rule.

    For any engine that runs the doubled batch ``cat([inputs, references])`` (shap's
    DeepExplainer, Captum's DeepLift / DeepLiftShap, tangermeme's deep_lift_shap)::

        with torch_handler.deeplift_mode(model):
            attributions = DeepLift(model).attribute(x, baselines=x_ref)

    Supported: nn.LSTM, nn.GRU, nn.RNN (any layers, bidirectional, batch_first, proj_size,
    bias, packed sequences) and nn.LSTMCell, nn.GRUCell, nn.RNNCell, in float32 and float64.
    Raises UnsupportedConfigurationError for a configuration the rule does not cover
    (modules overriding forward, half precision, dropout active in training mode); warns if
    the model has no recurrent module. Yields the model itself.

    If the body raises, the model also loses whatever hooks, attributes and flags the engine
    had added to it before failing (see :class:`ModelSnapshot`).

    Around the recurrent modules, the ops of the model's own forward (functional calls,
    nn.MultiheadAttention, norms, gates) run exact rules too
    (:mod:`torch_handler.interception`); an op without a rule on input-dependent tensors is
    named in an ``UnsupportedOpWarning``, or raises ``UnsupportedOpError`` with
    ``strict=True``. A model without recurrent modules is left to the engine's own rules.
    """
    modules = recurrent_modules(model)
    if not modules:
        warnings.warn(
            f"deeplift_mode: {type(model).__name__} has no nn.LSTM/GRU/RNN or cell module; "
            "nothing to change (the engine's own rules apply).",
            UserWarning,
            stacklevel=3,
        )
    _check_model(model, modules)
    entered: list[nn.Module] = []
    snapshot = None
    try:
        with _lock:
            for module in modules:
                record = _active.get(module)
                if record is None:
                    previous = module.__dict__.get("forward", _MISSING)
                    forward = deeplift_forward_for(module)
                    module.forward = types.MethodType(forward, module)
                    _active[module] = [1, previous]
                else:
                    record[0] += 1
                entered.append(module)
        # Taken after the forwards are swapped, so restoring leaves those to `finally`.
        snapshot = ModelSnapshot(model)
        # --- interception of the ops around the recurrent modules (torch_handler.interception)
        with interception.intercepting(model, modules, strict=strict):
            yield model
        # --- end interception
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    finally:
        with _lock:
            for module in entered:
                record = _active[module]
                record[0] -= 1
                if record[0] == 0:
                    previous = record[1]
                    if previous is _MISSING:
                        del module.__dict__["forward"]
                    else:
                        module.__dict__["forward"] = previous
                    del _active[module]
