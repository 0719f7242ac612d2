"""Shared helpers of the end-to-end tests (shap, Captum, tangermeme, errors)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

import torch_handler
from torch_handler.additivity import tolerance_for


def as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def additivity_error(model, background, X, values, ranks=None) -> float:
    """max |Σ attributions − (f(x) − E f(background))| / output scale.

    The output scale is max(|f(x)|, |E f(background)|): floating-point rounding is relative
    to the magnitude of the numbers involved, not to their (possibly tiny) difference.
    values: shap's return value (array, or list of arrays for multi-input models), with the
    outputs on the last axis; ranks: shap's ranked output indices, if any.
    """
    with torch.no_grad():
        f = model(*as_list(X)).double().cpu().numpy()
        expected = model(*as_list(background)).double().mean(0).cpu().numpy()
    sums = sum(v.sum(axis=tuple(range(1, v.ndim - 1))) for v in as_list(values))
    if ranks is None:
        ranks = np.broadcast_to(np.arange(f.shape[1]), f.shape)
    ranks = np.asarray(ranks)
    delta = np.take_along_axis(f, ranks, axis=1) - expected[ranks]
    scale = max(np.abs(f).max(), np.abs(expected).max())
    return float(np.abs(sums - delta).max() / scale)


def explain(model, background, X, **kwargs):
    """shap.DeepExplainer(model, background).shap_values(X) with the handler registered."""
    import shap

    torch_handler.register()
    try:
        return shap.DeepExplainer(model, background).shap_values(X, **kwargs)
    finally:
        torch_handler.unregister()


# The project's one definition of "exact", per dtype.
TOLERANCE = {dtype: tolerance_for(dtype) for dtype in (torch.float64, torch.float32)}


class ModuleState(NamedTuple):
    forward_hooks: dict
    forward_pre_hooks: dict
    backward_hooks: dict
    backward_pre_hooks: dict
    attributes: list
    parameters: list
    instance_forward: bool
    training: bool
    full_backward_hook: object


def model_state(model) -> dict[str, ModuleState]:
    """Everything an explanation could leave behind on a model, per submodule: hooks, instance
    attributes, parameters, an instance-level forward, the training and full-backward-hook flags."""
    return {
        name: ModuleState(
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._backward_hooks),
            dict(m._backward_pre_hooks),
            sorted(vars(m)),
            sorted(m._parameters),
            "forward" in m.__dict__,
            m.training,
            m._is_full_backward_hook,
        )
        for name, m in model.named_modules()
    }


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale of b."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))


def captum_on_both_paths(monkeypatch, model, x, background, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captum ``DeepLiftShap`` attributions inside ``deeplift_mode``, first with the compiled CPU
    library, then with ``LSTM_DEEPSHAP_FUSED=0`` (the torch-ops path), detached."""
    from captum.attr import DeepLiftShap

    from torch_handler.recurrent.fused_loops import ENV

    def attributions():
        with torch_handler.deeplift_mode(model):
            return DeepLiftShap(model).attribute(x, baselines=background, target=target).detach()

    monkeypatch.delenv(ENV, raising=False)
    compiled = attributions()
    monkeypatch.setenv(ENV, "0")
    plain = attributions()
    monkeypatch.delenv(ENV)
    return compiled, plain


def additivity_gap(model, x, background, target: int, attributions: torch.Tensor) -> float:
    """max over inputs |Σ attributions − (f(x) − E f(background))|, relative to the largest gap."""
    with torch.no_grad():
        gap = model(x)[:, target] - model(background)[:, target].mean()
    total = attributions.sum(dim=tuple(range(1, attributions.ndim)))
    return float((total - gap).abs().max() / gap.abs().max())
