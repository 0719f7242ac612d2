"""Inputs of :func:`torch_handler.deep_shap`: every accepted form as one stream of row chunks.

Accepted: a tensor (N, ...), a tuple / list of tensors (a model with several inputs, N rows
each), a ``torch.utils.data.Dataset`` (map-style: ``dataset[i]`` is a tensor or a tuple of
tensors, one row), or any iterable of batches (a ``DataLoader``; each batch a tensor, a tuple
of tensors, or the one-element list a ``DataLoader`` over a ``TensorDataset`` yields).

Everything becomes :class:`Rows`: the per-row shapes and dtypes (read from the first row or
batch, before any work), the row count when it is known in advance, and :meth:`Rows.chunks`,
which re-batches the stream into chunks of exactly ``rows`` rows (the last one shorter) so
that chunk boundaries depend only on the rows and ``rows`` (what makes a resumed run compute
exactly what an uninterrupted run computes).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate


@dataclass(frozen=True)
class Spec:
    """One model input: the shape of one row (without the batch axis), its dtype, its device."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


def as_tensors(batch, where: str) -> tuple[Tensor, ...]:
    """A batch (tensor, or tuple / list of tensors) as a tuple of tensors, or a clear error."""
    items = (batch,) if isinstance(batch, Tensor) else batch
    if not isinstance(items, (tuple, list)) or not items or not all(isinstance(t, Tensor) for t in items):
        raise TypeError(
            f"deep_shap: {where} is a {type(batch).__name__}; expected a tensor or a tuple of "
            "tensors (one per model input). Wrap other containers, e.g. "
            "inputs=(batch['x'] for batch in loader)."
        )
    if any(t.ndim == 0 for t in items):
        raise ValueError(f"deep_shap: {where} holds a 0-d tensor; each input needs a batch axis (N, ...).")
    rows = {t.shape[0] for t in items}
    if len(rows) != 1:
        raise ValueError(
            f"deep_shap: the tensors of {where} have different numbers of rows {[t.shape[0] for t in items]}; "
            "every model input needs one row per example. (A list of batches of one input: pass iter(batches).)"
        )
    for i, t in enumerate(items):
        if not t.is_floating_point():
            raise TypeError(
                f"deep_shap: model input {i} of {where} is {t.dtype}; DeepSHAP attributes to floating-point "
                "inputs, which have an x - r to share out. Token ids: explain the embeddings "
                "(torch_handler.from_embeddings(model, model.embedding), docs/token-ids.md). Lengths or other "
                "integer side inputs: bind them inside the model (a wrapper module) rather than passing them."
            )
    # The values are gradients times (x - r): inputs that carry a graph (requires_grad) would carry
    # it into the results. The rows are read, never differentiated through the caller's graph.
    return tuple(t.detach() for t in items)


def specs_of(tensors: tuple[Tensor, ...]) -> tuple[Spec, ...]:
    return tuple(Spec(tuple(t.shape[1:]), t.dtype, t.device) for t in tensors)


class Rows:
    """A stream of input rows: ``specs`` (per model input), ``count`` (None when unknown),
    and :meth:`chunks`."""

    def __init__(self, specs: tuple[Spec, ...], count: int | None, batches: Iterator[tuple[Tensor, ...]] | None,
                 tensors: tuple[Tensor, ...] | None = None, dataset: Dataset | None = None,
                 first: tuple[Tensor, ...] | None = None):
        self.specs, self.count = specs, count
        # The first row of every model input (a batch axis of 1): what the driver probes the model with.
        self.first = None if first is None else tuple(t[:1] for t in first)
        self._batches, self._tensors, self._dataset = batches, tensors, dataset

    def chunks(self, rows: int) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
        """(first row index, tensors of ``rows`` rows each, the last chunk shorter), in order.
        Each batch's shapes, dtypes and devices are checked against the first batch's."""
        if self._tensors is not None:
            n = self.count
            for start in range(0, n, rows):
                yield start, tuple(t[start : start + rows] for t in self._tensors)
            return
        if self._dataset is not None:
            batches = (
                as_tensors(default_collate([self._dataset[i] for i in range(a, min(a + rows, self.count))]),
                           f"dataset items {a}..")
                for a in range(0, self.count, rows)
            )
        else:
            batches = self._batches
        yield from rebatch(batches, rows, self.specs)


