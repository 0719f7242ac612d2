"""The rule's step loops compiled to C, for CPUs.

Why: a step of the eager loops (:mod:`torch_handler.function`) is a handful of torch calls on a
few hundred numbers each at small batches, and their dispatch, not their arithmetic, sets the
time (BLAS's path for two-row products is slow too): the LSTM's eager forward+backward took
3-4x native autograd's (oneDNN's fused RNN) at 2 rows. ``cpu_kernels.c`` holds compiled twins
of the rules' code for every cell type, each running a whole layer or a whole backward chunk
in one call: the forward ``step`` loop, the chunk's ``coefficients`` (+ ``step_factors``; one
pass instead of some twenty torch kernels over the chunk) and the ``step_backward`` loop.
OpenMP threads (torch's own, see ``_OPTIONAL_FLAGS``) take blocks of
pairs; a row's arithmetic in them does not depend on the other rows of its batch, so engines
that batch the same pairs differently differ only where BLAS does (the input projections and
the input multipliers, one BLAS call per layer or chunk in every path), which stay in torch.

Compilation never blocks an explanation: the first call that could use the kernels starts the
C compiler in a background thread (about 2 s) and runs the eager loops; calls
after it has finished get the compiled ones (:func:`load` compiles and waits, :func:`wait`
waits). The library is cached on disk per source, compiler and CPU (``$LSTM_DEEPSHAP_CACHE``,
else ``$XDG_CACHE_HOME/lstm-deepshap`` or ``~/.cache/lstm-deepshap``), so later processes
load it at once. Without a C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``), or if compiling
fails (reported once, as a warning), the eager loops serve every call: the same rule, the same
results to rounding.

Used when all of these hold: CPU tensors, float32 or float64; no packed-sequence mask; no LSTM
projection (``proj_size``); recurrent weights of at most :data:`MAX_WEIGHT_BYTES`, or at most
:data:`MAX_ROWS` doubled-batch rows; the library is loaded; and ``LSTM_DEEPSHAP_FUSED`` (the
switch of all compiled loops, see :mod:`torch_handler.fused_loops`) is not ``0``.
``tests/test_cpu_loops.py`` checks every kernel against the eager rule element-wise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .fused_loops import ENV

__all__ = ["MAX_ROWS", "MAX_WEIGHT_BYTES", "enabled", "forward", "step_factors", "backward_chunk", "wait",
           "load"]

MAX_WEIGHT_BYTES = 1 << 20
MAX_ROWS = 64
"""The compiled loops serve a layer whose recurrent weights take at most MAX_WEIGHT_BYTES (an
LSTM up to hidden size 256 in float32), at any batch size, and larger layers up to MAX_ROWS
doubled-batch rows. Their products stream the weights from cache once per block of rows (8
with AVX-512, else 4) and step; BLAS blocks large products better, which pays once the weights
outgrow the cache and the batch is large (measured on the 2-core EPYC, two threads: hidden 512,
512 rows, 1.10x the eager loops; hidden 256, 1.03x; hidden 128, every batch from 2 to 2048
rows, 0.7-1.0x)."""

SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu99")
# Tried in order: OpenMP (-fopenmp links libgomp.so.1, which resolves to the copy torch has
# already loaded, so the kernels' threads are torch's own intra-op threads) and code for this
# CPU's instruction sets; compilers without one of them get the next line.
_OPTIONAL_FLAGS = (("-fopenmp", "-march=native"), ("-march=native",), ("-fopenmp",), ())
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_KIND = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}

_LOCK = threading.Lock()
_DONE: threading.Event | None = None  # set once the (single) compilation has finished
_LIBRARY: ctypes.CDLL | None = None


def enabled(rule, weights, rows: int, device: torch.device, dtype: torch.dtype, mask: Tensor | None) -> bool:
    """Whether the compiled loops serve this layer: its forward loop, and its backward's chunk
    factors and step loops (see the module docstring)."""
    if device.type != "cpu" or dtype not in _SUFFIX or mask is not None:
        return False
    if rows > MAX_ROWS and weights.w_hh.numel() * weights.w_hh.element_size() > MAX_WEIGHT_BYTES:
        return False
    if getattr(rule, "name", None) not in _KIND or getattr(weights, "w_hr", None) is not None:
        return False
    if os.environ.get(ENV, "1") == "0":
        return False
    return _compiled()


def _compiled() -> bool:
    """Whether the library is loaded; starts its compilation the first time it is asked for."""
    global _DONE
    with _LOCK:
        if _DONE is None:
            _DONE = threading.Event()
            threading.Thread(target=_build, args=(_DONE,), daemon=True, name="lstm-deepshap-cc").start()
        done = _DONE
    return done.is_set() and _LIBRARY is not None


def wait(timeout: float | None = None) -> bool:
    """Block until a compilation started so far has finished; True when none is pending."""
    with _LOCK:
        done = _DONE
    return done is None or done.wait(timeout)


def load(timeout: float | None = None) -> bool:
    """Compile (or load from the cache) now, waiting up to ``timeout`` seconds: for programs
    that would rather have the compiled loops from their first explanation on. True when they
    are loaded."""
    _compiled()
    wait(timeout)
    return _compiled()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    explicit = os.environ.get("LSTM_DEEPSHAP_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lstm-deepshap"


def _cpu_signature() -> str:
    """What the compiled code depends on besides source and compiler: ``-march=native`` code
    runs only on CPUs with the same instruction sets (a cache on a shared home directory may
    be read from several machines)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(done: threading.Event) -> None:
    """Compile (or find in the cache) and load the library; a failure is reported once and
    leaves every call to the eager loop."""
    global _LIBRARY
    try:
        compiler = _compiler()
        if compiler is None:
            return  # no C compiler: the eager loop, silently (nothing the user must fix)
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        source = SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in (
            source, compiler, version, repr((_FLAGS, _OPTIONAL_FLAGS)), _cpu_signature()))).hexdigest()[:16]
        path = _library_path(key, compiler)
        library = ctypes.CDLL(str(path))
        _declare(library)
        _LIBRARY = library
    except Exception as error:  # noqa: BLE001 - reported, and the eager loop serves every call
        warnings.warn(f"torch_handler: compiling the CPU step loops ({SOURCE.name}) failed ({error!r}); the "
                      f"eager loop (same rule, slower at small batches) serves every call. Set {ENV}=0 to "
                      "silence this.", RuntimeWarning, stacklevel=1)
    finally:
        done.set()


