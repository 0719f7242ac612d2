"""Shared helpers of the benchmark scripts: options, device, timing, tables, JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# A script's sys.path starts with benchmarks/: put this checkout first, so that its
# torch_handler is the one measured (not another installed copy).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from torch_handler.demo.devices import resolve_device  # noqa: E402, F401  (re-exported for the scripts)


def base_parser(description: str, samples_help: str, samples_default: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="out", help="folder for the JSON results (default: out)")
    parser.add_argument("--samples", type=int, default=samples_default,
                        help=f"{samples_help} (default: {samples_default})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads (default: torch's, the number of cores); "
                        "1 gives steadier timings on a machine shared with other jobs")
    return parser


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, ``repeats`` times after ``warmup`` calls, the
    variants alternating so that load from other processes hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes: its own, unlike ru_maxrss, which Linux
    carries over fork and exec from the parent."""
    return _proc_status()["VmHWM"]


def peak_memory_rise(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak memory rise in bytes of one call of ``fn`` (warm it up first), and how it was
    measured: on CUDA ``max_memory_allocated`` over what was allocated before; on the CPU the
    rise of the resident-set high-water mark (VmHWM, reset to the current RSS first) over the
    RSS just before. Run each variant in a fresh process: VmHWM is per process."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status()["VmRSS"]
    fn()
    return _proc_status()["VmHWM"] - before, "VmHWM rise (clear_refs)"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_json(out: str | Path, name: str, payload: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path | torch.device | torch.dtype):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
