"""What the current context explains: :class:`Explanation`, :func:`current_explanation`,
:func:`is_active` and :func:`module_label` (per-context state, a :class:`contextvars.ContextVar`;
entered and left by :func:`torch_handler.deeplift_mode`)."""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import NamedTuple

from torch import nn


class Explanation(NamedTuple):
    """What the current context explains (see :func:`current_explanation`).

    model: the root module passed to :func:`deeplift_mode`; modules: every recurrent module
    that runs the DeepLIFT forward in this context (this explanation's and any enclosing
    one's), mapped to its qualified name in its model (``""`` for a root); options: read-only
    settings of this explanation (empty today; the place where integrations record theirs);
    parent: the enclosing explanation in this context, or None.
    """

    model: nn.Module
    modules: Mapping[nn.Module, str]
    options: Mapping[str, object]
    parent: Explanation | None


_current: contextvars.ContextVar[Explanation | None] = contextvars.ContextVar(
    "torch_handler_explanation", default=None
)


def current_explanation() -> Explanation | None:
    """The innermost explanation active in the calling context, or None outside any.

    Per context (thread, asyncio task): another thread running the same model gets None.
    """
    return _current.get()


def is_active(module: nn.Module) -> bool:
    """Whether ``module`` runs its DeepLIFT forward in the calling context."""
    explanation = _current.get()
    return explanation is not None and module in explanation.modules


def module_label(module: nn.Module) -> str:
    """``"name (Type)"`` of a module of the current explanation (``"Type"`` outside one)."""
    explanation = _current.get()
    name = explanation.modules.get(module) if explanation is not None else None
    return f"{name} ({type(module).__name__})" if name else type(module).__name__
