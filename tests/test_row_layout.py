"""A recurrent layer's forward once per distinct row of the doubled batch
(torch_handler/recurrent/row_layout.py), and the backward that skips an idle reference half.

The engines' doubled batches repeat rows (shap: one input S times; Captum's DeepLiftShap and
deep_shap: n inputs S times each and S references n times over). The layout is detected on
the layer's own input and states, exactly; the compiled factor kernels then read the distinct
rows through a row map, with each row's exponentials computed once: the same bits as
computing them per pair. Explanations with and without it agree to rounding, and a model that
reorders rows before the layer gets a correct layout or none.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_handler
from torch_handler.recurrent import cpu_kernels, row_layout
from torch_handler.recurrent.rules import GRURule, LSTMRule, RNNRule

RULES = {"LSTM": LSTMRule, "GRU": GRURule, "RNN": lambda: RNNRule("tanh"), "RNN-relu": lambda: RNNRule("relu")}


pytestmark = pytest.mark.usefixtures("compiled_library")


def doubled(xs: torch.Tensor, refs: torch.Tensor, pattern: str) -> torch.Tensor:
    """A time-major doubled batch (T, 2N, I) laid out as an engine lays it out."""
    if pattern == "shap":  # one input, S references
        actual, reference = xs[:, :1].expand(-1, refs.shape[1], -1), refs
    else:  # "deep_shap": n inputs x S references (Captum's DeepLiftShap too)
        n, s = xs.shape[1], refs.shape[1]
        actual, reference = xs.repeat_interleave(s, 1), refs.repeat(1, n, 1)
    return torch.cat([actual, reference], 1).contiguous()


@pytest.mark.parametrize("pattern,n,s,kept", [("shap", 1, 8, 10), ("deep_shap", 3, 4, 8), ("deep_shap", 5, 3, 8),
                                              ("deep_shap", 4, 1, 6)])
def test_the_engines_layouts_are_found_and_rebuild_the_batch(pattern, n, s, kept):
    torch.manual_seed(0)
    x = doubled(torch.randn(6, n, 3), torch.randn(6, s, 3), pattern)
    states = (torch.zeros(x.shape[1], 5),)
    layout = row_layout.detect(x, states)
    assert layout is not None
    assert layout.distinct.numel() == kept  # distinct rows, padded to an even count
    compact_x, compact_states = layout.compact(x, states)
    assert torch.equal(compact_x.index_select(1, layout.index), x)
    assert torch.equal(compact_states[0].index_select(0, layout.index), states[0])


def test_no_layout_where_rows_do_not_repeat_or_the_states_differ():
    torch.manual_seed(1)
    assert row_layout.detect(torch.randn(5, 8, 3), (torch.zeros(8, 4),)) is None
    x = doubled(torch.randn(5, 2, 3), torch.randn(5, 4, 3), "deep_shap")
    assert row_layout.detect(x, (torch.zeros(16, 4),)) is not None
    assert row_layout.detect(x, (torch.randn(16, 4),)) is None  # states that do not repeat
    # a run broken in its middle is not a run
    broken = x.clone()
    broken[:, 2, 0] += 1
    layout = row_layout.detect(broken, ())
    assert layout is None or torch.equal(layout.compact(broken, ())[0].index_select(1, layout.index), broken)


def full_scan(halves):
    """The patterns from every step's rows at once (what detect did before it looked at the
    first step first)."""
    same_as_first = row_layout._same_as_first(halves)
    return tuple(row_layout._pattern(halves[:, k], same_as_first[k], scanned=True) for k in (0, 1))


def test_the_first_step_proposes_and_the_full_scan_decides():
    # One-hot rows and a few distinct values make rows equal at the first step but not later:
    # the layout must be the full scan's in every case, and it must rebuild the batch.
    generator = torch.Generator().manual_seed(3)
    found = set()
    for case in range(600):
        T, n, s = 1 + case % 4, 1 + case % 5, 1 + (case // 5) % 6
        x = torch.randint(0, 2, (T, n, 2), generator=generator).float()
        r = torch.randint(0, 2, (T, s, 2), generator=generator).float()
        batch = doubled(x, r, "deep_shap")
        if case % 3 == 0:  # a layout broken after the first step
            batch[-1, torch.randint(0, batch.shape[1], (1,), generator=generator), 0] += 1
        halves = batch.reshape(T, 2, batch.shape[1] // 2, -1)
        patterns = row_layout._patterns(halves)
        assert patterns == full_scan(halves), (case, T, n, s)
        found.update(kind for kind, _ in patterns)
        layout = row_layout.detect(batch, ())
        if layout is not None:
            assert torch.equal(layout.compact(batch, ())[0].index_select(1, layout.index), batch)
    assert found == {"runs", "period", "rows"}  # every branch was taken
    # every row equal at the first step, and not later: not one run
    same_start = torch.randn(4, 8, 3, generator=generator)
    same_start[0] = same_start[0, :1]
    halves = same_start.reshape(4, 2, 4, 3)
    assert row_layout._patterns(halves) == full_scan(halves) == (("rows", 4), ("rows", 4))


def layer(kind, dtype, x, hidden=20):
    torch.manual_seed(7)
    rule = RULES[kind]()
    gates = {"LSTM": 4, "GRU": 3}.get(kind, 1) * hidden
    w = lambda *shape: torch.randn(*shape, dtype=dtype) / shape[-1] ** 0.5  # noqa: E731
    weights = rule.weights(w(gates, x.shape[-1]), w(gates, hidden), w(gates), w(gates))
    state0 = tuple(torch.zeros(x.shape[1], hidden, dtype=dtype) for _ in range(2 if kind == "LSTM" else 1))
    return rule, weights, state0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(RULES))
def test_factors_from_the_distinct_rows_are_the_factors_of_every_row_bit_for_bit(kind, dtype):
    torch.manual_seed(2)
    x = doubled(torch.randn(7, 3, 4, dtype=dtype) * 3, torch.randn(7, 5, 4, dtype=dtype) * 3, "deep_shap")
    rule, weights, state0 = layer(kind, dtype, x)
    layout = row_layout.detect(x, state0)
    assert layout is not None and layout.distinct.numel() < x.shape[1]
    full = rule.forward_buffers(weights, x)
    cpu_kernels.forward(rule, weights, full, state0)
    compact_x, compact_state0 = layout.compact(x, state0)
    compact = rule.forward_buffers(weights, compact_x)
    cpu_kernels.forward(rule, weights, compact, compact_state0)
    # the same forward values on every row: the compact buffers, expanded
    expanded = tuple(b.index_select(1, layout.index) for b in compact)
    expanded_state0 = tuple(s.index_select(0, layout.index) for s in compact_state0)
    every_row = torch.arange(x.shape[1])
    for t0, t1 in ((3, 7), (0, 3)):
        got = cpu_kernels.step_factors(rule, weights, compact, compact_state0, t0, t1, layout.index)
        same = cpu_kernels.step_factors(rule, weights, expanded, expanded_state0, t0, t1, every_row)
        assert all(torch.equal(a, b) for a, b in zip(got, same, strict=True))
        # against the full forward: the input projection of fewer rows may round differently
        want = cpu_kernels.step_factors(rule, weights, full, state0, t0, t1, every_row)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(RULES))
def test_an_idle_reference_half_is_skipped_without_changing_the_actual_half(kind, dtype):
    torch.manual_seed(3)
    x = torch.randn(6, 10, 4, dtype=dtype)
    rule, weights, state0 = layer(kind, dtype, x)
    buffers = rule.forward_buffers(weights, x)
    cpu_kernels.forward(rule, weights, buffers, state0)
    T, B, H = buffers[-1].shape
    grad_out = torch.randn(T, B, H, dtype=dtype)
    grad_out[:, B // 2 :] = 0
    results = {}
    for halves in (2, 1):
        m_state = [torch.zeros(2, B // 2, H, dtype=dtype) for _ in state0]
        m_state[0][0] = torch.randn(B // 2, H, dtype=dtype, generator=torch.Generator().manual_seed(4))
        m_z = torch.zeros(T, B, rule.side_width(weights), dtype=dtype)
        factors = cpu_kernels.step_factors(rule, weights, buffers, state0, 0, T, torch.arange(B))
        cpu_kernels.backward_chunk(rule, weights, factors, m_state[0], tuple(m_state[1:]), m_z, grad_out, 0, T, halves)
        results[halves] = (m_state, m_z)
    (state2, z2), (state1, z1) = results[2], results[1]
    assert torch.equal(z1[:, : B // 2], z2[:, : B // 2])
    for a, b in zip(state1, state2, strict=True):
        assert torch.equal(a, b)  # the reference half: zero in both
    assert not z2[:, B // 2 :].any()


class Classifier(nn.Module):
    def __init__(self, cell="LSTM"):
        super().__init__()
        self.rnn = getattr(nn, cell)(4, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Flipped(Classifier):
    """Reorders the batch before the layer: the engines' layout is not the layer's."""

    def forward(self, x):
        out, _ = self.rnn(x.flip(0))
        return self.head(out.flip(0)[:, -1])


@pytest.mark.parametrize("model_class", [Classifier, Flipped])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_explanations_with_the_distinct_rows_equal_those_without(monkeypatch, model_class, cell):
    torch.manual_seed(5)
    model = model_class(cell).double().eval()
    x, refs = torch.randn(3, 9, 4, dtype=torch.float64), torch.randn(4, 9, 4, dtype=torch.float64)
    found = []
    detect = row_layout.detect
    monkeypatch.setattr(row_layout, "detect", lambda *a: found.append(detect(*a)) or found[-1])
    with_layout = torch_handler.deep_shap(model, x, refs, outputs="all", progress=False)
    assert any(layout is not None for layout in found)
    monkeypatch.setattr(row_layout, "detect", lambda *a: None)
    without = torch_handler.deep_shap(model, x, refs, outputs="all", progress=False)
    torch.testing.assert_close(with_layout, without, rtol=0, atol=1e-12)
