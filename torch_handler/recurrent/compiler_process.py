"""The C compiler as a background process of the build (:mod:`torch_handler.recurrent.cpu_loops`):
each command runs within the build's deadline, in a process group of its own (killed as a
whole), and on Linux dies with this process; a compilation runs at the lowest CPU priority
first (the short queries that key the cache at normal priority: a cached library loads at once).

Why the lowest priority, in this process's scheduling group: the build runs while the first
explanations run on the eager loops, and torch's intra-op threads (OpenMP) wait for each other
at the end of every parallel op, spinning. A compiler that takes a core from one of them makes
the other spin until the scheduler gives it back, at every op. Started in a session of its own
(as this module did before), the compiler had a scheduling group of its own too (Linux's
autogroup), which the scheduler gives an equal share of the CPU whatever its nice value: a
whole core's worth. Measured on the 2-core VM with torch's two threads, the 2-layer LSTM's first
Captum call took 4.7-6.4 s instead of 0.27 s; at nice 19 in this process's group, 0.35-0.5 s.

Why a time limit on that: at nice 19 the compiler gets only the cycles this process leaves, and
a process keeping every core busy (a long ``deep_shap`` job) left it under 1 % (over 120 s for a
2 s build, all of it on the eager loops). So a compilation still running after
:data:`BACKGROUND_SECONDS` of the build is restarted at normal priority and finishes within
seconds, sharing the cores fairly. The cache key's queries (``--version``, the macros of
``-march=native``) take some 50 ms and run at normal priority: at nice 19 in a busy process they
held a cached library back for those 10 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT_ENV = "LSTM_DEEPSHAP_CC_TIMEOUT"
"""Seconds the whole build (compiler queries and every compile attempt) may take; 300 unless set."""

BACKGROUND_SECONDS = 10.0
"""Seconds from the build's start during which its compilations run at :data:`BACKGROUND_NICE`;
one still running then is killed and run again at normal priority."""

BACKGROUND_NICE = 19


class BuildError(Exception):
    """A failure with its cause and a fix, reported once as a warning."""

    def __init__(self, cause: str, fix: str):
        super().__init__(cause)
        self.cause, self.fix = cause, fix


def _prctl():
    """libc's prctl (Linux), resolved before any fork so the child makes only foreign calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes, prctl.restype = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong], \
        ctypes.c_int
    return prctl


def _preexec(background: bool):
    """The ``preexec_fn`` of a compiler command: the lowest priority (``background``), and on
    Linux SIGKILL when this process dies; None when there is nothing to do."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None and not background:
        return None

    def arm() -> None:
        if background:
            os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)  # inherited by cc1, as and ld
        if prctl is not None:
            prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)

    return arm


def kill(process: subprocess.Popen | None) -> None:
    """SIGKILL the compiler's whole process group."""
    if process is None or process.poll() is not None:
        return
    if hasattr(os, "killpg"):
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        process.kill()


def _start(command: list[str], background: bool) -> subprocess.Popen:
    # A process group of its own (kill() reaches cc1, as and ld), not a session of its own:
    # that would also give it a scheduling group of its own (see the module docstring).
    options = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   errors="replace", **({"process_group": 0} if os.name == "posix" else {}))
    try:
        return subprocess.Popen(command, preexec_fn=_preexec(background), **options)
    except RuntimeError:
        # Python 3.12 refuses a preexec_fn once the interpreter is shutting down (atexit runs
        # while the build finishes), sys.is_finalizing() still False. Started without it, the
        # compiler is still in its own process group, which the exit handler kills.
        return subprocess.Popen(command, **options)


def run(build, command: list[str], background: bool = True) -> subprocess.CompletedProcess:
    """Run one compiler command within ``build.deadline``, at the lowest priority until
    ``build.background_until`` where ``background`` (a compilation; the short queries that key
    the cache run at normal priority, so that a cached library loads at once in a busy
    process), else at normal priority; past the deadline, kill its process group and raise
    :class:`BuildError`. ``build.process`` holds the command while it runs (the exit handler
    kills it) and ``build.stopping`` abandons the build."""
    timeout_fix = (f"set {TIMEOUT_ENV} to more seconds (now {build.timeout:g}), or set CC to a compiler "
                   "that works")
    while True:
        now = time.monotonic()
        remaining = build.deadline - now
        if build.stopping or not remaining > 0:
            raise BuildError(f"the build did not finish within {TIMEOUT_ENV}={build.timeout:g} s", timeout_fix)
        background = background and now < build.background_until
        process = build.process = _start(command, background)
        try:
            out, err = process.communicate(timeout=min(remaining, build.background_until - now)
                                           if background else remaining)
        except subprocess.TimeoutExpired:
            kill(process)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=5)
            if background:
                continue  # starved of idle cycles: again, at normal priority (or past the deadline)
            raise BuildError(f"{Path(command[0]).name} did not finish within {TIMEOUT_ENV}={build.timeout:g} s "
                             f"({shlex.join(command[:3])} ...)", timeout_fix) from None
        finally:
            build.process = None
        return subprocess.CompletedProcess(command, process.returncode, out, err)
