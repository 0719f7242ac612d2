"""The DeepLIFT rule against native autograd over module x batch x threads (x device).

    python benchmarks/sweep.py --out out [--modules lstm,gru] [--batches 2,128] [--threads 1]
                               [--device cpu|cuda|all] [--seconds 4] [--quick]
                               [--sections grid,long,calls,memory,check]

One forward+backward of a 2-layer recurrent module (T = 100, F = 32, H = 128, float32) on a
doubled batch of ``B`` rows (B / 2 inputs and their references), ``x`` requiring grad:
``out, _ = module(x); torch.autograd.grad(out.sum(), x)``, natively and inside
``torch_handler.deeplift_mode(module)``. The two alternate (native, rule, rule, native, ...)
so that load from other processes hits both alike; each pair gives one ratio rule / native,
and the table reports the median ratio with the range of the per-pair ratios, and the median
milliseconds of each. Every cell gets one warm-up call of each variant (its cost, the
first-call time, is reported separately in the JSON) and then as many pairs as fit in
``--seconds`` (at least ``--min-pairs``).

Section ``long`` adds the genomics-sized cell, T = 1000 with 1024 rows (largest thread count
only). On the CPU the native variant is oneDNN's fused RNN (nn.LSTM) or ATen's loop (nn.GRU,
nn.RNN), and the rule runs its compiled C loops (``torch_handler/recurrent/cpu_loops.py``). On CUDA the
native variant is cuDNN (module in train() mode, the same function as eval()
without dropout) and the rule runs its fused loops (``torch_handler/recurrent/fused_loops.py``; set
``LSTM_DEEPSHAP_FUSED=0`` to time the eager loops instead); section ``check`` then compares the
compiled kernels with the eager loops and with float64, element-wise, and checks additivity.
A process's first call starts the compilation (C on the CPU, Triton kernels on CUDA) in the
background and runs the eager loops: the JSON's ``first_call_ms``, and ``compile_wait_ms``, how
long the cell then waited for the compiled loops before timing its pairs (``LSTM_DEEPSHAP_FUSED=0``
times the eager loops instead). Rows for a device that is not present are reported as
"not measured". Writes ``sweep.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
FULL = {"T": 100, "F": 32, "H": 128, "layers": 2, "batches": (2, 16, 128, 512, 2048),
        "threads": (1, 2), "seconds": 2.0, "min_pairs": 3}
QUICK = {"T": 10, "F": 8, "H": 16, "layers": 2, "batches": (2, 16), "threads": (1,),
         "seconds": 0.2, "min_pairs": 2}
LONG = {"T": 1000, "batch": 1024}  # genomics-sized: section "long"
TARGET = 1.2


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def make_case(kind: str, sizes: dict, batch: int, device: torch.device, seed: int):
    """The module (train mode, no dropout: cuDNN's backward needs it) and a (T, B, F) input."""
    torch.manual_seed(seed)
    module = MODULES[kind](sizes["F"], sizes["H"], num_layers=sizes["layers"]).to(device).train()
    x = torch.randn(sizes["T"], batch, sizes["F"], device=device, requires_grad=True)
    return module, x


def variants(module: nn.Module, x: torch.Tensor) -> dict:
    """``native`` and ``deeplift`` closures: one forward+backward each."""
    import torch_handler

    def native():
        out, _ = module(x)
        return torch.autograd.grad(out.sum(), x)

    def deeplift():
        with torch_handler.deeplift_mode(module):
            out, _ = module(x)
            return torch.autograd.grad(out.sum(), x)

    return {"native": native, "deeplift": deeplift}


def timed_both(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    common.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    common.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_cell(kind: str, sizes: dict, batch: int, threads: int, device: torch.device,
                 seconds: float, min_pairs: int, seed: int, clock: str = "wall") -> dict:
    """Interleaved pairs for one (module, batch, threads, device). ``clock``: which time the
    ratios use, ``wall`` or ``cpu`` (this process's CPU time: on a machine shared with
    other jobs it leaves out the time spent waiting for a core; both are recorded)."""
    torch.set_num_threads(threads)
    module, x = make_case(kind, sizes, batch, device, seed)
    row = _interleave(variants(module, x), device, seconds, min_pairs, clock)
    row.update({"module": kind, "batch": batch, "threads": threads, "device": str(device)})
    return row


def _interleave(fns: dict, device: torch.device, seconds: float, min_pairs: int, clock: str) -> dict:
    """One first call of each of ``fns`` (native, deeplift), then alternating pairs for
    ``seconds`` (at least ``min_pairs``): per-pair ratios deeplift / native."""
    first = {name: timed_both(fn, device)[0] for name, fn in fns.items()}
    # The first call starts the fused loops' compilation in the background (and runs the eager
    # loop meanwhile): wait for it, and call once more, so that the pairs time the steady state.
    waited = time.perf_counter()
    _wait_for_kernels()
    waited = time.perf_counter() - waited
    if waited > 1e-3:
        for fn in fns.values():
            fn()
    times = {clk: {"native": [], "deeplift": []} for clk in ("wall", "cpu")}
    ratios: list[float] = []
    start = time.perf_counter()
    pair = 0
    while pair < min_pairs or time.perf_counter() - start < seconds:
        order = ("native", "deeplift") if pair % 2 == 0 else ("deeplift", "native")
        got = {name: timed_both(fns[name], device) for name in order}
        for name, (wall, cpu) in got.items():
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
        k = 0 if clock == "wall" else 1
        ratios.append(got["deeplift"][k] / got["native"][k])
        pair += 1
    med = {clk: {name: 1e3 * statistics.median(v) for name, v in per.items()} for clk, per in times.items()}
    return {
        "clock": clock, "pairs": pair, "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "native_ms": med[clock]["native"], "deeplift_ms": med[clock]["deeplift"],
        "median_ms": med, "first_call_ms": {name: 1e3 * v for name, v in first.items()},
        "ratios": ratios, "seconds": times, "compile_wait_ms": 1e3 * waited,
    }


def _wait_for_kernels() -> None:
    """Block until the compiled loops' background compilations (GPU: fused_loops, CPU:
    cpu_loops) have finished (2 minutes at most each)."""
    from torch_handler.recurrent import cpu_loops, fused_loops

    for loops in (fused_loops, cpu_loops):
        if not loops.wait(timeout=120):
            raise RuntimeError(f"{loops.__name__}'s compilation did not finish within 120 s")


# ----------------------------------------------------------------------- whole calls

CALL_SIZES = {"T": 50, "F": 32, "H": 64, "layers": 2, "outputs": 2, "samples": 8, "background": 32}


class Classifier(nn.Module):
    """A recurrent module (batch_first) and a Linear head on the last step."""

    def __init__(self, kind: str, sizes: dict):
        super().__init__()
        self.rnn = MODULES[kind](sizes["F"], sizes["H"], num_layers=sizes["layers"], batch_first=True)
        self.head = nn.Linear(sizes["H"], sizes["outputs"])

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def whole_call_fns(kind: str, sizes: dict, device: torch.device, seed: int) -> dict:
    """Pairs (without, with) of whole user calls: shap DeepExplainer.shap_values without
    and with ``torch_handler.register()`` (both ``check_additivity=False``: plain shap
    fails the check), and Captum DeepLiftShap.attribute without and inside
    ``deeplift_mode``."""
    import shap
    from captum.attr import DeepLiftShap

    import torch_handler

    torch.manual_seed(seed)
    model = Classifier(kind, sizes).to(device).eval()
    shape = (sizes["T"], sizes["F"])
    bg = torch.randn(sizes["background"], *shape, device=device)
    X = torch.randn(sizes["samples"], *shape, device=device)

    def shap_plain():
        torch_handler.unregister()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unrecognized nn.Module: LSTM"
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN: no RNN backward in eval mode
                return shap.DeepExplainer(model, bg).shap_values(X, check_additivity=False)

    def shap_handler():
        torch_handler.register()
        try:
            return shap.DeepExplainer(model, bg).shap_values(X, check_additivity=False)
        finally:
            torch_handler.unregister()

    def captum_plain():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.backends.cudnn.flags(enabled=False):
                return DeepLiftShap(model).attribute(X, baselines=bg, target=0)

    def captum_mode():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch_handler.deeplift_mode(model):
                return DeepLiftShap(model).attribute(X, baselines=bg, target=0)

    return {"shap_values": (shap_plain, shap_handler),
            "captum_deepliftshap": (captum_plain, captum_mode)}


def measure_calls(kinds, threads: int, device: torch.device, seconds: float, min_pairs: int,
                  seed: int, clock: str) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for kind in kinds:
        for call, (without, with_rule) in whole_call_fns(kind, CALL_SIZES, device, seed).items():
            fns = {"native": without, "deeplift": with_rule}
            row = _interleave(fns, device, seconds, min_pairs, clock)
            row.update({"module": kind, "call": call, "threads": threads, "device": str(device)})
            rows.append(row)
            print(f"  {device.type} threads={threads} {kind} {call}: {row['ratio_median']:.2f}x "
                  f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}] without {row['native_ms']:.1f} "
                  f"ms, with {row['deeplift_ms']:.1f} ms ({row['pairs']} pairs)", flush=True)
    return rows


