"""Keeping the engines' own module rules off the modules whose internals the library handles.

An engine's backward hook on a module *replaces* the gradient the module's internals produced.
Inside an explained recurrent model, the ops inside ``nn.Softmax``, ``nn.LayerNorm``,
``nn.GELU``, ... already run exact rules (:mod:`torch_handler.ops.interception`), so the engines'
rules for those modules (shap's ``op_handler``, Captum's ``SUPPORTED_NON_LINEAR``, tangermeme's
``_NON_LINEAR_OPS``) must not run there: they split dim 0 in half whatever the layout and
some fall back to plain gradients for small differences.

One seam per engine, wrapped once and inert outside an explanation (the wrapper calls the
original unless an explanation is active in the *current* context and the module belongs to
its model):

* shap: ``PyTorchDeep.add_handles`` (called per module, recursively);
* Captum: ``DeepLift._can_register_hook`` (consulted per module by ``model.apply``);
* tangermeme: ``tangermeme.deep_lift_shap._register_hooks`` (applied per module).

A module keeps its engine rule when the library has no rule for its internals (``MaxPool``,
``PReLU``, a user's ``additional_nonlinear_ops`` entry, ...): interception is then off inside
it, and its input must have the doubled batch on dim 0 (checked), as that rule assumes.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

from torch import nn

from torch_handler.ops.interception.context import current
from torch_handler.ops.table import OP_RULES

_lock = threading.Lock()

# Module types whose forward is functional calls with rules (or linear ops): the rule names
# they need. Handled (engine hooks off) when every named rule is in the op table.
_HANDLED_TYPES: dict[type, tuple[str, ...]] = {
    nn.ReLU: ("relu",),
    nn.ReLU6: ("relu6",),
    nn.LeakyReLU: ("leaky_relu",),
    nn.ELU: ("elu",),
    nn.GELU: ("gelu",),
    nn.SiLU: ("silu",),
    nn.Softplus: ("softplus",),
    nn.Sigmoid: ("sigmoid",),
    nn.Tanh: ("tanh",),
    nn.Hardtanh: ("clamp",),
    nn.Softmax: ("softmax",),
    nn.LogSoftmax: ("log_softmax",),
    nn.GLU: ("glu",),
    nn.LayerNorm: ("layer_norm",),
    nn.RMSNorm: ("rms_norm",),
    nn.MultiheadAttention: ("softmax", "matmul", "baddbmm", "scaled_dot_product_attention"),
}
# Modules whose engine rule is the identity: no hooks needed, none attached.
_LINEAR_TYPES = (
    nn.Linear,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Embedding,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)


def _bilinear_op_type():
    # Only where tangermeme's module is imported: no model holds a BilinearOp before that, and
    # importing it (numba) cost seconds on the first explanation of a shap or Captum user.
    if "tangermeme.deep_lift_shap" not in sys.modules:
        return None
    try:
        from tangermeme.deep_lift_shap import BilinearOp
    except Exception:  # noqa: BLE001 - tangermeme absent or broken: no such module type
        return None
    return BilinearOp


def handles_internals(module: nn.Module) -> bool:
    """Whether every op inside ``module`` runs a library rule (or is linear)."""
    if isinstance(module, _LINEAR_TYPES):
        return True
    needed = _HANDLED_TYPES.get(type(module))
    bilinear = _bilinear_op_type()
    if needed is None and bilinear is not None and type(module) is bilinear:
        needed = ("einsum", "matmul")
    if needed is None:
        return False
    return all(name in OP_RULES for name in needed)


def _explained_member(module: nn.Module):
    """The active explanation if ``module`` belongs to its model and is not one of its recurrent
    modules (those are the recurrent rule's business), else None."""
    ex = current()
    if ex is None or module not in ex.members or module in ex.recurrent:
        return None
    return ex


# ---------------------------------------------------------------------------------------------
# The three seams.


def _guard_shap_add_handles(original):
    def add_handles(self, model, forward_handle, backward_handle):
        ex = _explained_member(model)
        if ex is None or list(model.children()):
            return original(self, model, forward_handle, backward_handle)
        if handles_internals(model):
            return []
        from shap.explainers._deep import deep_pytorch

        handler = deep_pytorch.op_handler.get(type(model).__name__)
        if handler is not None and handler.__name__ not in ("passthrough", "linear_1d"):
            ex.engine_ruled[model] = True
        return original(self, model, forward_handle, backward_handle)

    add_handles.__wrapped__ = original
    add_handles._torch_handler_guard = True
    return add_handles


def _guard_captum_can_register(original):
    def _can_register_hook(self, module):
        ex = _explained_member(module)
        if ex is None:
            return original(self, module)
        if handles_internals(module):
            return False
        result = original(self, module)
        if result:
            ex.engine_ruled[module] = True
        return result

    _can_register_hook.__wrapped__ = original
    _can_register_hook._torch_handler_guard = True
    return _can_register_hook


def _guard_tangermeme_register(original):
    def _register_hooks(module):
        ex = _explained_member(module)
        if ex is None:
            return original(module)
        if handles_internals(module) and type(module) in getattr(module, "_NON_LINEAR_OPS", {}):
            ops = module._NON_LINEAR_OPS
            builtin = _tangermeme_builtin_rule(type(module))
            if builtin is None or ops.get(type(module)) is builtin:
                return None
        before = len(module._backward_hooks)
        result = original(module)
        if len(module._backward_hooks) > before:
            ex.engine_ruled[module] = True
        return result

    _register_hooks.__wrapped__ = original
    _register_hooks._torch_handler_guard = True
    return _register_hooks


def _tangermeme_builtin_rule(module_type):
    """tangermeme's own rule for ``module_type`` (a user's replacement in
    ``additional_nonlinear_ops`` is theirs to keep)."""
    from tangermeme._deep_lift_utils import _build_nonlinear_ops

    return _build_nonlinear_ops().get(module_type)


def _guarded(function) -> bool:
    while function is not None:
        if getattr(function, "_torch_handler_guard", False):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


_users = 0  # explanations using the seams, every thread together
_installed: list[tuple[object, str, object, object]] = []  # (owner, name, original, wrapper)


def _seams():
    """(owner, attribute, guard factory) of each installed engine's seam.

    An engine that is not installed has nothing to guard. One that is installed but lacks the
    seam (a reorganised release) raises UnsupportedVersionError naming it: without the guard
    its module rules would silently override the library's. An engine whose seam module is
    not imported yet is not imported here (tangermeme's pulls in numba, 0.7-2 s, Captum's
    0.3 s, shap's more, on the first explanation of a process that may never use them): :class:`_WhenImported`
    wraps it the moment it is imported while explanations are active.
    """
    for module_name, seam in _SEAMS.items():
        if module_name in sys.modules:
            found = seam()
            if found is not None:
                yield found


def _shap_seam():
    from torch_handler.engines.versions import require_attributes

    try:
        from shap.explainers._deep import deep_pytorch
    except ImportError:
        return None
    require_attributes(deep_pytorch, ["PyTorchDeep.add_handles"], "shap", _PURPOSE)
    return deep_pytorch.PyTorchDeep, "add_handles", _guard_shap_add_handles


def _captum_seam():
    from torch_handler.engines.versions import check_version, require_attributes

    try:
        import captum
        from captum.attr._core import deep_lift
    except ImportError:
        return None
    check_version("captum", _version(captum), _PURPOSE)
    require_attributes(deep_lift, ["DeepLift._can_register_hook"], "captum", _PURPOSE)
    return deep_lift.DeepLift, "_can_register_hook", _guard_captum_can_register


def _tangermeme_seam():
    from torch_handler.engines.versions import check_version, require_attributes

    try:
        import tangermeme
        import tangermeme.deep_lift_shap as tdls
    except ImportError:
        return None
    check_version("tangermeme", _version(tangermeme), _PURPOSE)
    from tangermeme import _deep_lift_utils

    require_attributes(tdls, ["_register_hooks"], "tangermeme", _PURPOSE)
    require_attributes(_deep_lift_utils, ["_build_nonlinear_ops"], "tangermeme", _PURPOSE)
    return tdls, "_register_hooks", _guard_tangermeme_register


def _version(package) -> str:
    """``package.__version__``, or its distribution's version while the package is still being
    imported (captum's ``__init__`` imports its DeepLift before it sets ``__version__``)."""
    import importlib.metadata

    return getattr(package, "__version__", None) or importlib.metadata.version(package.__name__)


_PURPOSE = "torch_handler.deeplift_mode (keeping the engine's module rules off handled modules)"
_SEAMS = {  # seam module -> its seam, checked
    "shap.explainers._deep.deep_pytorch": _shap_seam,
    "captum.attr._core.deep_lift": _captum_seam,
    "tangermeme.deep_lift_shap": _tangermeme_seam,
}


def _wrap(seam) -> None:
    owner, name, guard = seam
    original = getattr(owner, name)
    if not _guarded(original):
        wrapper = guard(original)
        setattr(owner, name, wrapper)
        _installed.append((owner, name, original, wrapper))


class _WhenImported(importlib.abc.MetaPathFinder):
    """While explanations are active: a seam module imported now (an engine first used inside
    ``deeplift_mode``) gets its seam wrapped as soon as its code has run, before the importer
    sees it. Finds nothing itself; it wraps the loader the next finder returns."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _SEAMS or fullname in sys.modules:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            seam = _SEAMS[fullname]()  # the module is in sys.modules now: not imported again
            with _lock:
                if _users and seam is not None:
                    _wrap(seam)

        loader.exec_module = exec_module
        return spec


_when_imported = _WhenImported()


def install() -> None:
    """Wrap each installed engine's seam while explanations are active. Counted: the first
    explanation to start wraps, :func:`uninstall` by the last to end puts the originals back, so
    the engines are exactly as found whenever nothing is explained. The wrappers are inert for
    other contexts and for modules outside the explained model."""
    global _users
    with _lock:
        if _users == 0:
            seams = list(_seams())  # every check first: a refused engine leaves nothing wrapped
            for seam in seams:
                _wrap(seam)
            sys.meta_path.insert(0, _when_imported)
        _users += 1


def uninstall() -> None:
    """Undo :func:`install` once; the last user puts each original back, unless someone wrapped
    the seam again meanwhile (``register()``'s shap wrapper, another library): theirs stays,
    and our inert wrapper with it, rather than dropping their patch."""
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            if _when_imported in sys.meta_path:
                sys.meta_path.remove(_when_imported)
            while _installed:
                owner, name, original, wrapper = _installed.pop()
                if getattr(owner, name) is wrapper:
                    setattr(owner, name, original)
