"""The built wheel, installed non-editable in a fresh venv without JAX (run by .ci/run).

    python -m pytest -q <copy of this file>      # from a folder outside the checkout

Checks what a user gets from ``pip install 'lstm-deepshap[shap,demo]'``: the package imports
from site-packages, JAX is absent, ``register()`` makes shap.DeepExplainer exact on a float64
LSTM, the ``lstm-deepshap demo`` command runs from the wheel, and ``import reference_jax``
fails with an ImportError that names the ``[jax]`` extra.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import shap
import torch
from torch import nn

import torch_handler


def test_imported_from_site_packages_not_a_checkout():
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(torch_handler.__file__).resolve().is_relative_to(site), torch_handler.__file__
    assert importlib.util.find_spec("torch_handler.demo") is not None
    installed = {f.parts[0] for f in importlib.metadata.files("lstm-deepshap") if f.parts[0] != ".."}
    assert {name for name in installed if not name.endswith(".dist-info")} == {
        "torch_handler", "reference_jax"}, installed


def test_no_jax_installed():
    for name in ("jax", "jaxlib", "chex"):
        assert importlib.util.find_spec(name) is None, f"{name} was installed without the [jax] extra"


class Classifier(nn.Module):
    """A 2-layer bidirectional nn.LSTM read at the last step, then nn.Linear."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_register_and_an_exact_explanation():
    torch.manual_seed(0)
    model = Classifier().double().eval()
    background = torch.randn(8, 7, 3, dtype=torch.float64)
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    torch_handler.register()
    try:
        explainer = shap.DeepExplainer(model, background)
        phi = np.asarray(explainer.shap_values(x))  # (3, 7, 3, 2)
    finally:
        torch_handler.unregister()
    with torch.no_grad():
        fx = model(x).numpy()
    delta = fx - np.asarray(explainer.expected_value)
    error = np.abs(phi.sum(axis=(1, 2)) - delta).max() / np.abs(fx).max()
    print(f"shap {shap.__version__}, torch {torch.__version__}, numpy {np.__version__}: "
          f"relative additivity error {error:.2e}")
    assert error < 1e-10


def test_cpu_loops_compile_from_the_installed_source(tmp_path):
    """The wheel ships cpu_kernels.c: in a fresh process with an empty cache, the compiled CPU
    loops build from site-packages and serve an explanation."""
    child = (
        "import sys, sysconfig, torch\n"
        "from pathlib import Path\n"
        "import torch_handler\n"
        "from torch_handler.recurrent import cpu_kernels, cpu_loops\n"
        "site = Path(sysconfig.get_paths()['purelib']).resolve()\n"
        "assert cpu_loops.SOURCE.resolve().is_relative_to(site), cpu_loops.SOURCE\n"
        "assert cpu_loops.load(timeout=300)\n"
        "calls = []\n"
        "original = cpu_kernels.backward_chunk\n"
        "cpu_kernels.backward_chunk = lambda *a, **k: (calls.append(1), original(*a, **k))[1]\n"
        "module, x = torch.nn.LSTM(3, 8), torch.randn(6, 4, 3, requires_grad=True)\n"
        "with torch_handler.deeplift_mode(module):\n"
        "    out, _ = module(x)\n"
        "    (grad,) = torch.autograd.grad(out.sum(), x)\n"
        "assert calls and bool(torch.isfinite(grad).all())\n"
    )
    env = {**os.environ, "LSTM_DEEPSHAP_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(tmp_path.glob("cpu_kernels-*.so"))) == 1


def test_demo_command_from_the_wheel(tmp_path):
    command = shutil.which("lstm-deepshap") or str(Path(sys.executable).with_name("lstm-deepshap"))
    done = subprocess.run([command, "demo", "--quick", "--samples", "2", "--no-progress",
                           "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"max rel err ([0-9.e+-]+)", done.stdout)
    assert match and float(match.group(1)) < 1e-4, done.stdout
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_reference_jax_without_jax_names_the_extra():
    with pytest.raises(ImportError, match=r"lstm-deepshap\[jax\]"):
        import reference_jax  # noqa: F401
