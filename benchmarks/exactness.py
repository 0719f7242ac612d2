"""How exact is it? Additivity of shap.DeepExplainer with and without the handler, and of
Captum's DeepLiftShap inside deeplift_mode, on the model families the project supports.

    python benchmarks/exactness.py --out out [--samples 4]

Two error measures, per model and dtype, over all explained samples and outputs:

* rel. to output scale: max |Σφ − (f(x) − E f(bg))| / max(|f(x)|, |E f(bg)|) (the measure
  of the project's bar: 1e-10 in float64, 1e-5 in float32);
* share of |Δf|: Σ |Σφ − Δf| / Σ |Δf| (how far the attributions miss the difference they
  are supposed to split: shap's "~45 %" on nn.LSTM is this measure).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402


class SeedCell(nn.Module):
    """The earlier handler's test case: one LSTMCell(3, 2) step, weights 0.1, inputs x, h, c."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 2)
        for p in self.cell.parameters():
            nn.init.constant_(p, 0.1)

    def forward(self, x, h, c):
        return torch.cat(self.cell(x, (h, c)), dim=1)


class UnrolledCell(nn.Module):
    def __init__(self, cell=nn.LSTMCell):
        super().__init__()
        self.cell, self.relu, self.head = cell(4, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(self.relu(h))


class SequenceClassifier(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        width = rnn.hidden_size if not getattr(rnn, "proj_size", 0) else rnn.proj_size
        self.head = nn.Linear(width * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def models():
    """(name, factory, input shape per sample or list of shapes)."""
    return [
        ("LSTMCell(3, 2) one step, weights 0.1 (seed case)", SeedCell, [(3,), (2,), (2,)]),
        ("LSTMCell(4, 16) unrolled 20 steps -> ReLU -> Linear", UnrolledCell, (20, 4)),
        ("GRUCell(4, 16) unrolled 20 steps -> ReLU -> Linear", lambda: UnrolledCell(nn.GRUCell), (20, 4)),
        ("LSTM(8, 32, 2 layers) classifier", lambda: SequenceClassifier(nn.LSTM(8, 32, 2, batch_first=True)),
         (30, 8)),
        ("LSTM(8, 32, 2 layers, bidirectional, proj 16)",
         lambda: SequenceClassifier(nn.LSTM(8, 32, 2, batch_first=True, bidirectional=True, proj_size=16)),
         (30, 8)),
        ("GRU(8, 32, 2 layers, bidirectional)",
         lambda: SequenceClassifier(nn.GRU(8, 32, 2, batch_first=True, bidirectional=True)), (30, 8)),
        ("RNN(8, 32, relu, 2 layers)",
         lambda: SequenceClassifier(nn.RNN(8, 32, 2, nonlinearity="relu", batch_first=True)), (30, 8)),
    ]


def _inputs(shape, n, dtype, generator, zeros=False):
    shapes = shape if isinstance(shape, list) else [shape]
    make = (lambda s: torch.zeros(n, *s, dtype=dtype)) if zeros else (
        lambda s: torch.randn(n, *s, generator=generator).to(dtype))
    tensors = [make(s) for s in shapes]
    return tensors if isinstance(shape, list) else tensors[0]


def errors(model, background, X, values) -> tuple[float, float]:
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    with torch.no_grad():
        f = model(*as_list(X)).double().numpy()
        expected = model(*as_list(background)).double().mean(0).numpy()
    sums = sum(v.sum(axis=tuple(range(1, v.ndim - 1))) for v in as_list(values))
    delta = f - expected
    miss = np.abs(sums - delta)
    scale = max(np.abs(f).max(), np.abs(expected).max())
    return float(miss.max() / scale), float(miss.sum() / np.abs(delta).sum())


def measure(name, factory, shape, dtype, samples, seed):
    import shap
    from captum.attr import DeepLiftShap

    import torch_handler

    torch.manual_seed(seed)
    model = factory().to(dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    seed_case = isinstance(shape, list)
    background = _inputs(shape, 1 if seed_case else 16, dtype, generator, zeros=seed_case)
    X = _inputs(shape, samples, dtype, generator)
    row = {"model": name, "dtype": str(dtype).removeprefix("torch.")}
    torch_handler.register()
    try:
        values = shap.DeepExplainer(model, background).shap_values(X)
    finally:
        torch_handler.unregister()
    row["shap + handler (scale)"], row["shap + handler (share of Δf)"] = errors(model, background, X, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = shap.DeepExplainer(model, background).shap_values(X, check_additivity=False)
    row["shap alone (scale)"], row["shap alone (share of Δf)"] = errors(model, background, X, values)
    if not seed_case:  # Captum's DeepLiftShap wants one tensor input here
        with torch_handler.deeplift_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Captum announces its hooks on every call
            attributions = DeepLiftShap(model).attribute(X, baselines=background, target=0)
        with torch.no_grad():
            f = model(X)[:, 0].double()
            expected = model(background)[:, 0].double().mean()
        miss = (attributions.double().sum(dim=tuple(range(1, X.dim()))) - (f - expected)).abs()
        scale = max(f.abs().max().item(), abs(expected.item()))
        row["Captum DeepLiftShap + mode (scale)"] = miss.max().item() / scale
    else:
        row["Captum DeepLiftShap + mode (scale)"] = "n/a (3 inputs)"
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.split("\n\n")[0], "samples explained per model", 4)
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    rows = []
    for name, factory, shape in models():
        for dtype in (torch.float64, torch.float32):
            rows.append(measure(name, factory, shape, dtype, 2 if args.quick else args.samples, args.seed))
    columns = list(rows[0])
    print(__doc__.split("\n\n")[0])
    print(common.table(columns, [[r[c] for c in columns] for r in rows]))
    path = common.write_json(args.out, "exactness", {"rows": rows, "machine": common.machine()})
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
