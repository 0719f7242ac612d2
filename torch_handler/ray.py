"""Exact DeepSHAP over a Ray Dataset: :class:`DeepShap`, a callable class for ``map_batches``.

    import ray
    from torch_handler.ray import DeepShap

    ds = ray.data.from_numpy(X).map_batches(          # X (N, T, F) -> column "data"
        DeepShap, fn_constructor_kwargs=dict(model=model, references=R, target=1),
        compute=ray.data.ActorPoolStrategy(size=4),    # 4 actors; + num_gpus=1 for GPU actors
        batch_size=256)                                # rows per call
    ds.write_parquet("shap/")                          # column "shap": (N, T, F)

Each actor builds (or unpickles) the model once, then every batch it receives goes through
:func:`torch_handler.deep_shap`: the values are those of the in-process call on the same rows,
element-wise. Ray streams the dataset through the actors, restarts an actor that dies and
re-runs its batch (``map_batches`` sets ``max_restarts=-1`` and ``max_task_retries=-1`` on
its actors by default), so every row comes back exactly once. docs/ray.md has the cluster
recipe; this module is the only one of the package that imports ray (``pip install
lstm-deepshap[ray]``), and only when the user imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

try:
    import ray
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "torch_handler.ray needs Ray Data: pip install 'lstm-deepshap[ray]' "
        "(on every node of the cluster, with the same torch as the driver)"
    ) from error

from torch_handler.dataset import deep_shap
from torch_handler.recurrent import cpu_loops

Tensors = torch.Tensor | tuple[torch.Tensor, ...]
# numpy kinds deep_shap can take after a cast to the references' dtype: bool, signed and
# unsigned integers (one-hot DNA is often stored as uint8), floats.
_NUMERIC_KINDS = "biuf"
# How long an actor waits for the compiled CPU loops (loaded from the disk cache at once;
# compiled in about 2 s the first time on a node); without a compiler the eager loops serve.
CPU_LOOPS_WAIT_S = 120.0


class DeepShap:
    """DeepSHAP values of the rows of a Ray Dataset, for ``Dataset.map_batches``.

    Arguments (all picklable: Ray ships them to every actor):

    * model: an ``nn.Module``, or a zero-argument callable returning one that each actor calls
      once (the weights then travel as the callable's code or a file path it loads, not as a
      pickle of the module). The actor's model is a copy, put in eval mode and moved to
      ``device``; the caller's module is left as it was.
    * references: a tensor or numpy array (S, ...) shared by every row, a tuple of them for a
      model with several inputs, or a callable ``references(batch) -> (n, S, ...)`` as
      :func:`torch_handler.deep_shap` takes it. Its dtype is the dtype of the computation.
    * target: an int, None for a model with one output, or the name of a batch column holding
      each row's output index (the Ray form of deep_shap's per-input target tensor).
    * outputs: a sequence of output indices or ``"all"``: the values get a last axis K.
    * column: the input column, or a tuple of columns for a model with several inputs (in the
      order of the model's arguments). Each column's rows must have the references' row shape;
      numeric columns (bool, int, float) are converted to the references' dtype.
    * output_column: the column the values are written to (same row shape as the input, plus
      K with ``outputs``); with several input columns, a tuple of names, or one prefix
      ``p`` giving ``p_<column>`` for each.
    * device: where the actor computes; default ``cuda`` when the actor was given a GPU
      (``map_batches(..., num_gpus=1)``), ``cpu`` otherwise.
    * batch_size: pairs per chunk inside deep_shap (default: sized to the device's memory).
      Not the number of rows Ray hands each call, which is ``map_batches(batch_size=...)``.
    * num_threads: torch intra-op threads of the actor, 1 by default. Ray runs one process
      per actor and places actors by their ``num_cpus`` (1 each by default); torch's default
      of one thread per core in every actor would put actors × cores threads on the cores and
      slow every one of them down. One thread per actor, as many actors as cores, is what
      scales (benchmarks/ray_scaling.py). Give an actor more threads together with
      ``num_cpus`` (``map_batches(..., num_cpus=4)``, ``num_threads=4``).

    A call takes a batch in Ray's numpy format (a dict of column name -> array, the default
    ``batch_format``) and returns it with the output column(s) added as numpy arrays.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        references,
        *,
        target: int | str | None = None,
        outputs: Sequence[int] | str | None = None,
        column: str | Sequence[str] = "data",
        output_column: str | Sequence[str] = "shap",
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        num_threads: int | None = 1,
    ):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device) if device is not None else _actor_device()
        self.model = _actor_model(model, self.device)
        if self.device.type == "cpu":
            # An actor is a fresh process: have the compiled loops ready before the first
            # batch, instead of running the eager ones while they load in the background.
            cpu_loops.load(timeout=CPU_LOOPS_WAIT_S)
        self.columns = _names(column, "column")
        self.output_columns = _output_names(output_column, self.columns)
        self.references = _cpu_references(references, len(self.columns))
        if target is not None and not isinstance(target, (int, str)):
            raise TypeError(
                f"DeepShap: target must be an int, None or the name of a column of output indices, "
                f"not {type(target).__name__}; per-row targets go in a column: target='label'"
            )
        self.target = target
        self.outputs = outputs
        self.batch_size = batch_size

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch: column -> array (n, ...); returns the batch plus the output column(s)."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"DeepShap takes batches as a dict of numpy arrays, got {type(batch).__name__}: "
                "call map_batches with batch_format='numpy' (its default)"
            )
        for name in self.output_columns:
            if name in batch:
                raise ValueError(
                    f"DeepShap: the output column {name!r} is already in the batch; choose another "
                    "output_column=... or drop the column first"
                )
        # The inputs and shared references stay on the CPU: deep_shap moves each chunk of pairs
        # (and the shared references once) to ``device`` and returns the values on the CPU.
        inputs = tuple(
            _column_tensor(batch, name, reference)
            for name, reference in zip(self.columns, self._reference_rows(), strict=True)
        )
        values = deep_shap(
            self.model,
            inputs[0] if len(inputs) == 1 else inputs,
            self.references,
            target=self._target(batch, len(inputs[0])),
            outputs=self.outputs,
            batch_size=self.batch_size,
            device=self.device,
            progress=False,
        )
        values = (values,) if isinstance(values, torch.Tensor) else tuple(values)
        result = dict(batch)
        for name, value in zip(self.output_columns, values, strict=True):
            result[name] = value.detach().cpu().numpy()
        return result

    def _reference_rows(self) -> tuple[torch.Tensor | None, ...]:
        """One reference tensor per input column (None each for callable references): the
        dtype and row shape each column is converted to and checked against."""
        if callable(self.references):
            return (None,) * len(self.columns)
        refs = self.references
        return refs if isinstance(refs, tuple) else (refs,)

    def _target(self, batch: Mapping[str, np.ndarray], rows: int) -> int | torch.Tensor | None:
        if not isinstance(self.target, str):
            return self.target
        indices = _column(batch, self.target, "target")
        if indices.dtype.kind not in "iu" or indices.shape != (rows,):
            raise TypeError(
                f"DeepShap: the target column {self.target!r} must hold one integer output index per "
                f"row, got dtype {indices.dtype} and shape {indices.shape} for {rows} rows"
            )
        return torch.as_tensor(indices, dtype=torch.long)