def _check_batch(tensors, specs, index: int) -> None:
    if len(tensors) != len(specs):
        raise ValueError(
            f"deep_shap: batch {index} has {len(tensors)} tensors, the first batch {len(specs)}; "
            "every batch needs one tensor per model input."
        )
    for i, (t, spec) in enumerate(zip(tensors, specs, strict=True)):
        if (tuple(t.shape[1:]), t.dtype, t.device) != (spec.shape, spec.dtype, spec.device):
            raise ValueError(
                f"deep_shap: input {i} of batch {index} has rows of shape {tuple(t.shape[1:])}, {t.dtype} on "
                f"{t.device}; the first batch had {spec.shape}, {spec.dtype} on {spec.device}. Pad "
                "variable-length data to one length (and pad its references alike)."
            )


def rebatch(batches: Iterable[tuple[Tensor, ...]], rows: int, specs) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """Chunks of exactly ``rows`` rows from batches of any sizes (the last chunk shorter)."""
    pending: list[tuple[Tensor, ...]] = []
    held = start = 0
    for index, tensors in enumerate(batches):
        _check_batch(tensors, specs, index)
        pending.append(tensors)
        held += tensors[0].shape[0]
        while held >= rows:
            joined = _join(pending)
            yield start, tuple(t[:rows] for t in joined)
            start += rows
            held -= rows
            pending = [tuple(t[rows:] for t in joined)] if held else []
    if held:
        yield start, _join(pending)


def _join(parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return parts[0] if len(parts) == 1 else tuple(torch.cat(ts) for ts in zip(*parts, strict=True))


def _loader_rows(loader: DataLoader) -> int | None:
    """Rows a DataLoader yields, when its sampler says so in advance (None otherwise)."""
    if isinstance(loader.dataset, IterableDataset):
        return None
    try:
        if loader.batch_size is not None and loader.batch_sampler is not None:
            sampled = len(loader.sampler)
            return (sampled // loader.batch_size) * loader.batch_size if loader.drop_last else sampled
    except TypeError:
        return None
    return None


def as_rows(inputs) -> Rows:
    """Any accepted ``inputs`` as :class:`Rows` (reads the first row or batch for the specs)."""
    if isinstance(inputs, Tensor) or (isinstance(inputs, (tuple, list)) and inputs
                                      and all(isinstance(t, Tensor) for t in inputs)):
        tensors = as_tensors(inputs, "inputs")
        return Rows(specs_of(tensors), tensors[0].shape[0], None, tensors=tensors, first=tensors)
    if isinstance(inputs, Dataset) and not isinstance(inputs, IterableDataset) and hasattr(inputs, "__len__"):
        count = len(inputs)
        if count == 0:
            return Rows((), 0, iter(()))
        first = as_tensors(default_collate([inputs[0]]), "dataset[0]")
        return Rows(specs_of(first), count, None, dataset=inputs, first=first)
    if isinstance(inputs, (Tensor, str, bytes, dict)) or not isinstance(inputs, Iterable):
        raise TypeError(
            f"deep_shap: inputs is a {type(inputs).__name__}; expected a tensor (N, ...), a tuple of "
            "tensors, a torch Dataset, or a DataLoader / iterable of batches."
        )
    count = _loader_rows(inputs) if isinstance(inputs, DataLoader) else None
    iterator = iter(inputs)
    try:
        first = next(iterator)
    except StopIteration:
        return Rows((), 0, iter(()))
    tensors = as_tensors(first, "the first batch of inputs")
    batches = (as_tensors(b, f"batch {i} of inputs") if i else tensors
               for i, b in enumerate(itertools.chain([first], iterator)))
    return Rows(specs_of(tensors), count, batches, first=tensors)
