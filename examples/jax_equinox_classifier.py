"""Exact DeepLIFT / DeepSHAP for an equinox recurrent classifier (``eqx.nn.LSTMCell`` under
``lax.scan``), with ``reference_jax.deeplift``: no torch, no model surgery.

    python examples/jax_equinox_classifier.py [--seed 0] [--steps 12]

The classifier reads a sequence ``(T, F)`` with an LSTM cell scanned over time and maps the
last hidden state to class logits. ``reference_jax.deeplift(fn)`` turns any JAX function of one
pytree into its DeepLIFT multipliers; the logit of one class is explained by a selecting
lambda, all classes at once by ``vmap`` over the class index::

    explain = reference_jax.deeplift(lambda x: logits(model, x)[k])
    m = explain(x, reference)                     # multipliers, shaped like x
    attributions = (x - reference) * m            # sum to logits(x)[k] - logits(reference)[k]

DeepSHAP over a background of references is ``reference_jax.deep_shap(fn, x, background)``.
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import reference_jax


class Classifier(eqx.Module):
    """``(T, F)`` sequence -> LSTMCell scanned over time -> linear head -> ``(K,)`` logits."""

    cell: eqx.nn.LSTMCell
    head: eqx.nn.Linear

    def __init__(self, features: int, hidden: int, classes: int, key):
        k_cell, k_head = jax.random.split(key)
        self.cell = eqx.nn.LSTMCell(features, hidden, key=k_cell, dtype=jnp.float64)
        self.head = eqx.nn.Linear(hidden, classes, key=k_head, dtype=jnp.float64)

    def __call__(self, x):
        hidden = self.cell.hidden_size
        state0 = (jnp.zeros(hidden, x.dtype), jnp.zeros(hidden, x.dtype))

        def step(state, x_t):
            return self.cell(x_t, state), None

        (h, _), _ = jax.lax.scan(step, state0, x)
        return self.head(h)


def explain_all_classes(model: Classifier, x, reference):
    """Multipliers ``(K, T, F)`` of every logit: ``vmap`` of the transform over the class."""
    classes = model.head.out_features

    def one(k):
        return reference_jax.deeplift(lambda v: model(v)[k])(x, reference)

    return jax.jit(jax.vmap(one))(jnp.arange(classes))


def main(seed: int = 0, steps: int = 12, features: int = 3, hidden: int = 16, classes: int = 4) -> dict:
    key_model, key_x, key_bg = jax.random.split(jax.random.PRNGKey(seed), 3)
    model = Classifier(features, hidden, classes, key_model)
    x = jax.random.normal(key_x, (steps, features), jnp.float64)
    reference = jnp.zeros_like(x)

    multipliers = explain_all_classes(model, x, reference)
    attributions = (x - reference) * multipliers  # (K, T, F)
    background = jax.random.normal(key_bg, (8, steps, features), jnp.float64)
    # every logit the checks need, from one compiled forward: x, the reference, the background
    all_logits = jax.jit(jax.vmap(model))(jnp.concatenate([x[None], reference[None], background]))
    logits, expected_all = all_logits[0], jnp.mean(all_logits[2:], axis=0)
    delta = logits - all_logits[1]
    gap = np.abs(attributions.sum(axis=(1, 2)) - delta).max() / np.abs(logits).max()

    predicted = int(jnp.argmax(logits))
    shap_values = jax.jit(lambda v, b: reference_jax.deep_shap(lambda u: model(u)[predicted], v, b))(x, background)
    expected = expected_all[predicted]
    shap_gap = abs(float(shap_values.sum()) - float(logits[predicted] - expected)) / abs(float(logits[predicted]))

    print(f"logits f(x)              {np.array2string(np.asarray(logits), precision=4)}")
    print(f"DeepLIFT vs zeros: max |Σ attributions − Δlogit| / |logit| = {gap:.2e} (all {classes} classes)")
    per_step = np.asarray(attributions[predicted].sum(axis=1))
    print(f"class {predicted}: attribution per time step {np.array2string(per_step, precision=3)}")
    print(f"DeepSHAP over {background.shape[0]} references: |Σ φ − (f(x) − E f(b))| / |f(x)| = {shap_gap:.2e}")
    return {"model": model, "x": x, "reference": reference, "multipliers": multipliers, "gap": float(gap),
            "shap_gap": float(shap_gap), "shap_values": shap_values}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    main(seed=args.seed, steps=args.steps)
