"""Whole recurrent models (a recurrent layer with a head around it): additivity of shap, Captum
DeepLiftShap and tangermeme with and without the library, and the cost of the interception.

    python benchmarks/whole_models.py --out out [--samples 3] [--threads 1] [--quick]

Exactness, per head family of ``whole_model_zoo.py`` and dtype: max |Σφ − (f(x) − E f)| over
the explained samples, relative to the output scale max(|f(x)|, |f(references)|) (the project's
bar: 1e-10 in float64, 1e-5 in float32). "+ lib": shap after ``torch_handler.register()``;
Captum's DeepLiftShap and tangermeme's deep_lift_shap inside ``torch_handler.deeplift_mode``.
"alone": the same engine without the library (shap with ``check_additivity=False``).

Overhead: forward + backward of the doubled batch (what every engine runs), float32, median
wall-clock of interleaved repeats, for a simple head, an attention head and
nn.MultiheadAttention: native autograd (no rules), the recurrent rules only (deeplift_mode
with the interception of the ops around them switched off), and the full ``deeplift_mode``.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import whole_model_zoo as zoo  # noqa: E402

TARGET = 1
ENGINES = ("shap", "Captum DeepLiftShap", "tangermeme")
OVERHEAD_MODELS = {
    "simple head (RNN, torch.relu)": "relu_head",
    "attention head (LSTM, nn.Softmax)": "attention_nn_softmax",
    "nn.MultiheadAttention (LSTM)": "mha_batch_first",
}


def _relative_error(model, X, references, sums) -> float:
    """max |sums − (f(x)[target] − mean f(references)[target])| / output scale."""
    with torch.no_grad():
        fx, fr = model(X).double(), model(references).double()
    miss = (torch.as_tensor(sums, dtype=torch.float64) - (fx[:, TARGET] - fr[:, TARGET].mean())).abs()
    return float(miss.max()) / max(float(fx.abs().max()), float(fr.abs().max()))


def _shap(model, X, references, library: bool) -> np.ndarray:
    import shap

    import torch_handler

    if library:
        torch_handler.register()
    try:
        values = shap.DeepExplainer(model, references).shap_values(X, check_additivity=False)
    finally:
        if library:
            torch_handler.unregister()
    return np.asarray(values)[..., TARGET].reshape(len(X), -1).sum(axis=1)


def _captum(model, X, references, library: bool) -> torch.Tensor:
    from captum.attr import DeepLiftShap

    import torch_handler

    with torch_handler.deeplift_mode(model) if library else nullcontext():
        attr = DeepLiftShap(model).attribute(X, baselines=references, target=TARGET)
    return attr.detach().double().reshape(len(X), -1).sum(dim=1)


def _tangermeme(model, X, references, library: bool) -> torch.Tensor:
    from tangermeme.deep_lift_shap import deep_lift_shap

    import torch_handler

    per_example = references.unsqueeze(0).expand(len(X), *references.shape)
    with torch_handler.deeplift_mode(model) if library else nullcontext():
        m = deep_lift_shap(model, X, references=per_example, target=TARGET, raw_outputs=True, device="cpu")
    return ((X.unsqueeze(1) - per_example) * m).double().mean(dim=1).reshape(len(X), -1).sum(dim=1)


RUNNERS = {"shap": _shap, "Captum DeepLiftShap": _captum, "tangermeme": _tangermeme}


def exactness_row(family: str, dtype, samples: int, seed: int) -> dict:
    row = {"family": family, "dtype": str(dtype).removeprefix("torch.")}
    for engine in ENGINES:
        for library in (True, False):
            model, X, references = zoo.make(family, dtype, n=samples, seed=seed)
            column = f"{engine} {'+ lib' if library else 'alone'}"
            try:
                sums = RUNNERS[engine](model, X, references, library)
                row[column] = _relative_error(model, X, references, sums)
            except Exception as error:  # a failure is a result too: report it in the table
                row[column] = f"{type(error).__name__}"
    return row


@contextmanager
def _recurrent_rules_only():
    """deeplift_mode without the interception of the ops around the recurrent modules."""
    from torch_handler import mode

    @contextmanager
    def off(model, recurrent, strict=False, engine_hooks=None):
        yield None

    with mock.patch.object(mode, "intercepting", off):
        yield


def overhead_row(label: str, family: str, batch: int, length: int, hidden: int, repeats: int, seed: int) -> dict:
    import torch_handler

    model, X, references = zoo.make(
        family, torch.float32, n=batch, n_references=batch, seed=seed, hidden=hidden, length=length
    )
    doubled = torch.cat([X, references])

    def step():
        x = doubled.clone().requires_grad_()
        torch.autograd.grad(model(x)[:, TARGET].sum(), x)

    def native():
        step()

    def recurrent_only():
        with _recurrent_rules_only(), torch_handler.deeplift_mode(model):
            step()

    def full():
        with torch_handler.deeplift_mode(model):
            step()

    device = torch.device("cpu")
    times = common.interleaved_times(
        {"native": native, "recurrent only": recurrent_only, "deeplift_mode": full}, repeats, 2, device
    )
    ms = {name: 1e3 * common.median(values) for name, values in times.items()}
    return {
        "model": label,
        "native (ms)": ms["native"],
        "recurrent rules only (ms)": ms["recurrent only"],
        "deeplift_mode (ms)": ms["deeplift_mode"],
        "interception overhead": f"{100 * (ms['deeplift_mode'] / ms['recurrent only'] - 1):+.0f} %",
        "vs native": f"{100 * (ms['deeplift_mode'] / ms['native'] - 1):+.0f} %",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.split("\n\n")[0], "samples explained per model", 3)
    parser.add_argument("--repeats", type=int, default=15, help="timing repeats (default: 15)")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    samples = 2 if args.quick else args.samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engines' notices and the "alone" runs' own warnings
        rows = [
            exactness_row(family, dtype, samples, args.seed)
            for family in zoo.FAMILIES
            for dtype in (torch.float64, torch.float32)
        ]
        sizes = (
            dict(batch=4, length=20, hidden=16, repeats=3)
            if args.quick
            else dict(batch=32, length=100, hidden=64, repeats=args.repeats)
        )
        overhead = [overhead_row(label, family, seed=args.seed, **sizes) for label, family in OVERHEAD_MODELS.items()]
    columns = list(rows[0])
    print("Additivity error relative to the output scale (max over samples)")
    print(common.table(columns, [[r[c] for c in columns] for r in rows]))
    print()
    print(
        f"fwd+bwd of the doubled batch, float32, batch {sizes['batch']} + {sizes['batch']} references, "
        f"length {sizes['length']}, hidden {sizes['hidden']}, median of {sizes['repeats']}"
    )
    print(common.table(list(overhead[0]), [list(r.values()) for r in overhead]))
    payload = {"exactness": rows, "overhead": overhead, "overhead_sizes": sizes, "machine": common.machine()}
    path = common.write_json(args.out, "whole_models", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
