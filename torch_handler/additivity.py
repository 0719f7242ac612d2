"""Summation-to-delta check with a dtype-aware tolerance.

The rule is exact, so attributions must sum to f(x) − E[f(background)] up to rounding. A
larger error means some operation in the model had no DeepLIFT rule (a functional
``torch.relu`` instead of ``nn.ReLU``, say) and the engine silently used its plain gradient.
"""

from __future__ import annotations

import numpy as np

from .errors import AdditivityError

# Relative to the scale of the model's outputs (max |f(x)|, |E f(background)|). Rounding of the
# exact rule stays orders of magnitude below these (README, "Exactness"); an unhandled
# nonlinearity lands far above them.
TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4}


def tolerance_for(dtype) -> float:
    return TOLERANCE.get(np.dtype(dtype), 1e-4)


def relative_errors(attribution_sums, output_deltas, scale) -> np.ndarray:
    """|Σ attributions − Δf| / scale, elementwise (per sample and output)."""
    scale = max(float(scale), np.finfo(np.float64).tiny)
    return np.abs(np.asarray(attribution_sums, np.float64) - np.asarray(output_deltas, np.float64)) / scale


def check_additivity(attribution_sums, output_deltas, scale, dtype, engine: str) -> float:
    """Raise AdditivityError when any sample misses its Δf by more than the tolerance.

    attribution_sums, output_deltas: arrays of the same shape (samples, outputs); scale: the
    output scale the errors are relative to. Returns the largest relative error.
    """
    errors = relative_errors(attribution_sums, output_deltas, scale)
    worst = float(errors.max()) if errors.size else 0.0
    tolerance = tolerance_for(dtype)
    if worst > tolerance:
        per_sample = errors.reshape(errors.shape[0], -1).max(axis=1) if errors.ndim else errors
        raise AdditivityError(
            f"{engine}: attributions do not sum to f(x) − E[f(background)]: relative error per "
            f"sample {np.array2string(per_sample, precision=3)} (max {worst:.3g}, tolerance "
            f"{tolerance:g} for {np.dtype(dtype)}). The recurrent layers are exact, so an "
            "operation in the model has no DeepLIFT rule in this engine and got a plain "
            "gradient: typically a functional call (torch.relu, torch.sigmoid, x * y) where an "
            "nn.Module (nn.ReLU, nn.Sigmoid) is needed. Replace it, or pass "
            "check_additivity=False to accept approximate values."
        )
    return worst
