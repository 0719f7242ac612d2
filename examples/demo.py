"""A real model explained: an LSTM forecaster of US inflation, attributed with DeepSHAP.

    python examples/demo.py --out out        # the same as: lstm-deepshap demo --out out

The demo ships inside the package as :mod:`torch_handler.demo` (data, model, training,
explanation, plots), so the installed ``lstm-deepshap`` command runs it without a checkout;
this file is the runnable example. Needs ``pip install 'lstm-deepshap[demo]'`` (``make demo``
does it). Reading it top to bottom, the steps that use this package are
:func:`torch_handler.demo.explain` (``register()`` then ``shap.DeepExplainer``) and
:func:`torch_handler.demo.additivity_table`.
"""

from __future__ import annotations

import sys

from torch_handler.demo import (  # noqa: F401  (re-exported for scripts that import this file)
    Dataset,
    Explanation,
    Forecaster,
    additivity_table,
    explain,
    main,
    make_dataset,
    run,
    train,
)

if __name__ == "__main__":
    sys.exit(main())
