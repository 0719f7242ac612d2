"""Which engine to use? Time and additivity of seven ways to explain the demo's LSTM.

    python benchmarks/engines.py --out out [--samples 8] [--quick] [--device cuda]

The model is the demo's forecaster (``torch_handler/demo/forecast.py``: nn.LSTM + nn.Linear on macrodata,
trained here with the demo's code and seed); the same held-out windows are explained by every
engine against the same background of training windows:

* shap DeepExplainer after ``torch_handler.register()`` (exact DeepSHAP);
* shap DeepExplainer without it (``torch_handler.unregister()``, plain gradients through the
  LSTM, ``check_additivity=False``);
* shap GradientExplainer (expected gradients);
* shap PermutationExplainer on flattened inputs (model-agnostic; exact additivity by
  construction, sampled values);
* Captum IntegratedGradients from each background row, averaged, at 20 and 50 steps;
* Captum DeepLiftShap inside ``torch_handler.deeplift_mode(model)``.

Additivity error = max over samples |sum(phi) - (f(x) - E f(bg))| / max(|f(x)|, |E f(bg)|),
the maximum of the denominator taken over the explained samples.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ADDITIVITY = ("additivity error = max_j |sum(phi_j) - (f(x_j) - E f(bg))| / "
              "max(max_j |f(x_j)|, |E f(bg)|)")


def load_demo():
    """The demo module, :mod:`torch_handler.demo` (data, model and training of the README's demo)."""
    import torch_handler.demo

    return torch_handler.demo


def demo_problem(samples: int, background: int, seed: int, epochs: int, device: torch.device):
    """The demo's trained model, ``samples`` held-out windows and a background sample."""
    demo = load_demo()
    data = demo.make_dataset()
    model, _ = demo.train(data, epochs, seed, device, progress=False)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data.x_train), size=min(background, len(data.x_train)),
                              replace=False))
    bg = torch.tensor(data.x_train[rows], dtype=torch.float32, device=device)
    X = torch.tensor(data.x_test[-samples:], dtype=torch.float32, device=device)
    return model, X, bg


# --------------------------------------------------------------------------- engines


def _as_array(phi, shape) -> np.ndarray:
    if isinstance(phi, list):
        phi = phi[0]
    if torch.is_tensor(phi):
        phi = phi.detach().cpu().numpy()
    return np.asarray(phi, dtype=np.float64).reshape(shape)


def shap_deep_handler(model, X, bg, seed):
    import shap

    import torch_handler

    torch_handler.register()
    return shap.DeepExplainer(model, bg).shap_values(X)


def shap_deep_plain(model, X, bg, seed):
    import shap

    import torch_handler

    torch_handler.unregister()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unrecognized nn.Module: LSTM"
            return shap.DeepExplainer(model, bg).shap_values(X, check_additivity=False)
    finally:
        torch_handler.register()


def shap_gradient(model, X, bg, seed):
    import shap

    np.random.seed(seed)
    torch.manual_seed(seed)
    return shap.GradientExplainer(model, bg).shap_values(X, nsamples=200)


def shap_permutation(model, X, bg, seed, permutations: int = 10):
    import shap

    shape = X.shape[1:]
    features = int(np.prod(shape))

    def f(flat):
        batch = torch.as_tensor(flat, dtype=torch.float32, device=X.device).reshape(-1, *shape)
        with torch.no_grad():
            return model(batch)[:, 0].double().cpu().numpy()

    bg_flat = bg.reshape(len(bg), -1).cpu().numpy()
    masker = shap.maskers.Independent(bg_flat, max_samples=len(bg_flat))
    explainer = shap.PermutationExplainer(f, masker, seed=seed)
    result = explainer(X.reshape(len(X), -1).cpu().numpy(),
                       max_evals=permutations * (2 * features + 1), silent=True)
    return result.values


def captum_ig(n_steps: int):
    def run(model, X, bg, seed):
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(model)
        out = []
        for j in range(len(X)):
            inputs = X[j : j + 1].expand(len(bg), *X.shape[1:]).contiguous()
            out.append(ig.attribute(inputs, baselines=bg, target=0, n_steps=n_steps).mean(0))
        return torch.stack(out)

    return run


