"""Property tests of the rule functions at extremes and of the public API's promise
that nothing changes outside an explanation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_handler
from torch_handler import UnsupportedConfigurationError
from torch_handler.explanation import is_active
from torch_handler.recurrent.registry import TORCH_FORWARD
from torch_handler.recurrent.rules import rescale_relu, rescale_sigmoid, rescale_tanh

EPS = torch.finfo(torch.float64).eps
TINY = torch.finfo(torch.float64).tiny
values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
tiny_steps = st.sampled_from([0.0, 1e-12, -1e-12, 1e-9, 1e-6, 1e-3, 1.0, 30.0, 1e4])


@settings(max_examples=300, deadline=None)
@given(z=values, step=tiny_steps)
@pytest.mark.parametrize(
    "rescale,phi,max_slope",
    [(rescale_sigmoid, torch.sigmoid, 0.25), (rescale_tanh, torch.tanh, 1.0), (rescale_relu, torch.relu, 1.0)],
)
def test_rescale_is_finite_bounded_and_sums_to_delta(rescale, phi, max_slope, z, step):
    z_a = torch.tensor([z], dtype=torch.float64)
    z_r = z_a - step
    factor = rescale(z_a, z_r)
    assert torch.isfinite(factor).all()
    assert 0.0 <= factor.item() <= max_slope * (1 + 4 * EPS)
    # factor · Δz reproduces Δφ up to rounding of φ's values (never worse than a few ulps).
    delta_phi = (phi(z_a) - phi(z_r)).item()
    scale = max(abs(phi(z_a).item()), abs(phi(z_r).item()), 1e-300)
    # (Plus the subnormal spacing: below finfo.tiny there is no relative precision to keep.)
    assert abs(factor.item() * (z_a - z_r).item() - delta_phi) <= 8 * EPS * scale + TINY


def test_rescale_limit_is_the_derivative():
    z = torch.linspace(-20, 20, 81, dtype=torch.float64)
    # References written without cancellation: σ'(z) = σ(z)σ(−z), tanh'(z) = 1/cosh²(z).
    assert torch.allclose(rescale_sigmoid(z, z), torch.sigmoid(z) * torch.sigmoid(-z), rtol=1e-14, atol=0)
    assert torch.allclose(rescale_tanh(z, z), torch.cosh(z) ** -2, rtol=1e-13, atol=0)


def cell_multipliers(cell, x, h, c, x_ref, h_ref, c_ref):
    """DeepLIFT multipliers of a cell step and the outputs' deltas, via the doubled batch."""
    inputs = [torch.cat(pair).requires_grad_() for pair in ((x, x_ref), (h, h_ref), (c, c_ref))]
    with torch_handler.deeplift_mode(cell):
        h1, c1 = cell(inputs[0], (inputs[1], inputs[2]))
        grads = torch.autograd.grad(h1.sum() + c1.sum(), inputs)
    n = x.shape[0]
    contributions = sum(
        (g[:n] * (a - r)).sum(1) for g, a, r in zip(grads, (x, h, c), (x_ref, h_ref, c_ref), strict=True)
    )
    deltas = (h1[:n] - h1[n:]).sum(1) + (c1[:n] - c1[n:]).sum(1)
    scale = torch.cat((h1, c1), 1).abs().max() + c.abs().max() + c_ref.abs().max()
    return grads, contributions.detach(), deltas.detach(), scale.item()


@settings(max_examples=60, deadline=None)
@given(
    weight_scale=st.sampled_from([1e-3, 1.0, 1e2, 1e4]),
    delta=st.sampled_from([0.0, 1e-12, 1e-8, 1e-3, 1.0]),
    hidden=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_lstm_cell_rule_at_extremes_is_finite_and_additive(weight_scale, delta, hidden, seed):
    torch.manual_seed(seed)
    cell = nn.LSTMCell(2, hidden).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(weight_scale)
    x, h, c = torch.randn(3, 2).double(), torch.randn(3, hidden).double(), torch.randn(3, hidden).double()
    x_ref, h_ref, c_ref = x - delta * torch.randn_like(x), h - delta, c + delta
    grads, contributions, deltas, scale = cell_multipliers(cell, x, h, c, x_ref, h_ref, c_ref)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (contributions - deltas).abs().max().item() <= 1e-12 * scale


def test_forward_outputs_and_gradients_unchanged_outside_an_explanation():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    x = torch.randn(5, 7, 3, requires_grad=True)

    def run():
        out, (h, c) = lstm(x)
        loss = out.pow(2).sum() + h.sum() * c.sum()
        return out.detach(), torch.autograd.grad(loss, (x, *lstm.parameters()))

    out_before, grads_before = run()
    torch_handler.register()
    try:
        out_during, grads_during = run()
    finally:
        torch_handler.unregister()
    assert torch.equal(out_before, out_during)
    assert all(torch.equal(a, b) for a, b in zip(grads_before, grads_during, strict=True))
    assert "forward" not in lstm.__dict__


def test_deeplift_forward_matches_torch_forward():
    torch.manual_seed(0)
    for module, x in [
        (nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2), torch.randn(6, 4, 3)),
        (nn.GRU(3, 4, num_layers=2, bidirectional=True), torch.randn(6, 4, 3)),
        (nn.RNN(3, 4, nonlinearity="relu"), torch.randn(6, 4, 3)),
    ]:
        module = module.double()
        x = x.double().requires_grad_()
        native = module(x)
        with torch_handler.deeplift_mode(module):
            ours = module(x)
        flat = lambda o: torch.cat([t.reshape(-1) for t in (o[0], *(o[1] if isinstance(o[1], tuple) else (o[1],)))])  # noqa: E731
        np.testing.assert_allclose(flat(ours).detach(), flat(native).detach(), rtol=0, atol=1e-14)


def test_nested_modes_and_register_restore_only_at_the_outermost_exit():
    lstm = nn.LSTM(3, 4)
    torch_handler.register()
    try:
        with torch_handler.deeplift_mode(lstm):
            with torch_handler.deeplift_mode(lstm):
                assert is_active(lstm)
            assert is_active(lstm) and nn.LSTM.forward is not TORCH_FORWARD[nn.LSTM]
        assert not is_active(lstm) and "forward" not in lstm.__dict__
        assert nn.LSTM.forward is TORCH_FORWARD[nn.LSTM]
    finally:
        torch_handler.unregister()


def test_an_instance_level_forward_is_refused_and_left_in_place():
    lstm = nn.LSTM(3, 4)
    custom = lstm.forward  # e.g. another tool had patched the instance
    lstm.forward = custom
    with pytest.raises(UnsupportedConfigurationError, match="instance-level forward"):
        with torch_handler.deeplift_mode(lstm):
            pass
    assert lstm.__dict__["forward"] is custom
