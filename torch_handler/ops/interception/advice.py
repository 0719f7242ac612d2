"""What a report says: the user's code that made the call, exact rewrites of common ops without a
rule, and the advice for an input-dependent constant (a mask, indices) whose halves differ."""

from __future__ import annotations

import os
import sys

import torch

_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__.partition(".")[0]]))


def _caller() -> str:
    """``"MaskedMean.forward"``: the function of the innermost frame outside torch and this
    package, i.e. the user's code that called the op being handled."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
    if frame is None:
        return "an unknown place"
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


# Exact rewrites, with ops that have rules, of common ops without one (named in the advice).
_REWRITES = {
    "amin": "-amax(-x, dim)",
    "min": "-amax(-x, dim) (over a dim) or torch.minimum(x, y) (of two tensors)",
    "hardswish": "x * clamp(x + 3, 0, 6) / 6",
    "hardsigmoid": "clamp(x + 3, 0, 6) / 6",
    "mish": "x * tanh(softplus(x))",
    "softsign": "x / (1 + relu(x) + relu(-x))",
    "log1p": "log(1 + x)",
    "expm1": "exp(x) - 1",
}


def _no_rule_advice(name: str) -> str:
    """The UnsupportedOpWarning text for an op without a rule: an exact rewrite where one is
    known, else the general fix."""
    rewrite = _REWRITES.get(name.strip("_"))
    fix = (
        f"Write it as {rewrite}: ops with exact rules"
        if rewrite
        else "Replace it by ops with rules (see the README's support table) or keep it out of the "
        "input-dependent path"
    )
    return (
        "it has no DeepLIFT rule, so its plain gradient is used and the attributions may not sum "
        f"to the output difference. {fix}"
    )


def _constant_advice(consumer: str, unfollowed: bool, origin: str = "") -> str:
    """The UnsupportedOpWarning text for a gradient-free input-dependent tensor (a mask,
    indices, an integer cast) that reaches a differentiable result through ``consumer``."""
    if unfollowed:
        what = ("its result has no gradient, and its rows could not be followed back to the "
                "doubled batch, so it cannot be checked to be the same for each input and its "
                "reference")
    else:
        what = "its result has no gradient and differs between an input and its reference"
    return (
        f"{what}; it reaches the output through `{consumer}`, so the part of the output "
        "difference it causes gets no attribution. Use references that give the same result "
        "(e.g. padded like their input: see docs/masks.md), or compute it from "
        "input-independent tensors"
        + (" (or drop the `.detach()`: DeepLIFT then attributes through the value, e.g. "
           "RevIN statistics)" if origin == "detach" else "")
    )


def _custom_function_advice(function: str) -> str:
    """The UnsupportedOpWarning text for the output of a custom ``torch.autograd.Function``."""
    return (
        f"it comes out of a custom torch.autograd.Function ({function}), whose own backward gives plain "
        "gradients where DeepLIFT needs its multipliers, so the attributions may not sum to the output "
        "difference. Write its forward with torch ops (the rules then see them), or keep it out of the "
        "input-dependent path"
    )
