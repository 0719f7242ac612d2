"""DeepLIFT as a JAX function transformation: ``deeplift(fn)(inputs, references)`` gives the
multipliers of any JAX function of one pytree (flax, equinox, plain ``lax.scan``) by
evaluating its jaxpr on (actual, reference) pairs with every nonlinear primitive's backward
replaced by its rule from :mod:`reference_jax.ops` / :mod:`reference_jax.rescale`.

Modules: :mod:`.api` (``deeplift``, ``deep_shap``), :mod:`.interpreter` (the dispatch),
:mod:`.rules` (elementwise and bilinear rules as ``custom_vjp``), :mod:`.units` (softmax,
log_softmax, logsumexp, relu, max as units), :mod:`.control` (scan, while, cond, calls),
:mod:`.pairs` (paired values), :mod:`.errors` (:class:`DeepLiftError`).
"""

from reference_jax.transform.api import deep_shap, deeplift
from reference_jax.transform.errors import DeepLiftError
from reference_jax.transform.interpreter import covered_primitives

__all__ = ["DeepLiftError", "covered_primitives", "deep_shap", "deeplift"]
