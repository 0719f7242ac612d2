"""Which outputs :func:`torch_handler.deep_shap` explains, and the additivity check per input.

``target`` has Captum's meaning (an int, or one output index per input); ``outputs`` (a
sequence of indices or ``"all"``) asks for several outputs from one forward pass, the output
axis last as shap returns them. Everything is checked against the model's output count before
any work is done.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# The project's one definition of "exact" lives in an internal module (the one internal import
# of this package): torch_handler.additivity.
from torch_handler.additivity import Diagnosis, check_additivity, relative_errors, tolerance_for


class Selection:
    """The selected outputs: ``count`` K per row, ``stacked`` (True when the result carries an
    output axis), and :meth:`columns` giving each row's K output indices."""

    def __init__(self, target, outputs, n_outputs: int, rows: int | None):
        self.n_outputs, self.rows = n_outputs, rows
        self.target_rows: Tensor | None = None
        self.fixed: list[int]
        if target is not None and outputs is not None:
            raise ValueError("deep_shap: pass target (one output per input) or outputs (several), not both.")
        if outputs is not None:
            self.fixed, self.stacked = self._outputs(outputs), True
        elif target is None:
            if n_outputs != 1:
                raise ValueError(
                    f"deep_shap: the model has {n_outputs} outputs; say which to explain with target=<index> "
                    "(or a tensor of one index per input) or outputs=[...] / outputs='all'."
                )
            self.fixed, self.stacked = [0], False
        elif isinstance(target, (Tensor, np.ndarray, Sequence)) and not isinstance(target, str) and np.ndim(target):
            self.target_rows, self.fixed, self.stacked = self._target_rows(target), [], False
        else:
            self.fixed, self.stacked = [self._index(target, "target")], False
        self.count = len(self.fixed) if self.target_rows is None else 1

    def _index(self, value, what: str) -> int:
        if isinstance(value, np.ndarray) and value.ndim == 0:  # np.array(1), as Captum takes it
            value = value[()]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) and not (
                isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point()
                and value.dtype != torch.bool):
            raise TypeError(f"deep_shap: {what} {value!r} is not an integer output index.")
        index = int(value)
        if not -self.n_outputs <= index < self.n_outputs:
            raise IndexError(
                f"deep_shap: {what} {index} is out of range for a model with {self.n_outputs} outputs "
                f"(valid: 0..{self.n_outputs - 1})."
            )
        return index % self.n_outputs

    def _outputs(self, outputs) -> list[int]:
        if isinstance(outputs, str):
            if outputs != "all":
                raise ValueError(f"deep_shap: outputs={outputs!r}; pass 'all' or a sequence of output indices.")
            return list(range(self.n_outputs))
        indices = [self._index(o, "outputs entry") for o in outputs]
        if not indices:
            raise ValueError("deep_shap: outputs is empty; pass at least one output index, or 'all'.")
        return indices

    def _target_rows(self, target) -> Tensor:
        rows = torch.as_tensor(np.asarray(target) if isinstance(target, Sequence) else target)
        if rows.is_floating_point() or rows.dtype == torch.bool or rows.ndim != 1:
            raise TypeError(
                f"deep_shap: target must be an int or a 1-d integer tensor of one output index per input; "
                f"got {rows.dtype} of shape {tuple(rows.shape)}."
            )
        if self.rows is not None and rows.shape[0] != self.rows:
            raise ValueError(
                f"deep_shap: target has {rows.shape[0]} entries for {self.rows} inputs; pass one per input.")
        if rows.numel() and not bool(((rows >= -self.n_outputs) & (rows < self.n_outputs)).all()):
            bad = rows[(rows < -self.n_outputs) | (rows >= self.n_outputs)][0].item()
            raise IndexError(
                f"deep_shap: target holds {bad}, out of range for a model with {self.n_outputs} outputs "
                f"(valid: 0..{self.n_outputs - 1})."
            )
        return rows.long().cpu() % self.n_outputs

    def columns(self, start: int, n: int, device) -> Tensor:
        """(n, K) output indices of rows start..start+n."""
        if self.target_rows is None:
            return torch.tensor(self.fixed, device=device).expand(n, len(self.fixed))
        if start + n > self.target_rows.shape[0]:
            raise ValueError(
                f"deep_shap: target has {self.target_rows.shape[0]} entries but the inputs have more rows "
                f"(at least {start + n}); pass one per input."
            )
        return self.target_rows[start : start + n, None].to(device)

    def check_rows_seen(self, rows: int) -> None:
        """After the last chunk: a per-input target of an unsized stream must have had one entry
        per row (a sized input was checked before any work)."""
        if self.target_rows is not None and self.target_rows.shape[0] != rows:
            raise ValueError(
                f"deep_shap: target has {self.target_rows.shape[0]} entries but the inputs yielded {rows} rows; "
                "pass one per input."
            )

    def describe(self):
        """What the fingerprint of a run records about the selection."""
        if self.target_rows is not None:
            return {"target_rows": self.target_rows.tolist()}
        return {"outputs": self.fixed, "stacked": self.stacked}


def _model_rounding(model, xs, references, f_x, f_r_mean, scale) -> float | None:
    """max |f_float32 − f_float64| / scale of the model's own forward on one input and its
    references (None in float64 or when the model cannot be copied and cast)."""
    try:
        exact = copy.deepcopy(model).double()
        with torch.no_grad():
            fx64 = exact(*(x.double() for x in xs)).reshape(1, -1)
            fr64 = exact(*(r.double() for r in references)).reshape(references[0].shape[0], -1).mean(0)
    except Exception:  # a model that cannot be deep-copied or run in float64
        return None
    worst = max(float((fx64[0] - f_x).abs().max()), float((fr64 - f_r_mean).abs().max()))
    return worst / scale


def check_rows(sums, values, selection: Selection, columns: Tensor, first_row: int, model, rows_of) -> None:
    """AdditivityError naming the input index when a row's values miss f(x) − mean f(r).

    values: per model input (n, ..., K); rows_of(i) -> (inputs of row i, its references), each a
    tuple of tensors with a batch axis, used only to diagnose a failure.
    """
    # Several inputs of different dtypes: the sum is only as exact as the least precise of them.
    dtype = max((v.dtype for v in values), key=lambda d: torch.finfo(d).eps)
    totals = sum(v.double().sum(tuple(range(1, v.ndim - 1))) for v in values)  # (n, K)
    f_r_mean = sums.f_r / sums.references
    columns = columns.to(sums.f_x.device)
    deltas = sums.f_x.gather(1, columns) - f_r_mean.gather(1, columns)
    scale = sums.scale.clamp_min(np.finfo(np.float64).tiny)[:, None]
    errors = relative_errors((totals / scale).cpu().numpy(), (deltas / scale).cpu().numpy(), 1.0)
    for i in np.flatnonzero(~(errors.max(1) <= tolerance_for(dtype))):  # NaN counts as failed
        row_scale = float(scale[i, 0])

        def diagnose(i=i, row_scale=row_scale):
            if dtype == torch.float64:
                return Diagnosis(None, [])
            xs, refs = rows_of(int(i))
            return Diagnosis(_model_rounding(model, xs, refs, sums.f_x[i], f_r_mean[i], row_scale), [])

        check_additivity(totals[i : i + 1].cpu().numpy(), deltas[i : i + 1].cpu().numpy(), row_scale,
                         str(dtype).removeprefix("torch."), f"deep_shap, input {first_row + int(i)}", diagnose)
