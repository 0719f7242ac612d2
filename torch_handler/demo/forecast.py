"""A real model explained: an LSTM forecaster of US inflation, attributed with DeepSHAP.

    lstm-deepshap demo --out out      # or: python -m torch_handler.demo, python examples/demo.py

Needs the ``[demo]`` extra (shap, statsmodels, matplotlib, tqdm): ``make demo`` in a checkout, or
``pip install 'lstm-deepshap[demo]'``.

Data: ``statsmodels``' shipped ``macrodata`` (US quarterly macro series, 1959Q1-2009Q3;
nothing is downloaded). From a window of the last ``WINDOW`` quarters of six standardized
features the model predicts next-quarter CPI inflation (annualized percent).

Steps: train a one-layer ``nn.LSTM`` + ``nn.Linear`` head on the first 75 % of the windows
(chronological split; full-batch Adam with early stopping on the last 20 % of the training
windows; seconds on a CPU); explain held-out predictions with
``shap.DeepExplainer`` after ``torch_handler.register()`` (background: a sample of training
windows); print the additivity table (the attributions of each prediction sum to
``f(x) - E[f]`` up to float32 rounding); write three PNGs.

Deterministic for a given ``--seed`` (and device).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_handler.additivity import tolerance_for
from torch_handler.demo.devices import resolve_device

WINDOW = 8  # quarters of history the model sees
TRAIN_FRACTION = 0.75
FEATURES = (
    "GDP growth",
    "consumption growth",
    "investment growth",
    "inflation",
    "T-bill rate",
    "unemployment",
)
TARGET_FEATURE = 3  # inflation
TARGET = "next-quarter CPI inflation (annualized %)"
VALIDATION_FRACTION = 0.2


# --------------------------------------------------------------------------- data


def load_series() -> tuple[np.ndarray, np.ndarray]:
    """(quarters, F) raw features in %, (quarters,) time in years.

    Growth rates are 100 * log differences, so the first quarter of the data is dropped.
    """
    import statsmodels.api as sm

    data = sm.datasets.macrodata.load_pandas().data
    growth = lambda col: 100.0 * np.diff(np.log(data[col].to_numpy(np.float64)))  # noqa: E731
    level = lambda col: data[col].to_numpy(np.float64)[1:]  # noqa: E731
    features = np.stack(
        [
            growth("realgdp"),
            growth("realcons"),
            growth("realinv"),
            level("infl"),
            level("tbilrate"),
            level("unemp"),
        ],
        axis=1,
    )
    years = (data["year"].to_numpy() + (data["quarter"].to_numpy() - 1) / 4.0)[1:]
    return features, years


@dataclass
class Dataset:
    x_train: np.ndarray  # (N_train, WINDOW, F), standardized with training statistics
    y_train: np.ndarray  # (N_train,) inflation of the quarter after each window, in %
    x_test: np.ndarray
    y_test: np.ndarray
    t_test: np.ndarray  # (N_test,) time (years) of the predicted quarter
    series: np.ndarray  # full target series, %
    years: np.ndarray  # its time axis
    last_test: np.ndarray  # (N_test,) the target's last observed value (naive forecast)


def make_dataset() -> Dataset:
    features, years = load_series()
    series = features[:, TARGET_FEATURE]
    n = len(series) - WINDOW  # window ends at t = i + WINDOW - 1, target is t + 1
    windows = np.stack([features[i : i + WINDOW] for i in range(n)])
    targets = series[WINDOW:]
    target_years = years[WINDOW:]
    n_train = int(round(TRAIN_FRACTION * n))
    train_rows = features[: n_train + WINDOW - 1]  # quarters seen by the training windows
    mean, std = train_rows.mean(axis=0), train_rows.std(axis=0)
    scaled = (windows - mean) / std
    return Dataset(
        x_train=scaled[:n_train],
        y_train=targets[:n_train],
        x_test=scaled[n_train:],
        y_test=targets[n_train:],
        t_test=target_years[n_train:],
        series=series,
        years=years,
        last_test=series[WINDOW - 1 : -1][n_train:],
    )


# --------------------------------------------------------------------------- model


class Forecaster(nn.Module):
    """nn.LSTM over the window, nn.Linear head on the last hidden state."""

    def __init__(self, n_features: int, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@contextmanager
def deterministic(seed: int, threads: int | None = 1):
    """Seed torch and numpy, turn on torch's deterministic algorithms (and, for this tiny
    model, one CPU thread: fastest, and immune to other jobs on a shared machine); put the
    global settings back on exit."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.get_num_threads())
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic = saved[2]
        torch.set_num_threads(saved[3])


