"""The demo: an ``nn.LSTM`` forecaster of US inflation trained on statsmodels' ``macrodata`` and
explained with ``shap.DeepExplainer`` + ``register()`` (:mod:`.forecast`), and the
``lstm-deepshap`` command line (:mod:`.cli`). Needs the ``[demo]`` extra."""

from torch_handler.demo.devices import resolve_device
from torch_handler.demo.forecast import (
    FEATURES,
    TARGET,
    TARGET_FEATURE,
    TRAIN_FRACTION,
    VALIDATION_FRACTION,
    WINDOW,
    Dataset,
    Explanation,
    Forecaster,
    additivity_table,
    build_parser,
    deterministic,
    explain,
    load_series,
    main,
    make_dataset,
    plot_heatmaps,
    plot_series,
    quarter,
    run,
    train,
)

__all__ = [
    "Dataset",
    "Explanation",
    "FEATURES",
    "Forecaster",
    "TARGET",
    "TARGET_FEATURE",
    "TRAIN_FRACTION",
    "VALIDATION_FRACTION",
    "WINDOW",
    "additivity_table",
    "build_parser",
    "deterministic",
    "explain",
    "load_series",
    "main",
    "make_dataset",
    "plot_heatmaps",
    "plot_series",
    "quarter",
    "resolve_device",
    "run",
    "train",
]
