"""References of :func:`torch_handler.deep_shap`: shared by every input, or one set per input.

* A tensor (S, ...) (a tuple of them for a model with several inputs): the same S references
  for every input, as shap's background and Captum's ``DeepLiftShap`` baselines.
* A callable ``references(batch) -> (n, S, ...)`` (a tuple for several inputs): each input its
  own S references (dinucleotide shuffles for genomics; references padded like their input for
  variable-length data). ``batch`` is what the model would get: a tensor (n, ...) for one
  input, a tuple for several, on the inputs' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .inputs import Spec


def _mismatch(what: str, i: int, got, spec: Spec, lead: int, fix: str) -> ValueError:
    return ValueError(
        f"deep_shap: {what} for input {i} has rows of shape {tuple(got.shape[lead:])} (tensor shape "
        f"{tuple(got.shape)}), {got.dtype} on {got.device}; "
        f"input {i} has rows of shape {spec.shape}, {spec.dtype} on {spec.device}. {fix}"
    )


def _check_against(tensors, specs, what: str, lead: int, fix: str) -> None:
    """Each tensor's shape after its ``lead`` leading axes, dtype and device must match its input's."""
    if len(tensors) != len(specs):
        raise ValueError(
            f"deep_shap: {what} has {len(tensors)} tensors but the inputs have {len(specs)}; pass one "
            "reference tensor per model input, in the same order."
        )
    for i, (r, spec) in enumerate(zip(tensors, specs, strict=True)):
        if not isinstance(r, Tensor):
            raise TypeError(f"deep_shap: {what} {i} is a {type(r).__name__}; expected a tensor.")
        if r.ndim < lead or (tuple(r.shape[lead:]), r.dtype, r.device) != (spec.shape, spec.dtype, spec.device):
            raise _mismatch(what, i, r, spec, lead, fix)


class SharedReferences:
    """The same S references for every input: ``tensors`` each (S, ...)."""

    def __init__(self, tensors: tuple[Tensor, ...], specs: tuple[Spec, ...]):
        _check_against(tensors, specs, "references", 1,
                       "Give references the inputs' per-row shape, dtype and device (r.to(x)).")
        self.tensors = tuple(r.detach() for r in tensors)
        self.count = int(self.tensors[0].shape[0])
        if len({r.shape[0] for r in self.tensors}) != 1:
            raise ValueError(
                f"deep_shap: the reference tensors have different numbers of rows "
                f"{[r.shape[0] for r in self.tensors]}; every model input needs the same S references."
            )
        if self.count == 0:
            raise ValueError("deep_shap: references has no rows; pass at least one reference (S >= 1).")

    def to(self, device) -> SharedReferences:
        moved = object.__new__(SharedReferences)
        moved.tensors, moved.count = tuple(r.to(device) for r in self.tensors), self.count
        return moved

    def for_chunk(self, batch: tuple[Tensor, ...]) -> None:
        return None  # shared: nothing per chunk


class PerInputReferences:
    """``function(batch) -> (n, S, ...)`` per model input, checked on every chunk."""

    def __init__(self, function: Callable, specs: tuple[Spec, ...]):
        self.function, self.specs, self.count = function, specs, None

    def for_chunk(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The chunk's references, each (n, S, ...), checked against the inputs."""
        made = self.function(batch[0] if len(batch) == 1 else batch)
        made = (made,) if isinstance(made, Tensor) else tuple(made) if isinstance(made, (tuple, list)) else made
        if not isinstance(made, tuple):
            raise TypeError(
                f"deep_shap: the references callable returned a {type(made).__name__}; it must return a "
                "tensor (n, S, ...) (a tuple of them for several inputs)."
            )
        n = batch[0].shape[0]
        fix = f"Return references shaped (n={n}, S, *row shape) with the inputs' dtype and device."
        _check_against(made, self.specs, "the references callable's output", 2, fix)
        if any(r.shape[0] != n for r in made) or len({r.shape[1] for r in made}) != 1:
            raise ValueError(
                f"deep_shap: the references callable returned shapes {[tuple(r.shape) for r in made]} for a "
                f"batch of {n} inputs. {fix}"
            )
        if made[0].shape[1] == 0:
            raise ValueError("deep_shap: the references callable returned S = 0 references; return at least one.")
        if self.count is None:
            self.count = int(made[0].shape[1])
        elif made[0].shape[1] != self.count:
            raise ValueError(
                f"deep_shap: the references callable returned S = {made[0].shape[1]} references after "
                f"S = {self.count} for earlier inputs; return the same number for every batch."
            )
        return tuple(r.detach() for r in made)


def as_references(references, specs: tuple[Spec, ...]):
    """``references`` as :class:`SharedReferences` or :class:`PerInputReferences`."""
    if callable(references) and not isinstance(references, Tensor):
        return PerInputReferences(references, specs)
    if isinstance(references, Tensor):
        references = (references,)
    if not isinstance(references, (tuple, list)):
        raise TypeError(
            f"deep_shap: references is a {type(references).__name__}; expected a tensor (S, ...), a tuple "
            "of tensors (one per model input) or a callable batch -> (n, S, ...)."
        )
    return SharedReferences(tuple(references), specs)


def finite_or_raise(tensors, what: str, first_row: int = 0) -> None:
    """NonFiniteError naming the first row (``first_row`` + its index) holding NaN / Inf.

    what: the rows' name in the message, e.g. "input" or "reference" ("input 12 (model input 0)")."""
    from torch_handler.errors import NonFiniteError

    for i, t in enumerate(tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[0, 0].item()
            raise NonFiniteError(
                f"deep_shap: {what} {first_row + bad} (model input {i}) holds NaN or Inf; its attributions "
                "would be NaN. Remove or impute those values first."
            )
