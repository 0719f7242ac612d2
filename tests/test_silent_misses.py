"""Idioms without a rule that once passed silently through ``deeplift_mode``: each is now
reported by name (UnsupportedOpError under strict=True, one UnsupportedOpWarning otherwise),
and its linear twin stays exact without a report.

Found by writing practitioner models (docs/whole-models.md): picking values with the indices
of ``torch.max(dim)``, ``addcmul`` / ``lerp`` whose product has two input-dependent factors, a
custom ``torch.autograd.Function``, a TorchScript submodule or function with nonlinear ops,
``h[h < 0] = 0`` (a ReLU written as a masked write), ``.data`` and a convolution whose kernel
depends on the input. Each missed f(x) − f(b) by 3-77 % of the output scale, without a word.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import DeepLift
from helpers import TOLERANCE
from torch import nn

import torch_handler
from torch_handler.errors import UnsupportedOpError, UnsupportedOpWarning

pytestmark = pytest.mark.usefixtures("one_thread")


class Sigmoid(torch.autograd.Function):
    """A user's own sigmoid with its own backward (plain gradients)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y * (1 - y)


class Gate(nn.Module):
    def forward(self, h):
        return torch.tanh(h) * torch.sigmoid(h.flip(-1))


@torch.jit.script
def scripted_gate(h):
    return torch.tanh(h) * torch.sigmoid(h.flip(-1))


def _gated(h):
    out = h.clone()
    out[h < 0] = 0.0
    return out


def _picked_by_max(h, z):
    _, index = torch.max(h.sum(-1), dim=1)
    return h[torch.arange(h.shape[0]), index]


def _gathered_by_max(h, z):
    _, index = torch.max(h.sum(-1), dim=1)
    return h.gather(1, index[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]


def _dynamic_conv(model, h, z):
    B = h.shape[0]
    kernels = model.kernel(h[:, -1]).view(B * 8, 8, 1)
    return F.conv1d(h.transpose(1, 2).reshape(1, B * 8, -1), kernels, groups=B).view(B, 8, -1).mean(-1)


# name -> (head on the GRU's outputs h (B, T, 8), the op the report names)
MISSES = {
    "max_indices_getitem": (_picked_by_max, "max"),
    "max_indices_gather": (_gathered_by_max, "max"),
    "addcmul": (lambda h, z: torch.addcmul(h[:, -1], h[:, -1], h[:, -1].flip(-1)), "addcmul"),
    "addcmul_method": (lambda h, z: h[:, -1].clone().addcmul_(h[:, -1], h[:, 0]), "addcmul"),
    "lerp_weight": (lambda h, z: torch.lerp(h[:, 0], h[:, -1], torch.sigmoid(h[:, 1])), "lerp"),
    "custom_function": (lambda h, z: Sigmoid.apply(h[:, -1]), "Sigmoid"),
    "scripted_module": (lambda h, z: z.gate(h[:, -1]), "torch.jit"),
    "scripted_function": (lambda h, z: scripted_gate(h[:, -1]), "torch.jit"),
    "masked_write": (lambda h, z: _gated(h[:, -1]), "__setitem__"),
    "data": (lambda h, z: h[:, -1] / (1 + h[:, -1].data.abs().amax(-1, keepdim=True)), "data"),
    "dynamic_conv": (lambda h, z: _dynamic_conv(z, h, z), "conv1d"),
}

# Their linear twins: no report, exact.
TWINS = {
    "max_values": lambda h, z: torch.max(h, dim=1).values,
    "addcmul_constant_factor": lambda h, z: torch.addcmul(h[:, -1], h[:, 0], z.scale),
    "lerp_scalar_weight": lambda h, z: torch.lerp(h[:, 0], h[:, -1], 0.3),
    "scripted_linear": lambda h, z: z.linear(h[:, -1]),
    "write_at_fixed_positions": lambda h, z: _write_fixed(h[:, -1]),
    "conv_with_parameter_kernel": lambda h, z: z.conv(h.transpose(1, 2)).mean(-1),
}


def _write_fixed(h):
    out = h.clone()
    out[:, :2] = 0.0
    return out


class Model(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head_fn = head
        self.gru = nn.GRU(5, 8, batch_first=True)
        self.kernel = nn.Linear(8, 64)
        self.conv = nn.Conv1d(8, 8, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            self.gate = torch.jit.script(Gate())
            self.linear = torch.jit.script(nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.out(self.head_fn(2 * h, self))


def _data(seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, 5, dtype=torch.float64, generator=generator)
    return x, torch.randn(4, 7, 5, dtype=torch.float64, generator=generator)


def _model(head):
    torch.manual_seed(0)
    return Model(head).double().eval()


def _miss(model, x, b, attributions) -> float:
    """max |Σ attributions − (f(x) − f(b))| of output 0, over the output scale."""
    with torch.no_grad():
        fx, fb = model(x), model(b)
    return float((attributions.sum((1, 2)) - (fx - fb)[:, 0]).abs().max() / torch.maximum(fx.abs(), fb.abs()).max())


@pytest.mark.parametrize("case", list(MISSES))
def test_each_idiom_without_a_rule_is_refused_by_name_under_strict(case):
    head, op = MISSES[case]
    model = _model(head)
    x, b = _data()
    with pytest.raises(UnsupportedOpError, match=f"`{op}`".replace(".", r"\.")), \
            torch_handler.deeplift_mode(model, strict=True):
        DeepLift(model).attribute(x, baselines=b, target=0)
    # and the miss it would have been, had it passed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch_handler.deeplift_mode(model):
            attributions = DeepLift(model).attribute(x, baselines=b, target=0).detach()
    reports = [w for w in caught if issubclass(w.category, UnsupportedOpWarning)]
    assert len(reports) == 1 and f"`{op}`" in str(reports[0].message)
    assert _miss(model, x, b, attributions) > 1e3 * TOLERANCE[torch.float64]


@pytest.mark.parametrize("case", list(TWINS))
def test_their_linear_twins_stay_exact_without_a_report(case):
    model = _model(TWINS[case])
    x, b = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        with torch_handler.deeplift_mode(model, strict=True):
            attributions = DeepLift(model).attribute(x, baselines=b, target=0).detach()
    assert _miss(model, x, b, attributions) <= TOLERANCE[torch.float64]


def test_scripted_code_is_reported_after_torchscript_warms_up():
    """TorchScript's profiling executor fuses a graph after a few calls into one opaque
    DifferentiableGraph node: still reported, call after call; a scripted Linear stays exact."""
    model, linear = _model(MISSES["scripted_function"][0]), _model(TWINS["scripted_linear"])
    x, b = _data()
    for _ in range(4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch_handler.deeplift_mode(model):
                DeepLift(model).attribute(x, baselines=b, target=0)
            with torch_handler.deeplift_mode(linear):
                DeepLift(linear).attribute(x, baselines=b, target=0)
        assert len([w for w in caught if issubclass(w.category, UnsupportedOpWarning)]) == 1
