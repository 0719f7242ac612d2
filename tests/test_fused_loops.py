"""The fused loops (torch_handler/recurrent/fused_loops.py) against the eager loops, element-wise.

The kernels are compiled twins of the rules' ``step`` / ``step_backward``: the same numbers up
to float32 rounding, for every cell type, batch size (one program and several), hidden size
(a padded tile and a full one), sequence length (several backward chunks) and every way the
outputs can be read (the sequence, the final state, both). Without a GPU they run in Triton's
interpreter: ``TRITON_INTERPRET=1`` must be set before the kernels are defined, so the cases
run in one child process and report back as JSON. On CUDA, the speed sweep's check section
compares the compiled kernels the same way (`sweep.py --device cuda --sections check`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_handler.recurrent.fused_loops as fused_loops
from torch_handler.additivity import tolerance_for

CASES = [
    # (cell, kwargs, T, B doubled rows, F, H, layers)
    ("LSTM", {}, 40, 6, 7, 20, 2),
    ("LSTM", {}, 17, 40, 5, 128, 1),
    ("LSTM", {"bidirectional": True}, 20, 4, 3, 16, 2),
    ("LSTM", {"bias": False}, 18, 34, 4, 24, 1),
    ("GRU", {}, 40, 6, 7, 20, 2),
    ("GRU", {"bias": False}, 17, 40, 5, 128, 1),
    ("RNN", {}, 40, 6, 7, 20, 2),
    ("RNN", {"nonlinearity": "relu"}, 33, 40, 5, 128, 1),
    ("GRU", {}, 16, 2, 3, 8, 2),  # below one tile column block, the shortest fused sequence, one pair
    # shap's layout (the actual half one row repeated): the forward runs on the distinct rows
    # (row_layout.py), the fused backward on every row's buffers
    ("LSTM", {"_repeat": True}, 20, 40, 5, 24, 2),
    ("GRU", {"_repeat": True}, 17, 40, 5, 24, 1),
]
READS = ("sequence", "final_state", "both")

CHILD = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    import torch_handler
    from torch_handler.recurrent import fused_loops

    from torch_handler.recurrent import row_layout

    calls = {"forward": 0, "backward_chunk": 0, "layouts": 0}
    detect = row_layout.detect
    def counted_detect(*a):
        layout = detect(*a)
        calls["layouts"] += layout is not None
        return layout
    row_layout.detect = counted_detect
    for name in ("forward", "backward_chunk"):
        original = getattr(fused_loops, name)
        def counted(*a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(*a, **k)
        setattr(fused_loops, name, counted)

    def explain(module, x, read, fused):
        os.environ["LSTM_DEEPSHAP_FUSED"] = "1" if fused else "0"
        x = x.clone().requires_grad_(True)
        with torch_handler.deeplift_mode(module):
            out, state = module(x)
            h_n = state[0] if isinstance(state, tuple) else state
            weights = torch.linspace(-1, 1, out.shape[-1])
            terms = {"sequence": (out * weights).sum(), "final_state": (h_n * weights[: h_n.shape[-1]]).sum()}
            terms["both"] = terms["sequence"] + terms["final_state"]
            (grad,) = torch.autograd.grad(terms[read], x)
        per_row = (out * weights).sum((0, 2)) if read != "final_state" else torch.zeros(x.shape[1])
        if read != "sequence":
            per_row = per_row + (h_n * weights[: h_n.shape[-1]]).sum((0, 2))
        return grad.detach(), per_row.detach()

    results = []
    for cell, kwargs, T, B, F, H, layers, read in json.loads(sys.argv[1]):
        torch.manual_seed(T * 1000 + B + H)
        repeat = kwargs.get("_repeat", False)
        module = getattr(nn, cell)(F, H, num_layers=layers, **{k: v for k, v in kwargs.items() if k != "_repeat"})
        x = torch.randn(T, B, F)
        if repeat:
            x[:, : B // 2] = x[:, :1].clone()
        before = dict(calls)
        g_fused, rows_fused = explain(module, x, read, True)
        used = {k: calls[k] - before[k] for k in calls}
        g_eager, rows_eager = explain(module, x, read, False)
        n = B // 2
        scale = float(rows_eager.abs().max())
        # DeepLIFT additivity on each pair: sum(grad * (x - x_ref)) = f(x) - f(x_ref)
        delta = (x[:, :n] - x[:, n:])
        contrib = (g_fused[:, :n] * delta).sum((0, 2))
        additivity = float((contrib - (rows_fused[:n] - rows_fused[n:])).abs().max()) / scale
        results.append({
            "case": [cell, kwargs, T, B, H, read], "used": used,
            "grad_diff": float((g_fused - g_eager).abs().max() / g_eager.abs().max()),
            "out_diff": float((rows_fused - rows_eager).abs().max()) / scale,
            "additivity": additivity,
        })
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreted_results():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.fail("these tests need Triton (pip install triton; CUDA builds of torch bring it)")
    cases = [[*case, read] for case in CASES for read in READS]
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {json.dumps(r["case"]): r for r in results}


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-T{c[2]}-B{c[3]}-H{c[5]}")
def test_fused_loops_match_the_eager_rule(interpreted_results, case, read):
    cell, kwargs, T, B, F, H, layers = case
    result = interpreted_results[json.dumps([cell, kwargs, T, B, H, read])]
    directions = 2 if kwargs.get("bidirectional") else 1
    # Every layer and direction ran the fused forward, and backward in at least one chunk each.
    assert result["used"]["forward"] == layers * directions
    assert result["used"]["backward_chunk"] >= layers * directions
    # shap's layout: every layer's forward ran on the distinct rows (none repeat elsewhere)
    assert result["used"]["layouts"] == (layers * directions if kwargs.get("_repeat") else 0)
    bar = tolerance_for(torch.float32)
    assert result["grad_diff"] <= bar, result
    assert result["out_diff"] <= bar, result
    assert result["additivity"] <= bar, result


def test_fused_loops_serve_only_what_they_compile():
    """Everything else takes the eager loop: a mask (packed sequences), a projection, a hidden
    size above one tile, a short sequence, float64, a CPU tensor outside the interpreter, the
    opt-out."""
    from torch_handler.recurrent.rules import GRURule, LSTMRule

    def weights(rule, H, proj=None):
        w_ih, w_hh = torch.randn(4 * H, 3), torch.randn(4 * H, proj or H)
        return rule.weights(w_ih, w_hh, None, None, torch.randn(proj, H) if proj else None)

    x = torch.randn(32, 4, 3)
    lstm = LSTMRule()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert fused_loops.enabled(lstm, weights(lstm, 8), x, None) is interpreted  # CPU: only interpreted
    gru = GRURule()
    gru_w = gru.weights(torch.randn(3 * 8, 3), torch.randn(3 * 8, 8), None, None)
    assert fused_loops.enabled(gru, gru_w, x.double(), None) is False
    assert fused_loops.enabled(lstm, weights(lstm, 8), x, torch.ones(32, 4, dtype=torch.bool)) is False
    assert fused_loops.enabled(lstm, weights(lstm, 8, proj=4), x, None) is False
    assert fused_loops.enabled(lstm, weights(lstm, fused_loops.MAX_HIDDEN + 1), x, None) is False
    assert fused_loops.enabled(lstm, weights(lstm, 8), x[: fused_loops.MIN_STEPS - 1], None) is False


def test_compilation_runs_in_the_background_and_failures_leave_the_eager_loop(monkeypatch):
    """The first call that could use a kernel variant starts its compilation in a background
    thread and gets the eager loop; once compiled, calls get the kernels; a failed compilation
    warns once and leaves that variant to the eager loop for good."""
    import threading

    from torch_handler.recurrent.rules import LSTMRule

    release = threading.Event()
    compiled = []
    real_compile = fused_loops._compile

    def slow_compile(key, rule, hidden, bias, device, done):
        release.wait(10)
        compiled.append(key)
        done.set()

    monkeypatch.setattr(fused_loops, "_COMPILED", {})
    monkeypatch.setattr(fused_loops, "_FAILED", {})
    monkeypatch.setattr(fused_loops, "_compile", slow_compile)
    rule = LSTMRule()
    weights = rule.weights(torch.randn(4 * 8, 3), torch.randn(4 * 8, 8), None, None)
    device = torch.device("cpu")
    assert fused_loops._compiled(rule, weights, device) is False  # started, not finished
    assert fused_loops._compiled(rule, weights, device) is False  # still compiling: eager
    assert fused_loops.wait(timeout=0.05) is False
    release.set()
    assert fused_loops.wait(timeout=10) is True
    assert fused_loops._compiled(rule, weights, device) is True
    assert len(compiled) == 1  # one compilation per variant, however many calls asked

    # The real compilation, run here on a device it cannot compile for: it warns, names the
    # fallback, and the variant stays with the eager loop.
    monkeypatch.setattr(fused_loops, "_compile", real_compile)
    other = rule.weights(torch.randn(4 * 16, 3), torch.randn(4 * 16, 16), None, None)
    key = ("LSTM", 16, False, device, *fused_loops._tiles())
    done = threading.Event()
    fused_loops._COMPILED[key] = done
    with pytest.warns(RuntimeWarning, match="eager loop"):
        real_compile(key, rule, 16, False, device, done)
    assert done.is_set() and key in fused_loops._FAILED
    assert fused_loops._compiled(rule, other, device) is False