# ----------------------------------------------------------------------- peak memory


def memory_probe(kind: str, batch: int, variant: str, device: torch.device, seed: int) -> int:
    """Peak memory rise (bytes) of one forward+backward, after one warm-up call: CUDA
    ``max_memory_allocated``, CPU the rise of VmHWM over the RSS just before."""
    module, x = make_case(kind, FULL, batch, device, seed)
    fn = variants(module, x)[variant]
    fn()
    _wait_for_kernels()  # the steady state: with the fused loops where they serve
    fn()
    return common.peak_memory_rise(fn, device)[0]


def measure_memory(kind: str, batch: int, device: torch.device, seed: int) -> dict:
    """Each variant in a fresh interpreter (no shared allocator state); glibc told to give
    every block >= 64 KiB back to the OS when freed, so the RSS follows live allocations."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    peak = {}
    for variant in ("native", "deeplift"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe",
               f"{kind},{batch},{variant},{device.type},{seed}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode:
            raise RuntimeError(f"memory probe {kind} {batch} {variant} failed:\n{done.stderr[-2000:]}")
        peak[variant] = int(done.stdout.strip().splitlines()[-1])
    return {"module": kind, "batch": batch, "device": str(device),
            "native_mib": peak["native"] / 2**20, "deeplift_mib": peak["deeplift"] / 2**20,
            "ratio": peak["deeplift"] / peak["native"] if peak["native"] > 0 else None}


def check_fused(modules, sizes: dict, device: torch.device, seed: int, quick: bool) -> list[dict]:
    """The rule's input multipliers with the fused loops against the eager loops (float32) and
    against float64 (eager), relative to the largest; and additivity per pair,
    ``sum(m * (x - x_ref)) = sum(out) - sum(out_ref)``, relative to the largest output total.
    Sizes: the grid's T with 128 rows, and the long cell."""
    import torch_handler
    from torch_handler.recurrent import fused_loops

    rows = []
    shapes = [(sizes["T"], 128), (LONG["T"], LONG["batch"])] if not quick else [(sizes["T"], 4)]
    for kind in modules:
        for T, batch in shapes:
            module, x = make_case(kind, dict(sizes, T=T), batch, device, seed)
            x = x.detach()

            def grads(model, inputs, fused):
                with mock.patch.dict(os.environ, {fused_loops.ENV: "1" if fused else "0"}):
                    inputs = inputs.clone().requires_grad_(True)
                    with torch_handler.deeplift_mode(model):
                        out, _ = model(inputs)
                        (grad,) = torch.autograd.grad(out.sum(), inputs)
                    return grad, out.detach().sum((0, 2))

            grads(module, x, True)  # starts the fused loops' compilation
            _wait_for_kernels()
            calls = []
            original = fused_loops.forward

            def counted(*args, _calls=calls, _original=original, **kwargs):
                _calls.append(1)
                return _original(*args, **kwargs)

            fused_loops.forward = counted
            try:
                g_fused, totals = grads(module, x, True)
            finally:
                fused_loops.forward = original
            g_eager, _ = grads(module, x, False)
            g_64, _ = grads(copy.deepcopy(module).double(), x.double(), False)
            n = batch // 2
            contrib = (g_fused[:, :n] * (x[:, :n] - x[:, n:])).sum((0, 2))
            scale = g_64.abs().max()
            row = {"module": kind, "T": T, "batch": batch, "device": str(device), "fused": bool(calls),
                   "vs_eager": float((g_fused - g_eager).abs().max() / scale),
                   "vs_float64": float((g_fused.double() - g_64).abs().max() / scale),
                   "additivity": float((contrib - (totals[:n] - totals[n:])).abs().max() / totals.abs().max())}
            rows.append(row)
            print(f"  check {device.type} {kind} T={T} B={batch}: fused={row['fused']} vs eager "
                  f"{row['vs_eager']:.1e}, vs float64 {row['vs_float64']:.1e}, additivity "
                  f"{row['additivity']:.1e}", flush=True)
    return rows


