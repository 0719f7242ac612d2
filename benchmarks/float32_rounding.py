"""float32 additivity error against the model's own float32 rounding.

For models of growing ill-conditioning (f = ((w + ε)·h − w·h) / ε on an nn.LSTM's last state:
the head cancels two nearly equal terms, amplifying their rounding by 1/ε), prints

* the model's own rounding: max |f_float32 − f_float64| / output scale, on inputs and
  background (the float64 model is a copy with the same weights);
* the float32 additivity error of shap.DeepExplainer + torch_handler:
  max |Σφ − (f(x) − E f)| / output scale;
* the float64 additivity error of the same model, for contrast.

Usage: python benchmarks/float32_rounding.py [--samples 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import numpy as np
import shap
import torch
from torch import nn

import torch_handler


class IllConditioned(nn.Module):
    def __init__(self, epsilon: float):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.wide = nn.Linear(8, 2)
        self.narrow = nn.Linear(2, 1)
        with torch.no_grad():
            self.wide.weight[1] = self.wide.weight[0] + epsilon
            self.wide.bias[1] = self.wide.bias[0]
            self.narrow.weight[:] = torch.tensor([[-1 / epsilon, 1 / epsilon]])
            self.narrow.bias.zero_()

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.narrow(self.wide(out[:, -1]))


def additivity_error(model, background, X) -> float:
    torch_handler.register()
    try:
        values = shap.DeepExplainer(model, background).shap_values(X, check_additivity=False)
    finally:
        torch_handler.unregister()
    with torch.no_grad():
        f = model(X).double().numpy()
        expected = model(background).double().mean(0).numpy()
    sums = values.sum(axis=tuple(range(1, values.ndim - 1)))
    scale = max(np.abs(f).max(), np.abs(expected).max())
    return float(np.abs(sums - (f - expected)).max() / scale)


def own_rounding(model, background, X) -> float:
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        f32 = torch.cat([model(X), model(background)]).double()
        f64 = torch.cat([exact(X.double()), exact(background.double())])
    return float((f32 - f64).abs().max() / f64.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print("| 1/ε | model's own float32 rounding | float32 additivity error | ratio | float64 additivity error |")
    print("|---|---|---|---|---|")
    for epsilon in (1.0, 1e-1, 1e-2, 1e-3, 1e-4):
        torch.manual_seed(args.seed)
        model = IllConditioned(epsilon).eval()
        background, X = torch.randn(16, 10, 3), torch.randn(args.samples, 10, 3)
        rounding = own_rounding(model, background, X)
        error32 = additivity_error(model, background, X)
        error64 = additivity_error(copy.deepcopy(model).double(), background.double(), X.double())
        print(f"| {1 / epsilon:g} | {rounding:.2e} | {error32:.2e} | {error32 / rounding:.2g} | {error64:.2e} |")


if __name__ == "__main__":
    main()
