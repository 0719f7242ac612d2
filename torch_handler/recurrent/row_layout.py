"""The distinct rows of a doubled batch, so that a layer's forward runs once per distinct row.

Why: every engine's doubled batch repeats rows. shap's ``DeepExplainer`` pairs one input with
S background rows (the actual half is one row, S times over); Captum's ``DeepLiftShap`` and
``deep_shap`` pair n inputs with S references (the actual half holds each input S times in a
run, the reference half the S references n times over); Captum's ``DeepLift`` with one baseline
repeats the baseline. The forward of a recurrent layer computes each row on its own, so it can
run on the distinct rows and copy each one's values to the rows that repeat it: the compiled
CPU loops give every row the same bits whatever the batch around it, and the rule's
backward, the part that is truly per pair, reads the distinct rows through a row map
(:func:`torch_handler.recurrent.cpu_kernels.step_factors`).

Detected, never assumed: a model may reorder, mix or pad rows before the layer, so the
patterns are checked exactly (every element equal) on the layer's own input and initial state.
Each half is tested for two patterns, which cover the engines' layouts:

* runs: rows constant in consecutive blocks of s (``x.repeat_interleave(s)``; one block: all
  rows equal);
* period: rows repeating with period p (``r.repeat(n)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Compaction pays when it drops at least a quarter of the rows: below that, the copies back
# to the full batch cost about what the skipped rows would have.
MAX_KEPT_FRACTION = 0.75


@dataclass(frozen=True)
class RowLayout:
    """Where each row of a doubled batch (B rows) finds its values among R distinct rows.

    index: (B,) int64, the distinct row of each batch row; distinct: (R,) int64, the batch row
    each distinct row is (R even: the compiled loops run rows in pairs, so an odd count gets its
    last row twice).
    """

    index: Tensor
    distinct: Tensor

    def compact(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """x (T, B, I) and states (B, ·) on the distinct rows: (T, R, I) and (R, ·)."""
        return x.index_select(1, self.distinct), tuple(s.index_select(0, self.distinct) for s in states)


def detect(x: Tensor, states: tuple[Tensor, ...]) -> RowLayout | None:
    """The layout of the doubled batch ``x`` (T, B, I), time-major, with initial ``states``
    ((B, ·) each), or None when it repeats too few rows to pay (see MAX_KEPT_FRACTION)."""
    T, B = x.shape[:2]
    N = B // 2
    if N < 2 or B != 2 * N:
        return None
    halves = [_half(x[:, :N]), _half(x[:, N:])]
    kept = sum(len(d) for _, d in halves)
    if kept > MAX_KEPT_FRACTION * B:
        return None
    (index_a, distinct_a), (index_r, distinct_r) = halves
    device = x.device
    index = torch.tensor(index_a + [len(distinct_a) + i for i in index_r], dtype=torch.int64, device=device)
    rows = distinct_a + [N + d for d in distinct_r]
    if len(rows) % 2:
        rows.append(rows[-1])
    layout = RowLayout(index, torch.tensor(rows, dtype=torch.int64, device=device))
    # The states must repeat where the input does (a state computed from another input of the
    # model, or passed in, may not).
    for s in states:
        if not torch.equal(s.index_select(0, layout.distinct).index_select(0, index), s):
            return None
    return layout


def _half(h: Tensor) -> tuple[list[int], list[int]]:
    """(index, distinct) of one half h (T, N, I): runs, a period, or every row its own."""
    T, N = h.shape[:2]
    rest = h.shape[2:]
    same_as_first = (h == h[:, :1]).reshape(T, N, -1).all(2).all(0).tolist()
    identity = (list(range(N)), list(range(N)))
    # runs of s equal rows: s is the first run's length
    s = same_as_first.index(False) if False in same_as_first else N
    if s > 1 and N % s == 0:
        blocks = h.reshape(T, N // s, s, *rest)
        if s == N or torch.equal(blocks, blocks[:, :, :1].expand_as(blocks)):
            return [i // s for i in range(N)], list(range(0, N, s))
        return identity
    # a period p: the first row equal to row 0 after it
    p = same_as_first.index(True, 1) if True in same_as_first[1:] else N
    if p < N and N % p == 0:
        periods = h.reshape(T, N // p, p, *rest)
        if torch.equal(periods, periods[:, :1].expand_as(periods)):
            return [i % p for i in range(N)], list(range(p))
    return identity
