"""How many (input, reference) pairs go through the model at once: a memory budget.

The memory a pair needs is measured, not guessed: one small probe forward inside
``deeplift_mode`` counts the bytes autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``, which sees the rules' own saved tensors too),
plus the pair's own tensors (x, r, the doubled batch, x − r, its gradient, the sums). The
budget is a share of the device's free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: the
kernel's MemAvailable), capped on CPUs in bytes and in pairs, where larger chunks no longer run
faster and only evict the caches (measured, one thread, the rule's throughput in pairs/s: the
demo model peaks at 1024–4096 pairs per chunk, a 2-layer LSTM (T 50, H 64) near 512, a one-hot
LSTM over T 1000 near 128, where the byte cap gives 161; ``benchmarks/dataset.py``).
"""

from __future__ import annotations

import os

import torch

# Share of the free memory one chunk may take (the rest: the model, other processes, the
# allocator's slack).
FREE_SHARE = 0.25
# On CPUs a larger chunk only costs memory and cache: see the module docstring.
CPU_BUDGET_BYTES = 256 << 20
CPU_MAX_PAIRS = 1024
# Above this many pairs a chunk gains nothing on any device, and a bad estimate costs less.
MAX_PAIRS = 1 << 16
PROBE_PAIRS = 4


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (CPU: MemAvailable, else a 1 GiB assumption)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def saved_bytes(run) -> int:
    """Bytes autograd keeps for backward while ``run()`` builds its graph (each storage once)."""
    seen: dict = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a view of a wrapper)
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def pair_bytes(probe, pairs: int, row_bytes: int, outputs: int) -> int:
    """Bytes one pair needs: saved activations of ``probe()`` (a forward over ``pairs`` pairs)
    per pair, plus its own tensors (two rows in the batch, x and r, x − r, the gradient of two
    rows, and the sums of ``outputs`` outputs, all ``row_bytes`` each)."""
    return saved_bytes(probe) // max(1, pairs) + row_bytes * (7 + outputs)


def choose_pairs(per_pair: int, device: torch.device) -> int:
    """Pairs per chunk for a device with its current free memory."""
    budget = free_bytes(device) * FREE_SHARE
    most = MAX_PAIRS
    if device.type != "cuda":
        budget, most = min(budget, CPU_BUDGET_BYTES), CPU_MAX_PAIRS
    return int(max(1, min(most, budget // max(1, per_pair))))