def train(data: Dataset, epochs: int, seed: int, device: torch.device, progress: bool = True,
          hidden: int = 8):
    """Full-batch Adam on standardized targets, keeping the weights with the lowest loss on
    the last ``VALIDATION_FRACTION`` of the training windows (early stopping); then fold the
    target scaling into the head so the model outputs inflation in percent. Returns the
    model in eval mode, float32, on ``device``, and the epoch that was kept."""
    with deterministic(seed):
        return _train(data, epochs, seed, device, progress, hidden)


def _train(data, epochs, seed, device, progress, hidden):
    from tqdm.auto import tqdm

    model = Forecaster(data.x_train.shape[2], hidden).to(device)
    y_mean, y_std = data.y_train.mean(), data.y_train.std()
    x = torch.tensor(data.x_train, dtype=torch.float32, device=device)
    y = torch.tensor((data.y_train - y_mean) / y_std, dtype=torch.float32, device=device)
    n_fit = len(x) - max(1, int(VALIDATION_FRACTION * len(x)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    best = (float("inf"), copy.deepcopy(model.state_dict()), 0)
    bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress,
               leave=False)
    for epoch in bar:
        model.train()
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[:n_fit]).squeeze(1), y[:n_fit])
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            val = nn.functional.mse_loss(model(x[n_fit:]).squeeze(1), y[n_fit:]).item()
        if val < best[0]:
            best = (val, copy.deepcopy(model.state_dict()), epoch)
        bar.set_postfix(train_mse=f"{loss.item():.3f}", val_mse=f"{val:.3f}")
    bar.close()
    model.load_state_dict(best[1])
    with torch.no_grad():
        model.head.weight.mul_(float(y_std))
        model.head.bias.mul_(float(y_std)).add_(float(y_mean))
    return model.eval(), best[2]


# --------------------------------------------------------------------------- explain


@dataclass
class Explanation:
    phi: np.ndarray  # (N, WINDOW, F) SHAP values in percentage points
    expected: float  # E[f(background)]
    prediction: np.ndarray  # (N,) f(x)
    actual: np.ndarray  # (N,) realised growth
    years: np.ndarray  # (N,) predicted quarter
    windows: np.ndarray  # (N, WINDOW, F) standardized inputs
    seconds: float

    @property
    def abs_error(self) -> np.ndarray:
        return np.abs(self.phi.sum(axis=(1, 2)) - (self.prediction - self.expected))

    @property
    def rel_error(self) -> np.ndarray:
        scale = np.maximum(np.abs(self.prediction), abs(self.expected))
        return self.abs_error / scale


def explain(model, data: Dataset, samples: int, background: int, seed: int,
            device: torch.device, progress: bool = True) -> Explanation:
    """DeepSHAP values of the last ``samples`` held-out predictions (one shap call each)."""
    with deterministic(seed):
        return _explain(model, data, samples, background, seed, device, progress)


def _explain(model, data, samples, background, seed, device, progress):
    import shap
    from tqdm.auto import tqdm

    from torch_handler import register

    register()
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data.x_train), size=min(background, len(data.x_train)), replace=False)
    bg = torch.tensor(data.x_train[np.sort(rows)], dtype=torch.float32, device=device)
    picked = np.arange(len(data.x_test))[-samples:]
    x = torch.tensor(data.x_test[picked], dtype=torch.float32, device=device)
    start = time.perf_counter()
    explainer = shap.DeepExplainer(model, bg)
    phis = []
    for j in tqdm(range(len(x)), desc="explaining", unit="sample", disable=not progress,
                  leave=False):
        # register() checks additivity itself with a float32 tolerance (1e-4 relative).
        phis.append(np.asarray(explainer.shap_values(x[j : j + 1])).reshape(1, *x.shape[1:]))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        prediction = model(x).squeeze(1).double().cpu().numpy()
    return Explanation(
        phi=np.concatenate(phis).astype(np.float64),
        expected=float(np.asarray(explainer.expected_value).reshape(-1)[0]),
        prediction=prediction,
        actual=data.y_test[picked],
        years=data.t_test[picked],
        windows=data.x_test[picked],
        seconds=seconds,
    )