def _library_path(key: str, compiler: str) -> Path:
    """The cached library for ``key``, compiled first if absent (written under a temporary
    name and renamed: concurrent processes never load a half-written file). Where the cache
    folder cannot be written, a private temporary folder of this process serves instead (never
    a shared one: a library another user could have placed there would be loaded)."""
    for folder in (_cache_dir(), None):
        try:
            if folder is None:
                folder = Path(tempfile.mkdtemp(prefix="lstm-deepshap-"))
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        path = folder / f"cpu_kernels-{key}.so"
        if path.exists() and _owned(path):
            return path
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = Path(scratch) / path.name
            for optional in _OPTIONAL_FLAGS:
                result = subprocess.run([compiler, *_FLAGS, *optional, "-o", str(built), str(SOURCE.resolve())],
                                        capture_output=True, text=True, timeout=300)
                if result.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip()[-2000:]}")
            os.replace(built, path)
        return path
    raise OSError("no writable folder for the compiled CPU loops")


def _owned(path: Path) -> bool:
    """Whether a cached library is this user's own (POSIX: same owner, not writable by others)."""
    if not hasattr(os, "getuid"):
        return True
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    grad = [i64] * 4  # with_grad, g_st, g_sb, g_sh
    signatures = {  # each starts with (threads, steps, N, H)
        "lstm_forward": [i64] * 4 + [ptr] * 8,
        "gru_forward": [i64] * 4 + [ptr] * 10,
        "rnn_forward": [i64] * 5 + [ptr] * 5,
        "lstm_factors": [i64] * 4 + [ptr] * 5,
        "gru_factors": [i64] * 4 + [ptr] * 7,
        "rnn_factors": [i64] * 5 + [ptr] * 2,
        "lstm_backward": [i64] * 4 + [ptr] * 5 + [i64] + [ptr] * 3 + grad,
        "gru_backward": [i64] * 4 + [ptr] * 5 + [i64] + [ptr] * 4 + grad,
        "rnn_backward": [i64] * 4 + [ptr] * 3 + [i64] + [ptr] * 3 + grad,
    }
    library.packed_block_bytes.argtypes, library.packed_block_bytes.restype = [], i64
    for suffix in _SUFFIX.values():
        for name, argtypes in signatures.items():
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None




