"""Exact DeepLIFT / DeepSHAP for a flax recurrent classifier (``flax.linen.RNN`` over an
``LSTMCell``, then a ``Dense`` head), with ``reference_jax.deeplift``.

    python examples/jax_flax_classifier.py [--seed 0] [--steps 12]

flax's ``nn.RNN`` lowers to a ``lax.scan``; the transformation explains ``model.apply`` as it
is. The batch axis is explained pair by pair with ``vmap``::

    fn = lambda x, k: model.apply(params, x[None])[0, k]
    m = jax.vmap(lambda x, r: reference_jax.deeplift(lambda v: fn(v, k))(x, r))(xs, refs)
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import reference_jax


class Classifier(nn.Module):
    """``(B, T, F)`` -> LSTM (``nn.RNN(nn.LSTMCell)``) -> last output -> ``Dense`` logits."""

    hidden: int
    classes: int

    @nn.compact
    def __call__(self, x):
        cell = nn.LSTMCell(self.hidden, param_dtype=jnp.float64, dtype=jnp.float64)
        out = nn.RNN(cell)(x)
        return nn.Dense(self.classes, param_dtype=jnp.float64, dtype=jnp.float64)(jnp.tanh(out[:, -1]))


def explain(model: Classifier, params, xs, references, target):
    """Multipliers ``(B, T, F)`` of logit ``target[b]`` for each pair ``(xs[b], references[b])``."""

    def one(x, r, k):
        return reference_jax.deeplift(lambda v: model.apply(params, v[None])[0, k])(x, r)

    return jax.jit(jax.vmap(one))(xs, references, target)


def main(seed: int = 0, steps: int = 12, features: int = 3, hidden: int = 16, classes: int = 3) -> dict:
    key_init, key_x, key_bg = jax.random.split(jax.random.PRNGKey(seed), 3)
    model = Classifier(hidden, classes)
    xs = jax.random.normal(key_x, (4, steps, features), jnp.float64)
    params = model.init(key_init, xs)
    references = jnp.zeros_like(xs)
    logits = model.apply(params, xs)
    target = jnp.argmax(logits, axis=1)

    multipliers = explain(model, params, xs, references, target)
    attributions = (xs - references) * multipliers
    chosen = lambda v: jnp.take_along_axis(v, target[:, None], 1)[:, 0]  # noqa: E731
    delta = chosen(logits) - chosen(model.apply(params, references))
    gap = float(np.max(np.abs(attributions.sum(axis=(1, 2)) - delta) / np.abs(chosen(logits))))

    background = jax.random.normal(key_bg, (6, steps, features), jnp.float64)
    k = int(target[0])
    fn = lambda v: model.apply(params, v[None])[0, k]  # noqa: E731
    shap_values = jax.jit(lambda v, b: reference_jax.deep_shap(fn, v, b))(xs[0], background)
    expected = jnp.mean(model.apply(params, background)[:, k])
    f_x = float(logits[0, k])
    shap_gap = abs(float(shap_values.sum()) - (f_x - float(expected))) / abs(f_x)

    print(f"predicted classes {np.asarray(target)}")
    print(f"DeepLIFT vs zeros: max |Σ attributions − Δlogit| / |logit| = {gap:.2e} over {xs.shape[0]} sequences")
    print(f"sequence 0: attribution per time step {np.array2string(np.asarray(attributions[0].sum(1)), precision=3)}")
    print(f"DeepSHAP over {background.shape[0]} references: |Σ φ − (f(x) − E f(b))| / |f(x)| = {shap_gap:.2e}")
    return {"model": model, "params": params, "xs": xs, "multipliers": multipliers, "gap": gap,
            "shap_gap": shap_gap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    main(seed=args.seed, steps=args.steps)
