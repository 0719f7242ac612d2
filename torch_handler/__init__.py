"""Exact DeepLIFT / DeepSHAP attributions for PyTorch recurrent layers.

Two verbs cover the engines:

* :func:`register` / :func:`unregister`: make ``shap.DeepExplainer`` exact for models with
  nn.LSTM, nn.GRU, nn.RNN and their cells.
* :func:`deeplift_mode`: a context manager for any engine that runs the doubled batch
  ``cat([inputs, references])``: Captum's DeepLift / DeepLiftShap, tangermeme's
  deep_lift_shap, or shap itself.

Explaining is private to the calling context (thread, asyncio task): other threads, copies
and saved models keep torch's own forward. :func:`current_explanation` says what the current
context explains. The rule for each cell type lives in :mod:`torch_handler.recurrent.rules`; the
supported classes are declared once, in :mod:`torch_handler.recurrent.registry`.
"""

from torch_handler.dataset import deep_shap
from torch_handler.embeddings import FromEmbeddings, from_embeddings
from torch_handler.engines.shap import (
    gru_cell_handler,
    gru_handler,
    is_registered,
    lstm_cell_handler,
    lstm_handler,
    register,
    rnn_cell_handler,
    rnn_handler,
    unregister,
)
from torch_handler.engines.versions import UnsupportedVersionError, UntestedVersionWarning
from torch_handler.errors import (
    AdditivityError,
    DoubledBatchError,
    NonFiniteError,
    UnsupportedConfigurationError,
    UnsupportedOpError,
    UnsupportedOpWarning,
)
from torch_handler.explanation import Explanation, current_explanation
from torch_handler.mode import deeplift_mode, recurrent_modules
from torch_handler.recurrent.registry import REGISTRY, SUPPORTED_MODULES
from torch_handler.references import padded_references

__version__ = "0.1.0"

__all__ = [
    "AdditivityError",
    "DoubledBatchError",
    "Explanation",
    "FromEmbeddings",
    "NonFiniteError",
    "REGISTRY",
    "SUPPORTED_MODULES",
    "UnsupportedConfigurationError",
    "UnsupportedOpError",
    "UnsupportedOpWarning",
    "UnsupportedVersionError",
    "UntestedVersionWarning",
    "current_explanation",
    "deep_shap",
    "deeplift_mode",
    "from_embeddings",
    "gru_cell_handler",
    "gru_handler",
    "is_registered",
    "lstm_cell_handler",
    "lstm_handler",
    "padded_references",
    "recurrent_modules",
    "register",
    "rnn_cell_handler",
    "rnn_handler",
    "unregister",
]
