"""Token ids through shap: torch_handler.from_embeddings.

``shap.DeepExplainer((model, model.embedding), token_ids)`` fails inside shap (it asks the
integer ids for gradients). The model as a function of its embedding output is exact through
shap, and gives the same per-token attributions as the Captum route of the README
(``LayerDeepLift`` on the embedding inside ``deeplift_mode``; examples/token_attributions.py).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import DeepLift
from helpers import TOLERANCE, additivity_error, explain, model_state
from torch import nn

import torch_handler
from torch_handler import UnsupportedOpError, UnsupportedOpWarning, from_embeddings, padded_references
from torch_handler.embeddings import token_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _example():
    """examples/token_attributions.py, loaded by path (examples/ is not a package)."""
    name = "_test_token_attributions"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "examples" / "token_attributions.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def token_data(dtype=torch.float64, seed=0):
    example = _example()
    torch.manual_seed(seed)
    model = example.TokenAttentionLSTM(len(example.VOCABULARY)).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, len(example.VOCABULARY), (3, example.LENGTH), generator=generator)
    references = torch.randint(1, len(example.VOCABULARY), (4, example.LENGTH), generator=generator)
    references[0] = 0  # the all-padding sequence
    return model, tokens, references


def test_shap_on_token_ids_fails_inside_shap():
    # Why from_embeddings exists: shap's layer form asks an integer tensor for gradients.
    model, tokens, references = token_data()
    with pytest.raises(RuntimeError, match=r"grad|Long|integer|floating"):
        explain((model, model.embedding), references, tokens)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shap_through_from_embeddings_is_exact_and_equals_the_captum_route(dtype):
    model, tokens, references = token_data(dtype)
    explained = from_embeddings(model, model.embedding)
    with torch.no_grad():
        background, embedded = model.embedding(references), model.embedding(tokens)
    before = model_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        values = explain(explained, background, embedded)  # (N, L, E, outputs)
    assert model_state(model) == before
    assert values.shape == (3, 10, 8, 2)
    assert additivity_error(explained, background, embedded, values) <= TOLERANCE[dtype]
    # the same model as a function of the token ids: f(tokens) − mean f(references)
    per_token = values.sum(axis=2)  # (N, L, outputs)
    with torch.no_grad():
        delta = (model(tokens) - model(references).mean(0)).double().numpy()
        scale = max(float(model(tokens).abs().max()), float(model(references).abs().max()))
    assert np.abs(per_token.sum(axis=1) - delta).max() / scale <= TOLERANCE[dtype]
    captum = _example().per_token_attributions(model, tokens, references, target=1).double().numpy()
    assert np.abs(per_token[..., 1] - captum).max() / scale <= TOLERANCE[dtype]


def test_the_example_prints_both_routes_in_agreement():
    result = _example().main(["--steps", "5"])
    assert result["relative_error"] <= TOLERANCE[torch.float64]
    assert result["shap_difference"] <= TOLERANCE[torch.float64]


class MaskedTokens(nn.Module):
    """Embedding -> GRU -> mean over the non-padding tokens (the mask read from the ids)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(12, 5, padding_idx=0)
        self.gru = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, tokens):
        out, _ = self.gru(self.embedding(tokens))
        mask = (tokens != 0).to(out.dtype).unsqueeze(-1)
        return self.head((out * mask).sum(1) / mask.sum(1).clamp_min(1))


def masked_tokens():
    torch.manual_seed(0)
    model = MaskedTokens().double().eval()
    tokens = torch.randint(1, 12, (3, 8))
    lengths = torch.tensor([8, 5, 3])
    for i, length in enumerate(lengths.tolist()):
        tokens[i, length:] = 0
    return model, tokens, lengths


def test_a_mask_from_the_ids_with_references_padded_like_the_input_is_exact():
    model, tokens, lengths = masked_tokens()
    references = padded_references(tokens, lengths, n=3, generator=torch.Generator().manual_seed(0))  # (N, 3, L)
    explained = from_embeddings(model, model.embedding)
    for i in range(len(tokens)):
        with torch.no_grad():
            background, embedded = model.embedding(references[i]), model.embedding(tokens[i : i + 1])
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnsupportedOpWarning)
            values = explain(explained, background, embedded)
        assert additivity_error(explained, background, embedded, values) <= TOLERANCE[torch.float64]
        with torch.no_grad():
            delta = (model(tokens[i : i + 1]) - model(references[i]).mean(0)).numpy()
        np.testing.assert_allclose(values.sum(axis=(1, 2)), delta, rtol=0, atol=1e-10)


def test_a_mask_from_the_ids_that_differs_from_the_references_is_named():
    model, tokens, _ = masked_tokens()
    references = torch.zeros(2, 8, dtype=torch.int64)  # all padding: another mask
    explained = from_embeddings(model, model.embedding)
    with torch.no_grad():
        background, embedded = model.embedding(references), model.embedding(tokens)
    with pytest.warns(UnsupportedOpWarning, match=r"MaskedTokens uses the token ids besides the embedding"):
        explain(explained, background, embedded, check_additivity=False)
    with torch_handler.deeplift_mode(explained, strict=True), \
            pytest.raises(UnsupportedOpError, match=r"padded like it"):
        DeepLift(explained).attribute(embedded, background[:1].expand_as(embedded), target=0)


def test_token_ids_are_recovered_bit_exactly_and_foreign_rows_are_refused():
    embedding = nn.Embedding(7, 3).double()
    ids = torch.tensor([[0, 6, 2], [2, 2, 5]])
    with torch.no_grad():
        embedded = embedding(ids)
    assert torch.equal(token_ids(embedding, embedded), ids)
    with pytest.raises(ValueError, match=r"not a row of the embedding matrix"):
        token_ids(embedding, embedded * 0.5)
    with pytest.raises(ValueError, match=r"4 features per token but the embedding layer has 3"):
        token_ids(embedding, torch.zeros(2, 4, dtype=torch.float64))


def test_from_embeddings_checks_its_arguments_and_leaves_no_hook():
    model, tokens, _ = masked_tokens()
    with pytest.raises(ValueError, match=r"module of model"):
        from_embeddings(model, nn.Embedding(12, 5))
    with pytest.raises(TypeError, match=r"nn.Embedding"):
        from_embeddings(model, model.gru)
    explained = from_embeddings(model, model.embedding)
    with torch.no_grad():
        torch.testing.assert_close(explained(model.embedding(tokens)), model(tokens), rtol=0, atol=0)
    assert not model.embedding._forward_hooks
