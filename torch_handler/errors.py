"""Exceptions raised by torch_handler. Each message names the problem and the fix."""

from __future__ import annotations


class UnsupportedConfigurationError(NotImplementedError):
    """A recurrent module, input or model setting that the rule does not cover.

    Raised instead of falling back to plain gradients, which would be silently wrong.
    """


class DoubledBatchError(ValueError):
    """A batch that cannot be the ``cat([inputs, references])`` batch DeepLIFT engines run."""


class AdditivityError(AssertionError):
    """Attributions do not sum to f(x) − E[f(background)] within the dtype's tolerance.

    Subclasses AssertionError so code that caught shap's own additivity assertion keeps working.
    """


class NonFiniteError(ValueError):
    """NaN or Inf arose inside a recurrent module while explaining (in its forward values or in
    the DeepLIFT multipliers), although its inputs were finite: the attributions would be NaN.

    Subclasses ValueError, the type raised for non-finite inputs, so one ``except`` covers both.
    """


class UnsupportedOpError(UnsupportedConfigurationError):
    """An op without a DeepLIFT rule ran on input-dependent tensors (``deeplift_mode(model, strict=True)``)."""


class UnsupportedOpWarning(UserWarning):
    """An op without a DeepLIFT rule ran on input-dependent tensors: attributions may not sum to Δf."""
