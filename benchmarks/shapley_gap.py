"""How far is exact DeepSHAP from true Shapley values? Tiny LSTM cells, brute force.

    python benchmarks/shapley_gap.py --out out [--samples 20] [--quick]

For random ``nn.LSTMCell(I, H)`` cells with ``I + 2H <= 16`` players (the elements of x, h
and c), a random input ``(x, h, c)`` and a random reference, each player's contribution to
``f = sum(h1)`` is computed three ways:

* DeepSHAP with the torch handler: ``torch_handler.deeplift_mode`` + ``nn.LSTMCell`` on the
  doubled batch of 2 rows, contribution = multiplier x (input - reference);
* the JAX oracle's DeepLIFT multipliers (``reference_jax.lstm_cell_multipliers``), as a check on
  the torch numbers;
* exact single-reference Shapley values (``reference_jax.exact_shapley``, all 2^n coalitions).

DeepLIFT is exact in the sense of summation-to-delta, not a Shapley value of the whole cell:
the gap to the brute-force Shapley values is what this measures. Per-player errors are divided
by |Δf| = |f(x) - f(x_ref)| of the cell (cells with |Δf| < 0.05 are redrawn); the L1 gap is
sum_i |DeepSHAP_i - Shapley_i| / sum_i |Shapley_i|; Spearman is the rank correlation of the
two attribution vectors of a cell.
Weights: torch's initialisation U(-1/sqrt(H), 1/sqrt(H)), and the same scaled by 4
(saturated gates, far from linear).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

FULL_SIZES = ((2, 1), (2, 2), (4, 2), (4, 3), (6, 3), (6, 4), (8, 4))
QUICK_SIZES = ((2, 1), (2, 2), (4, 2))
WEIGHT_SCALES = (1.0, 4.0)
MIN_DELTA = 0.05


def _reference():
    try:
        import reference_jax
    except ImportError as error:
        raise SystemExit(
            "error: shapley_gap needs the JAX oracle reference_jax (pip install -e . from a "
            f"checkout of lstm-deepshap): {error}"
        ) from error
    return reference_jax


def deepshap_torch(cell: torch.nn.LSTMCell, actual, reference) -> np.ndarray:
    """Contributions of (x, h, c) to sum(h1) from the torch handler, shape (I + 2H,)."""
    import torch_handler

    inputs = [torch.stack((a, r)).requires_grad_() for a, r in zip(actual, reference, strict=True)]
    with torch_handler.deeplift_mode(cell):
        h1, _ = cell(inputs[0], (inputs[1], inputs[2]))
        grads = torch.autograd.grad(h1.sum(), inputs)
    return torch.cat([g[0] * (a - r) for g, a, r in zip(grads, actual, reference, strict=True)]
                     ).detach().numpy()


def cell_case(I: int, H: int, scale: float, rng: np.random.Generator):
    """A random cell (float64) and a random (input, reference) pair with |Δf| >= MIN_DELTA."""
    torch.manual_seed(int(rng.integers(2**31)))
    cell = torch.nn.LSTMCell(I, H).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(scale)
    while True:
        draw = lambda n: torch.from_numpy(rng.standard_normal(n))  # noqa: E731
        actual, reference = (draw(I), draw(H), draw(H)), (draw(I), draw(H), draw(H))
        with torch.no_grad():
            delta = (cell(actual[0][None], (actual[1][None], actual[2][None]))[0].sum()
                     - cell(reference[0][None], (reference[1][None], reference[2][None]))[0].sum())
        if abs(float(delta)) >= MIN_DELTA:
            return cell, actual, reference


def compare_cell(cell: torch.nn.LSTMCell, actual, reference) -> dict:
    """DeepSHAP (torch and JAX oracle) vs exact Shapley values for one cell and input."""
    import jax.numpy as jnp

    rj = _reference()
    I, H = cell.input_size, cell.hidden_size
    params = rj.LSTMParams(*(jnp.asarray(p.detach().numpy()) for p in
                             (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)))
    a = [jnp.asarray(t.numpy()) for t in actual]
    r = [jnp.asarray(t.numpy()) for t in reference]

    def f(v):
        return jnp.sum(rj.lstm_cell(params, v[:I], (v[I : I + H], v[I + H :]))[0])

    players_a, players_r = jnp.concatenate(a), jnp.concatenate(r)
    shapley = np.asarray(rj.exact_shapley(f, players_a, players_r))
    m_x, (m_h, m_c) = rj.lstm_cell_multipliers(params, a[0], (a[1], a[2]), r[0], (r[1], r[2]),
                                          (jnp.ones(H), jnp.zeros(H)))
    oracle = np.asarray(jnp.concatenate([m_x, m_h, m_c]) * (players_a - players_r))
    deep = deepshap_torch(cell, actual, reference)
    delta = float(f(players_a) - f(players_r))
    gap = np.abs(deep - shapley) / abs(delta)
    l1_gap = float(np.abs(deep - shapley).sum() / np.abs(shapley).sum())
    return {
        "players": I + 2 * H,
        "delta_f": delta,
        "mean_rel_gap": float(gap.mean()),
        "max_rel_gap": float(gap.max()),
        "l1_gap": l1_gap,
        "spearman": spearman(deep, shapley),
        "deepshap_additivity": abs(float(deep.sum()) - delta) / abs(delta),
        "shapley_additivity": abs(float(shapley.sum()) - delta) / abs(delta),
        "torch_vs_oracle": float(np.abs(deep - oracle).max() / abs(delta)),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # average ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _pick(results: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in results])


def gap_table(sizes, scales, cells: int, seed: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(seed)
    for scale in scales:
        for I, H in sizes:
            results = [compare_cell(*cell_case(I, H, scale, rng)) for _ in range(cells)]
            pick = functools.partial(_pick, results)
            rows.append({
                "input_size": I,
                "hidden_size": H,
                "players": I + 2 * H,
                "weight_scale": scale,
                "cells": cells,
                "mean_rel_gap": float(pick("mean_rel_gap").mean()),
                "max_rel_gap": float(pick("max_rel_gap").max()),
                "mean_l1_gap": float(pick("l1_gap").mean()),
                "mean_spearman": float(np.nanmean(pick("spearman"))),
                "min_spearman": float(np.nanmin(pick("spearman"))),
                "max_deepshap_additivity": float(pick("deepshap_additivity").max()),
                "max_torch_vs_oracle": float(pick("torch_vs_oracle").max()),
            })
    return rows


def run(out: str | Path = "out", samples: int = 20, device: str = "cpu", seed: int = 0,
        quick: bool = False) -> dict:
    if device != "cpu":
        print("shapley_gap: tiny cells, float64; runs on the CPU whatever --device says")
    _reference()
    sizes = QUICK_SIZES if quick else FULL_SIZES
    start = time.perf_counter()
    rows = gap_table(sizes, WEIGHT_SCALES, samples, seed)
    seconds = time.perf_counter() - start
    print(f"shapley_gap: DeepSHAP (torch handler) vs exact Shapley values of sum(h1), "
          f"{samples} random nn.LSTMCell per row, float64, {seconds:.1f} s")
    print(common.table(
        ["I", "H", "players", "weights", "mean |DeepSHAP-Shapley|/|Δf|",
         "max |DeepSHAP-Shapley|/|Δf|", "mean L1 gap", "Spearman mean (min)", "DeepSHAP additivity",
         "torch vs JAX oracle"],
        [[r["input_size"], r["hidden_size"], r["players"],
          "torch init" if r["weight_scale"] == 1 else f"x{r['weight_scale']:g}",
          r["mean_rel_gap"], r["max_rel_gap"], r["mean_l1_gap"],
          f"{r['mean_spearman']:.3f} ({r['min_spearman']:.2f})",
          r["max_deepshap_additivity"], r["max_torch_vs_oracle"]] for r in rows]))
    result = {
        "benchmark": "shapley_gap",
        "output": "sum(h1)",
        "cells_per_row": samples,
        "min_delta": MIN_DELTA,
        "machine": common.machine(),
        "seconds": seconds,
        "rows": rows,
    }
    path = common.write_json(out, "shapley_gap", result)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0], "random cells per table row", 20)
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    run(args.out, args.samples, args.device, args.seed, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
