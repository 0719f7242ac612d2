"""One chunk of (input, reference) pairs through the model: the DeepSHAP values of its rows.

For a chunk of n inputs and s of their references, the model runs once on the doubled batch
``cat([x_pairs, r_pairs])`` (2·n·s rows; row j of the first half paired with row j of the
second) inside ``deeplift_mode``, where the library's rules make the gradients the DeepLIFT
multipliers. Each requested output then takes one backward pass on the retained graph (the
forward is shared by every output); the gradient that reaches the first half times (x − r),
summed over the chunk's references, is that output's share of each row's DeepSHAP value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ChunkSums:
    """Running sums over a chunk's references, for n rows and K selected outputs.

    values: per model input, (n, *row shape, K) in the input's dtype, Σ_r m·(x − r);
    f_x: (n, C) float64 model outputs on the rows; f_r: (n, C) float64 Σ_r f(r);
    scale: (n,) float64 max |f| over the rows' outputs and every reference's (the additivity
    check's output scale); references: how many references the sums hold.
    """

    values: list
    f_x: Tensor | None = None
    f_r: Tensor | None = None
    scale: Tensor | None = None
    references: int = 0


def model_outputs(out, rows: int) -> Tensor:
    """The model's output as (rows, C): a (rows,) output is one column; anything else refused."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"deep_shap: the model returned a {type(out).__name__}; it must return one tensor (B,) or (B, C). "
            "Wrap the model to return the output to explain."
        )
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[0] != rows:
        raise ValueError(
            f"deep_shap: the model returned shape {tuple(out.shape)} for a batch of {rows} rows; it must return "
            "(B,) or (B, C). Wrap the model to flatten or select the outputs to explain."
        )
    return out


def pair_up(xs, shared, per_input, a: int, b: int) -> tuple[list, list]:
    """x and r of every pair of the rows with references a..b: x repeated per reference."""
    n, s = xs[0].shape[0], b - a
    x_pairs = [x.repeat_interleave(s, 0) for x in xs]
    if per_input is not None:
        r_pairs = [r[:, a:b].reshape(n * s, *r.shape[2:]) for r in per_input]
    else:
        r_pairs = [r[a:b].repeat(n, *(1,) * (r.ndim - 1)) for r in shared]
    return x_pairs, r_pairs


def explain_chunk(model, xs: tuple[Tensor, ...], columns: Tensor, shared=None, per_input=None,
                  references_per_pass: int | None = None) -> ChunkSums:
    """Σ over references of multipliers·(x − r) for the rows ``xs`` (each (n, ...)).

    columns: (n, K) long, the output index of each row's k-th selected output; shared: tensors
    (S, ...) of references for every row, or per_input: tensors (n, S, ...); the references go
    through the model ``references_per_pass`` at a time (all at once by default). Must run
    inside ``deeplift_mode(model)`` with gradients enabled.
    """
    n, K = xs[0].shape[0], columns.shape[1]
    S = (per_input[0].shape[1] if per_input is not None else shared[0].shape[0])
    step = references_per_pass or S
    sums = ChunkSums([torch.zeros(*x.shape, K, dtype=x.dtype, device=x.device) for x in xs])
    for a in range(0, S, step):
        b = min(S, a + step)
        s = b - a
        x_pairs, r_pairs = pair_up(xs, shared, per_input, a, b)
        batch = [torch.cat([x, r]).requires_grad_() for x, r in zip(x_pairs, r_pairs, strict=True)]
        out = model_outputs(model(*batch), 2 * n * s)
        pairs = n * s
        picked = out[:pairs].gather(1, columns.repeat_interleave(s, 0))  # (pairs, K)
        differences = [x - r for x, r in zip(x_pairs, r_pairs, strict=True)]
        for k in range(K):
            grads = torch.autograd.grad(picked[:, k].sum(), batch, retain_graph=k < K - 1, allow_unused=True)
            for total, grad, diff in zip(sums.values, grads, differences, strict=True):
                if grad is not None:
                    total[..., k] += (grad[:pairs] * diff).reshape(n, s, *diff.shape[1:]).sum(1)
        _add_outputs(sums, out.detach().double(), n, s)
    return sums


def _add_outputs(sums: ChunkSums, out: Tensor, n: int, s: int) -> None:
    f_x = out[: n * s].reshape(n, s, -1)[:, 0]
    f_r = out[n * s :].reshape(n, s, -1)
    scale = torch.maximum(f_x.abs().amax(1), f_r.abs().amax((1, 2)))
    if sums.f_x is None:
        sums.f_x, sums.f_r, sums.scale = f_x, f_r.sum(1), scale
    else:
        sums.f_r += f_r.sum(1)
        sums.scale = torch.maximum(sums.scale, scale)
    sums.references += s
