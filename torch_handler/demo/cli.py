"""``lstm-deepshap``: the demo from the command line.

    lstm-deepshap demo [--out out] [--samples N] [--device cpu|cuda] [--seed S] [--epochs E]
                       [--quick] [--no-progress]

The demo is :mod:`torch_handler.demo`, part of the installed package, so the command works
from a wheel; it needs the ``[demo]`` extra. The benchmarks are scripts of the repository, not
of the package: run them from a checkout with ``make bench`` or
``python benchmarks/run_all.py --out out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from torch_handler.demo.devices import resolve_device

DEMO_PACKAGES = ("shap", "statsmodels", "matplotlib", "tqdm")
"""Imported by the demo and not by the handler: the ``[demo]`` extra."""


def missing_demo_packages() -> list[str]:
    """The packages of the ``[demo]`` extra that cannot be imported here."""
    missing = []
    for name in DEMO_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-deepshap",
        description="Exact DeepLIFT / DeepSHAP for PyTorch recurrent layers: the demo.",
        epilog="Benchmarks: from a checkout, make bench or python benchmarks/run_all.py.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train an LSTM forecaster on macrodata, explain it "
                               "with shap.DeepExplainer, print the additivity table, write PNGs")
    demo.add_argument("--out", default="out", help="output folder (default: out)")
    demo.add_argument("--samples", type=int, help="held-out predictions to explain (default: 24)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, help="training epochs (default: 200)")
    demo.add_argument("--quick", action="store_true", help="smoke-test sizes")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def demo_argv(args: argparse.Namespace) -> list[str]:
    """The command line of :func:`torch_handler.demo.main` for the parsed ``args``."""
    argv = ["--out", args.out, "--device", args.device, "--seed", str(args.seed)]
    for flag in ("samples", "epochs"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag}", str(value)]
    for flag in ("quick", "no_progress"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_demo_packages()
    if missing:
        print(f"lstm-deepshap: the demo needs {', '.join(missing)}: "
              "pip install 'lstm-deepshap[demo]'", file=sys.stderr)
        return 2
    try:
        resolve_device(args.device)
    except SystemExit as error:
        print(f"lstm-deepshap: {error}", file=sys.stderr)
        return 2
    from torch_handler import demo

    return int(demo.main(demo_argv(args)) or 0)


if __name__ == "__main__":
    sys.exit(main())