def quarter(year: float) -> str:
    return f"{int(year)}Q{int(round((year - int(year)) * 4)) + 1}"


def additivity_table(e: Explanation) -> str:
    lines = [
        "Additivity per explained prediction (percentage points of inflation):",
        "  rel err = |sum(SHAP) - (f(x) - E[f])| / max(|f(x)|, |E[f]|)",
        f"  {'quarter':>8} {'actual':>8} {'f(x)':>9} {'E[f]':>9} {'sum SHAP':>10} "
        f"{'f(x)-E[f]':>10} {'abs err':>9} {'rel err':>9}",
    ]
    sums = e.phi.sum(axis=(1, 2))
    for j in range(len(sums)):
        lines.append(
            f"  {quarter(e.years[j]):>8} {e.actual[j]:8.3f} {e.prediction[j]:9.4f} "
            f"{e.expected:9.4f} {sums[j]:10.5f} {e.prediction[j] - e.expected:10.5f} "
            f"{e.abs_error[j]:9.2e} {e.rel_error[j]:9.2e}"
        )
    lines.append(
        f"  max abs err {e.abs_error.max():.2e}, max rel err {e.rel_error.max():.2e} "
        f"(float32; the handler's own check holds it to {tolerance_for('float32'):g})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _lag_labels() -> list[str]:
    return [f"t-{WINDOW - 1 - k}" if k < WINDOW - 1 else "t" for k in range(WINDOW)]


def plot_heatmaps(e: Explanation, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    files = []
    mean_abs = np.abs(e.phi).mean(axis=0).T  # (F, WINDOW)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    im = ax.imshow(mean_abs, aspect="auto", cmap="viridis")
    ax.set_xticks(range(WINDOW), _lag_labels())
    ax.set_yticks(range(len(FEATURES)), FEATURES)
    ax.set_xlabel("quarter of the input window (t = last observed quarter)")
    ax.set_title(f"mean |SHAP| over {len(e.phi)} held-out predictions of {TARGET}", fontsize=10)
    fig.colorbar(im, ax=ax, label="percentage points")
    fig.tight_layout()
    files.append(out / "heatmap_mean_abs_shap.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    j = int(np.argmax(np.abs(e.prediction - e.expected)))
    example = e.phi[j].T
    bound = float(np.abs(example).max()) or 1.0
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    im = ax.imshow(example, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound)
    for (f, k), value in np.ndenumerate(example):
        ax.text(k, f, f"{value:+.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(WINDOW), _lag_labels())
    ax.set_yticks(range(len(FEATURES)), FEATURES)
    ax.set_xlabel("quarter of the input window (t = last observed quarter)")
    ax.set_title(
        f"SHAP for the forecast of {quarter(e.years[j])}: f(x) = {e.prediction[j]:.2f}, "
        f"E[f] = {e.expected:.2f}, sum = {example.sum():+.2f}",
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, label="percentage points")
    fig.tight_layout()
    files.append(out / "heatmap_example_shap.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def plot_series(e: Explanation, data: Dataset, out: Path) -> Path:
    """Top: inflation with the forecasts, each forecast's deviation from E[f] split into
    per-feature bars (SHAP summed over the window). Bottom: the input window of the most
    strongly attributed forecast, points coloured by their SHAP value."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), height_ratios=(3, 2))
    start = e.years[0] - 3.0
    keep = data.years >= start
    top.plot(data.years[keep], data.series[keep], color="0.35", lw=1, label="inflation (actual)")
    top.axhline(e.expected, color="0.5", ls="--", lw=1, label="E[f] (background mean)")
    per_feature = e.phi.sum(axis=1)  # (N, F)
    width = 0.18
    up = np.full(len(e.years), e.expected)
    down = up.copy()
    for f, name in enumerate(FEATURES):
        v = per_feature[:, f]
        pos, neg = np.clip(v, 0, None), np.clip(v, None, 0)
        top.bar(e.years, pos, width, bottom=up, color=colors[f], alpha=0.75, label=name)
        top.bar(e.years, neg, width, bottom=down, color=colors[f], alpha=0.75)
        up, down = up + pos, down + neg
    top.scatter(e.years, e.prediction, color="k", s=14, zorder=3,
                label="forecast f(x) = E[f] + sum SHAP")
    top.set_ylabel("% (annualized)")
    top.set_title("US CPI inflation: LSTM forecasts and their DeepSHAP decomposition by feature",
                  fontsize=10)
    top.legend(fontsize=7, ncol=3, loc="lower left")

    j = int(np.argmax(np.abs(e.prediction - e.expected)))
    lags = e.years[j] - 0.25 * np.arange(WINDOW, 0, -1)
    bound = float(np.abs(e.phi[j]).max()) or 1.0
    for f, name in enumerate(FEATURES):
        bottom.plot(lags, e.windows[j, :, f], color=colors[f], lw=1, label=name)
        points = bottom.scatter(lags, e.windows[j, :, f], c=e.phi[j, :, f], cmap="RdBu_r",
                                vmin=-bound, vmax=bound, s=25 + 400 * np.abs(e.phi[j, :, f]) / bound,
                                edgecolors=colors[f], zorder=3)
    fig.colorbar(points, ax=bottom, label="SHAP (pp)")
    bottom.set_xticks(lags, [quarter(v) for v in lags])
    bottom.set_ylabel("standardized value")
    bottom.set_xlabel("quarter")
    bottom.set_title(f"input window of the forecast of {quarter(e.years[j])} "
                     "(marker colour and size: SHAP value)", fontsize=10)
    bottom.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = out / "series_shap.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def run(out: str | Path = "out", samples: int = 24, device: str = "cpu", seed: int = 0,
        epochs: int = 200, background: int = 64, progress: bool = True) -> dict:
    """The whole demo; returns a summary dict (also used by the tests)."""
    import matplotlib

    matplotlib.use("Agg")
    start = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_dataset()
    print(f"data: statsmodels macrodata, {len(data.x_train)} training and {len(data.x_test)} "
          f"held-out windows of {WINDOW} quarters x {len(FEATURES)} features "
          f"({', '.join(FEATURES)}); target: {TARGET}")
    t0 = time.perf_counter()
    model, kept = train(data, epochs, seed, dev, progress)
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        x_test = torch.tensor(data.x_test, dtype=torch.float32, device=dev)
        test_pred = model(x_test).squeeze(1).double().cpu().numpy()
    rmse = lambda pred: float(np.sqrt(np.mean((pred - data.y_test) ** 2)))  # noqa: E731
    print(f"trained {epochs} epochs in {train_seconds:.1f} s (kept epoch {kept}, lowest "
          f"validation loss); held-out RMSE {rmse(test_pred):.2f} pp, vs {rmse(data.last_test):.2f} "
          f"(last value) and {rmse(data.y_train.mean()):.2f} (training mean)")
    samples = max(1, min(samples, len(data.x_test)))
    e = explain(model, data, samples, background, seed, dev, progress)
    print(f"explained {samples} held-out predictions with shap.DeepExplainer + "
          f"torch_handler.register() (background: {min(background, len(data.x_train))} "
          f"training windows) in {e.seconds:.2f} s")
    print(additivity_table(e))
    files = plot_heatmaps(e, out) + [plot_series(e, data, out)]
    print("wrote:")
    for path in files:
        print(f"  {path}")
    total = time.perf_counter() - start
    print(f"demo finished in {total:.1f} s")
    return {
        "max_abs_error": float(e.abs_error.max()),
        "max_rel_error": float(e.rel_error.max()),
        "files": [str(p) for p in files],
        "rmse": rmse(test_pred),
        "seconds": total,
        "explanation": e,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="folder for the PNGs (default: out)")
    parser.add_argument("--samples", type=int, default=24,
                        help="held-out predictions to explain (default: 24)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=200, help="training epochs (default: 200)")
    parser.add_argument("--background", type=int, default=64,
                        help="training windows in the SHAP background (default: 64)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes: 20 epochs, background 16")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.background = min(args.epochs, 20), min(args.background, 16)
    run(args.out, args.samples, args.device, args.seed, args.epochs, args.background,
        progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
