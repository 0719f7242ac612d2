"""The engines' paths' own cost: shap and Captum with the library against the engine alone.

    python benchmarks/engine_paths.py --out out --threads 1 [--repeats 9] [--quick]

For three models, each explained for 8 samples against 32 background rows, float32, CPU:

* ``demo``: the demo's forecaster (``torch_handler.demo.Forecaster``: nn.LSTM(6, 32) + Linear,
  window 8), untrained weights (the time does not depend on them);
* ``lstm2``: a 2-layer LSTM classifier (T 50, F 16, H 64, Linear head on the last step, 2 classes);
* ``mha``: a GRU -> LayerNorm -> MultiheadAttention -> GELU MLP forecaster (T 24, F 8, H 32,
  4 heads, mean over time, one output).

Variants, timed as users run them (the explainer built and called each time):

* shap plain: ``shap.DeepExplainer(model, bg).shap_values(X, check_additivity=False)`` without
  ``register()`` (shap's engine alone; inexact through recurrent layers);
* shap + lib: the same after ``torch_handler.register()`` with the default additivity check;
* Captum alone: ``DeepLiftShap(model).attribute(X, baselines=bg, target=0)``;
* Captum + lib: the same inside ``torch_handler.deeplift_mode(model)``.

Steady state: median of interleaved repeats after warm-up, in one process: at least
``--repeats``, and as many as take about a second of the model's slowest variant (up to 200:
the demo's calls take a few milliseconds, and seven of them sample 50 ms of a VM whose speed
wanders within seconds). First call: each
lib variant's first call in a fresh interpreter whose ``LSTM_DEEPSHAP_CACHE`` is an empty
temporary folder (so the compiled CPU loops are not on disk; shap / Captum already imported, as
a user's script does before it explains), minus that process's steady state (measured once
the compiled loops are built).

MultiheadAttention's interception: forward+backward of the doubled batch (``--mha-rows``
inputs + as many references) of the ``mha`` model with the recurrent rules only (interception switched off,
as in ``benchmarks/whole_models.py``) against the full ``deeplift_mode``; median of ten times
``--repeats`` interleaved steps (at least 50). For comparison, the last column: the same with
MultiheadAttention stepped into call by call (as every form other than its plain one is), not
run as one call (``torch_handler/ops/interception/attention_block.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from whole_models import _recurrent_rules_only  # noqa: E402  (interception off, as measured there)

SAMPLES, BACKGROUND = 8, 32
SECONDS_PER_VARIANT, MAX_REPEATS = 1.0, 200
TARGETS = {"shap + lib": 1.3, "Captum + lib": 1.3, "MHA interception": 1.3, "first call (s)": 1.0}


class LSTMClassifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class AttentionForecaster(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, 1))

    def forward(self, x):
        h, _ = self.gru(x)
        h = self.norm(h)
        context, _ = self.attention(h, h, h, need_weights=False)
        return self.mlp(context.mean(dim=1))


def make(name: str, seed: int = 0):
    """(model, X (SAMPLES, T, F), background (BACKGROUND, T, F)), float32, eval mode."""
    from torch_handler import demo

    torch.manual_seed(seed)
    if name == "demo":
        model, shape = demo.Forecaster(len(demo.FEATURES)), (demo.WINDOW, len(demo.FEATURES))
    elif name == "lstm2":
        model, shape = LSTMClassifier(), (50, 16)
    elif name == "mha":
        model, shape = AttentionForecaster(), (24, 8)
    else:
        raise ValueError(f"unknown model {name!r}")
    g = torch.Generator().manual_seed(seed + 1)
    return model.eval(), torch.randn(SAMPLES, *shape, generator=g), torch.randn(BACKGROUND, *shape, generator=g)


MODELS = ("demo", "lstm2", "mha")


def variants(model, X, bg) -> dict:
    import shap
    from captum.attr import DeepLiftShap

    import torch_handler

    def shap_plain():
        torch_handler.unregister()
        return shap.DeepExplainer(model, bg).shap_values(X, check_additivity=False)

    def shap_lib():
        torch_handler.register()
        try:
            return shap.DeepExplainer(model, bg).shap_values(X)
        finally:
            torch_handler.unregister()

    def captum_alone():
        return DeepLiftShap(model).attribute(X, baselines=bg, target=0)

    def captum_lib():
        with torch_handler.deeplift_mode(model):
            return DeepLiftShap(model).attribute(X, baselines=bg, target=0)

    return {"shap plain": shap_plain, "shap + lib": shap_lib, "Captum alone": captum_alone,
            "Captum + lib": captum_lib}


def mha_fns(rows: int, seed: int) -> dict:
    import torch_handler

    model, X, bg = make("mha", seed)
    g = torch.Generator().manual_seed(seed + 2)
    doubled = torch.randn(2 * rows, *X.shape[1:], generator=g)

    def step():
        x = doubled.clone().requires_grad_()
        torch.autograd.grad(model(x)[:, 0].sum(), x)

    def recurrent_only():
        with _recurrent_rules_only(), torch_handler.deeplift_mode(model):
            step()

    def full():
        with torch_handler.deeplift_mode(model):
            step()

    def stepped_into():
        # For comparison: MultiheadAttention stepped into call by call, as any form other than
        # the plain one is (a benchmark-only patch: the plain-form reader declines).
        from torch_handler.ops.interception import attention_block

        with mock.patch.object(attention_block, "read", lambda *args: None):
            full()

    return {"native": step, "recurrent only": recurrent_only, "deeplift_mode": full,
            "MHA stepped into": stepped_into}


def first_call_probe(name: str, variant: str, repeats: int, seed: int) -> dict:
    """In this (fresh) process: the first call of ``variant`` and its steady state after."""
    model, X, bg = make(name, seed)
    fn = variants(model, X, bg)[variant]
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    from torch_handler.recurrent import cpu_loops

    built = cpu_loops.wait(120)  # the steady state is with the compiled loops, as every later call
    fn()
    steady = common.median([common.timed(fn, torch.device("cpu")) for _ in range(repeats)])
    return {"first": first, "steady": steady, "compiled_loops": built}


def first_call(name: str, variant: str, repeats: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lstm-deepshap-cache-") as cache:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", f"{name}:{variant}",
               "--repeats", str(repeats), "--seed", str(seed), "--threads", str(torch.get_num_threads())]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env=dict(os.environ, LSTM_DEEPSHAP_CACHE=cache))
    if done.returncode:
        raise RuntimeError(f"first-call probe {name}:{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out="out", repeats: int = 9, seed: int = 0, quick: bool = False, first: bool = True,
        mha_rows: int = 32) -> dict:
    threads = torch.get_num_threads()
    print(f"engine_paths: {SAMPLES} samples, {BACKGROUND} background rows, float32, CPU, torch "
          f"threads {threads}, median of at least {repeats} interleaved repeats after 2 warm-up (as "
          f"many as take {SECONDS_PER_VARIANT:g} s of the slowest variant); load average "
          f"{os.getloadavg()[0]:.2f}")
    rows, raw, repeats_of = [], {}, {}
    for name in MODELS:
        model, X, bg = make(name, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shap alone: "unrecognized nn.Module"
            fns = variants(model, X, bg)
            probe = common.interleaved_times(fns, 1, 2, torch.device("cpu"))
            # A few-millisecond call timed 7 times is a median of 50 ms of a VM whose speed
            # wanders by 2x within seconds: small models get more repeats.
            n = max(repeats, min(MAX_REPEATS, math.ceil(SECONDS_PER_VARIANT / max(max(v) for v in probe.values()))))
            times = common.interleaved_times(fns, n, 0, torch.device("cpu"))
        t = {k: common.median(v) for k, v in times.items()}
        repeats_of[name] = n
        raw[name] = times
        firsts = {}
        if first:
            for variant in ("shap + lib", "Captum + lib"):
                firsts[variant] = first_call(name, variant, max(3, repeats // 3), seed)
        for engine, alone, lib in (("shap", "shap plain", "shap + lib"),
                                   ("Captum", "Captum alone", "Captum + lib")):
            f = firsts.get(lib)
            rows.append({
                "model": name, "engine": engine, "alone (ms)": 1e3 * t[alone],
                "+ lib (ms)": 1e3 * t[lib], "ratio": t[lib] / t[alone],
                "target": f"<= {TARGETS[lib]}x",
                "first call (s)": None if f is None else f["first"],
                "first - steady (s)": None if f is None else f["first"] - f["steady"],
            })
    print(common.table(list(rows[0]), [list(r.values()) for r in rows]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A step takes 10-20 ms, the engines' calls 10-500 ms: ten times their repeats (at least
        # 50) give a median as steady as theirs on a shared VM.
        mt = common.interleaved_times(mha_fns(mha_rows, seed), max(10 * repeats, 50), 5, torch.device("cpu"))
    m = {k: 1e3 * common.median(v) for k, v in mt.items()}
    mha = {"native (ms)": m["native"], "recurrent rules only (ms)": m["recurrent only"],
           "deeplift_mode (ms)": m["deeplift_mode"],
           "interception": f"{100 * (m['deeplift_mode'] / m['recurrent only'] - 1):+.0f} %",
           "target": "<= +30 %",
           "MHA stepped into": f"{100 * (m['MHA stepped into'] / m['recurrent only'] - 1):+.0f} %"}
    print(f"\nMultiheadAttention interception, mha model, fwd+bwd of the doubled batch "
          f"{mha_rows} + {mha_rows} rows")
    print(common.table(list(mha), [list(mha.values())]))
    result = {"benchmark": "engine_paths", "rows": rows, "mha": mha, "raw": raw, "mha_raw": mt,
              "repeats": repeats_of, "machine": common.machine()}
    print(f"wrote {common.write_json(out, f'engine_paths_{threads}threads', result)}")
    return result


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0], "(unused)", SAMPLES)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-first", action="store_true", help="skip the fresh-process first calls")
    parser.add_argument("--mha-rows", type=int, default=32)
    parser.add_argument("--probe", help=argparse_suppress())
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    if args.probe:
        name, variant = args.probe.split(":", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(first_call_probe(name, variant, args.repeats, args.seed)))
        return 0
    run(args.out, 3 if args.quick else args.repeats, args.seed, args.quick, not args.no_first,
        args.mha_rows)
    return 0


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
