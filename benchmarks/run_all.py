"""All the benchmarks, one after the other (what ``make bench`` runs).

    python benchmarks/run_all.py --out out [--quick] [--threads 1] [--only engines]

* ``exactness.py``: additivity with and without the handler, shap and Captum, every family;
* ``overhead.py``: the DeepLIFT rule vs native autograd (time, memory), shap with vs without
  the handler;
* ``engines.py``: seven ways to explain the demo's LSTM, time and additivity;
* ``shapley_gap.py``: exact DeepSHAP vs brute-force Shapley values on tiny LSTM cells.

Each prints its table and writes ``<name>.json`` into ``--out``; this script adds
``run_all.json`` with the wall time of each. ``--samples`` goes to every script (shap samples,
explained samples, cells per row); without it each uses its own default.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

BENCHMARKS = ("exactness", "overhead", "engines", "shapley_gap")


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0],
                                "samples for every benchmark (0: each script's default)", 0)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    common.resolve_device(args.device)
    names = BENCHMARKS if not args.only else tuple(n.strip() for n in args.only.split(","))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    forwarded = ["--out", args.out, "--device", args.device, "--seed", str(args.seed)]
    if args.samples:
        forwarded += ["--samples", str(args.samples)]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    if args.quick:
        forwarded.append("--quick")
    seconds, failed = {}, []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        try:
            _module(name).main(list(forwarded))
        except (Exception, SystemExit) as error:  # report, then run the others
            failed.append(name)
            if isinstance(error, SystemExit):
                print(error, file=sys.stderr)
            else:
                traceback.print_exc()
        seconds[name] = time.perf_counter() - start
    print("\n" + common.table(["benchmark", "wall time (s)", "status"],
                              [[n, seconds[n], "FAILED" if n in failed else "ok"] for n in names]))
    path = common.write_json(args.out, "run_all", {
        "quick": args.quick, "seconds": seconds, "failed": failed, "machine": common.machine()})
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
