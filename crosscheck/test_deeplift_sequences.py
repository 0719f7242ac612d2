"""reference_jax.deeplift(fn) on plain-JAX (lax.scan) LSTM / GRU / RNN stacks holding a torch
module's weights, against the torch handler (the module inside deeplift_mode on the doubled
batch) and the oracle's hand-written ``batched_*_sequence_multipliers``, element-wise.

The explained function is the stack followed by a fixed linear read-out of every output
(``Σ m_out ⊙ out + Σ m_hn ⊙ h_n (+ Σ m_cn ⊙ c_n)``): its input multipliers are the stack's
multipliers for those output multipliers, which the other two sides are given directly.
The JAX stack is written the way a user would write it (torch's gate layout, ``(1 − z) ⊙ n +
z ⊙ h`` for GRU); it shares no code with either side.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pairing import TOLERANCE, handler_multipliers, relative_error, stack_params
from test_crosscheck_sequences import _module  # the same torch module from a config

import reference_jax as oracle

N_CONFIGS = {"lstm": 3, "gru": 3, "rnn": 2}


# --------------------------------------------------------------------------- the user's model


def _lstm_step(p, x, state):
    h, c = state
    z = x @ p.w_ih.T + p.b_ih + h @ p.w_hh.T + p.b_hh
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    if p.w_hr is not None:
        h = h @ p.w_hr.T
    return h, c


def _gru_step(p, x, state):
    (h,) = state
    gx, gh = x @ p.w_ih.T + p.b_ih, h @ p.w_hh.T + p.b_hh
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return ((1.0 - z) * n + z * h,)


def _rnn_step(nonlinearity):
    act = jnp.tanh if nonlinearity == "tanh" else jax.nn.relu

    def step(p, x, state):
        (h,) = state
        return (act(x @ p.w_ih.T + p.b_ih + h @ p.w_hh.T + p.b_hh),)

    return step


def jax_stack(step, params, x, init):
    """A batch-first stack: ``x`` ``(B, T, I)``, ``init`` a tuple of ``(L*D, B, ·)``; returns
    ``(out (B, T, D*P), finals)`` like torch."""
    n_dir = len(params[0])
    finals = [[] for _ in init]
    layer_in = jnp.swapaxes(x, 0, 1)  # (T, B, ·)
    for layer, directions in enumerate(params):
        outs = []
        for d, p in enumerate(directions):
            s0 = tuple(s[layer * n_dir + d] for s in init)

            def body(state, x_t, p=p):
                new = step(p, x_t, state)
                return new, new[0]

            final, out = jax.lax.scan(body, s0, layer_in, reverse=d == 1)
            outs.append(out)
            for k, s in enumerate(final):
                finals[k].append(s)
        layer_in = jnp.concatenate(outs, axis=-1)
    return jnp.swapaxes(layer_in, 0, 1), tuple(jnp.stack(f) for f in finals)


# --------------------------------------------------------------------------- the three sides


def _config(kind: str, index: int):
    rng = np.random.default_rng(zlib.crc32(f"jaxfn-{kind}-{index}".encode()))
    config = dict(
        num_layers=int(rng.integers(1, 3)),
        bidirectional=index % 2 == 1,  # each kind runs both directions and, at index 2, no bias
        bias=index != 2,
        steps=int(rng.integers(1, 9)),
        batch=int(rng.integers(1, 4)),
        features=int(rng.integers(1, 5)),
        hidden=int(rng.integers(1, 6)),
    )
    if kind == "lstm":
        config["proj_size"] = int(rng.integers(0, config["hidden"])) if rng.random() < 0.5 else 0
    if kind == "rnn":
        config["nonlinearity"] = "relu" if index % 2 else "tanh"
    return config, rng


CASES = [(kind, index) for kind, n in N_CONFIGS.items() for index in range(n)]


@pytest.mark.parametrize("kind,index", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_transform_of_a_jax_stack_equals_the_handler_and_the_oracle(kind, index):
    config, rng = _config(kind, index)
    torch.manual_seed(index)
    module = _module(kind, config).double()
    B, T, I, H = config["batch"], config["steps"], config["features"], config["hidden"]
    P = config.get("proj_size", 0) or H
    D = 2 if config["bidirectional"] else 1
    LD = config["num_layers"] * D
    is_lstm = kind == "lstm"
    normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    shapes = [(B, T, I), (LD, B, P)] + ([(LD, B, H)] if is_lstm else [])
    actual = [normal(*s) for s in shapes]
    reference = [normal(*s) for s in shapes]
    m_out = [normal(B, T, D * P), normal(LD, B, P)] + ([normal(LD, B, H)] if is_lstm else [])

    # The transformation on the plain-JAX stack.
    params = stack_params(module)
    step = {"lstm": _lstm_step, "gru": _gru_step}.get(kind) or _rnn_step(config["nonlinearity"])

    def readout(inputs):
        out, finals = jax_stack(step, params, inputs[0], tuple(inputs[1:]))
        return sum(jnp.sum(m * v) for m, v in zip(m_out, (out, *finals), strict=True))

    ours = jax.jit(oracle.deeplift(readout))(actual, reference)
    pairs = [np.stack(p) for p in zip(actual, reference, strict=True)]
    f_x, f_r = (float(v) for v in jax.jit(jax.vmap(readout))(pairs))  # one compilation
    total = sum(np.sum((a - r) * m) for a, r, m in zip(actual, reference, ours, strict=True))
    assert abs(total - (f_x - f_r)) <= TOLERANCE[torch.float64] * max(abs(f_x), abs(f_r))

    # The torch handler on the module itself (x batch-first, states (L*D, B, ·)).
    if is_lstm:
        call = lambda m, x, h0, c0: (lambda o: (o[0], *o[1]))(m(x, (h0, c0)))  # noqa: E731
    else:
        call = lambda m, x, h0: m(x, h0)  # noqa: E731
    dims = [0, 1, 1][: len(actual)]
    as_t = lambda arrays: [torch.as_tensor(a) for a in arrays]  # noqa: E731
    halves = handler_multipliers(module, call, as_t(actual), as_t(reference), dims, as_t(m_out), dims)

    # The oracle's hand-written sequence multipliers (batch first everywhere).
    first = lambda a, d: np.moveaxis(a, d, 0)  # noqa: E731
    a, r, m = ([first(v, d) for v, d in zip(vs, dims, strict=True)] for vs in (actual, reference, m_out))
    if kind == "lstm":
        m_x, (m_h0, m_c0) = oracle.batched_lstm_sequence_multipliers(
            params, a[0], (a[1], a[2]), r[0], (r[1], r[2]), tuple(m))
        expected = [m_x, m_h0, m_c0]
    elif kind == "gru":
        m_x, (m_h0,) = oracle.batched_gru_sequence_multipliers(params, a[0], (a[1],), r[0], (r[1],), tuple(m))
        expected = [m_x, m_h0]
    else:
        m_x, (m_h0,) = oracle.batched_rnn_sequence_multipliers(
            params, a[0], (a[1],), r[0], (r[1],), tuple(m), nonlinearity=config["nonlinearity"])
        expected = [m_x, m_h0]

    for k, d in enumerate(dims):
        mine = first(np.asarray(ours[k]), d)
        handler = halves[k][0].movedim(d, 0).numpy()
        for name, other in (("handler", handler), ("oracle", np.asarray(expected[k]))):
            error = relative_error(mine, other)
            print(f"[agreement] {kind}-{index} input {k} vs {name}: max abs {np.abs(mine - other).max():.3g}, "
                  f"relative {error:.3g}")
            assert error <= TOLERANCE[torch.float64], f"{config}: input {k} vs {name}: {error:.3g}"
