"""shap's per-sample loop with its gradients computed a chunk of samples at a time.

shap's ``DeepExplainer.shap_values`` explains sample by sample: for output ``i`` and sample
``j`` its ``gradient`` runs the model on ``cat([x_j repeated S times, background])`` (2·S rows)
and shap reads the gradient at the background half. That is N·K passes of 2·S rows, and on a
small model most of each pass is Python and autograd overhead, not arithmetic.

For a model the library handles, :func:`batched` lets shap run its own loop unchanged (its
products with ``x − background``, its means, output formats and hooks), but the first
``gradient`` call of a chunk of samples runs the whole chunk in one pass: ``cat([x_a … x_b each
repeated S times, the background repeated b − a times])``, the layout Captum's DeepLiftShap
uses, with shap's own output selection (the sum of output ``i`` over every row). The chunk's
other calls then read their rows. Each row's gradient still comes from its own pair (the
recurrent rules, the intercepted ops and shap's hooks all work pair by pair on the batch's two
halves), so the values equal the per-sample loop's to rounding
(``tests/test_shap_batches.py``) for every model whose rows do not interact; a model that
computes statistics over its batch gives other values on any other batch, shap's included (and
shap's additivity check then fails on both). Chunks are sized by the memory budget
``deep_shap`` uses (:mod:`torch_handler.dataset.chunking`). The model's ``forward`` runs fewer
times (a probe of a few pairs, then once per chunk and output), which only a model that
counts its calls or keeps state across them can notice.

A chunk pass that fails (a model that takes shap's 2·S rows but not a chunk's, such as an
initial state sized for a largest batch), or a model output other than (B, C) (shap's own
``gradient`` refuses those with its own error), hands the call and the rest of the loop to
shap's own ``gradient``: what works one sample at a time still works, and what fails fails
with shap's error.

Each call checks that shap asks for what the plan expects (output ``i`` of sample ``j``, in
shap's loop order, with sample ``j``'s rows); any other call, and every call after it, goes to
shap's own ``gradient``, so a shap whose loop differs still gets correct values, one sample
at a time. The plan is per thread and per explainer: other threads and explainers are not
affected. ``LSTM_DEEPSHAP_SHAP_BATCHES=0`` in the environment keeps shap's per-sample passes
(2·S rows each: the least memory per pass).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

from torch_handler.dataset.chunking import PROBE_PAIRS, choose_pairs, pair_bytes

ENV = "LSTM_DEEPSHAP_SHAP_BATCHES"
_local = threading.local()


class _Unplanned(Exception):
    """The model's chunk pass cannot stand for shap's per-sample passes."""


class _Plan:
    """What shap's loop will ask ``gradient`` for, and the chunk computed last."""

    def __init__(self, explainer, X: list):
        self.X = X
        self.data = list(explainer.data)
        self.samples = X[0].shape[0]
        self.references = self.data[0].shape[0]
        self.calls = 0
        self.per_pass = 0  # samples per pass, chosen at the first call
        self.chunk = None  # (output, first sample, end, gradients per input (2·n·S, ...))
        self.active = True

    def expects(self, idx, inputs) -> tuple[int, int] | None:
        """(output, sample) of this call when it is the one shap's loop makes next, else None."""
        i, j = divmod(self.calls, self.samples)
        S = self.references
        try:
            same = (
                int(idx) == i
                and len(inputs) == len(self.X)
                and all(
                    z.shape[0] == 2 * S and torch.equal(z[0], x[j]) and torch.equal(z[S], d[0])
                    for z, x, d in zip(inputs, self.X, self.data, strict=True)
                )
            )
        except (TypeError, ValueError, RuntimeError):
            same = False
        return (i, j) if same else None

    def samples_per_pass(self, model) -> int:
        """Samples per pass from the bytes one pair needs (a probe forward of a few pairs)."""
        S = self.references
        pairs = min(PROBE_PAIRS, S)
        batch = [torch.cat([x[:1].expand(pairs, *x.shape[1:]), d[:pairs]]).requires_grad_()
                 for x, d in zip(self.X, self.data, strict=True)]
        row_bytes = sum(x[0].numel() * x.element_size() for x in self.X)
        per_pair = pair_bytes(lambda: model(*batch), pairs, row_bytes, 1)
        return max(1, choose_pairs(per_pair, self.X[0].device) // S)

    def compute(self, model, i: int, a: int) -> None:
        """Gradients of output ``i`` summed over every row, for samples a.. in one pass."""
        if not self.per_pass:
            self.per_pass = self.samples_per_pass(model)
        b = min(self.samples, a + self.per_pass)
        n = b - a
        batch = [
            torch.cat([x[a:b].repeat_interleave(self.references, 0), d.repeat(n, *(1,) * (d.ndim - 1))])
            .requires_grad_()
            for x, d in zip(self.X, self.data, strict=True)
        ]
        out = model(*batch)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            # shap's own gradient selects outputs[:, i] per row: it explains (B, C) outputs only
            # and raises its own error on others, which a sum over extra axes must not hide.
            raise _Unplanned(f"the model returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        out = out[:, i]
        grads = torch.autograd.grad(out, batch, torch.ones_like(out), allow_unused=True)
        self.chunk = (i, a, b, [None if g is None else g.detach() for g in grads])

    def rows(self, j: int, inputs) -> list:
        """Sample ``j``'s gradients as shap's ``gradient`` returns them: per input, a numpy
        array over its 2·S rows (the input half, then the background half)."""
        _, a, b, grads = self.chunk
        S = self.references
        pairs, lo = (b - a) * S, (j - a) * S
        out = []
        for g, z in zip(grads, inputs, strict=True):
            if g is None:  # shap's own answer for an input the output does not depend on
                out.append(torch.zeros_like(z).cpu().numpy())
            else:
                out.append(torch.cat([g[lo : lo + S], g[pairs + lo : pairs + lo + S]]).cpu().numpy())
        return out


def gradient(original):
    """shap's ``PyTorchDeep.gradient``, answered from the chunk where a plan is active."""

    def batched_gradient(self, idx, inputs):
        plan = getattr(_local, "plans", {}).get(id(self))
        if plan is None or not plan.active:
            return original(self, idx, inputs)
        expected = plan.expects(idx, inputs)
        if expected is None:  # not shap's loop as planned: shap's own gradient from here on
            plan.active = False
            return original(self, idx, inputs)
        i, j = expected
        plan.calls += 1
        chunk = plan.chunk
        if chunk is None or chunk[0] != i or not chunk[1] <= j < chunk[2]:
            plan.chunk = None  # the previous chunk's gradients go before the next are made
            self.model.zero_grad()
            try:
                plan.compute(self.model, i, j)
            except Exception:
                # The chunk is an optimisation, so nothing it alone meets may reach the user:
                # a model that takes shap's 2·S rows but not a chunk's (an initial state sized
                # for a largest batch, a memory limit), or outputs shap itself refuses. shap's
                # own gradient answers this call and the rest, and raises its own error where
                # the model fails on shap's passes too.
                plan.active, plan.chunk = False, None
                self.model.zero_grad()
                return original(self, idx, inputs)
        return plan.rows(j, inputs)

    batched_gradient.__wrapped__ = original
    batched_gradient.__doc__ = original.__doc__
    return batched_gradient


@contextmanager
def batched(explainer, X, ranked_outputs):
    """Inside: ``explainer``'s ``shap_values(X)`` gets its gradients a chunk of samples at a
    time on this thread. Ranked outputs (each sample's own output order), interim layers
    (``(model, layer)``) and ``LSTM_DEEPSHAP_SHAP_BATCHES=0`` keep shap's per-sample gradients."""
    if ranked_outputs is not None or explainer.interim or os.environ.get(ENV, "1") == "0":
        yield
        return
    inputs = X if isinstance(X, list) else [X]
    plans = _local.__dict__.setdefault("plans", {})
    key = id(explainer)
    if key in plans:  # a nested call on the same explainer: leave it to shap
        yield
        return
    plans[key] = _Plan(explainer, [x.detach().to(explainer.device) for x in inputs])
    try:
        yield
    finally:
        del plans[key]
