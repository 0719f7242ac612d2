"""``deep_shap``: exact DeepSHAP values for a whole dataset, streamed in chunks of pairs.

The driver ties the pieces together: the inputs as a stream of row chunks
(:mod:`.inputs`), their references (:mod:`.references`), the outputs to explain and the
additivity check (:mod:`.outputs`), the chunk size from a memory budget (:mod:`.chunking`),
one chunk through the model (:mod:`.pairs`), and the resumable ``.npy`` results
(:mod:`.storage`). Everything that can be checked is checked before the first chunk runs.
"""

from __future__ import annotations

import sys
import time

import torch

from torch_handler.errors import NonFiniteError
from torch_handler.mode import deeplift_mode
from torch_handler.recurrent import cpu_loops

from . import storage
from .chunking import PROBE_PAIRS, choose_pairs, pair_bytes
from .inputs import as_rows
from .outputs import Selection, check_rows
from .pairs import explain_chunk, model_outputs
from .references import SharedReferences, as_references, finite_or_raise

# A killed run loses at most this much work: the sidecar records progress this often.
CHECKPOINT_SECONDS = 2.0


def deep_shap(model, inputs, references, *, target=None, outputs=None, batch_size=None, device=None,
              progress=None, out=None, resume=False, check=True):
    """DeepSHAP values of ``model`` for every input: the mean over its references of the
    DeepLIFT multipliers times (x − r), exact for the library's rules (equal element-wise, to
    rounding, to shap's DeepExplainer with ``register()``, Captum's DeepLiftShap and
    tangermeme's deep_lift_shap inside ``deeplift_mode``).

    inputs: a tensor (N, ...); a tuple of tensors (N, ...) for a model with several inputs; a
        torch Dataset (``dataset[i]`` a tensor or a tuple, one row); or a DataLoader / iterable
        of batches (a tensor or a tuple each; the one-element list of a TensorDataset's
        DataLoader is one input). Every element of a batch is a model input.
    references: a tensor (S, ...) shared by every input (a tuple for several inputs), or a
        callable ``references(batch) -> (n, S, ...)`` (a tuple for several inputs) giving each
        input its own S references; it is called once on the first input before the run (to
        learn S), then on each chunk. Same per-row shape, dtype and device as the inputs.
    target: an output index, or one per input ((N,) integer tensor), as in Captum; None for a
        model with one output. outputs: a sequence of output indices, or "all": several outputs
        from one forward pass per chunk, the output axis last (N, ..., K), as shap returns them.
    batch_size: pairs (input, reference) per forward pass; by default chosen from the memory a
        pair needs (measured on the first input) and the device's free memory.
    device: where the model runs (default: the device of its parameters); chunks are moved there.
    progress: a tqdm bar (needs tqdm); default on when stderr is a terminal, off otherwise.
    out: a path: results are written to ``out`` (``.npy``; several inputs: ``<stem>.input<i>.npy``)
        as they are computed and returned as read-only ``np.memmap`` arrays; a sidecar
        ``<out>.deep_shap.json`` records progress. resume: continue the run that wrote ``out``
        (the same arguments are required; anything else is refused), or start it if absent.
    check: check each input's additivity (Σ values = f(x) − mean f(r) to the project's
        tolerance); AdditivityError names the input index.

    Returns a tensor shaped like the inputs (on their device; an output axis last with
    ``outputs``), a tuple for several inputs; np.memmap arrays with ``out``.
    Raises ValueError / TypeError / IndexError for mismatched inputs and references, empty
    inputs, integer inputs (token ids: explain the embeddings), a model that is not an
    ``nn.Module`` or an output index out of range, before any work (RuntimeError inside
    ``torch.inference_mode()``; an unsized stream with a per-input target is checked against
    the rows it yielded at its end); FileExistsError for ``out`` files deep_shap did not write;
    NonFiniteError for NaN / Inf in the inputs, references or values; AdditivityError
    (check=True). Inputs that require grad are read detached; each result has its input's dtype.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"deep_shap: model is a {type(model).__name__}; it must be a torch.nn.Module (the rules are set on "
            "its modules). Wrap a function in a module whose forward calls it."
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "deep_shap: called inside torch.inference_mode(), where nothing is differentiated; the DeepLIFT "
            "multipliers are gradients. Call it outside the inference_mode block."
        )
    rows = as_rows(inputs)
    if rows.first is None or rows.first[0].shape[0] == 0:
        raise ValueError("deep_shap: inputs is empty; pass at least one input row.")
    refs = as_references(references, rows.specs)
    device = _device(model, device)
    if resume and out is None:
        raise ValueError("deep_shap: resume=True needs out=<path> (the results of the run to continue).")
    if rows.count is None and out is not None:
        raise ValueError(
            "deep_shap: out= needs the number of inputs in advance, and this iterable does not say it. Pass a "
            "tensor, a Dataset, or a DataLoader over a sized dataset."
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"deep_shap: batch_size={batch_size!r}; it must be a positive number of pairs (or None).")
    saved = storage.stored_fingerprint(out) if resume and out is not None else None
    if device.type == "cpu":
        # Every chunk on the same loops: the compiled CPU loops and the eager ones round
        # differently, so a run whose first chunks ran eagerly while the library was still being
        # built would not equal itself resumed, or rerun. A dataset job can wait the few seconds
        # a first build takes (the library is cached for every later process).
        cpu_loops.load()
    with deeplift_mode(model), torch.enable_grad():
        finite_or_raise(rows.first, "input")
        probe_refs = _probe_references(refs, rows.first)
        n_outputs, per_pair = _probe(model, rows.first, probe_refs, device)
        selection = Selection(target, outputs, n_outputs, rows.count)
        S = probe_refs[0].shape[0]
        pairs = int(batch_size or (saved or {}).get("pairs_per_chunk") or choose_pairs(per_pair, device))
        run = _Run(model, rows, refs, selection, device, S, pairs, check)
        store = None
        if out is not None:
            store = storage.Store(out, run.result_shapes(), [_numpy_dtype(spec.dtype) for spec in rows.specs],
                                  run.fingerprint(), resume)
        try:
            return run.execute(store, _bar(progress, rows.count, store.done if store else 0))
        finally:
            if store is not None:
                store.release()


def _device(model, device) -> torch.device:
    parameter = next(model.parameters(), None)
    home = parameter.device if parameter is not None else torch.device("cpu")
    if device is None:
        return home
    device = torch.device(device)
    if parameter is not None and (device.type, device.index or 0) != (home.type, home.index or 0):
        raise ValueError(
            f"deep_shap: device={device} but the model's parameters are on {home}; move the model there "
            f"(model.to('{device}')) or pass device='{home}'."
        )
    return device


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    return np.dtype(str(dtype).removeprefix("torch."))


def _probe_references(refs, first):
    """References of the first input: the shared ones, or the callable's for the first row."""
    if isinstance(refs, SharedReferences):
        finite_or_raise(refs.tensors, "reference")
        return refs.tensors
    made = refs.for_chunk(first)
    finite_or_raise(made, "the references the callable gave for input")
    return tuple(r[0] for r in made)