def _packed(w: Tensor) -> Tensor:
    """``w`` (K, M)'s first M - M mod C columns as (M // C, K, C), C columns per block: the
    layout the kernels' products stream (each block's K rows contiguous)."""
    K, M = w.shape
    C = _LIBRARY.packed_block_bytes() // w.element_size()
    full = M // C * C
    return w[:, :full].reshape(K, full // C, C).transpose(0, 1).contiguous()


def forward(rule, weights, buffers, state0) -> tuple[Tensor, ...]:
    """The whole forward loop of one layer, as the rule's ``step`` would run it: writes
    ``buffers`` (holding the input projection in their first, see each rule's
    ``forward_buffers``) and returns the final state, views of the buffers' last step."""
    out = buffers[-1]
    T, B, H = out.shape
    h0 = state0[0].contiguous()
    threads = torch.get_num_threads()
    kernel = getattr(_LIBRARY, f"{_KIND[rule.name]}_forward_{_SUFFIX[out.dtype]}")
    if rule.name == "LSTM":
        Z, C, OUT = buffers
        # Every tensor whose address a kernel gets is held by a name until the kernel returns.
        w_t, c0, gates = weights.w_hh_t, state0[1].contiguous(), Z.new_empty(B, 4 * H)
        packed = _packed(w_t)
        kernel(threads, T, B // 2, H, Z.data_ptr(), C.data_ptr(), OUT.data_ptr(), w_t.data_ptr(), packed.data_ptr(),
               h0.data_ptr(), c0.data_ptr(), gates.data_ptr())
        return OUT[-1], C[-1]
    if rule.name == "GRU":
        GX, HN, OUT = buffers
        w_rz, w_n = weights.w_rz_t, weights.w_n_t
        packed_rz, packed_n = _packed(w_rz), _packed(w_n)
        b_hn = None if weights.b_hn is None else weights.b_hn.contiguous()
        gates = GX.new_empty(B, 2 * H)
        kernel(threads, T, B // 2, H, GX.data_ptr(), HN.data_ptr(), OUT.data_ptr(), w_rz.data_ptr(),
               packed_rz.data_ptr(), w_n.data_ptr(), packed_n.data_ptr(), None if b_hn is None else b_hn.data_ptr(),
               h0.data_ptr(), gates.data_ptr())
        return (OUT[-1],)
    PRE, OUT = buffers
    w_t = weights.w_hh.T.contiguous()
    packed = _packed(w_t)
    kernel(threads, T, B // 2, H, int(rule.nonlinearity == "relu"), PRE.data_ptr(), OUT.data_ptr(), w_t.data_ptr(),
           packed.data_ptr(), h0.data_ptr())
    return (OUT[-1],)


def step_factors(rule, weights, buffers, state0, t0: int, t1: int) -> tuple[Tensor, ...]:
    """``rule.step_factors(weights, rule.coefficients(weights, buffers, state0, t0, t1))`` in one
    pass over the chunk: LSTM (F_c, F_p), each (τ, N, 5, H); GRU (K_x, K_h) (τ, N, 3, H) and
    mean(z) (τ, N, H); RNN (R,) (τ, N, H)."""
    tau, B, H = t1 - t0, buffers[0].shape[1], state0[0].shape[-1]
    N, threads = B // 2, torch.get_num_threads()
    kernel = getattr(_LIBRARY, f"{_KIND[rule.name]}_factors_{_SUFFIX[buffers[0].dtype]}")
    new = lambda *shape: buffers[0].new_empty(tau, N, *shape)  # noqa: E731
    if rule.name == "LSTM":
        Z, C, _ = buffers
        c_first = C[t0 - 1] if t0 > 0 else state0[1].contiguous()
        F_c, F_p = new(5, H), new(5, H)
        kernel(threads, tau, N, H, Z[t0].data_ptr(), C[t0].data_ptr(), c_first.data_ptr(), F_c.data_ptr(),
               F_p.data_ptr())
        return F_c, F_p
    if rule.name == "GRU":
        GX, HN, OUT = buffers
        h_first = OUT[t0 - 1] if t0 > 0 else state0[0].contiguous()
        K_x, K_h, mean_z = new(3, H), new(3, H), new(H)
        kernel(threads, tau, N, H, GX[t0].data_ptr(), HN[t0].data_ptr(), OUT[t0].data_ptr(), h_first.data_ptr(),
               K_x.data_ptr(), K_h.data_ptr(), mean_z.data_ptr())
        return K_x, K_h, mean_z
    R = new(H)
    kernel(threads, tau, N, H, int(rule.nonlinearity == "relu"), buffers[0][t0].data_ptr(), R.data_ptr())
    return (R,)


def backward_chunk(rule, weights, factors, m_h: Tensor, m_rest: tuple[Tensor, ...], m_z_chunk: Tensor,
                   grad_out: Tensor | None, t0: int, t1: int) -> None:
    """Steps t1-1 down to t0 of backward, as the rule's ``step_backward`` would run them; the
    same contract as :func:`torch_handler.fused_loops.backward_chunk`."""
    two, N, H = m_h.shape
    tau = t1 - t0
    width = m_z_chunk.shape[-1]
    # grad_prev of step t is grad_out[t - 1]: steps t1-1..1 have one, step 0 none.
    with_grad = 0 if grad_out is None else min(tau, t1 - 1)
    grad = grad_out[t1 - 2] if with_grad else m_h
    g_strides = grad_out.stride() if with_grad else (0, 0, 0)
    factors = tuple(f.contiguous() for f in factors)
    w_hh = weights.w_hh.contiguous()
    packed = _packed(w_hh)
    w = (w_hh.data_ptr(), packed.data_ptr())
    kernel = getattr(_LIBRARY, f"{_KIND[rule.name]}_backward_{_SUFFIX[m_h.dtype]}")
    tail = (grad.data_ptr(), with_grad, *g_strides)
    threads = torch.get_num_threads()
    if rule.name == "LSTM":
        F_c, F_p = factors
        (m_c,) = m_rest
        kernel(threads, tau, N, H, F_c.data_ptr(), F_p.data_ptr(), m_h.data_ptr(), m_c.data_ptr(),
               m_z_chunk.data_ptr(), width, *w, *tail)
    elif rule.name == "GRU":
        K_x, K_h, mean_z = factors
        side = m_h.new_empty(two * N, 3 * H)
        kernel(threads, tau, N, H, K_x.data_ptr(), K_h.data_ptr(), mean_z.data_ptr(), m_h.data_ptr(),
               m_z_chunk.data_ptr(), width, side.data_ptr(), *w, *tail)
    else:
        (R,) = factors
        kernel(threads, tau, N, H, R.data_ptr(), m_h.data_ptr(), m_z_chunk.data_ptr(), width, *w, *tail)