def _devices(choice: str) -> list[str]:
    return ["cpu", "cuda"] if choice == "all" else [choice]


SECTIONS = ("grid", "long", "calls", "memory", "check")


def run(out="out", modules=("lstm", "gru", "rnn"), batches=None, threads=None, device="cpu",
        seconds=None, min_pairs=None, seed=0, quick=False, sections=SECTIONS, clock="wall",
        memory_batches=(128, 2048)) -> dict:
    sizes = dict(QUICK if quick else FULL)
    batches = batches or sizes["batches"]
    threads = threads or sizes["threads"]
    seconds = sizes["seconds"] if seconds is None else seconds
    min_pairs = min_pairs or sizes["min_pairs"]
    devices = _devices(device)
    missing = [d for d in devices if d == "cuda" and not torch.cuda.is_available()]
    present = [torch.device(d) for d in devices if d not in missing]
    print(f"sweep ({clock} clock): {sizes['layers']}-layer modules, T={sizes['T']}, F={sizes['F']}, "
          f"H={sizes['H']}, float32; one forward+backward of the doubled batch, DeepLIFT rule / "
          f"native autograd, interleaved pairs for ~{seconds:g} s per cell (at least "
          f"{min_pairs}); ratio: median [min-max] of the per-pair ratios", flush=True)
    result = {"benchmark": "sweep", "sizes": sizes, "batches": list(batches),
              "threads": list(threads), "modules": list(modules), "target_ratio": TARGET,
              "clock": clock, "machine": common.machine(), "not_measured": missing,
              "fused_loops": os.environ.get("LSTM_DEEPSHAP_FUSED", "1") != "0",
              "cells": [], "long": [], "calls": [], "memory": [], "check": []}
    if "grid" in sections:
        for dev in present:
            for n_threads in threads:
                for kind in modules:
                    for batch in batches:
                        cell = measure_cell(kind, sizes, batch, n_threads, dev, seconds, min_pairs,
                                            seed, clock)
                        result["cells"].append(cell)
                        print(f"  {dev.type} threads={n_threads} {kind} B={batch}: "
                              f"{cell['ratio_median']:.2f}x [{cell['ratio_min']:.2f}-"
                              f"{cell['ratio_max']:.2f}] native {cell['native_ms']:.1f} ms, rule "
                              f"{cell['deeplift_ms']:.1f} ms ({cell['pairs']} pairs)", flush=True)
    if "long" in sections:
        long_sizes = dict(sizes, T=LONG["T"] if not quick else 2 * sizes["T"])
        long_batch = LONG["batch"] if not quick else 4
        for dev in present:
            for kind in modules:
                cell = measure_cell(kind, long_sizes, long_batch, max(threads), dev, seconds, min_pairs,
                                    seed, clock)
                cell["T"] = long_sizes["T"]
                result["long"].append(cell)
                print(f"  {dev.type} threads={max(threads)} {kind} T={long_sizes['T']} B={long_batch}: "
                      f"{cell['ratio_median']:.2f}x [{cell['ratio_min']:.2f}-{cell['ratio_max']:.2f}] native "
                      f"{cell['native_ms']:.1f} ms, rule {cell['deeplift_ms']:.1f} ms, first calls "
                      f"{cell['first_call_ms']['native']:.0f} / {cell['first_call_ms']['deeplift']:.0f} ms",
                      flush=True)
    if "check" in sections:
        for dev in present:
            if dev.type == "cuda" or quick:  # the fused loops run on CUDA only (quick: interpreted)
                result["check"] += check_fused(modules, sizes, dev, seed, quick)
    if "calls" in sections and not quick:
        print(f"whole calls: {CALL_SIZES}, threads {max(threads)}", flush=True)
        for dev in present:
            result["calls"] += measure_calls(modules, max(threads), dev, seconds, min_pairs, seed, clock)
    if "memory" in sections and not quick:
        for dev in present:
            if dev.type == "cpu" and not Path("/proc/self/clear_refs").exists():
                print("memory: no /proc/self/clear_refs on this system, not measured")
                break
            for kind in modules:
                for batch in memory_batches:
                    row = measure_memory(kind, batch, dev, seed)
                    result["memory"].append(row)
                    print(f"  {dev.type} {kind} B={batch} peak memory: native "
                          f"{row['native_mib']:.1f} MiB, rule {row['deeplift_mib']:.1f} MiB", flush=True)
    print()
    if result["cells"] or ("grid" in sections and missing):
        print(markdown(result["cells"], modules, batches, threads, devices, missing))
        print()
    if result["long"]:
        print(common.table(
            ["device", "module", "T", "batch", "native (ms)", "rule (ms)", "ratio [min-max]",
             "first call native / rule (ms)"],
            [[c["device"], f"nn.{MODULES[c['module']].__name__}", c["T"], c["batch"], c["native_ms"],
              c["deeplift_ms"], f"{c['ratio_median']:.2f}x [{c['ratio_min']:.2f}-{c['ratio_max']:.2f}]",
              f"{c['first_call_ms']['native']:.0f} / {c['first_call_ms']['deeplift']:.0f}"]
             for c in result["long"]]))
        print()
    if result["check"]:
        print(common.table(
            ["device", "module", "T", "batch", "fused loops", "vs eager", "vs float64", "additivity"],
            [[c["device"], f"nn.{MODULES[c['module']].__name__}", c["T"], c["batch"], c["fused"],
              f"{c['vs_eager']:.1e}", f"{c['vs_float64']:.1e}", f"{c['additivity']:.1e}"]
             for c in result["check"]]))
        print()
    if result["calls"]:
        print(common.table(
            ["device", "module", "call", "without (ms)", "with (ms)", "ratio [min-max]"],
            [[c["device"], f"nn.{MODULES[c['module']].__name__}", c["call"], c["native_ms"],
              c["deeplift_ms"], f"{c['ratio_median']:.2f}x [{c['ratio_min']:.2f}-{c['ratio_max']:.2f}]"]
             for c in result["calls"]]))
        print()
    if result["memory"]:
        print(common.table(
            ["device", "module", "batch", "native peak (MiB)", "rule peak (MiB)", "ratio"],
            [[m["device"], f"nn.{MODULES[m['module']].__name__}", m["batch"], m["native_mib"],
              m["deeplift_mib"], m["ratio"]] for m in result["memory"]]))
        print()
    for dev in missing:
        print(f"{dev}: not present on this machine, not measured")
    path = common.write_json(out, "sweep", result)
    print(f"wrote {path}")
    return result


