"""reference_jax needs the ``jax`` extra; without JAX its import fails with an error that
names the extra, and the torch side (which never imports JAX) still imports.

Each check runs in a fresh interpreter whose import system refuses ``jax`` and ``chex``
(a ``sys.meta_path`` finder), from the repository root so that this checkout is imported.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCK_JAX = textwrap.dedent(
    """
    import sys

    class NoJax:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib", "chex"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoJax())
    """
)


def _run_without_jax(body: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_JAX + textwrap.dedent(body)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_reference_jax_without_jax_names_the_extra():
    result = _run_without_jax(
        """
        try:
            import reference_jax
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("reference_jax imported although jax is blocked")
        """
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "pip install 'lstm-deepshap[jax]'" in message, message
    assert "No module named 'jax'" in message, message  # and what is missing


def test_torch_handler_imports_without_jax():
    result = _run_without_jax(
        """
        import torch_handler
        assert "jax" not in sys.modules and "reference_jax" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
