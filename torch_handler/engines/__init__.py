"""The seams to the explanation engines: shap (:mod:`.shap`: ``register`` / ``unregister`` and
the op handlers), the engines' own module rules kept off handled modules (:mod:`.hooks`), and
the tested version ranges and version policy (:mod:`.versions`)."""
