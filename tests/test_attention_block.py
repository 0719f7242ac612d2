"""``F.multi_head_attention_forward`` in its plain form as one intercepted call
(torch_handler/ops/interception/attention_block.py) against stepping into it.

Its forward is torch's composite call for call: the same value, bit for bit. Its backward is what
stepping in applies (linear projections, the attention rule): the attributions agree with the
stepped-in path's to rounding, in shap and Captum, and keep additivity. Every other form (masks,
attention weights, extra key/value biases, zero attention, dropout while training, a key or value
that does not vary with the input) is stepped into as before.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLiftShap
from helpers import additivity_gap, relative
from torch import nn

import torch_handler
from torch_handler.additivity import tolerance_for
from torch_handler.ops.interception import attention_block

BAR = {torch.float64: 1e-12, torch.float32: tolerance_for(torch.float32)}


class Attending(nn.Module):
    """GRU features attended by nn.MultiheadAttention in one of several forms."""

    def __init__(self, form: str = "self", batch_first: bool = True, memory: int = 12, **attention):
        super().__init__()
        self.form, self.batch_first = form, batch_first
        self.gru = nn.GRU(4, 12, batch_first=True)
        self.memory = nn.GRU(4, memory, batch_first=True)
        self.attention = nn.MultiheadAttention(12, 3, batch_first=batch_first, **attention)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        h, _ = self.gru(x)
        if self.form == "constant-memory":  # key and value do not vary with the input
            m = torch.arange(x.shape[1] * 12, dtype=x.dtype).sin().view(1, x.shape[1], 12).expand(len(x), -1, -1)
        else:
            m, _ = self.memory(x.flip(1))
        if not self.batch_first:
            h, m = h.transpose(0, 1), m.transpose(0, 1)
        kwargs = {"need_weights": self.form == "weights"}
        if self.form == "mask":
            kwargs["attn_mask"] = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)  # True: masked
        if self.form in ("self", "weights", "mask"):
            a, _ = self.attention(h, h, h, **kwargs)
        elif self.form == "cross":  # key is value, query apart
            a, _ = self.attention(h, m, m, **kwargs)
        else:  # three different tensors
            a, _ = self.attention(h, m, m * 0.5, **kwargs)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.out(nn.functional.gelu(a).mean(1))


def attributions(model, x, background, *, block: bool, monkeypatch) -> torch.Tensor:
    """Captum DeepLiftShap in deeplift_mode, through the block (checked to serve) or stepped in."""
    served = []
    real = attention_block.read

    def spy(*args):
        served.append(real(*args) if block else None)
        return served[-1]

    monkeypatch.setattr(attention_block, "read", spy)
    with torch_handler.deeplift_mode(model):
        result = DeepLiftShap(model).attribute(x, baselines=background, target=1).detach()
    monkeypatch.setattr(attention_block, "read", real)
    assert served and all((s is not None) == block for s in served)
    return result


def data(dtype, n=3, s=4, t=6):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, t, 4, generator=g, dtype=dtype), torch.randn(s, t, 4, generator=g, dtype=dtype)


CASES = {
    "self": {}, "self-time-major": {"batch_first": False}, "cross": {"form": "cross"},
    "three-inputs": {"form": "three"}, "kdim-vdim": {"form": "three", "memory": 8, "kdim": 8, "vdim": 8},
    "no-bias": {"bias": False},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_the_block_matches_stepping_in(monkeypatch, case, dtype):
    torch.manual_seed(0)
    model = Attending(**CASES[case]).to(dtype).eval()
    # kdim, vdim other than the embedding size: q, k and v have projection weights of their own
    assert model.attention._qkv_same_embed_dim == (case != "kdim-vdim")
    x, background = data(dtype)
    block = attributions(model, x, background, block=True, monkeypatch=monkeypatch)
    stepped = attributions(model, x, background, block=False, monkeypatch=monkeypatch)
    assert torch.isfinite(block).all()
    assert relative(block, stepped) <= BAR[dtype]
    assert additivity_gap(model, x, background, 1, block) <= BAR[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["self", "cross", "three"])
def test_the_forward_is_torch_own_value(form, dtype):
    """The block's output equals torch's composite bit for bit (same calls, same order)."""
    torch.manual_seed(2)
    model = Attending(form=form).to(dtype).eval()
    x, background = data(dtype)
    doubled = torch.cat([x, background[:3]])  # a doubled batch, as the engines run it
    seen = []
    handle = model.attention.register_forward_hook(lambda module, args, out: seen.append((args, out[0])))
    try:
        with torch_handler.deeplift_mode(model):
            model(doubled.clone().requires_grad_())
    finally:
        handle.remove()
    (args, inside), = seen
    with torch.no_grad():
        native, _ = model.attention(*(a.detach() for a in args), need_weights=False)
    assert torch.equal(inside.detach(), native)


@pytest.mark.parametrize("form, attention", [
    ("weights", {}), ("mask", {}), ("self", {"add_bias_kv": True}), ("self", {"add_zero_attn": True}),
    ("constant-memory", {}),
])
def test_other_forms_are_stepped_into(monkeypatch, form, attention):
    torch.manual_seed(3)
    model = Attending(form=form, **attention).double().eval()
    x, background = data(torch.float64)
    stepped = attributions(model, x, background, block=False, monkeypatch=monkeypatch)  # read declines
    assert torch.isfinite(stepped).all()
    assert additivity_gap(model, x, background, 1, stepped) <= 1e-10


def test_dropout_while_training_is_stepped_into(monkeypatch):
    torch.manual_seed(4)
    model = Attending(dropout=0.1).double().eval()
    model.attention.train()  # dropout active: not the plain form
    x, background = data(torch.float64)
    seen = []
    real = attention_block.read
    monkeypatch.setattr(attention_block, "read", lambda *a: seen.append(real(*a)) or seen[-1])
    no_rule = pytest.warns(torch_handler.UnsupportedOpWarning, match="scaled_dot_product_attention")
    with torch_handler.deeplift_mode(model), no_rule:  # stepped in: the attention with dropout
        model(torch.cat([x, background[:3]]).requires_grad_()).sum().backward()
    assert seen and all(s is None for s in seen)


def test_an_input_changed_in_place_after_the_attention_is_refused():
    class Overwrites(Attending):
        def forward(self, x):
            h = self.gru(x)[0] * 1.0  # a tensor of its own (the GRU's output is a view)
            a, _ = self.attention(h, h, h, need_weights=False)
            out = self.out(a.mean(1))
            h.mul_(2)  # after the attention used h
            return out

    torch.manual_seed(5)
    model = Overwrites().double().eval()
    x, background = data(torch.float64)
    with torch_handler.deeplift_mode(model), pytest.raises(RuntimeError, match="modified by an in-place"):
        DeepLiftShap(model).attribute(x, baselines=background, target=1)


def test_a_call_torch_refuses_is_refused_by_torch():
    """The block computes by its own calls, so it first makes the composite's shape checks; a call
    that fails them is stepped into, where torch raises its own error."""

    class WrongSize(Attending):
        def forward(self, x):
            h, _ = self.gru(x)
            t = h.transpose(0, 1)
            a = self.attention
            out, _ = nn.functional.multi_head_attention_forward(
                t, t, t, 16, 3, a.in_proj_weight, a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight,
                a.out_proj.bias, training=False, need_weights=False)
            return self.out(out.mean(0))

    model = WrongSize().double().eval()
    x, background = data(torch.float64)
    with torch_handler.deeplift_mode(model), pytest.raises(AssertionError, match="expecting embedding dimension"):
        DeepLiftShap(model).attribute(x, baselines=background, target=1)
