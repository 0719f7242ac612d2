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
    last row twice); representative: (B,) int64, distinct[index], the batch row whose values
    each row takes.
    """

    index: Tensor
    distinct: Tensor
    representative: Tensor

    def compact(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """x (T, B, I) and states (B, ·) on the distinct rows: (T, R, I) and (R, ·)."""
        return x.index_select(1, self.distinct), tuple(s.index_select(0, self.distinct) for s in states)


# Layouts by (B, pattern of each half, device): the index tensors are built once per shape
# (an engine explains batch after batch of the same layout).
_LAYOUTS: dict = {}
_MAX_CACHED = 64
_MISSING = object()


def detect(x: Tensor, states: tuple[Tensor, ...]) -> RowLayout | None:
    """The layout of the doubled batch ``x`` (T, B, I), time-major, with initial ``states``
    ((B, ·) each), or None when it repeats too few rows to pay (see MAX_KEPT_FRACTION)."""
    T, B = x.shape[:2]
    N = B // 2
    if N < 2 or B != 2 * N or x.numel() == 0:
        return None
    halves = x.reshape(T, 2, N, -1)
    patterns = _patterns(halves)
    if patterns == (("rows", N), ("rows", N)):
        return None
    key = (B, patterns, x.device)
    layout = _LAYOUTS.get(key, _MISSING)  # one lookup: another thread may clear the cache
    if layout is _MISSING:
        layout = _build(N, patterns, x.device)
        if len(_LAYOUTS) >= _MAX_CACHED:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    if layout is None:
        return None
    # The states must repeat where the input does (a state computed from another input of the
    # model, or passed in, may not).
    for s in states:
        if not torch.equal(s.index_select(0, layout.representative), s):
            return None
    return layout


def _patterns(halves: Tensor) -> tuple:
    """The pattern of each half of ``halves`` (T, 2, N, F), as a full scan finds it.

    Why the first step first: which rows equal their half's first row, over every step, is a
    pass over the whole input that wrote a bool tensor as large (measured: most of a 2-layer
    LSTM's forward on deep_shap's 512 rows of T 50). The first step alone proposes the
    pattern, which the exact check of :func:`_pattern` then confirms over every step. A
    pattern so confirmed is the full scan's (rows equal at every step are equal at the first;
    so the first step's run is at least as long and its period at most as long, and a
    confirmed run or period is one over every step); one that fails takes the full scan.
    """
    proposed = _same_as_first(halves[:1])
    patterns = tuple(_pattern(halves[:, k], proposed[k], scanned=halves.shape[0] == 1) for k in (0, 1))
    if halves.shape[0] == 1 or all(_confirmed(kind, rows) for (kind, _), rows in zip(patterns, proposed, strict=True)):
        return patterns
    same_as_first = _same_as_first(halves)
    return tuple(_pattern(halves[:, k], same_as_first[k], scanned=True) for k in (0, 1))


def _same_as_first(halves: Tensor) -> list:
    """Per half of ``halves`` (T, 2, N, F), whether each row equals the half's first row at every step."""
    return (halves == halves[:, :, :1]).all(3).all(0).tolist()


def _confirmed(kind: str, same_at_first_step: list) -> bool:
    """Whether a pattern found from the first step's rows is the full scan's: a run or a
    period :func:`_pattern` returned was checked over every step; ("rows", N) was not (a run
    or a period may have failed its check only because the first step proposed a longer one),
    unless no row equals the first at the first step (then at no step: the full scan's too)."""
    return kind != "rows" or not any(same_at_first_step[1:])


def _pattern(h: Tensor, same_as_first: list, scanned: bool = False) -> tuple[str, int]:
    """One half h (T, N, F): ("runs", s), ("period", p) or ("rows", N), checked exactly.

    same_as_first: whether each row equals the first, at every step (``scanned``) or at the
    first step only (then even "every row equals the first" is checked)."""
    T, N = h.shape[:2]
    # runs of s equal rows: s is the first run's length
    s = same_as_first.index(False) if False in same_as_first else N
    if s > 1 and N % s == 0:
        blocks = h.reshape(T, N // s, s, -1)
        if (s == N and scanned) or torch.equal(blocks, blocks[:, :, :1].expand_as(blocks)):
            return ("runs", s)
        return ("rows", N)
    # a period p: the first row equal to row 0 after it
    p = same_as_first.index(True, 1) if True in same_as_first[1:] else N
    if p < N and N % p == 0:
        periods = h.reshape(T, N // p, p, -1)
        if torch.equal(periods, periods[:, :1].expand_as(periods)):
            return ("period", p)
    return ("rows", N)


def _build(N: int, patterns, device) -> RowLayout | None:
    """The layout of two halves of N rows with these patterns (None: too few repeats)."""
    parts = []
    for kind, k in patterns:
        rows = torch.arange(N)
        parts.append({"runs": (rows // k, rows[::k]), "period": (rows % k, rows[:k]), "rows": (rows, rows)}[kind])
    (index_a, distinct_a), (index_r, distinct_r) = parts
    kept = len(distinct_a) + len(distinct_r)
    if kept > MAX_KEPT_FRACTION * 2 * N:
        return None
    index = torch.cat([index_a, len(distinct_a) + index_r])
    distinct = torch.cat([distinct_a, N + distinct_r])
    if kept % 2:
        distinct = torch.cat([distinct, distinct[-1:]])
    return RowLayout(index.to(device), distinct.to(device), distinct[index].to(device))
