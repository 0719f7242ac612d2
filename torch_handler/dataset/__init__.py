"""Explain a dataset: :func:`deep_shap` streams exact DeepSHAP values over many inputs.

One module per idea: :mod:`.inputs` (every accepted form of inputs as a stream of row
chunks), :mod:`.references` (shared or per-input references), :mod:`.outputs` (which outputs,
and the additivity check per input), :mod:`.chunking` (pairs per chunk from a memory budget),
:mod:`.pairs` (one chunk through the model), :mod:`.storage` (resumable ``.npy`` results) and
:mod:`.driver` (:func:`deep_shap` itself).
"""

from .driver import deep_shap

__all__ = ["deep_shap"]
