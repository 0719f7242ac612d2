"""Per-token attributions for a token model: nn.Embedding -> nn.LSTM -> attention head.

    python examples/token_attributions.py [--seed 0] [--steps 80]

Token ids are integers, so no engine can attribute to them directly; the attributions are
taken at the embedding layer's output and summed over the embedding dimension, one number per
token. Captum's ``LayerDeepLift`` on ``model.embedding`` does exactly that, and inside
``torch_handler.deeplift_mode(model)`` the LSTM and the attention head (``torch.softmax`` and
an elementwise product of two input-dependent tensors) run exact DeepLIFT rules, so the
per-token attributions of each sequence sum to f(x) − f(reference):

    with torch_handler.deeplift_mode(model):
        attr = LayerDeepLift(model, model.embedding).attribute(tokens, baselines=reference_tokens, target=1)
    per_token = attr.sum(dim=-1)          # (N, L)

shap users explain the model as a function of the embedding output instead
(:func:`per_token_shap_values`; ``shap.DeepExplainer((model, model.embedding), tokens)`` fails
inside shap, which asks the integer ids for gradients)::

    explained = torch_handler.from_embeddings(model, model.embedding)
    values = shap.DeepExplainer(explained, model.embedding(references).detach()).shap_values(
        model.embedding(tokens).detach())                   # (N, L, E, outputs)
    per_token = values.sum(axis=2)[..., 1]                  # (N, L)

The two routes give the same numbers (to rounding).

DeepSHAP over several references (S, L) is the mean over (sequence, reference) pairs. Captum's
``LayerDeepLiftShap`` would do this expansion but calls ``requires_grad_()`` on the inputs,
which integer token ids refuse; :func:`per_token_attributions` expands the pairs itself.

Task (synthetic, trained in seconds): a sequence is positive when it holds more "good" than
"bad" tokens. References: the all-padding sequence and shuffles of the explained sequences
are common choices; here the padding sequence and random sequences.
"""

from __future__ import annotations

import argparse

import torch
from captum.attr import LayerDeepLift
from torch import nn

import torch_handler

VOCABULARY = ["<pad>", "the", "film", "was", "good", "bad", "plot", "very", "not", "a", "and", "actors"]
GOOD, BAD = VOCABULARY.index("good"), VOCABULARY.index("bad")
LENGTH = 10


class TokenAttentionLSTM(nn.Module):
    """(N, L) token ids -> Embedding (N, L, E) -> LSTM (N, L, H) -> softmax attention -> (N, 2)."""

    def __init__(self, vocabulary: int, embedding: int = 8, hidden: int = 16, outputs: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embedding, padding_idx=0)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.score = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, tokens):
        h, _ = self.lstm(self.embedding(tokens))
        weights = torch.softmax(self.score(h).squeeze(-1), dim=1)
        return self.out((weights.unsqueeze(-1) * h).sum(dim=1))


def make_data(n: int, generator: torch.Generator):
    tokens = torch.randint(1, len(VOCABULARY), (n, LENGTH), generator=generator)
    labels = ((tokens == GOOD).sum(1) > (tokens == BAD).sum(1)).long()
    return tokens, labels


def train(model: nn.Module, steps: int, generator: torch.Generator) -> float:
    tokens, labels = make_data(256, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        test_tokens, test_labels = make_data(256, generator)
        return float((model(test_tokens).argmax(1) == test_labels).double().mean())


def per_token_attributions(model, tokens, references, target: int = 1) -> torch.Tensor:
    """(N, L) attributions of each token (N, L) to output ``target``: exact DeepSHAP against the
    references (S, L), i.e. the mean over the S (sequence, reference) pairs of DeepLIFT at the
    embedding layer, summed over the embedding dimension. Per sequence they sum to
    f(tokens) − mean f(references)."""
    n, s = len(tokens), len(references)
    pairs = tokens.repeat_interleave(s, dim=0)  # (N·S, L): each sequence with every reference
    baselines = references.repeat(n, 1)
    with torch_handler.deeplift_mode(model):
        attr = LayerDeepLift(model, model.embedding).attribute(pairs, baselines=baselines, target=target)
    return attr.detach().sum(dim=-1).view(n, s, -1).mean(dim=1)


def per_token_shap_values(model, tokens, references, target: int = 1) -> torch.Tensor:
    """The same (N, L) attributions through shap: DeepExplainer on the model as a function of
    its embedding output (torch_handler.from_embeddings), background the references'
    embeddings, summed over the embedding dimension."""
    import shap

    explained = torch_handler.from_embeddings(model, model.embedding)
    registered = torch_handler.is_registered()
    torch_handler.register()
    try:
        with torch.no_grad():
            background, embedded = model.embedding(references), model.embedding(tokens)
        values = shap.DeepExplainer(explained, background).shap_values(embedded)  # (N, L, E, outputs)
    finally:
        if not registered:
            torch_handler.unregister()
    return torch.from_numpy(values[..., target].sum(axis=2))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = TokenAttentionLSTM(len(VOCABULARY)).double()
    accuracy = train(model, args.steps, generator)
    model.eval()

    tokens, _ = make_data(3, generator)
    references = torch.randint(1, len(VOCABULARY), (4, LENGTH), generator=generator)
    references[0] = 0  # the all-padding sequence
    per_token = per_token_attributions(model, tokens, references)

    with torch.no_grad():
        out_x, out_ref = model(tokens), model(references)
    expected = out_x[:, 1] - out_ref[:, 1].mean()
    scale = max(float(out_x.abs().max()), float(out_ref.abs().max()))
    relative_error = float((per_token.sum(1) - expected).abs().max()) / scale

    print(f"held-out accuracy {accuracy:.3f}; attributions to the 'positive' logit")
    for row, values in zip(tokens, per_token, strict=True):
        print("  ".join(f"{VOCABULARY[t]}:{v:+.3f}" for t, v in zip(row.tolist(), values.tolist(), strict=True)))
    print(f"token sums - (f(x) - mean f(ref)): max {relative_error:.1e} of the output scale")
    through_shap = per_token_shap_values(model, tokens, references)
    shap_difference = float((through_shap - per_token).abs().max()) / scale
    print(f"shap route (from_embeddings) vs Captum route: max difference {shap_difference:.1e} of the output scale")
    return {"accuracy": accuracy, "relative_error": relative_error, "per_token": per_token,
            "per_token_shap": through_shap, "shap_difference": shap_difference}


if __name__ == "__main__":
    main()
