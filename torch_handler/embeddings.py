"""Token models through shap: the model as a function of its embedding layer's output.

``shap.DeepExplainer((model, model.embedding), token_ids)`` fails inside shap (it asks the
integer token ids for gradients). :func:`from_embeddings` gives shap (or any engine) a float
input instead: ``from_embeddings(model, model.embedding)`` is a module taking the embedding
layer's output ``(..., E)`` and returning ``model(tokens)``, where ``tokens`` are the ids whose
embedding rows those are. The model's forward runs unchanged on those ids (so padding masks or
lengths computed from the ids are the model's own), and the embedding layer's output is
replaced by the given tensor, which the engine differentiates. Per-token attributions are the
attributions summed over the embedding dimension (see docs/token-ids.md)::

    explained = torch_handler.from_embeddings(model, model.embedding)
    torch_handler.register()
    explainer = shap.DeepExplainer(explained, model.embedding(reference_tokens).detach())
    values = explainer.shap_values(model.embedding(tokens).detach())  # (N, L, E, outputs)
    per_token = values.sum(axis=2)                                      # (N, L, outputs)

Inside an explanation the engine hands the wrapper exactly the rows it was given (inputs and
references; DeepLIFT never interpolates), so every row is a row of the embedding matrix and
the ids are recovered exactly; a row that is not one raises ValueError.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

from torch_handler.errors import UnsupportedOpError, UnsupportedOpWarning
from torch_handler.explanation import current_explanation

__all__ = ["FromEmbeddings", "from_embeddings", "token_ids"]


def _rows_as_bytes(matrix: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.ascontiguousarray(matrix)]


def token_ids(embedding: nn.Embedding, embedded: Tensor) -> Tensor:
    """The token ids (...,) int64 whose rows of ``embedding.weight`` (V, E) make up
    ``embedded`` (..., E), on ``embedded``'s device. Rows are matched bit for bit; ids with
    identical rows are indistinguishable and the lowest is returned. Raises ValueError for a row
    that is no row of the embedding matrix (a scaled, noisy or interpolated embedding).

    Computed in NumPy, outside torch: no engine's interception or autograd sees it.
    """
    weight = embedding.weight.detach().cpu().numpy()
    values = embedded.detach().cpu().numpy().astype(weight.dtype, copy=False)
    if values.shape[-1:] != weight.shape[-1:]:
        raise ValueError(
            f"the embeddings have {values.shape[-1] if values.ndim else 0} features per token but "
            f"the embedding layer has {weight.shape[1]}; pass the layer's output (..., {weight.shape[1]})."
        )
    lookup: dict[bytes, int] = {}
    for index, key in enumerate(_rows_as_bytes(weight)):
        lookup.setdefault(key, index)
    rows = values.reshape(-1, weight.shape[1])
    ids = np.empty(len(rows), dtype=np.int64)
    for k, key in enumerate(_rows_as_bytes(rows)):
        found = lookup.get(key)
        if found is None:
            raise ValueError(
                f"embedding row {k} (of {len(rows)}) is not a row of the embedding matrix: "
                "from_embeddings takes the embedding layer's own output (embedding(token_ids)), "
                "for the inputs and the references alike, not scaled or interpolated embeddings."
            )
        ids[k] = found
    return torch.from_numpy(ids.reshape(values.shape[:-1])).to(embedded.device)


class FromEmbeddings(nn.Module):
    """``model`` as a function of ``embedding``'s output: ``forward(embedded (..., E)) ->
    model(tokens)`` with the embedding layer's output replaced by ``embedded``.

    Holds the model as a submodule, so engines see (and explain) its layers; the embedding
    layer must be called exactly once per forward, on the whole token tensor.
    """

    def __init__(self, model: nn.Module, embedding: nn.Embedding):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}.")
        if not any(m is embedding for m in model.modules()):
            raise ValueError("embedding must be a module of model (e.g. model.embedding).")
        self.model = model
        self._embedding = [embedding]  # a list: not a second registered submodule

    @property
    def embedding(self) -> nn.Embedding:
        return self._embedding[0]

    def forward(self, embedded: Tensor) -> Tensor:
        tokens = token_ids(self.embedding, embedded)
        calls = []

        def replace(module, args, output):
            if output.shape != embedded.shape:
                raise ValueError(
                    f"the embedding layer returned {tuple(output.shape)} inside the model but "
                    f"from_embeddings was given {tuple(embedded.shape)}: the model must embed "
                    "the whole token tensor it receives, once."
                )
            calls.append(None)
            return embedded

        handle = self.embedding.register_forward_hook(replace)
        try:
            if _explaining(tokens):
                # Before the forward the engine differentiates: engines' forward hooks save
                # values on modules (shap's module.x / module.y), which that forward must set last.
                self._check_tokens_agree(tokens)
                calls.clear()
            output = self.model(tokens)
            if len(calls) != 1:
                raise ValueError(
                    f"the embedding layer ran {len(calls)} times in one forward of the model; "
                    "from_embeddings needs it to run exactly once, on the model's input."
                )
        finally:
            handle.remove()
        return output

    def _check_tokens_agree(self, tokens: Tensor) -> None:
        """On a doubled batch, the ids are recovered outside the engine's view: what the model
        computes from them besides the embedding (a padding mask, lengths) is a constant to the
        rules, exact only if it is the same for each input and its reference. Checked by two
        forwards (no gradients: torch's own layers, compared with each other bit for bit), the
        second with the references' ids replaced by their inputs': the output must not change.
        Otherwise UnsupportedOpWarning (UnsupportedOpError when strict)."""
        n = len(tokens) // 2
        with torch.no_grad():
            same = torch.equal(self.model(tokens), self.model(torch.cat([tokens[:n], tokens[:n]])))
        if same:
            return
        message = (
            f"{type(self.model).__name__} uses the token ids besides the embedding layer (e.g. a "
            "padding mask or lengths computed from them), and what it computes from them differs "
            "between inputs and references: from_embeddings' attributions would not sum to "
            "f(x) − E f. Give each input references padded like it "
            "(torch_handler.padded_references on the token ids), or explain the token ids with "
            "Captum's LayerDeepLift (docs/token-ids.md)."
        )
        explanation = current_explanation()
        if explanation is not None and explanation.options.get("strict"):
            raise UnsupportedOpError(message)
        warnings.warn(message, UnsupportedOpWarning, stacklevel=3)


def _explaining(tokens: Tensor) -> bool:
    """Whether this forward runs an engine's doubled batch (inside an explanation, with
    gradients: the forward the attributions come from)."""
    return current_explanation() is not None and torch.is_grad_enabled() and len(tokens) % 2 == 0 and len(tokens) > 0


def from_embeddings(model: nn.Module, embedding: nn.Embedding) -> FromEmbeddings:
    """``model`` (token ids -> outputs) as a module of ``embedding``'s output (float (..., E)
    -> outputs), for engines that need float inputs (shap's DeepExplainer). See
    :class:`FromEmbeddings` and docs/token-ids.md."""
    return FromEmbeddings(model, embedding)
