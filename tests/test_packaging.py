"""Packaging: one definition of each tested range, a handler without JAX, CI's sets.

``torch_handler/engines/versions.py`` is the one definition of the tested ranges; pyproject.toml's
lower bounds, the constraint files CI installs and docs/versions.md must agree with it. The
wheel itself is built and installed without JAX by ``.ci/run`` (``.ci/check_wheel.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from torch_handler.engines.versions import TESTED

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
JAX_PACKAGES = {"jax", "jaxlib", "chex"}
CONSTRAINT_FILES = sorted(REPO.glob("constraints*.txt"))


def _requirements(extra: str | None = None) -> list[Requirement]:
    entries = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(entry) for entry in entries]


def _closure(extra: str) -> set[str]:
    """Distribution names an extra pulls in directly, following the project's own extras."""
    names = set()
    for requirement in _requirements(extra):
        if requirement.name == PROJECT["name"]:
            for inner in requirement.extras:
                names |= _closure(inner)
        else:
            names.add(requirement.name)
    return names


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_the_handler_needs_no_jax():
    base = {r.name for r in _requirements()}
    assert base == {"numpy", "torch", "packaging"}
    for extra in ("shap", "captum", "tangermeme", "demo"):
        assert not (_closure(extra) & JAX_PACKAGES), extra
    assert _closure("jax") == JAX_PACKAGES
    assert JAX_PACKAGES | {"shap", "captum", "tangermeme", "pytest", "hypothesis"} <= _closure("test")


@pytest.mark.parametrize("package, extra", [
    ("numpy", None), ("torch", None), ("shap", "shap"), ("captum", "captum"),
    ("tangermeme", "tangermeme"), ("jax", "jax"),
])
def test_lower_bounds_are_the_oldest_tested(package, extra):
    (requirement,) = [r for r in _requirements(extra) if r.name == package]
    (spec,) = requirement.specifier
    assert spec.operator == ">="
    assert Version(spec.version) == Version(TESTED[package].oldest)


def test_python_versions():
    assert PROJECT["requires-python"] == f">={TESTED['python'].oldest}"
    classified = [c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if "Python :: 3." in c]
    assert classified == ["3.11", "3.12", "3.13"]
    assert TESTED["python"].newest == classified[-1]
    run = (REPO / ".ci" / "run").read_text()
    for version in classified:
        assert f"find_python {version}" in run, f"CI runs no job on Python {version}"


def test_constraint_files_cover_each_tested_range():
    """Every pin lies inside its tested range, and the oldest and newest of each are run."""
    assert {p.name for p in CONSTRAINT_FILES} == {"constraints.txt", "constraints-newest.txt",
                                                  "constraints-nojax.txt"}
    pinned: dict[str, set[Version]] = {}
    for path in CONSTRAINT_FILES:
        for name, version in _pins(path).items():
            if name in TESTED:
                assert TESTED[name].position(version) == 0, f"{path.name}: {name}=={version}"
                pinned.setdefault(name, set()).add(Version(version))
    for name, rng in TESTED.items():
        if name == "python":
            continue
        assert {Version(rng.oldest), Version(rng.newest)} <= pinned[name], name
    assert not JAX_PACKAGES & set(_pins(REPO / "constraints-nojax.txt"))
    assert _pins(REPO / "constraints.txt")["torch"] == "2.13.0"  # the CPU wheel on disk


def test_ci_uses_every_constraint_file():
    run = (REPO / ".ci" / "run").read_text()
    for path in CONSTRAINT_FILES:
        assert path.name in run


def test_docs_state_each_tested_range():
    doc = (REPO / "docs" / "versions.md").read_text()
    for name, rng in TESTED.items():
        assert re.search(rf"\b{name}\b", doc), name
        assert rng.oldest in doc and rng.newest in doc, name


def test_handler_imports_and_explains_without_jax(tmp_path):
    """With jax, jaxlib and chex made unimportable: import, register(), an exact explanation."""
    script = textwrap.dedent("""
        import sys

        class NoJax:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"jax", "jaxlib", "chex"}:
                    raise ImportError(f"{name} blocked: the handler must not need it")
                return None

        sys.meta_path.insert(0, NoJax())
        import numpy as np
        import shap
        import torch
        from torch import nn

        import torch_handler

        torch_handler.register()
        torch.manual_seed(0)

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.gru, self.out = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 1)

            def forward(self, x):
                return self.out(self.gru(x)[0][:, -1])

        model = Head().double().eval()
        background = torch.randn(8, 6, 3, dtype=torch.float64)
        x = torch.randn(3, 6, 3, dtype=torch.float64)
        explainer = shap.DeepExplainer(model, background)
        phi = np.asarray(explainer.shap_values(x)).reshape(3, -1)
        with torch.no_grad():
            fx = model(x).numpy().reshape(-1)
        error = np.abs(phi.sum(axis=1) - (fx - np.asarray(explainer.expected_value).reshape(-1)))
        assert error.max() / np.abs(fx).max() < 1e-10, error
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"jax", "jaxlib", "chex"})
        assert not loaded, loaded
        print("ok", error.max())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
