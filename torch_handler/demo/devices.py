"""Choosing the device from the command line (shared by the demo and the benchmarks)."""

from __future__ import annotations


def resolve_device(name: str):
    """``torch.device(name)``, or exit with a clear message when CUDA is asked for and absent.

    Shared by the command line, the demo and the benchmarks.
    """
    import torch

    if name not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__} built {'with' if torch.version.cuda else 'without'} "
            "CUDA). Use --device cpu, or install a CUDA build of torch on a machine with a GPU."
        )
    return torch.device(name)
