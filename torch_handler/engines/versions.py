"""Which versions of Python and of each engine this package is tested with, and the checks.

The one definition of every tested range is :data:`TESTED`; ``pyproject.toml``'s lower bounds,
the CI constraint files and the documentation follow it (``tests/test_packaging.py`` checks
that they agree). The policy, applied by :func:`check_version`:

* inside the tested range: silent;
* newer than tested: an :class:`UntestedVersionWarning` naming the tested range. The code goes
  on; the strict additivity check is the guard, so a release that breaks the integration
  raises :class:`~torch_handler.AdditivityError` rather than returning wrong values;
* older than tested: :class:`UnsupportedVersionError` naming the version found, the tested
  range and the fix.

Independently of the version number, code that reaches into an engine's internals checks
that they exist with :func:`require_attributes` (a missing one is an
:class:`UnsupportedVersionError` naming it), so a reorganised release fails with a message
rather than an ``AttributeError`` deep inside a patch. :func:`shap_deep_pytorch` does both for
what :func:`torch_handler.register` changes in shap.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType

from packaging.version import Version


@dataclass(frozen=True)
class TestedRange:
    """Versions from ``oldest`` (the oldest CI runs) up to, not including, ``below``.

    ``newest`` is the newest version CI runs; every release in ``[oldest, below)`` counts as
    tested (``below`` is the next minor release after ``newest``).
    """

    __test__ = False  # not a pytest test class despite the name

    package: str
    oldest: str
    newest: str
    below: str

    @property
    def specifier(self) -> str:
        """PEP 440 form, e.g. ``>=0.49.1,<0.55``."""
        return f">={self.oldest},<{self.below}"

    def describe(self) -> str:
        """Human form, e.g. ``shap>=0.49.1,<0.55 (CI runs 0.49.1 to 0.54.1)``."""
        return f"{self.package}{self.specifier} (CI runs {self.oldest} to {self.newest})"

    def position(self, version: str) -> int:
        """-1 older than tested, 0 inside the range, 1 newer than tested.

        Pre-releases and local builds compare by their release: ``2.15.0+cpu`` is 2.15.0 and
        ``0.55.0rc1`` is newer than a range that stops below 0.55.
        """
        release = Version(Version(version).base_version)
        if release < Version(self.oldest):
            return -1
        return 0 if release < Version(self.below) else 1


TESTED: dict[str, TestedRange] = {
    "python": TestedRange("python", "3.11", "3.13", "3.14"),
    "torch": TestedRange("torch", "2.13.0", "2.15.0", "2.16"),
    "numpy": TestedRange("numpy", "1.26.4", "2.5.5", "2.6"),
    "shap": TestedRange("shap", "0.49.1", "0.54.1", "0.55"),
    "captum": TestedRange("captum", "0.9.0", "0.9.0", "0.10"),
    "tangermeme": TestedRange("tangermeme", "1.6.0", "1.6.0", "1.7"),
    "jax": TestedRange("jax", "0.10.2", "0.12.1", "0.13"),
}

EXTRAS = {"shap": "shap", "captum": "captum", "tangermeme": "tangermeme", "jax": "jax"}
"""The ``pip install 'lstm-deepshap[extra]'`` that brings each optional package."""


class UnsupportedVersionError(RuntimeError):
    """An installed package is older than tested, or lacks an internal this package uses."""


class UntestedVersionWarning(UserWarning):
    """An installed package is newer than the newest version CI runs."""


def _install_hint(package: str) -> str:
    rng = TESTED[package]
    extra = EXTRAS.get(package)
    via = f" (or pip install 'lstm-deepshap[{extra}]')" if extra else ""
    return f"pip install '{package}{rng.specifier}'{via}"


def check_version(package: str, version: str, purpose: str, stacklevel: int = 2) -> None:
    """Apply the version policy to ``package`` at ``version`` for ``purpose`` (a phrase such as
    ``"torch_handler.register()"``). Silent inside :data:`TESTED`'s range, warns when newer,
    raises :class:`UnsupportedVersionError` when older. ``stacklevel`` as in
    :func:`warnings.warn`, counted from the caller of this function."""
    rng = TESTED[package]
    where = rng.position(version)
    if where < 0:
        raise UnsupportedVersionError(
            f"{purpose} needs {rng.describe()}, found {package} {version}; upgrade: "
            f"{_install_hint(package)}."
        )
    if where > 0:
        warnings.warn(
            f"{purpose}: {package} {version} is newer than the tested range {rng.describe()}. "
            "Attributions are still checked for additivity, so an incompatibility raises "
            f"rather than returning wrong values; if it does, install {package}<{rng.below}.",
            UntestedVersionWarning,
            stacklevel=stacklevel + 1,
        )


def _lookup(owner: object, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


def require_attributes(module: ModuleType, names: list[str] | tuple[str, ...], package: str,
                       purpose: str) -> None:
    """Raise :class:`UnsupportedVersionError` unless every dotted name in ``names`` (e.g.
    ``"PyTorchDeep.shap_values"``) resolves on ``module``.

    ``package`` is the distribution whose version and tested range the message names (a key
    of :data:`TESTED`); ``purpose`` says what needs the internals. For code that patches or
    calls a private part of shap, Captum or tangermeme: an API that moved is then a clear
    error instead of an ``AttributeError`` from inside the patch.
    """
    missing = [name for name in names if not _lookup(module, name)]
    if missing:
        raise UnsupportedVersionError(
            f"{purpose} needs {', '.join(f'{module.__name__}.{n}' for n in missing)}, which "
            f"{package} {_installed_version(package)} does not have. Tested: "
            f"{TESTED[package].describe()}; install a version in that range: "
            f"{_install_hint(package)}."
        )


def _installed_version(package: str) -> str:
    module = sys.modules.get(package)
    version = getattr(module, "__version__", None)
    if version is not None:
        return str(version)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


# --------------------------------------------------------------------------- shap

REGISTER = "torch_handler.register()"

SHAP_INTERNALS = (
    "op_handler",
    "PyTorchDeep",
    "PyTorchDeep.shap_values",
    "PyTorchDeep.add_handles",
    "PyTorchDeep.gradient",
)
"""What :func:`torch_handler.register` changes in ``shap.explainers._deep.deep_pytorch``."""

SHAP_VALUES_PARAMETERS = ("X", "ranked_outputs", "output_rank_order", "check_additivity")
"""The arguments the wrapped ``PyTorchDeep.shap_values`` passes on, in this order."""

ADD_HANDLES_PARAMETERS = ("model", "forward_handle", "backward_handle")


def _require_parameters(function, names: tuple[str, ...], qualname: str) -> None:
    try:
        parameters = list(inspect.signature(function).parameters)[1:]  # drop self
    except (TypeError, ValueError):
        parameters = []
    if parameters[: len(names)] != list(names):
        raise UnsupportedVersionError(
            f"{REGISTER} needs {qualname}(self, {', '.join(names)}, ...), found "
            f"{qualname}(self, {', '.join(parameters)}) in shap {_installed_version('shap')}. "
            f"Tested: {TESTED['shap'].describe()}; install a version in that range: "
            f"{_install_hint('shap')}."
        )


def shap_deep_pytorch() -> ModuleType:
    """``shap.explainers._deep.deep_pytorch`` after the version policy and the internals check.

    Raises ImportError (naming the ``[shap]`` extra) without shap, UnsupportedVersionError for
    an older shap or one without what :func:`torch_handler.register` changes, and warns
    (:class:`UntestedVersionWarning`) for a newer one.
    """
    try:
        import shap
    except ImportError as error:
        raise ImportError(
            f"{REGISTER} needs shap: pip install 'lstm-deepshap[shap]' (tested: "
            f"{TESTED['shap'].describe()})."
        ) from error
    # The warning points at the user's register() call: here, _deep_pytorch, register, caller.
    check_version("shap", shap.__version__, REGISTER, stacklevel=4)
    try:
        from shap.explainers._deep import deep_pytorch
    except ImportError as error:
        raise UnsupportedVersionError(
            f"{REGISTER} needs shap.explainers._deep.deep_pytorch, which shap {shap.__version__} "
            f"does not provide ({error}). Tested: {TESTED['shap'].describe()}; install a "
            f"version in that range: {_install_hint('shap')}."
        ) from error
    require_attributes(deep_pytorch, SHAP_INTERNALS, "shap", REGISTER)
    if not isinstance(deep_pytorch.op_handler, dict):
        raise UnsupportedVersionError(
            f"{REGISTER} needs shap.explainers._deep.deep_pytorch.op_handler to be a dict, found "
            f"{type(deep_pytorch.op_handler).__name__} in shap {shap.__version__}. Tested: "
            f"{TESTED['shap'].describe()}; install a version in that range: {_install_hint('shap')}."
        )
    cls = deep_pytorch.PyTorchDeep
    for name, parameters in (("shap_values", SHAP_VALUES_PARAMETERS),
                             ("add_handles", ADD_HANDLES_PARAMETERS)):
        if name not in cls.__dict__:
            raise UnsupportedVersionError(
                f"{REGISTER} needs PyTorchDeep.{name} defined on shap's PyTorchDeep itself, but "
                f"shap {shap.__version__} inherits it. Tested: {TESTED['shap'].describe()}; "
                f"install a version in that range: {_install_hint('shap')}."
            )
        _require_parameters(cls.__dict__[name], parameters, f"PyTorchDeep.{name}")
    return deep_pytorch
