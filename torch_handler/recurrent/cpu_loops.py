"""The rule's step loops compiled to C, for CPUs.

Why: a step of the eager loops (:mod:`torch_handler.recurrent.function`) is a handful of torch calls on a
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
waits). The library is cached on disk (``$LSTM_DEEPSHAP_CACHE``, else
``$XDG_CACHE_HOME/lstm-deepshap`` or ``~/.cache/lstm-deepshap``), keyed on the source, the
compiler (``$CC`` with its flags, else ``cc``, ``gcc`` or ``clang``; its ``--version``), the
flags and the CPU features ``-march=native`` resolves to, so later processes load it at once.
A build is published atomically (a unique temporary name in the cache folder, fsync, rename)
with a trailer recording its SHA-256; a cached file is read (never mapped) and loaded only when
it is a regular file (no symlink), this user's (or root's), not writable by others, and its
bytes match the trailer; the verified bytes are loaded from memory, so nothing done to the file
afterwards reaches this process. Anything else is rebuilt in its place. An unwritable cache
folder gives way to a private temporary one (removed at once; one warning). The compiler runs
in its own process group, at the lowest priority first
(:mod:`torch_handler.recurrent.compiler_process` says why), with a deadline
(``$LSTM_DEEPSHAP_CC_TIMEOUT``, 300 s) and, on Linux, dies with this process; at exit a build
under way gets up to :data:`EXIT_WAIT` s to publish.
Without a C compiler, or if building fails (one warning naming the cause and a fix), the eager
loops serve every call: the same rule, the same results to rounding. ``docs/compiled-loops.md``
says more.

Used when all of these hold: CPU tensors, float32 or float64; no packed-sequence mask; no LSTM
projection (``proj_size``); recurrent weights of at most :data:`MAX_WEIGHT_BYTES`, or at most
:data:`MAX_ROWS` doubled-batch rows; the library is loaded; and ``LSTM_DEEPSHAP_FUSED`` (the
switch of all compiled loops, see :mod:`torch_handler.recurrent.fused_loops`) is not ``0``.
``tests/test_cpu_loops.py`` checks every kernel against the eager rule element-wise.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from torch_handler.recurrent import compiler_process
from torch_handler.recurrent.compiler_process import TIMEOUT_ENV
from torch_handler.recurrent.compiler_process import BuildError as _BuildError
from torch_handler.recurrent.compiler_process import kill as _kill
from torch_handler.recurrent.compiler_process import run as _run
from torch_handler.recurrent.fused_loops import ENV

__all__ = ["EXIT_WAIT", "CACHE_ENV", "TIMEOUT_ENV", "wait", "load", "status", "check_cached", "library"]


SOURCE = Path(__file__).with_name("cpu_kernels.c")


_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu99")


# Tried in order: OpenMP (-fopenmp links libgomp.so.1, which resolves to the copy torch has
# already loaded, so the kernels' threads are torch's own intra-op threads) and code for this
# CPU's instruction sets; compilers without one of them get the next line. $CC's own flags
# come after these, so they win where they disagree (CC="gcc -O0" compiles at -O0).
_OPTIONAL_FLAGS = (("-fopenmp", "-march=native"), ("-march=native",), ("-fopenmp",), ())


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


_KIND = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}


CACHE_ENV = "LSTM_DEEPSHAP_CACHE"


EXIT_WAIT = 60.0
"""Seconds a process exiting while its build is under way waits for it to publish (at most the
build's own deadline); then the compiler's process group is killed."""


_DEFAULT_TIMEOUT = 300.0


_FILE_MODE, _FOLDER_MODE = 0o644, 0o700  # set explicitly: the umask never decides them


_TRAILER_MAGIC = b"\nlstm-deepshap-cpu-loops-v1\n"


_MAX_BYTES = 64 << 20  # a cached library larger than this is not ours


_LOCK = threading.Lock()


_BUILD: _Build | None = None  # the (single) build of this process


_LIBRARY: ctypes.CDLL | None = None


class _Build:
    """One process's build: its completion event, deadline, running compiler and outcome."""

    def __init__(self, timeout: float):
        self.done = threading.Event()
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.background_until = time.monotonic() + compiler_process.BACKGROUND_SECONDS
        self.pid = os.getpid()
        self.process: subprocess.Popen | None = None  # the compiler now running, if any
        self.stopping = False  # set at exit: the build is abandoned, silently
        self.private: list[Path] = []  # private fallback folders, removed when done and at exit
        self.origin: str | None = None  # "cache", "compiled" or "private" once loaded
        self.path: Path | None = None
        self.rejected: str | None = None  # why a cached file was not loaded (then rebuilt)
        self.warning: str | None = None
        self.command: list[str] | None = None  # the compile command, when built by this process


class _Unwritable(Exception):
    """The cache folder cannot take a new build (it may still hold a verified one)."""

    def __init__(self, folder: Path, error: OSError):
        super().__init__(f"{folder}: {error.strerror or error}")
        self.folder, self.error = folder, error


def _compiled() -> bool:
    """Whether the library is loaded; starts its build the first time it is asked for."""
    global _BUILD
    with _LOCK:
        if _BUILD is None:
            _BUILD = _Build(_timeout())
            atexit.register(_at_exit, _BUILD)
            # Daemon, so a hanging compiler never holds up exit beyond _at_exit's bounded wait.
            threading.Thread(target=_build, args=(_BUILD,), daemon=True, name="lstm-deepshap-cc").start()
        done = _BUILD.done
    return done.is_set() and _LIBRARY is not None


def wait(timeout: float | None = None) -> bool:
    """Block until a compilation started so far has finished; True when none is pending."""
    with _LOCK:
        build = _BUILD
    return build is None or build.done.wait(timeout)


def load(timeout: float | None = None) -> bool:
    """Compile (or load from the cache) now, waiting up to ``timeout`` seconds: for programs
    that would rather have the compiled loops from their first explanation on. True when they
    are loaded. Builds nothing under the opt-out (``LSTM_DEEPSHAP_FUSED=0``)."""
    if os.environ.get(ENV, "1") == "0":
        return False
    _compiled()
    wait(timeout)
    return _compiled()


def status() -> dict:
    """Where this process stands: ``loaded`` (bool); ``origin``: ``"cache"`` (a verified cached
    library), ``"compiled"`` (built and published to the cache now), ``"private"`` (built in a
    private temporary folder: the cache folder could not be written) or None; ``path`` (the
    cache file, str); ``rejected`` (why a cached file was not loaded and was rebuilt, or None);
    ``warning`` (the one warning given, or None); ``command`` (the compiler command, when this
    process built the library)."""
    with _LOCK:
        build = _BUILD
    if build is None:
        return {"loaded": False, "origin": None, "path": None, "rejected": None, "warning": None, "command": None}
    return {"loaded": _LIBRARY is not None, "origin": build.origin, "path": build.path and str(build.path),
            "rejected": build.rejected, "warning": build.warning, "command": build.command}


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value.strip() else _DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    return seconds if seconds > 0 else float("nan")  # NaN: reported by _build (not here, in a hot path)


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CC`` split like a shell would (``CC="gcc -O0"``: the program,
    then its flags), else the first of ``cc``, ``gcc``, ``clang`` found; None without one."""
    cc = os.environ.get("CC", "").strip()
    if not cc:
        found = next((shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
        return None if found is None else [found]
    fix = "set CC to an installed C compiler and its flags (e.g. CC=gcc or CC=\"gcc -O2\"), or unset it"
    try:
        words = shlex.split(cc)
    except ValueError as error:
        raise _BuildError(f"$CC={cc!r} cannot be split into words ({error})", fix) from error
    program = shutil.which(words[0]) if words else None
    if program is None:
        raise _BuildError(f"$CC={cc!r} names no executable found on PATH", fix)
    return [program, *words[1:]]


def _cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lstm-deepshap"


def _cpu_features(build: _Build, cc: list[str]) -> str:
    """What ``-march=native`` resolves to (the compiler's predefined macros: __AVX2__, ...) and
    the CPU's flags: ``-march=native`` code runs only on CPUs with the same instruction sets (a
    cache on a shared home directory may be read from several machines)."""
    resolved = _run(build, [*cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull], background=False)
    macros = "\n".join(sorted(resolved.stdout.splitlines())) if resolved.returncode == 0 else ""
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {platform.processor()} {flags}\n{macros}"


def _key(build: _Build, cc: list[str], source: bytes) -> str:
    """The cache key: source, compiler (path, flags, ``--version``), our flags, CPU features."""
    version = _run(build, [cc[0], "--version"], background=False).stdout
    parts = (source, shlex.join(cc), version, repr((_FLAGS, _OPTIONAL_FLAGS)), _cpu_features(build, cc))
    return hashlib.sha256(b"\0".join(p.encode() if isinstance(p, str) else p for p in parts)).hexdigest()[:16]


def _pack(body: bytes, key: str, command: list[str]) -> bytes:
    """The cache file: the library's bytes, then a JSON record (key, SHA-256 and size of those
    bytes, the command that built them), its length (8 bytes) and a magic line. The library
    stays a valid ELF file (trailing bytes are ignored by the loader)."""
    record = json.dumps({"key": key, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                         "command": command}).encode()
    return body + record + len(record).to_bytes(8, "little") + _TRAILER_MAGIC


def _unpack(data: bytes, key: str) -> tuple[bytes | None, str | None]:
    """(the library's bytes, None) when ``data`` is a complete cache file for ``key``, else
    (None, why not)."""
    tail = len(_TRAILER_MAGIC) + 8
    if len(data) < tail or not data.endswith(_TRAILER_MAGIC):
        return None, "truncated or not written by lstm-deepshap (no trailer)"
    size = int.from_bytes(data[-tail:-len(_TRAILER_MAGIC)], "little")
    if size > len(data) - tail:
        return None, "corrupt (bad trailer length)"
    try:
        record = json.loads(data[len(data) - tail - size:len(data) - tail])
        body = data[:len(data) - tail - size]
        expected = (record["key"], record["sha256"], record["size"])
    except (ValueError, KeyError, TypeError):
        return None, "corrupt (unreadable trailer)"
    if expected[0] != key:
        return None, "built for another source, compiler or CPU"
    if expected[2] != len(body) or hashlib.sha256(body).hexdigest() != expected[1]:
        return None, "corrupt or truncated (its bytes do not match their recorded SHA-256)"
    return body, None


def _untrusted(info: os.stat_result) -> str | None:
    """Why a file with this ``stat`` must not be loaded (POSIX: not a regular file, owned by
    another user than this one or root, writable by group or others), or None."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if hasattr(os, "geteuid") and info.st_uid not in (os.geteuid(), 0):
        return f"owned by another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):#o})"
    return None


def _read_cached(path: Path, key: str) -> tuple[bytes | None, str | None]:
    """The verified library bytes of the cache file ``path`` (read, never mapped: a truncated
    file gives short bytes, not SIGBUS), or (None, why not: "absent", a symlink, foreign, ...)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None, "absent"
    except OSError as error:
        return None, f"cannot be examined ({error.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return None, "a symbolic link"
    reason = _untrusted(info)
    if reason is not None:
        return None, reason
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        return None, f"cannot be opened ({error.strerror})"
    with os.fdopen(fd, "rb") as file:
        reason = _untrusted(os.fstat(fd))  # the file opened, not the name examined above
        if reason is not None:
            return None, reason
        data = file.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        return None, "too large to be this library"
    return _unpack(data, key)


def check_cached(path: str | os.PathLike) -> str | None:
    """Why the cache file ``path`` would not be loaded (a symlink, foreign, group- or
    world-writable, truncated, corrupt), or None when it would be, for the key in its name."""
    name = Path(path).name
    if not (name.startswith("cpu_kernels-") and name.endswith(".so")):
        return "not named cpu_kernels-<key>.so"
    return _read_cached(Path(path), name[len("cpu_kernels-"):-len(".so")])[1]


def _prepare(folder: Path) -> None:
    """Create the cache folder if missing, mode 0o700 whatever the umask (parents as usual).
    An existing folder others may write to (group- or world-writable without the sticky bit) is
    refused: they could swap a build between its compiling and its publishing."""
    if folder.is_dir():
        mode = folder.stat().st_mode
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise _Unwritable(folder, PermissionError(
                1, f"writable by group or others (mode {stat.S_IMODE(mode):#o}); chmod go-w it"))
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder, _FOLDER_MODE)
        os.chmod(folder, _FOLDER_MODE)
    except FileExistsError:
        if not folder.is_dir():
            raise _Unwritable(folder, NotADirectoryError(20, "not a directory")) from None
    except OSError as error:
        raise _Unwritable(folder, error) from error


def _compile_and_publish(build: _Build, cc: list[str], path: Path, key: str) -> bytes:
    """Compile into a unique temporary file next to ``path``, append the trailer, set the mode,
    fsync, rename onto ``path`` (atomic: a reader sees the old file or the whole new one; racing
    builders each publish a complete file) and return the library's bytes."""
    folder = path.parent
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _Unwritable(folder, error) from error
    os.close(fd)
    try:
        result = None
        for optional in _OPTIONAL_FLAGS:
            command = [cc[0], *_FLAGS, *optional, *cc[1:], "-o", temp, str(SOURCE.resolve()), "-lm"]
            result = _run(build, command)
            if result.returncode == 0:
                break
        else:
            raise _BuildError(f"{shlex.join(cc)} failed: {result.stderr.strip()[-2000:]}",
                              "install a working C compiler, or set CC to one (e.g. CC=gcc)")
        nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(temp, os.O_RDONLY | nofollow), "rb") as file:
            body = file.read()
        data = _pack(body, key, command)
        build.command = command
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_TRUNC | nofollow), "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), _FILE_MODE)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.replace(temp, path)
        except OSError as error:
            raise _Unwritable(folder, error) from error
        with contextlib.suppress(OSError):  # the rename itself, durable
            folder_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(folder_fd)
            finally:
                os.close(folder_fd)
        return body
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _open_library(body: bytes, path: Path) -> ctypes.CDLL:
    """Load the verified bytes from an anonymous in-memory file (Linux), so a later change to
    the cache file (truncation, replacement) cannot reach this process; else the file itself."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("lstm-deepshap-cpu-loops", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            return ctypes.CDLL(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # a kernel refusing executable memfds (vm.memfd_noexec): the verified file
        finally:
            os.close(fd)
    return ctypes.CDLL(str(path))


def _build(build: _Build) -> None:
    """Load the library from the cache (verified) or build, publish and load it; a failure is
    reported once and leaves every call to the eager loops."""
    global _LIBRARY
    try:
        if build.timeout != build.timeout:  # NaN: a bad $LSTM_DEEPSHAP_CC_TIMEOUT
            raise _BuildError(f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)!r} is not a positive number of seconds",
                              f"set {TIMEOUT_ENV} to seconds (e.g. 300), or unset it")
        cc = _compiler()
        if cc is None:
            return  # no C compiler: the eager loops, silently (nothing the user must fix)
        key = _key(build, cc, SOURCE.read_bytes())
        folder = _cache_dir()
        build.path = path = folder / f"cpu_kernels-{key}.so"
        body, reason = _read_cached(path, key)
        build.origin = "cache"
        if body is None:
            build.rejected = None if reason == "absent" else reason
            build.origin = "compiled"
            try:
                _prepare(folder)
                body = _compile_and_publish(build, cc, path, key)
            except _Unwritable as unwritable:
                private = Path(tempfile.mkdtemp(prefix="lstm-deepshap-"))
                build.private.append(private)
                path = private / path.name
                body = _compile_and_publish(build, cc, path, key)
                build.origin = "private"
                build.warning = (
                    f"torch_handler: the cache folder of the compiled CPU loops cannot be written ({unwritable}); "
                    "they were compiled in a private temporary folder (removed at once) and serve this process, "
                    f"but every process compiles them again. Fix: make {unwritable.folder} writable, or set "
                    f"{CACHE_ENV} to a writable folder.")
        library = _open_library(body, path)
        _declare(library)
        _LIBRARY = library
    except Exception as error:  # noqa: BLE001 - reported, and the eager loops serve every call
        if build.stopping:
            return  # abandoned at exit: nothing to report
        cause, fix = (error.cause, error.fix) if isinstance(error, _BuildError) else (
            f"{type(error).__name__}: {error}", "set CC to a working C compiler, or report this error")
        build.origin = None
        build.warning = (
            f"torch_handler: compiling the CPU step loops ({SOURCE.name}) failed: {cause}. The eager loop (same "
            f"rule, slower at small batches) serves every call. Fix: {fix}; or set {ENV}=0 to use the eager "
            "loops without this warning.")
    finally:
        for private in build.private:
            shutil.rmtree(private, ignore_errors=True)
        if build.warning is not None and not build.stopping:
            warnings.warn(build.warning, RuntimeWarning, stacklevel=1)
        build.done.set()


def _at_exit(build: _Build) -> None:
    """Give a build under way up to EXIT_WAIT s (within its deadline) to publish, then kill the
    compiler's process group and remove private folders: nothing outlives the process."""
    if build.pid != os.getpid():
        return  # a forked child: the build is its parent's
    try:
        if not build.done.is_set():
            build.done.wait(max(0.0, min(EXIT_WAIT, build.deadline - time.monotonic())))
    finally:  # a Ctrl-C during the wait ends it, not the cleanup
        if not build.done.is_set():
            build.stopping = True
            _kill(build.process)
            build.done.wait(5)
        for private in build.private:
            shutil.rmtree(private, ignore_errors=True)