def _actor_device() -> torch.device:
    """cuda when this actor was given a GPU, else cpu (Ray hides the GPUs it did not give)."""
    given_gpu = bool(ray.get_gpu_ids()) if ray.is_initialized() else True
    return torch.device("cuda" if given_gpu and torch.cuda.is_available() else "cpu")


def _actor_model(model, device: torch.device) -> nn.Module:
    """The actor's own module: built by the callable, or a copy of the given one (so that a
    DeepShap made in the caller's process leaves the caller's module as it was), in eval mode
    on ``device``."""
    if isinstance(model, nn.Module):
        built = copy.deepcopy(model)
    elif callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"DeepShap: the model builder {getattr(model, '__name__', model)!r} returned "
                f"{type(built).__name__}, not an nn.Module; it must take no arguments and return the model"
            )
    else:
        raise TypeError(
            f"DeepShap: model must be an nn.Module or a zero-argument callable building one, "
            f"not {type(model).__name__}"
        )
    return built.eval().to(device)


def _names(names: str | Sequence[str], what: str) -> tuple[str, ...]:
    result = (names,) if isinstance(names, str) else tuple(names)
    if not result or not all(isinstance(n, str) for n in result) or len(set(result)) != len(result):
        raise ValueError(f"DeepShap: {what} must be a column name or a tuple of distinct names, got {names!r}")
    return result


def _output_names(output_column: str | Sequence[str], columns: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(output_column, str) and len(columns) > 1:
        names = tuple(f"{output_column}_{c}" for c in columns)
    else:
        names = _names(output_column, "output_column")
    if len(names) != len(columns):
        raise ValueError(
            f"DeepShap: {len(names)} output columns {names!r} for {len(columns)} input columns {columns!r}"
        )
    if set(names) & set(columns):
        raise ValueError(f"DeepShap: output columns {names!r} would overwrite input columns {columns!r}")
    return names


def _cpu_references(references, inputs: int):
    """references as deep_shap takes them, on the CPU like the columns: a tensor, a tuple of
    them, or the callable (whose results must be on the CPU too)."""
    if callable(references) and not isinstance(references, (torch.Tensor, np.ndarray)):
        return references
    refs = references if isinstance(references, (tuple, list)) else (references,)
    if len(refs) != inputs:
        raise ValueError(
            f"DeepShap: {len(refs)} reference tensors for {inputs} input columns; give one (S, ...) "
            "reference tensor per input column, in the same order"
        )
    placed = tuple(torch.as_tensor(r).cpu() for r in refs)
    for r in placed:
        if not r.is_floating_point():
            raise TypeError(
                f"DeepShap: references must be floating point (their dtype is the computation's), "
                f"got {r.dtype}; convert them, e.g. references.float()"
            )
    return placed[0] if inputs == 1 else placed


def _column(batch: Mapping[str, np.ndarray], name: str, role: str) -> np.ndarray:
    if name not in batch:
        raise KeyError(
            f"DeepShap: the {role} column {name!r} is not in the batch, whose columns are "
            f"{sorted(batch)}; pass {'column' if role == 'input' else role}=... naming it"
        )
    return np.asarray(batch[name])


def _column_tensor(batch, name: str, reference: torch.Tensor | None) -> torch.Tensor:
    """The column as a CPU tensor of the references' dtype, checked first."""
    array = _column(batch, name, "input")
    if array.dtype.kind not in _NUMERIC_KINDS:
        hint = (
            "its rows differ in shape (a ragged column): pad them to one length first"
            if array.dtype == object
            else "it must hold numbers"
        )
        raise TypeError(f"DeepShap: the input column {name!r} has dtype {array.dtype}: {hint}")
    if not array.flags.writeable:  # Ray hands out read-only views of its blocks; torch warns on them
        array = array.copy()
    if reference is None:  # callable references: deep_shap checks what they return
        return torch.as_tensor(array)
    if array.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"DeepShap: the input column {name!r} has rows of shape {array.shape[1:]}, the references "
            f"{tuple(reference.shape[1:])}; every row must have the references' row shape"
        )
    return torch.as_tensor(array, dtype=reference.dtype)
