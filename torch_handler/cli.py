"""``lstm-deepshap``: the demo and the benchmarks from the command line.

    lstm-deepshap demo  [--out out] [--samples N] [--device cpu|cuda] [--seed S] [--quick]
    lstm-deepshap bench [--out out] [--samples N] [--device cpu|cuda] [--seed S] [--quick]

The code lives in ``examples/demo.py`` and ``benchmarks/run_all.py`` of the repository, which
are scripts rather than installed modules: this command finds them next to the package, as in
an editable install (``pip install -e '.[demo]'``), and runs their ``main``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"demo": REPO / "examples" / "demo.py", "bench": REPO / "benchmarks" / "run_all.py"}


def _load(path: Path):
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found. The demo and benchmarks are scripts in the repository, "
            "not part of the installed package: clone lstm-deepshap and install it editable "
            "(pip install -e '.[demo]'), or run the script with python directly."
        )
    spec = importlib.util.spec_from_file_location(f"lstm_deepshap_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def resolve_device(name: str):
    """``torch.device(name)``, or exit with a clear message when CUDA is asked for and absent.

    Shared by this command, ``examples/demo.py`` and the benchmarks.
    """
    import torch

    if name not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__} built {'with' if torch.version.cuda else 'without'} "
            "CUDA). Use --device cpu, or install a CUDA build of torch on a machine with a GPU."
        )
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-deepshap",
        description="Exact DeepLIFT / DeepSHAP for PyTorch recurrent layers: demo and benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train an LSTM forecaster on macrodata, explain it "
                               "with shap.DeepExplainer, print the additivity table, write PNGs")
    bench = commands.add_parser("bench", help="exactness, overhead, engine comparison and Shapley-gap "
                                "benchmarks; tables printed, JSON written to --out")
    for sub in (demo, bench):
        sub.add_argument("--out", default="out", help="output folder (default: out)")
        sub.add_argument("--samples", type=int, help="samples to explain (default: the script's)")
        sub.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--quick", action="store_true", help="smoke-test sizes")
    demo.add_argument("--epochs", type=int, help="training epochs (default: the demo's)")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    bench.add_argument("--threads", type=int, help="torch.set_num_threads for the benchmarks")
    bench.add_argument("--only", help="comma-separated subset of exactness,overhead,engines,shapley_gap")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolve_device(args.device)
    except SystemExit as error:
        print(f"lstm-deepshap: {error}", file=sys.stderr)
        return 2
    forwarded = ["--out", args.out, "--device", args.device, "--seed", str(args.seed)]
    for flag in ("samples", "epochs", "threads", "only"):
        value = getattr(args, flag, None)
        if value is not None:
            forwarded += [f"--{flag}", str(value)]
    for flag in ("quick", "no_progress"):
        if getattr(args, flag, False):
            forwarded.append("--" + flag.replace("_", "-"))
    return int(_load(SCRIPTS[args.command]).main(forwarded) or 0)


if __name__ == "__main__":
    sys.exit(main())