def captum_deepliftshap(model, X, bg, seed):
    from captum.attr import DeepLiftShap

    import torch_handler

    with torch_handler.deeplift_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
        return DeepLiftShap(model).attribute(X, baselines=bg, target=0)


def engines(permutations: int) -> dict:
    return {
        "shap DeepExplainer + torch_handler": shap_deep_handler,
        "shap DeepExplainer, no handler": shap_deep_plain,
        "shap GradientExplainer (200 samples)": shap_gradient,
        f"shap PermutationExplainer ({permutations} permutations)":
            lambda m, X, bg, s: shap_permutation(m, X, bg, s, permutations),
        "Captum IntegratedGradients, 20 steps, avg over bg": captum_ig(20),
        "Captum IntegratedGradients, 50 steps, avg over bg": captum_ig(50),
        "Captum DeepLiftShap + deeplift_mode": captum_deepliftshap,
    }


def compare(model, X, bg, seed: int = 0, permutations: int = 10, warmup: bool = True) -> list[dict]:
    """Run every engine on (model, X, bg); one dict per engine, with time and errors."""
    device = X.device
    with torch.no_grad():
        f = model(X)[:, 0].double().cpu().numpy()
        expected = float(model(bg)[:, 0].double().mean().cpu())
    delta = f - expected
    scale = max(float(np.abs(f).max()), abs(expected))
    rows, values = [], {}
    # cuDNN refuses RNN backward in eval mode: the gradient engines need the native kernels.
    with torch.backends.cudnn.flags(enabled=False):
        for name, engine in engines(permutations).items():
            if warmup:
                engine(model, X[:1], bg, seed)
            common.synchronize(device)
            start = time.perf_counter()
            phi = _as_array(engine(model, X, bg, seed), X.shape)
            common.synchronize(device)
            seconds = time.perf_counter() - start
            sums = phi.reshape(len(X), -1).sum(axis=1)
            values[name] = phi
            rows.append({
                "engine": name,
                "seconds": seconds,
                "additivity_error": float(np.abs(sums - delta).max() / scale),
            })
    reference = values[rows[0]["engine"]].ravel()
    permutation = next(v for k, v in values.items() if "Permutation" in k).ravel()
    for row in rows:
        phi = values[row["engine"]].ravel()
        row["corr_vs_permutation"] = float(np.corrcoef(phi, permutation)[0, 1])
        row["max_diff_vs_exact_deepshap"] = float(np.abs(phi - reference).max()
                                                  / np.abs(reference).max())
    return rows


def run(out: str | Path = "out", samples: int = 8, device: str = "cpu", seed: int = 0,
        quick: bool = False) -> dict:
    dev = common.resolve_device(device)
    background = 8 if quick else 32
    epochs = 20 if quick else 200
    permutations = 2 if quick else 10
    model, X, bg = demo_problem(samples, background, seed, epochs, dev)
    print(f"engines: demo forecaster (nn.LSTM(6, 8) + Linear, T={X.shape[1]}), {len(X)} "
          f"held-out samples, background {len(bg)} training windows, {dev}, torch threads "
          f"{torch.get_num_threads()}")
    rows = compare(model, X, bg, seed, permutations)
    print(common.table(
        ["engine", "time (s)", "additivity error", "corr. with Permutation",
         "max |phi - exact DeepSHAP| / max |exact|"],
        [[r["engine"], r["seconds"], r["additivity_error"], r["corr_vs_permutation"],
          r["max_diff_vs_exact_deepshap"]] for r in rows]))
    print(ADDITIVITY)
    result = {
        "benchmark": "engines",
        "samples": len(X),
        "background": len(bg),
        "epochs": epochs,
        "device": str(dev),
        "machine": common.machine(),
        "additivity_definition": ADDITIVITY,
        "rows": rows,
    }
    path = common.write_json(out, "engines", result)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0], "held-out samples to explain", 8)
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    run(args.out, args.samples, args.device, args.seed, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
