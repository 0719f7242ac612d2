"""Parquet in, Parquet out: exact DeepSHAP streamed through Ray actors.

    python examples/ray_parquet.py --work /tmp/ray-shap [--rows 2000] [--actors 2]
    python examples/ray_parquet.py --work /shared/ray-shap --address auto    # a running cluster

Three steps, each a function:

1. :func:`save_model` writes a model's weights, and :func:`write_inputs` a Parquet dataset of
   windows (columns ``id`` and ``data``, (T, F) float32 per row). With your own data, both
   exist already: weights on storage every node reads, Parquet files anywhere Ray reads.
2. :func:`explain` streams the Parquet files through ``DeepShap`` actors and writes Parquet:
   the input columns plus ``shap`` (T, F) per row. Rows are read, explained and written
   block by block; no process ever holds the whole dataset.
3. The workers build the model themselves: the builder (a ``functools.partial`` of
   :func:`load_forecaster`) is what Ray pickles, so only the path travels, not the weights.
   The model class, ``torch_handler.demo.Forecaster``, comes with lstm-deepshap, which every
   node installs; a class of your own must be importable on the workers as well (an
   installed package, or defined in the driver script, which Ray pickles by value).

The references (S, T, F) travel once to each actor, in ``fn_constructor_kwargs``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import ray
import torch

from torch_handler.demo import Forecaster
from torch_handler.ray import DeepShap

WINDOW, FEATURES, HIDDEN = 16, 4, 16


def save_model(path: Path, seed: int = 0) -> Path:
    """A Forecaster's weights (random here; your trained ones in practice) at ``path``."""
    torch.manual_seed(seed)
    torch.save(Forecaster(FEATURES, HIDDEN).state_dict(), path)
    return path


def load_forecaster(path: str) -> torch.nn.Module:
    """The model builder each actor runs once: the class from an installed package, the
    weights from ``path`` (storage every node reads)."""
    model = Forecaster(FEATURES, HIDDEN)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def make_inputs(rows: int, seed: int = 1) -> np.ndarray:
    """(rows, WINDOW, FEATURES) float32 windows."""
    return np.random.default_rng(seed).standard_normal((rows, WINDOW, FEATURES), dtype=np.float32)


def write_inputs(folder: Path, windows: np.ndarray, files: int = 4) -> Path:
    """The windows as ``files`` Parquet files with columns ``id`` (int64) and ``data`` (Ray's
    tensor column: one (T, F) array per row)."""
    rows = [{"id": i, "data": w} for i, w in enumerate(windows)]
    ray.data.from_items(rows, override_num_blocks=files).write_parquet(str(folder))
    return folder


def make_references(samples: int = 8, seed: int = 2) -> torch.Tensor:
    """(samples, WINDOW, FEATURES) float32 references: zeros and small random windows."""
    generator = torch.Generator().manual_seed(seed)
    noise = 0.1 * torch.randn(samples - 1, WINDOW, FEATURES, generator=generator)
    return torch.cat([torch.zeros(1, WINDOW, FEATURES), noise])


def explain(inputs: Path, output: Path, weights: Path, references: torch.Tensor, actors: int,
            rows_per_call: int = 256, gpus_per_actor: float = 0) -> Path:
    """Parquet ``inputs`` -> Parquet ``output`` with a ``shap`` column, on ``actors`` actors."""
    ray.data.read_parquet(str(inputs)).map_batches(
        DeepShap,
        fn_constructor_kwargs=dict(model=functools.partial(load_forecaster, str(weights)),
                                   references=references),
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
        batch_size=rows_per_call,
    ).write_parquet(str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for weights, inputs and outputs")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--gpus-per-actor", type=float, default=0)
    parser.add_argument("--address", help="a running Ray cluster ('auto' on one of its nodes); default: a local one")
    args = parser.parse_args(argv)

    # A new local cluster without the dashboard; a running cluster keeps its own settings.
    ray.init(address=args.address) if args.address else ray.init(include_dashboard=False)
    args.work.mkdir(parents=True, exist_ok=True)
    weights = save_model(args.work / "forecaster.pt")
    inputs = write_inputs(args.work / "inputs", make_inputs(args.rows))
    output = explain(inputs, args.work / "shap", weights, make_references(), args.actors,
                     gpus_per_actor=args.gpus_per_actor)
    rows = ray.data.read_parquet(str(output)).count()
    print(f"explained {rows} rows: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
