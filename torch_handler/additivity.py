"""Summation-to-delta check with a dtype-aware tolerance, and a diagnosis when it fails.

The rule is exact, so attributions must sum to f(x) − E[f(background)] up to rounding. A
larger error has one of two causes, which need different fixes:

* an operation in the model has no DeepLIFT rule and got its plain gradient (``abs``, ``sort``,
  a module class the engine does not know), or an input-dependent value without a gradient (a
  mask, indices) differs between an input and its reference: the error is typically 1e-2 or
  more, in any dtype. Inside an explained recurrent model the explanation itself reports such
  ops (UnsupportedOpWarning); those reports name the culprits, with their fixes;
* float32 rounding of an ill-conditioned model: the model's own float32 forward already
  differs from its float64 forward by about as much (cancellation between large terms), so
  no float32 attribution can do better. Explaining in float64 fixes it.

Tolerances (relative to the output scale max(|f(x)|, |E f|)) are the project's bar for
"exact": 1e-10 in float64 and 1e-5 in float32. The rule's own rounding stays orders of magnitude
below them; an operation without a rule misses by far more. One exception needs evidence: a
float32 model that cancels large terms inside itself can have its *own* float32 forward off by
more than 1e-5 (fuzzing random models found up to 7.5e-5), and no float32 attribution can beat
its forward. Such a result is accepted only when the check measures it: the model's float32
forward differs from its float64 forward by at least a tenth of the additivity error, and the
error stays below ``FLOAT32_ROUNDING_CAP``. Everything else raises, with the cause diagnosed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from torch_handler.errors import AdditivityError

TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}

# The largest float32 error ever accepted, and only with the model's own rounding measured to
# account for it (see the module docstring).
FLOAT32_ROUNDING_CAP = 1e-4

# How many culprits a failure message names.
MAX_CULPRITS = 8

# An additivity error within this factor of the model's own float32-vs-float64 difference is
# attributed to rounding: the attribution adds a few roundings of its own on top of the
# forward's, and cancellation amplifies both alike.
ROUNDING_FACTOR = 10.0


class Diagnosis(NamedTuple):
    """Facts about the model for the failure message, computed only when the check fails.

    model_rounding: max |f_float32 − f_float64| / scale of the model's own forward on the same
    inputs and background (None in float64, or if it could not be measured); unhandled:
    ``"name (Type): why"`` for each module that likely computes without a DeepLIFT rule, found
    by replaying the model; reported: ``{"gt in MaskedMean.forward": advice}``, the ops the
    explanation itself reported (None: read :func:`torch_handler.ops.interception.last_reported`).
    Reported ops, observed on the gradient's path, name the culprits when there are any.
    """

    model_rounding: float | None
    unhandled: list[str]
    reported: dict | None = None


def _as_numpy(dtype) -> np.dtype:
    """numpy dtype of a numpy/torch dtype or a dtype name ("float32", "torch.float32")."""
    if isinstance(dtype, str) or type(dtype).__module__ == "torch":
        return np.dtype(str(dtype).removeprefix("torch."))
    return np.dtype(dtype)


def tolerance_for(dtype) -> float:
    """The additivity tolerance of ``dtype`` (a numpy or torch dtype, or its name)."""
    return TOLERANCE[_as_numpy(dtype)]


def relative_errors(attribution_sums, output_deltas, scale) -> np.ndarray:
    """|Σ attributions − Δf| / scale, elementwise (per sample and output). NaN stays NaN."""
    scale = max(float(scale), np.finfo(np.float64).tiny)
    return np.abs(np.asarray(attribution_sums, np.float64) - np.asarray(output_deltas, np.float64)) / scale


def _is_rounding(worst: float, diagnosis: Diagnosis | None) -> bool:
    rounding = diagnosis.model_rounding if diagnosis is not None else None
    return rounding is not None and worst <= ROUNDING_FACTOR * rounding


def failure_message(engine: str, per_sample, worst: float, tolerance: float, dtype, diagnosis: Diagnosis | None) -> str:
    """The AdditivityError message: the measured errors, then the likely cause and its fix."""
    head = (
        f"{engine}: attributions do not sum to f(x) − E[f(background)]: relative error per "
        f"sample {np.array2string(per_sample, precision=3)} (max {worst:.3g}, tolerance "
        f"{tolerance:g} for {np.dtype(dtype)}). "
    )
    if not np.isfinite(worst):
        return head + (
            "The attributions or the model's outputs are NaN or Inf: some operation in the model "
            "overflowed or divided by zero on these inputs. Check the model's outputs on them, "
            "or explain in float64."
        )
    if _is_rounding(worst, diagnosis):
        return head + (
            "Cause: float32 rounding of the model itself. Its own float32 forward differs from "
            f"its float64 forward by {diagnosis.model_rounding:.3g} (relative to the output "
            "scale) on these inputs, which is comparable: the model cancels large terms, and no "
            "float32 attribution can be more accurate than its forward. Fix: explain in float64 "
            "(model.double() and float64 inputs and background), or pass check_additivity=False "
            "to accept values accurate to about that error."
        )
    rounding_note = ""
    if diagnosis is not None and diagnosis.model_rounding is not None:
        rounding_note = (
            f" (Not float32 rounding: the model's own float32 forward is within "
            f"{diagnosis.model_rounding:.2g} of its float64 forward.)"
        )
    reported = dict(diagnosis.reported or {}) if diagnosis is not None else {}
    if reported:
        # Seen on the gradient's path by the explanation itself: these are the culprits.
        labels = list(reported)[:MAX_CULPRITS]
        culprits = " Likely culprits: " + "; ".join(f"functional {label}" for label in labels) + "."
        fixes = " ".join(f"Fix for {label}: {reported[label]}." for label in labels)
        return head + (
            "Cause: an operation in the model has no DeepLIFT rule, or an input-dependent value "
            "without a gradient (a mask, indices) differs between an input and its reference, "
            f"and the explanation reported it.{culprits}{rounding_note} {fixes} Or pass "
            "check_additivity=False to accept approximate values."
        )
    culprits = ""
    if diagnosis is not None and diagnosis.unhandled:
        culprits = " Likely culprits: " + "; ".join(diagnosis.unhandled[:MAX_CULPRITS]) + "."
    return head + (
        "Cause: an operation in the model has no DeepLIFT rule in this engine and got a plain "
        "gradient (the recurrent layers, and inside a recurrent model the ops of the README's "
        "support table, functional calls included, are exact): an op such as sort, amin or "
        f"cumprod, or a module class the engine does not know.{culprits}{rounding_note} Fix: "
        "write that operation with ops that have rules (e.g. amin(x, d) = -amax(-x, d), "
        "log1p(x) = log(1 + x)) or keep it off the input-dependent path, or pass "
        "check_additivity=False to accept approximate values."
    )


def _last_reported() -> dict:
    """The ops the last explanation in this context reported (imported late: interception
    needs torch, this module does not)."""
    from torch_handler.ops.interception.context import last_reported

    return last_reported()


def check_additivity(
    attribution_sums, output_deltas, scale, dtype, engine: str, diagnose: Callable[[], Diagnosis] | None = None
) -> float:
    """Raise AdditivityError when any sample misses its Δf by more than the tolerance, or when
    any attribution sum or output is NaN / Inf.

    attribution_sums, output_deltas: arrays of the same shape (samples, outputs); scale: the
    output scale the errors are relative to; diagnose: called only on failure, to tell the
    causes apart in the message (and, in float32, to accept an error the model's own measured
    rounding accounts for, up to FLOAT32_ROUNDING_CAP). Returns the largest relative error.
    """
    errors = relative_errors(attribution_sums, output_deltas, scale)
    finite = bool(np.isfinite(errors).all()) and np.isfinite(scale)
    # NaN compares False with everything: test for it explicitly, or NaN values would pass.
    worst = float(np.nanmax(errors)) if errors.size and finite else (np.inf if errors.size else 0.0)
    tolerance = tolerance_for(dtype)
    if worst > tolerance:
        per_sample = errors.reshape(errors.shape[0], -1).max(axis=1) if errors.ndim else errors
        diagnosis = diagnose() if diagnose is not None and np.isfinite(worst) else None
        if diagnosis is not None and diagnosis.reported is None:
            diagnosis = diagnosis._replace(reported=_last_reported())
        if _as_numpy(dtype) == np.float32 and worst <= FLOAT32_ROUNDING_CAP and _is_rounding(worst, diagnosis):
            return worst  # the model's own float32 rounding, measured: nothing to blame the rule for
        raise AdditivityError(failure_message(engine, per_sample, worst, tolerance, dtype, diagnosis))
    return worst
