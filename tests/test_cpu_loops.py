"""The compiled CPU loops (torch_handler/recurrent/cpu_loops.py, cpu_kernels.c) against the eager rule.

The C functions are twins of the rules' ``step``, ``coefficients`` + ``step_factors`` and
``step_backward`` (every cell type): the same numbers up to rounding, checked
element-wise here for every cell type, both dtypes, one pair and several (one thread and a
team of threads), hidden sizes that fill the vectors and sizes that leave tails, backward
chunks that start mid-sequence, output multipliers dense, expanded (stride 0) and absent, and
inputs that saturate the gates or make a pair's halves equal. Whole explanations then match
``LSTM_DEEPSHAP_FUSED=0`` (the eager loops) and keep additivity. How the library is built,
cached and loaded: tests/test_cpu_cache.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import relative
from torch import nn

import torch_handler
from torch_handler.additivity import tolerance_for
from torch_handler.recurrent import cpu_kernels, fused_loops
from torch_handler.recurrent.function import _forward_loop
from torch_handler.recurrent.rules import GRURule, LSTMRule, RNNRule

RULES = {"LSTM": LSTMRule, "GRU": GRURule, "RNN": lambda: RNNRule("tanh"), "RNN-relu": lambda: RNNRule("relu")}
SHAPES = [(1, 128), (3, 37), (5, 20), (32, 64)]  # (pairs, hidden): one pair, tails, a full team


pytestmark = pytest.mark.usefixtures("compiled_library")


def bar(dtype: torch.dtype) -> float:
    return tolerance_for(dtype)


def layer(kind: str, pairs: int, hidden: int, dtype: torch.dtype, steps: int = 9, features: int = 3, scale=1.0):
    """A rule, its weights, an input and initial states for a doubled batch of ``pairs``."""
    torch.manual_seed(pairs * 100 + hidden)
    rule = RULES[kind]()
    gates = {"LSTM": 4, "GRU": 3}.get(kind, 1) * hidden
    w = lambda *shape: (torch.randn(*shape, dtype=dtype) / shape[-1] ** 0.5)  # noqa: E731
    weights = rule.weights(w(gates, features), w(gates, hidden), w(gates), w(gates))
    x = torch.randn(steps, 2 * pairs, features, dtype=dtype) * scale
    state0 = tuple(torch.randn(2 * pairs, hidden, dtype=dtype) for _ in range(2 if kind == "LSTM" else 1))
    return rule, weights, x, state0


def eager_forward(rule, weights, x, state0):
    buffers = rule.forward_buffers(weights, x)
    _forward_loop(rule, weights, buffers, None, state0, rule.step_workspace(weights, x))
    return buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pairs,hidden", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["moderate", "saturating"])
@pytest.mark.parametrize("kind", list(RULES))
def test_forward_matches_the_step_loop(threads, kind, dtype, pairs, hidden, scale):
    rule, weights, x, state0 = layer(kind, pairs, hidden, dtype, scale=scale)
    expected = eager_forward(rule, weights, x, state0)
    buffers = rule.forward_buffers(weights, x)
    final = cpu_kernels.forward(rule, weights, buffers, state0)
    for got, want in zip(buffers, expected, strict=True):
        assert relative(got, want) <= bar(dtype)
    assert torch.equal(final[0], buffers[-1][-1])
    if kind == "LSTM":
        assert torch.equal(final[1], buffers[1][-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pairs,hidden", SHAPES)
@pytest.mark.parametrize("t0", [0, 4])
@pytest.mark.parametrize("kind", list(RULES))
def test_factors_match_the_rule(threads, kind, dtype, pairs, hidden, t0):
    rule, weights, x, state0 = layer(kind, pairs, hidden, dtype, scale=4.0)
    buffers = eager_forward(rule, weights, x, state0)
    pre, n = buffers[0], pairs
    # Halves equal (Δ = 0: the derivative limit), nearly equal (the series branch) and
    # saturated (σ = 0 or 1 in float32) in the first columns of every gate block.
    for block in range(pre.shape[-1] // hidden):
        cols = slice(block * hidden, block * hidden + hidden)
        part = pre[..., cols]
        part[:, n:, : hidden // 3] = part[:, :n, : hidden // 3]
        part[:, n:, hidden // 3 : 2 * hidden // 3] = part[:, :n, hidden // 3 : 2 * hidden // 3] * (1 + 1e-6)
        part[:, :, -2:] = torch.tensor([60.0, -60.0], dtype=dtype)
    if kind == "RNN-relu":  # both signs of a relu pair, and a pair straddling 0
        pre[:, :n, 0], pre[:, n:, 0] = 1.5, -0.5
    want = rule.step_factors(weights, rule.coefficients(weights, buffers, state0, t0, x.shape[0]))
    got = cpu_kernels.step_factors(rule, weights, buffers, state0, t0, x.shape[0], torch.arange(x.shape[1]))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert relative(g, w) <= bar(dtype)


def eager_backward(rule, weights, factors, m_state, m_z, grad_out, t0, t1):
    """The eager loop of function.py for one chunk, on copies."""
    m_h, m_rest = m_state[0].clone(), tuple(m.clone() for m in m_state[1:])
    steps = tuple(zip(*(f.unbind(0) for f in factors), strict=True))
    two, N = m_h.shape[:2]
    m_z_steps = m_z.view(m_z.shape[0], two, N, -1).unbind(0)
    for t in reversed(range(t0, t1)):
        grad_prev = grad_out[t - 1] if grad_out is not None and t > 0 else None
        m_h, m_rest = rule.step_backward(weights, steps[t - t0], m_h, m_rest, m_z_steps[t - t0], grad_prev)
        m_rest = tuple(m.clone() for m in m_rest)
    return m_h, m_rest


@pytest.mark.parametrize("grads", ["dense", "expanded", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pairs,hidden", SHAPES)
@pytest.mark.parametrize("kind", list(RULES))
def test_backward_chunks_match_the_step_loop(threads, kind, dtype, pairs, hidden, grads):
    rule, weights, x, state0 = layer(kind, pairs, hidden, dtype)
    buffers = eager_forward(rule, weights, x, state0)
    T, B = x.shape[:2]
    grad_out = {"dense": torch.randn(T, B, hidden, dtype=dtype),
                "expanded": torch.ones((), dtype=dtype).expand(T, B, hidden), "none": None}[grads]
    width = rule.side_width(weights)
    m_state = [torch.randn(2, pairs, hidden, dtype=dtype) for _ in state0]
    for t0, t1 in ((4, T), (0, 4)):  # the last chunk, then the first: as backward runs them
        factors = rule.step_factors(weights, rule.coefficients(weights, buffers, state0, t0, t1))
        m_z_want = torch.zeros(t1 - t0, B, width, dtype=dtype)
        m_h_want, m_rest_want = eager_backward(rule, weights, factors, m_state, m_z_want, grad_out, t0, t1)
        m_z = torch.zeros(t1 - t0 + 2, B, width, dtype=dtype)  # larger than the chunk, as in function.py
        m_h, m_rest = m_state[0].clone(), tuple(m.clone() for m in m_state[1:])
        cpu_kernels.backward_chunk(rule, weights, factors, m_h, m_rest, m_z, grad_out, t0, t1)
        assert relative(m_z[: t1 - t0], m_z_want) <= bar(dtype)
        assert relative(m_h, m_h_want) <= bar(dtype)
        for got, want in zip(m_rest, m_rest_want, strict=True):
            assert relative(got, want) <= bar(dtype)
        m_state = [m_h, *m_rest]


MODELS = [
    ("LSTM", {}, 2), ("LSTM", {"bidirectional": True}, 6), ("LSTM", {"bias": False}, 64),
    ("GRU", {}, 2), ("GRU", {}, 16), ("RNN", {}, 6), ("RNN", {"nonlinearity": "relu"}, 16),
]


def explain(module, x):
    x = x.clone().requires_grad_(True)
    with torch_handler.deeplift_mode(module):
        out, _ = module(x)
        weights = torch.linspace(-1, 1, out.shape[-1], dtype=x.dtype)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return grad, (out * weights).sum((0, 2)).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell,kwargs,rows", MODELS, ids=lambda v: str(v))
def test_explanations_match_the_eager_loops(threads, monkeypatch, cell, kwargs, rows, dtype):
    torch.manual_seed(rows)
    module = getattr(nn, cell)(5, 24, num_layers=2, **kwargs).to(dtype)
    x = torch.randn(30, rows, 5, dtype=dtype)
    calls = {"forward": 0, "backward_chunk": 0}

    def counting(name, original):
        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return call

    monkeypatch.setenv(fused_loops.ENV, "1")  # the compiled loops
    with monkeypatch.context() as patch:
        for name in calls:
            patch.setattr(cpu_kernels, name, counting(name, getattr(cpu_kernels, name)))
        grad, per_row = explain(module, x)
    monkeypatch.setenv(fused_loops.ENV, "0")  # the eager loops
    grad_eager, per_row_eager = explain(module, x)
    layers = 2 * (2 if kwargs.get("bidirectional") else 1)
    assert calls["backward_chunk"] >= layers  # every layer's backward ran compiled
    assert calls["forward"] == layers
    assert relative(grad, grad_eager) <= bar(dtype)
    n = rows // 2
    contributions = (grad[:, :n] * (x[:, :n] - x[:, n:])).sum((0, 2))
    assert relative(contributions, per_row[:n] - per_row[n:]) <= bar(dtype)


def test_the_loops_serve_only_what_they_compile(monkeypatch):
    """Everything else takes the eager loop: a GPU tensor, half precision, a packed-sequence
    mask, an LSTM projection, more rows than MAX_ROWS with weights above MAX_WEIGHT_BYTES, the
    opt-out."""
    rule, weights, x, _ = layer("LSTM", 1, 8, torch.float32)
    cpu = torch.device("cpu")
    assert cpu_kernels.enabled(rule, weights, 2, cpu, torch.float32, None) is True
    assert cpu_kernels.enabled(rule, weights, 2, torch.device("cuda"), torch.float32, None) is False
    assert cpu_kernels.enabled(rule, weights, 2, cpu, torch.float16, None) is False
    assert cpu_kernels.enabled(rule, weights, 2, cpu, torch.float32, torch.ones(9, 2, dtype=torch.bool)) is False
    assert cpu_kernels.enabled(rule, weights, 4096, cpu, torch.float32, None) is True  # small weights: any batch
    big = layer("LSTM", 1, 512, torch.float32)[1]  # 4 MiB of recurrent weights
    assert big.w_hh.numel() * 4 > cpu_kernels.MAX_WEIGHT_BYTES
    assert cpu_kernels.enabled(rule, big, cpu_kernels.MAX_ROWS, cpu, torch.float32, None) is True
    assert cpu_kernels.enabled(rule, big, cpu_kernels.MAX_ROWS + 2, cpu, torch.float32, None) is False
    projected = rule.weights(torch.randn(32, 3), torch.randn(32, 4), None, None, torch.randn(4, 8))
    assert cpu_kernels.enabled(rule, projected, 2, cpu, torch.float32, None) is False
    monkeypatch.setenv(fused_loops.ENV, "0")
    assert cpu_kernels.enabled(rule, weights, 2, cpu, torch.float32, None) is False


def test_short_sequences_are_one_backward_chunk(monkeypatch):
    """A window of a few steps is one chunk (chunks of one or two steps cost more in calls than
    in arithmetic) unless it is large; longer sequences keep the cache-sized chunks; the
    attributions are the same either way."""
    from torch_handler.recurrent import function

    assert function.chunk_steps(8, 256, 160) == 8  # the demo's window, Captum's 8 x 32 pairs
    assert function.chunk_steps(8, 4096, 160) == 1  # too large: a step at a time
    assert function.chunk_steps(100, 8, 640) == 25  # a longer sequence: a quarter
    assert function.chunk_steps(50, 256, 320) == 3
    torch.manual_seed(0)
    model = nn.LSTM(3, 16, batch_first=True).double()
    x, r = torch.randn(4, 8, 3, dtype=torch.float64), torch.randn(4, 8, 3, dtype=torch.float64)

    def multipliers():
        batch = torch.cat([x, r]).requires_grad_()
        with torch_handler.deeplift_mode(model):
            out, _ = model(batch)
            return torch.autograd.grad(out[:4].sum(), batch)[0]

    whole = multipliers()
    monkeypatch.setattr(function, "SHORT_SEQUENCE_STEPS", 0)
    monkeypatch.setattr(function, "CHUNK_ELEMENTS", 2 * 4 * 16 * 4)  # two steps a chunk
    assert function.chunk_steps(8, 4, 64) == 2
    assert relative(whole, multipliers()) <= 1e-14
