"""reference_jax.deeplift(fn) on an LSTM followed by a head (relu, tanh, gelu, softmax
attention, layer norm, elementwise product and matmul of two input-dependent tensors) equals
the torch handler's op rules on the same model, element-wise (float64, 1e-10).

The torch side is a real module inside ``deeplift_mode(strict=True)`` (every op of the head
must have a rule there) on the doubled batch; the JAX side is the same computation written in
plain JAX (``lax.scan`` LSTM, ``jax.nn`` activations, ``jax.nn.softmax``, layer norm as
``xc · rsqrt(mean(xc²) + eps)``) holding the module's weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pairing import TOLERANCE, relative_error, stack_params
from test_deeplift_sequences import _lstm_step, jax_stack
from torch import nn

import reference_jax
import torch_handler

B, T, I, H = 3, 5, 3, 4


class Model(nn.Module):
    """nn.LSTM, then the head named ``head``, then a linear read-out of the time mean."""

    def __init__(self, head: str):
        super().__init__()
        self.head = head
        self.lstm = nn.LSTM(I, H, batch_first=True)
        self.q, self.k, self.v, self.gate = (nn.Linear(H, H) for _ in range(4))
        self.norm = nn.LayerNorm(H)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()
        self.out = nn.Linear(H, 1)

    def forward(self, x):
        o, _ = self.lstm(x)
        y = TORCH_HEADS[self.head](self, o)
        return self.out(y.mean(1))


def _attention(m, o):
    scores = torch.matmul(m.q(o), m.k(o).transpose(1, 2)) / math.sqrt(H)
    return torch.matmul(torch.softmax(scores, dim=-1), m.v(o))


TORCH_HEADS = {
    "relu": lambda m, o: torch.relu(m.q(o)),
    "tanh": lambda m, o: torch.tanh(m.q(o)),
    "gelu": lambda m, o: F.gelu(m.q(o)),
    "gelu_tanh": lambda m, o: F.gelu(m.q(o), approximate="tanh"),
    "attention": _attention,
    "layer_norm": lambda m, o: m.norm(m.q(o)),
    "flax_layer_norm": lambda m, o: m.norm(m.q(o)),  # flax: variance E[x²] − E[x]² on the JAX side
    "equinox_layer_norm": lambda m, o: m.norm(m.q(o)),
    "product": lambda m, o: m.q(o) * torch.sigmoid(m.gate(o)),
    "matmul": lambda m, o: torch.matmul(torch.matmul(m.q(o), o.transpose(1, 2)), m.v(o)) / T,
    "all": lambda m, o: F.gelu(m.norm(_attention(m, o) + o)) * torch.tanh(m.gate(o)),
}


def _linear(layer):
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    return lambda x: x @ w.T + b


def _jax_heads(m: Model):
    q, k, v, gate = (_linear(layer) for layer in (m.q, m.k, m.v, m.gate))
    w_norm, b_norm, eps = m.norm.weight.detach().numpy(), m.norm.bias.detach().numpy(), m.norm.eps

    def layer_norm(x):
        xc = x - jnp.mean(x, axis=-1, keepdims=True)
        return xc * jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps) * w_norm + b_norm

    def flax_layer_norm(x):
        import flax.linen

        params = {"params": {"scale": w_norm, "bias": b_norm}}
        return flax.linen.LayerNorm(epsilon=eps).apply(params, x)

    def equinox_layer_norm(x):
        import equinox

        norm = equinox.nn.LayerNorm(H, eps=eps)
        norm = equinox.tree_at(lambda n: (n.weight, n.bias), norm, (jnp.asarray(w_norm), jnp.asarray(b_norm)))
        return jax.vmap(jax.vmap(norm))(x)

    def attention(o):
        scores = jnp.matmul(q(o), jnp.swapaxes(k(o), 1, 2)) / math.sqrt(H)
        return jnp.matmul(jax.nn.softmax(scores, axis=-1), v(o))

    return {
        "relu": lambda o: jax.nn.relu(q(o)),
        "tanh": lambda o: jnp.tanh(q(o)),
        "gelu": lambda o: jax.nn.gelu(q(o), approximate=False),
        "gelu_tanh": lambda o: jax.nn.gelu(q(o), approximate=True),
        "attention": attention,
        "layer_norm": lambda o: layer_norm(q(o)),
        "flax_layer_norm": lambda o: flax_layer_norm(q(o)),
        "equinox_layer_norm": lambda o: equinox_layer_norm(q(o)),
        "product": lambda o: q(o) * jax.nn.sigmoid(gate(o)),
        "matmul": lambda o: jnp.matmul(jnp.matmul(q(o), jnp.swapaxes(o, 1, 2)), v(o)) / T,
        "all": lambda o: jax.nn.gelu(layer_norm(attention(o) + o), approximate=False) * jnp.tanh(gate(o)),
    }


def strict_handler_multipliers(model, x, x_ref, m_out) -> np.ndarray:
    """Multipliers of the actual half from the handler, every op of the model held to a rule
    (``strict=True``: an op without one raises instead of warning)."""
    doubled = torch.cat((torch.as_tensor(x), torch.as_tensor(x_ref))).requires_grad_()
    with torch_handler.deeplift_mode(model, strict=True):
        (grad,) = torch.autograd.grad(model(doubled), doubled, torch.as_tensor(np.concatenate([m_out, m_out])))
    return grad[: len(x)].numpy()


@pytest.mark.parametrize("head", sorted(TORCH_HEADS))
def test_transform_equals_the_handler_on_an_lstm_with_a_head(head):
    torch.manual_seed(sorted(TORCH_HEADS).index(head))
    model = Model(head).double().eval()
    rng = np.random.default_rng(len(head))
    x, x_ref = rng.standard_normal((B, T, I)), rng.standard_normal((B, T, I))
    m_out = rng.standard_normal((B, 1))

    handler = strict_handler_multipliers(model, x, x_ref, m_out)
    params = stack_params(model.lstm)
    jax_head = _jax_heads(model)[head]
    w_out, b_out = model.out.weight.detach().numpy(), model.out.bias.detach().numpy()
    h0 = np.zeros((1, B, H))

    def fn(inputs):
        o, _ = jax_stack(_lstm_step, params, inputs, (h0, h0))
        return jnp.sum(m_out * (jnp.mean(jax_head(o), axis=1) @ w_out.T + b_out))

    ours = jax.jit(reference_jax.deeplift(fn))(x, x_ref)
    error = relative_error(ours, handler)
    print(f"[agreement] head {head}: max abs {np.abs(np.asarray(ours) - handler).max():.3g}, relative {error:.3g}")
    assert error <= TOLERANCE[torch.float64], f"{head}: {error:.3g}"
    f_x, f_r = (float(v) for v in jax.jit(jax.vmap(fn))(np.stack([x, x_ref])))  # one compilation
    total = float(np.sum((x - x_ref) * ours))
    assert abs(total - (f_x - f_r)) <= TOLERANCE[torch.float64] * max(abs(f_x), abs(f_r))