def markdown(cells, modules, batches, threads, devices, missing) -> str:
    """One table: a row per (device, threads, module), a column per batch; each entry
    'median ratio [min-max] (native ms / rule ms)'."""
    index = {(c["device"], c["threads"], c["module"], c["batch"]): c for c in cells}
    headers = ["device", "threads", "module", *(f"B={b}" for b in batches)]
    rows = []
    for dev in devices:
        for n_threads in threads:
            for kind in modules:
                entries = []
                for batch in batches:
                    cell = index.get((dev, n_threads, kind, batch))
                    if cell is None:
                        entries.append("not measured" if dev in missing else "-")
                        continue
                    entries.append(f"{cell['ratio_median']:.2f}x [{cell['ratio_min']:.2f}-"
                                   f"{cell['ratio_max']:.2f}] ({_ms(cell['native_ms'])} / "
                                   f"{_ms(cell['deeplift_ms'])} ms)")
                rows.append([dev, n_threads, f"nn.{MODULES[kind].__name__}", *entries])
    return common.table(headers, rows)


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="folder for sweep.json (default: out)")
    parser.add_argument("--modules", default="lstm,gru,rnn", help="subset of lstm,gru,rnn")
    parser.add_argument("--batches", type=_ints, help="doubled-batch rows (default 2,16,128,512,2048)")
    parser.add_argument("--threads", type=_ints, help="torch thread counts (default 1,2)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="cpu",
                        help="'all': CPU, then CUDA when present")
    parser.add_argument("--seconds", type=float, help="time per cell (default 2)")
    parser.add_argument("--min-pairs", type=int, help="at least this many pairs per cell (default 3)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="subset of grid (module x batch x threads), long (T 1000 x 1024 rows), "
                        "calls (whole shap / Captum calls), memory (peak memory per module at "
                        "--memory-batches), check (fused loops vs eager and float64)")
    parser.add_argument("--memory-batches", type=_ints, default=(128, 2048))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="ratios of wall-clock time (default) or of this process's CPU time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one variant
    args = parser.parse_args(argv)
    if args.memory_probe:
        kind, batch, variant, dev, seed = args.memory_probe.split(",")
        print(memory_probe(kind, int(batch), variant, torch.device(dev), int(seed)))
        return 0
    sections = tuple(x.strip() for x in args.sections.split(","))
    if any(x not in SECTIONS for x in sections):
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}")
    modules = tuple(m.strip() for m in args.modules.split(","))
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: every row is 'not measured'.")
    run(args.out, modules, args.batches, args.threads, args.device, args.seconds, args.min_pairs,
        args.seed, args.quick, sections, args.clock, args.memory_batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
