"""What does exactness cost? The DeepLIFT rule against native autograd, time and memory.

    python benchmarks/overhead.py --out out [--quick] [--device cuda]

1. One forward+backward through a 2-layer ``nn.LSTM`` on the doubled batch (2 x 64 rows,
   T = 100, F = 32, H = 128, float32): native autograd vs the same module inside
   ``torch_handler.deeplift_mode`` (``out, (h, c) = lstm(x); torch.autograd.grad(out.sum(), x)``).
   Median of interleaved repeats after warm-up.
2. A whole ``shap.DeepExplainer(model, background).shap_values(X)`` call (the LSTM + a Linear
   head on the last step) with ``torch_handler.register()`` vs without it (plain gradients,
   ``check_additivity=False``).
3. Peak memory of each variant, each in a fresh subprocess: on CPU the rise of the process's
   resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over its RSS
   just before the measured call; on CUDA ``torch.cuda.max_memory_allocated`` over the
   allocation before it.

Budget: forward+backward <= 2x native (aim 1.5x), shap_values <= 2x, peak
memory <= 1.5x. The numbers are reported, not asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

FULL = {"T": 100, "B": 64, "F": 32, "H": 128, "layers": 2, "background": 16, "repeats": 7,
        "warmup": 2, "shap_repeats": 5}
QUICK = {"T": 20, "B": 8, "F": 8, "H": 16, "layers": 2, "background": 4, "repeats": 2,
         "warmup": 1, "shap_repeats": 1}
BUDGET = {"forward_backward": 2.0, "shap_values": 2.0, "peak_memory": 1.5}


class LSTMRegressor(nn.Module):
    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(lstm.hidden_size, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def make_lstm(sizes: dict, device: torch.device, seed: int, batch_first: bool = False) -> nn.LSTM:
    torch.manual_seed(seed)
    # train() mode: no dropout, so the same function as eval(); on CUDA it lets cuDNN run
    # the native backward (cuDNN refuses RNN backward in eval mode).
    return nn.LSTM(sizes["F"], sizes["H"], num_layers=sizes["layers"],
                   batch_first=batch_first).to(device).train()


def forward_backward_fns(sizes: dict, device: torch.device, seed: int) -> dict:
    """``native`` and ``deeplift`` closures: one forward+backward of the doubled batch."""
    import torch_handler

    lstm = make_lstm(sizes, device, seed)
    x = torch.randn(sizes["T"], 2 * sizes["B"], sizes["F"], device=device, requires_grad=True)

    def native():
        out, (h, c) = lstm(x)
        return torch.autograd.grad(out.sum(), x)

    def deeplift():
        with torch_handler.deeplift_mode(lstm):
            out, (h, c) = lstm(x)
            return torch.autograd.grad(out.sum(), x)

    def forward_native():
        return lstm(x)

    def forward_deeplift():
        with torch_handler.deeplift_mode(lstm):
            return lstm(x)

    return {"native": native, "deeplift": deeplift, "forward_native": forward_native,
            "forward_deeplift": forward_deeplift}


def shap_fns(sizes: dict, samples: int, device: torch.device, seed: int) -> dict:
    """``plain`` / ``handler`` / ``handler_checked`` closures: one whole shap_values call."""
    import shap

    import torch_handler

    model = LSTMRegressor(make_lstm(sizes, device, seed, batch_first=True)).to(device).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (sizes["T"], sizes["F"])
    bg = torch.randn(sizes["background"], *shape, generator=generator).to(device)
    X = torch.randn(samples, *shape, generator=generator).to(device)

    def plain():
        torch_handler.unregister()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unrecognized nn.Module: LSTM"
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN: no backward in eval mode
                explainer = shap.DeepExplainer(model, bg)
                return explainer.shap_values(X, check_additivity=False), explainer

    def handler(check: bool = False):
        torch_handler.register()
        explainer = shap.DeepExplainer(model, bg)
        return explainer.shap_values(X, check_additivity=check), explainer

    return {"plain": plain, "handler": handler,
            "handler_checked": lambda: handler(check=True), "model": model, "X": X}


def additivity_error(model, X, result) -> float:
    """max_j |sum phi_j - (f(x_j) - E f(bg))| / max(|f(x_j)|, |E f|)."""
    import numpy as np

    phi, explainer = result
    with torch.no_grad():
        f = model(X).double().cpu().numpy()[:, 0]
    expected = float(np.asarray(explainer.expected_value).reshape(-1)[0])
    sums = np.asarray(phi).reshape(len(f), -1).sum(axis=1)
    return float(np.abs(sums - (f - expected)).max() / max(np.abs(f).max(), abs(expected)))


# --------------------------------------------------------------------------- memory


def memory_probe(variant: str, sizes: dict, samples: int, device: torch.device, seed: int) -> dict:
    """Run one variant once (after a warm-up call) and return its peak memory rise in bytes."""
    if variant in ("native", "deeplift"):
        fn = forward_backward_fns(sizes, device, seed)[variant]
    else:
        fn = shap_fns(sizes, samples, device, seed)[variant]
    fn()
    gc.collect()
    peak, method = common.peak_memory_rise(fn, device)
    return {"peak_bytes": peak, "method": method}


def measure_memory(variant: str, sizes: dict, samples: int, device: torch.device,
                   seed: int) -> dict:
    """``memory_probe`` in a fresh interpreter, so variants do not share allocator state."""
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        return {"peak_bytes": None, "method": "unavailable (no /proc/self/clear_refs)"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", variant,
           "--sizes", json.dumps(sizes), "--samples", str(samples), "--device", device.type,
           "--seed", str(seed), "--threads", str(torch.get_num_threads())]
    # Fixed glibc thresholds: every block >= 64 KiB is its own mmap, returned to the OS when
    # freed, so the RSS follows the live allocations (with the default dynamic threshold,
    # memory freed by the warm-up call stays resident and hides the measured call's peak).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"memory probe {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def run(out: str | Path = "out", samples: int = 4, device: str = "cpu", seed: int = 0,
        quick: bool = False, memory: bool = True) -> dict:
    dev = common.resolve_device(device)
    sizes = dict(QUICK if quick else FULL)
    print(f"overhead: 2-layer nn.LSTM, doubled batch 2x{sizes['B']}, T={sizes['T']}, "
          f"F={sizes['F']}, H={sizes['H']}, float32, {dev}; torch threads "
          f"{torch.get_num_threads()}; median of {sizes['repeats']} interleaved repeats after "
          f"{sizes['warmup']} warm-up")
    fb = forward_backward_fns(sizes, dev, seed)
    times = common.interleaved_times(fb, sizes["repeats"], sizes["warmup"], dev)
    t = {name: common.median(v) for name, v in times.items()}

    shap_calls = shap_fns(sizes, samples, dev, seed)
    timed = {k: shap_calls[k] for k in ("plain", "handler", "handler_checked")}
    shap_times = common.interleaved_times(timed, sizes["shap_repeats"], 1, dev)
    s = {name: common.median(v) for name, v in shap_times.items()}
    errors = {name: additivity_error(shap_calls["model"], shap_calls["X"], timed[name]())
              for name in ("plain", "handler")}

    mem = {}
    if memory:
        for variant in ("native", "deeplift", "plain", "handler"):
            mem[variant] = measure_memory(variant, sizes, samples, dev, seed)
    ratio = lambda a, b: (a / b) if (a is not None and b) else None  # noqa: E731
    mb = lambda v: None if v is None else v / 2**20  # noqa: E731

    rows = [
        ["forward+backward (s)", t["native"], t["deeplift"], ratio(t["deeplift"], t["native"]),
         f"<= {BUDGET['forward_backward']:g}x (aim 1.5x)"],
        ["forward only, grad enabled (s)", t["forward_native"], t["forward_deeplift"],
         ratio(t["forward_deeplift"], t["forward_native"]), "-"],
        [f"shap_values, {samples} samples, bg {sizes['background']} (s)", s["plain"],
         s["handler"], ratio(s["handler"], s["plain"]), f"<= {BUDGET['shap_values']:g}x"],
        ["shap_values + strict additivity check (s)", s["plain"], s["handler_checked"],
         ratio(s["handler_checked"], s["plain"]), "-"],
        ["shap additivity error (rel.)", errors["plain"], errors["handler"], "-", "-"],
    ]
    if memory:
        native, deeplift = (mem[k]["peak_bytes"] for k in ("native", "deeplift"))
        plain, handler = (mem[k]["peak_bytes"] for k in ("plain", "handler"))
        rows += [
            ["peak memory rise, forward+backward (MiB)", mb(native), mb(deeplift),
             ratio(deeplift, native), f"<= {BUDGET['peak_memory']:g}x"],
            ["peak memory rise, shap_values (MiB)", mb(plain), mb(handler), ratio(handler, plain),
             f"<= {BUDGET['peak_memory']:g}x"],
        ]
    print(common.table(["measure", "native / no handler", "DeepLIFT rule / handler", "ratio",
                        "budget"], rows))
    if memory:
        print(f"memory: {mem['native']['method']}, one fresh process per variant")
    result = {
        "benchmark": "overhead",
        "sizes": sizes,
        "samples": samples,
        "device": str(dev),
        "machine": common.machine(),
        "forward_backward_seconds": times,
        "forward_backward_median": t,
        "forward_backward_ratio": ratio(t["deeplift"], t["native"]),
        "forward_ratio": ratio(t["forward_deeplift"], t["forward_native"]),
        "shap_values_seconds": shap_times,
        "shap_values_median": s,
        "shap_values_ratio": ratio(s["handler"], s["plain"]),
        "shap_values_checked_ratio": ratio(s["handler_checked"], s["plain"]),
        "shap_additivity_error": errors,
        "memory": mem,
        "memory_ratio_forward_backward": ratio(mem["deeplift"]["peak_bytes"],
                                               mem["native"]["peak_bytes"]) if memory else None,
        "memory_ratio_shap_values": ratio(mem["handler"]["peak_bytes"],
                                          mem["plain"]["peak_bytes"]) if memory else None,
        "budget": BUDGET,
    }
    path = common.write_json(out, "overhead", result)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0], "samples in the shap_values call", 4)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one variant
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    if args.memory_probe:
        dev = common.resolve_device(args.device)
        print(json.dumps(memory_probe(args.memory_probe, json.loads(args.sizes), args.samples,
                                      dev, args.seed)))
        return 0
    run(args.out, args.samples, args.device, args.seed, args.quick, memory=not args.no_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