def _probe(model, first, references, device) -> tuple[int, int]:
    """(number of model outputs, bytes one pair needs) from one small forward pass."""
    pairs = min(PROBE_PAIRS, references[0].shape[0])
    batch = [torch.cat([x.to(device).expand(pairs, *x.shape[1:]), r[:pairs].to(device)]).requires_grad_()
             for x, r in zip(first, references, strict=True)]
    found = {}

    def forward():
        found["out"] = model_outputs(model(*batch), 2 * pairs)

    row_bytes = sum(x[0].numel() * x.element_size() for x in first)
    per_pair = pair_bytes(forward, pairs, row_bytes, 1)
    return found["out"].shape[1], per_pair


def _bar(progress, total, initial):
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("deep_shap: progress=True needs tqdm (pip install tqdm), or pass progress=False.") from error
    return tqdm(total=total, initial=initial, unit="input", desc="deep_shap", dynamic_ncols=True)


class _Run:
    """One deep_shap call after its checks: the chunk loop, the results and the fingerprint."""

    def __init__(self, model, rows, refs, selection, device, S, pairs, check):
        self.model, self.rows, self.refs, self.selection = model, rows, refs, selection
        self.device, self.S, self.pairs, self.check = device, S, pairs, check
        self.rows_per_chunk = max(1, pairs // S)
        self.references_per_pass = min(S, pairs)
        self.shared = refs.to(device).tensors if isinstance(refs, SharedReferences) else None

    def result_shapes(self) -> list[tuple]:
        extra = (self.selection.count,) if self.selection.stacked else ()
        return [(self.rows.count, *spec.shape, *extra) for spec in self.rows.specs]

    def fingerprint(self) -> dict:
        refs = (storage.tensor_digest(*self.refs.tensors) if self.shared is not None
                else f"callable {getattr(self.refs.function, '__qualname__', type(self.refs.function).__name__)}")
        return {
            "model": storage.model_digest(self.model),
            "inputs": [[list(s.shape), str(s.dtype)] for s in self.rows.specs],
            "rows": self.rows.count,
            "references": refs,
            "references_per_input": self.S,
            "outputs": storage.text_digest(repr(self.selection.describe())),
            "pairs_per_chunk": self.pairs,
            "device": self.device.type,
        }

    def execute(self, store, bar):
        done = store.done if store is not None else 0
        digests = {}  # of the inputs (and per-input references) of rows written to ``out``
        results = None if store is not None else self._allocate()
        last = time.monotonic()
        verified = store is None or done == 0
        try:
            for start, xs in self.rows.chunks(self.rows_per_chunk):
                references = self.refs.for_chunk(xs)
                if store is not None:
                    self._digest(digests, xs, references)
                if start < done:
                    if start + xs[0].shape[0] > done:
                        raise ValueError("deep_shap: the stored progress does not fall on a chunk boundary; "
                                         "delete the results to start over.")
                    if start + xs[0].shape[0] == done:
                        self._verify_inputs(store, digests)
                        verified = True
                    continue
                values = self._explain(start, xs, references)
                if store is None:
                    results = self._collect(results, start, values)
                else:
                    store.write(start, [v.cpu().numpy() for v in values])
                    if time.monotonic() - last >= CHECKPOINT_SECONDS:
                        store.checkpoint(start + xs[0].shape[0], _hex(digests))
                        last = time.monotonic()
                if bar is not None:
                    bar.update(xs[0].shape[0])
        finally:
            if bar is not None:
                bar.close()
        end = (start + xs[0].shape[0])
        self.selection.check_rows_seen(end)
        if store is None:
            return self._finish(results, end)
        if not verified:
            self._verify_inputs(store, digests)
        if end != self.rows.count:
            raise ValueError(f"deep_shap: the inputs yielded {end} rows, {self.rows.count} were announced.")
        store.checkpoint(end, _hex(digests), complete=True)
        arrays = store.arrays()
        return arrays[0] if len(arrays) == 1 else tuple(arrays)

    def _digest(self, digests, xs, references) -> None:
        named = [(f"input{i}", x) for i, x in enumerate(xs)]
        named += [(f"references{i}", r) for i, r in enumerate(references or ())]
        for name, t in named:
            storage.update_digest(digests.setdefault(name, storage.new_digest()), t)

    def _verify_inputs(self, store, digests) -> None:
        if store.saved is not None and store.saved.get("inputs") and _hex(digests) != store.saved["inputs"]:
            raise ValueError(
                f"deep_shap: resume=True refused: the inputs (or the references the callable gave) of the "
                f"{store.done} rows already written differ from those of the run that wrote them. Resume with the "
                "same inputs in the same order (and a deterministic references callable), or write to another out."
            )

    def _explain(self, start, xs, references):
        """The chunk's values, per model input (n, ..., K) or (n, ...), checked."""
        finite_or_raise(xs, "input", start)
        xs = tuple(x.to(self.device) for x in xs)
        per_input = None
        if references is not None:
            finite_or_raise(references, "the references the callable gave for input", start)
            per_input = tuple(r.to(self.device) for r in references)
        columns = self.selection.columns(start, xs[0].shape[0], self.device)
        sums = explain_chunk(self.model, xs, columns, shared=self.shared, per_input=per_input,
                             references_per_pass=self.references_per_pass)
        values = [v / sums.references for v in sums.values]
        for i, v in enumerate(values):
            if not bool(torch.isfinite(v).all()):
                bad = (~torch.isfinite(v)).reshape(v.shape[0], -1).any(1).nonzero()[0, 0].item()
                raise NonFiniteError(
                    f"deep_shap: the values of input {start + bad} (model input {i}) are NaN or Inf although its "
                    "inputs and references are finite: the model overflows on them. Check the model's outputs "
                    "there, or explain in float64."
                )
        if self.check:
            shared = self.shared

            def rows_of(i):
                refs = tuple(r[i] for r in per_input) if per_input is not None else shared
                return tuple(x[i : i + 1] for x in xs), refs

            check_rows(sums, values, self.selection, columns, start, self.model, rows_of)
        return values if self.selection.stacked else [v[..., 0] for v in values]

    def _allocate(self):
        """Per model input, the result tensor (N known) or a list of chunks (N unknown)."""
        if self.rows.count is None:
            return [[] for _ in self.rows.specs]
        return [torch.empty(shape, dtype=spec.dtype, device=spec.device)
                for shape, spec in zip(self.result_shapes(), self.rows.specs, strict=True)]

    def _collect(self, results, start, values):
        for result, value in zip(results, values, strict=True):
            if isinstance(result, list):
                result.append(value.detach())
            else:
                result[start : start + value.shape[0]] = value.detach()
        return results

    def _finish(self, results, end):
        if self.rows.count is None:
            results = [torch.cat(parts).to(spec.device) for parts, spec in zip(results, self.rows.specs, strict=True)]
        return results[0] if len(results) == 1 else tuple(results)


def _hex(digests) -> dict:
    return {name: d.hexdigest() for name, d in sorted(digests.items())}
