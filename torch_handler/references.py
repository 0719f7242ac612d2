"""References for padded variable-length sequences: each padded like the input it explains.

DeepLIFT pairs an input with a reference step by step. With variable-length data (packed
sequences, padding masks) the pair must agree on where the padding is: a packed input and its
reference must have the same length (else UnsupportedConfigurationError), and a padding mask
that differs between the two is an input-dependent, non-differentiable tensor that no rule can
attribute exactly. :func:`padded_references` builds references that share each input's
length and padding, from shuffles of the input itself or from background sequences cut to
that length. See docs/variable-length.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["padded_references"]


def _check_lengths(inputs: Tensor, lengths: Tensor, time_dim: int) -> Tensor:
    lengths = torch.as_tensor(lengths).to("cpu", torch.int64)
    steps = inputs.shape[time_dim]
    if lengths.shape != (inputs.shape[0],):
        raise ValueError(f"lengths must have shape ({inputs.shape[0]},), one per input; got {tuple(lengths.shape)}.")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > steps):
        raise ValueError(
            f"lengths must lie in 1..{steps} (the inputs' time dimension {time_dim}); got "
            f"{lengths.min().item()}..{lengths.max().item()}."
        )
    return lengths


def _sources(inputs, lengths, background, n, generator, time_dim):
    """For each input i, the n unpadded sequences (time first) its references are cut from."""
    if background is None:
        if n is None or n < 1:
            raise ValueError("without a background, give n >= 1: the number of shuffles per input.")
        for x, length in zip(inputs, lengths.tolist(), strict=True):
            valid = x.movedim(time_dim - 1, 0)[:length]
            yield [valid[torch.randperm(length, generator=generator).to(valid.device)] for _ in range(n)]
        return
    if background.shape[0] == 0 or background.dim() != inputs.dim() or (
        background.shape[1:time_dim] + background.shape[time_dim + 1 :]
        != inputs.shape[1:time_dim] + inputs.shape[time_dim + 1 :]
    ):
        raise ValueError(
            f"background must be a non-empty (S, ...) batch laid out like the inputs (time in dim "
            f"{time_dim}, the same features); got {tuple(background.shape)} for inputs "
            f"{tuple(inputs.shape)}."
        )
    longest = int(lengths.max()) if len(lengths) else 0
    if background.shape[time_dim] < longest:
        raise ValueError(
            f"background sequences have {background.shape[time_dim]} steps but the longest input "
            f"has {longest}: each reference is cut from a background sequence, which "
            "must be at least as long as its input."
        )
    sequences = background.movedim(time_dim, 1)
    count = len(sequences)
    if n is not None and not 1 <= n <= count:
        raise ValueError(f"n must lie in 1..{count} (the background's size) or be None (all of it); got {n}.")
    for length in lengths.tolist():
        chosen = range(count) if n is None else torch.randperm(count, generator=generator)[:n].tolist()
        yield [sequences[j][:length] for j in chosen]


def padded_references(
    inputs: Tensor,
    lengths,
    background: Tensor | None = None,
    *,
    n: int | None = None,
    pad_value: float = 0.0,
    generator: torch.Generator | None = None,
    time_dim: int = 1,
) -> Tensor:
    """References for padded variable-length inputs, each padded like its input.

    inputs: (N, ...) a padded batch, time in dimension ``time_dim`` (1: ``(N, T, F)``
    batch-first; 2: ``(N, C, T)`` channels-first); steps ``t >= lengths[i]`` of input i are
    padding. lengths: (N,) ints in 1..T (a tensor or a list).

    background: None, to shuffle the valid steps of each input itself (``n`` random
    permutations of its first ``lengths[i]`` steps, the multiset of steps kept); or (S, ...)
    unpadded sequences laid out like the inputs with at least ``max(lengths)`` steps, each
    reference then being a background sequence cut to the input's length: all S of them in
    order (``n=None``) or ``n`` drawn without replacement, independently per input.
    n: references per input (required without a background). pad_value: the value written at
    every padding step of the references (use the inputs' own padding value). generator: a
    ``torch.Generator`` for reproducible draws.

    Returns (N, n, ...) with ``n = S`` for ``n=None``: ``references[i, k]`` has input i's
    shape, the same dtype and device, its first ``lengths[i]`` steps taken from a shuffle or a
    background sequence and ``pad_value`` after them. Use ``references[i]`` as the baselines of
    input i (Captum ``DeepLiftShap(model).attribute(inputs[i:i+1], baselines=references[i])``),
    or pass the whole tensor as tangermeme's ``references`` (channels-first, ``time_dim=2``).
    """
    if time_dim < 1 or time_dim >= inputs.dim():
        raise ValueError(f"time_dim must name a dimension of the inputs after the batch (1..{inputs.dim() - 1}).")
    lengths = _check_lengths(inputs, lengths, time_dim)
    steps = inputs.shape[time_dim]
    per_input = []
    for cuts in _sources(inputs, lengths, background, n, generator, time_dim):
        padded = []
        for cut in cuts:  # (length, ...) time first
            reference = cut.new_full((steps, *cut.shape[1:]), pad_value, dtype=inputs.dtype, device=inputs.device)
            reference[: len(cut)] = cut
            padded.append(reference.movedim(0, time_dim - 1))
        per_input.append(torch.stack(padded))
    if not per_input:
        return inputs.new_empty(0, n or 0, *inputs.shape[1:])
    return torch.stack(per_input)