def _forget_unfinished_build() -> None:
    """In a forked child: its parent's build thread did not come along; start afresh if needed."""
    global _BUILD, _LOCK
    _LOCK = threading.Lock()
    if _BUILD is not None and not _BUILD.done.is_set():
        _BUILD = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_unfinished_build)


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    grad = [i64] * 4  # with_grad, g_st, g_sb, g_sh; the backward kernels then take halves
    rows = [ptr, i64, ptr]  # the factor kernels' row map, the buffers' row count, the operand cache
    signatures = {  # each starts with (threads, steps, N, H)
        "lstm_forward": [i64] * 4 + [ptr] * 8,
        "gru_forward": [i64] * 4 + [ptr] * 10,
        "rnn_forward": [i64] * 5 + [ptr] * 5,
        "lstm_factors": [i64] * 4 + [ptr] * 5 + rows,
        "gru_factors": [i64] * 4 + [ptr] * 7 + rows,
        "rnn_factors": [i64] * 5 + [ptr] * 2 + rows,
        "lstm_operands": [i64] * 4 + [ptr] * 3,
        "gru_operands": [i64] * 4 + [ptr] * 2,
        "rnn_operands": [i64] * 4 + [ptr] * 2,
        "lstm_backward": [i64] * 4 + [ptr] * 5 + [i64] + [ptr] * 3 + grad + [i64],
        "gru_backward": [i64] * 4 + [ptr] * 5 + [i64] + [ptr] * 4 + grad + [i64],
        "rnn_backward": [i64] * 4 + [ptr] * 3 + [i64] + [ptr] * 3 + grad + [i64],
    }
    library.packed_block_bytes.argtypes, library.packed_block_bytes.restype = [], i64
    ops = {"sdpa_work_f64": ([i64] * 4, i64), "norm_work_f64": ([i64], i64), "softmax_work_f64": ([i64], i64),
           "sdpa_rule_f64": ([i64] * 7 + [ctypes.c_double] + [ptr] * 3, None),
           "softmax_rule_f64": ([i64] * 4 + [ptr] * 2, None),
           "norm_rule_f64": ([i64] * 5 + [ctypes.c_double] + [ptr] * 3, None),
           "gelu_rule_f64": ([i64] * 2 + [ptr], None)}  # the op rules' kernels (float64 only)
    for name, (argtypes, restype) in ops.items():
        getattr(library, name).argtypes, getattr(library, name).restype = argtypes, restype
    for suffix in _SUFFIX.values():
        for name, argtypes in signatures.items():
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None


def library():
    """The loaded kernels (a ``ctypes.CDLL``), or None before the build has loaded them."""
    return _LIBRARY
