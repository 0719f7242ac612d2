"""The compiled CPU loops' cache (torch_handler/recurrent/cpu_loops.py): how the library is built,
published, verified and loaded, and every way that can fail.

Each case runs in fresh Python processes with a cache folder of its own (``tmp_path``, through
``$LSTM_DEEPSHAP_CACHE``): a bad cached file (truncated, corrupt, group/world-writable, another
user's, a symlink) is never loaded and is rebuilt in its place; two processes building at once
both load a verified library; modes do not depend on the umask; an unwritable cache folder
gives way to a private one that leaves nothing behind; a hanging compiler times out, warns once
and leaves no process; ``$CC`` with flags is honoured and keys the cache; a process that exits
right after its first explanation still fills the cache. The kernels themselves are held to the
eager rule by tests/test_cpu_loops.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from torch_handler.recurrent import cpu_loops, fused_loops

CHILD = textwrap.dedent(
    """
    import json, os, sys, time, warnings
    import torch
    from torch import nn
    import torch_handler
    from torch_handler.recurrent import compiler_process, cpu_kernels, cpu_loops

    if "TEST_BACKGROUND_SECONDS" in os.environ:
        compiler_process.BACKGROUND_SECONDS = float(os.environ["TEST_BACKGROUND_SECONDS"])

    torch.set_num_threads(1)
    mode = sys.argv[1]

    def explain():
        module = nn.LSTM(3, 8)
        x = torch.randn(5, 2, 3, requires_grad=True)
        with torch_handler.deeplift_mode(module):
            out, _ = module(x)
            (grad,) = torch.autograd.grad(out.sum(), x)
        return bool(torch.isfinite(grad).all())

    if mode == "explain-and-exit":  # the first explanation starts the build; exit at once
        explain()
        sys.exit(0)
    if mode == "hang-then-exit":  # the compiler hangs; leave while it runs
        cpu_loops.EXIT_WAIT = 1.0
        explain()
        print("started", flush=True)
        if sys.argv[2:] == ["sleep"]:
            time.sleep(600)
        sys.exit(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = cpu_loops.load(timeout=float(sys.argv[2]) if sys.argv[2:] else 300)
        finished = cpu_loops.wait(0)
        finite = explain()
        if mode == "truncate-while-loaded":  # an interrupted copy over the file this process loaded
            path = cpu_loops.status()["path"]
            with open(path, "r+b") as file:
                file.truncate(4096)
            finite = explain() and explain()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print(json.dumps({"loaded": loaded, "finished": finished, "finite": finite, "warnings": messages,
                      **cpu_loops.status()}))
    """
)


def run_child(cache: Path, *args: str, prefix: tuple[str, ...] = (), **env: str) -> dict:
    """Run CHILD in a fresh interpreter with ``cache`` as its cache folder; its JSON report."""
    done = subprocess.run([*prefix, sys.executable, "-c", CHILD, *(args or ("load",))], capture_output=True,
                          text=True, check=False, timeout=600,
                          env={**os.environ, cpu_loops.CACHE_ENV: str(cache), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("cpu_kernels-*.so"))


def leftovers(folder: Path) -> list[str]:
    """Temporary builds (hidden names) left in a cache folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_served(report: dict, origin: str) -> None:
    assert report["loaded"] is True and report["finite"] is True
    assert report["origin"] == origin
    assert report["warnings"] == []


def test_the_library_is_compiled_once_then_loaded_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    assert_served(run_child(cache), "compiled")
    (built,) = libraries(cache)
    before = built.stat()
    assert_served(run_child(cache), "cache")  # a second process: loaded, not rebuilt
    after = built.stat()
    assert libraries(cache) == [built]
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert cpu_loops.check_cached(built) is None
    assert leftovers(cache) == []


def test_a_failed_compilation_warns_once_and_leaves_the_eager_loop(tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    failing.chmod(0o755)
    report = run_child(tmp_path / "cache", CC=str(failing))
    assert (report["loaded"], report["finite"], len(report["warnings"])) == (False, True, 1)
    (message,) = report["warnings"]
    assert "eager loop" in message and "no compiler here" in message and "Fix: " in message
    assert libraries(tmp_path / "cache") == [] and leftovers(tmp_path / "cache") == []


def spoil(path: Path, how: str, tmp_path: Path) -> str:
    """Spoil the cached library ``path`` in the way ``how``; the reason the loader must give."""
    data = path.read_bytes()
    if how == "truncated":  # an interrupted copy or sync
        path.write_bytes(data[: len(data) // 2])
        return "truncated"
    if how == "corrupt":  # the same size, one byte changed in the code
        middle = len(data) // 3
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
        return "SHA-256"
    if how == "group-writable":
        path.chmod(0o664)
        return "writable by group or others"
    if how == "world-writable":
        path.chmod(0o666)
        return "writable by group or others"
    if how == "foreign-owner":
        os.chown(path, 65534, 65534)
        return "owned by another user"
    if how == "symlink":  # a verified library, but reached through a link: never followed
        target = tmp_path / "elsewhere.so"
        shutil.copy2(path, target)
        path.unlink()
        path.symlink_to(target)
        return "symbolic link"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "corrupt", "group-writable", "world-writable", "foreign-owner",
                                 "symlink"])
def test_a_bad_cached_library_is_never_loaded_and_is_rebuilt(tmp_path, how):
    if how == "foreign-owner" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    cache = tmp_path / "cache"
    assert_served(run_child(cache), "compiled")
    (built,) = libraries(cache)
    reason = spoil(built, how, tmp_path)
    assert reason in cpu_loops.check_cached(built)
    report = run_child(cache)  # exits normally: a truncated file never reaches the loader (no SIGBUS)
    assert_served(report, "compiled")
    assert reason in report["rejected"]
    assert libraries(cache) == [built] and not built.is_symlink()
    assert cpu_loops.check_cached(built) is None
    assert built.stat().st_uid == os.geteuid() and built.stat().st_mode & 0o777 == 0o644
    if how == "symlink":
        assert cpu_loops.check_cached(tmp_path / "elsewhere.so") is not None  # not a cache name; untouched
        assert (tmp_path / "elsewhere.so").exists()
    assert_served(run_child(cache), "cache")


def test_a_library_truncated_under_a_running_process_does_not_crash_it(tmp_path):
    """The loaded bytes are a private in-memory copy: truncating the cache file under a process
    that uses the kernels (the old loader mapped the file: SIGBUS) changes nothing for it."""
    cache = tmp_path / "cache"
    assert_served(run_child(cache), "compiled")
    report = run_child(cache, "truncate-while-loaded")
    assert_served(report, "cache")
    (built,) = libraries(cache)
    assert built.stat().st_size == 4096 and "truncated" in cpu_loops.check_cached(built)
    assert_served(run_child(cache), "compiled")  # the next process rebuilds it


def test_two_processes_building_at_once_both_load_a_verified_library(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, cpu_loops.CACHE_ENV: str(cache)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, "load"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for report in reports:
        assert report["loaded"] is True and report["finite"] is True and report["warnings"] == []
        assert report["origin"] in ("compiled", "cache")
    assert "compiled" in [r["origin"] for r in reports]
    (built,) = libraries(cache)
    assert cpu_loops.check_cached(built) is None
    assert leftovers(cache) == []
    assert_served(run_child(cache), "cache")


def test_modes_do_not_depend_on_the_umask(tmp_path):
    cache = tmp_path / "cache"
    umask = ("sh", "-c", 'umask 002 && exec "$0" "$@"')
    assert_served(run_child(cache, prefix=umask), "compiled")
    (built,) = libraries(cache)
    assert cache.stat().st_mode & 0o777 == 0o700
    assert built.stat().st_mode & 0o777 == 0o644
    before = built.stat()
    assert_served(run_child(cache, prefix=umask), "cache")  # the writer and the check agree: a hit
    assert (built.stat().st_ino, built.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def without_override() -> tuple[str, ...]:
    """A command prefix under which root, too, is refused by a folder's mode bits."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, this test needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")


def test_an_unwritable_cache_folder_falls_back_to_a_private_one(tmp_path):
    cache, scratch = tmp_path / "read-only", tmp_path / "tmp"
    cache.mkdir(mode=0o755)
    scratch.mkdir(mode=0o700)
    cache.chmod(0o555)
    prefix = without_override()
    report = run_child(cache, prefix=prefix, TMPDIR=str(scratch))
    assert report["loaded"] is True and report["finite"] is True and report["origin"] == "private"
    (message,) = report["warnings"]
    assert str(cache) in message and cpu_loops.CACHE_ENV in message and "Fix: " in message
    assert list(scratch.iterdir()) == [] and list(cache.iterdir()) == []  # nothing left behind
    # A read-only folder that holds a verified library (a container image's) serves it.
    cache.chmod(0o755)
    assert_served(run_child(cache), "compiled")
    cache.chmod(0o555)
    assert_served(run_child(cache, prefix=prefix, TMPDIR=str(scratch)), "cache")
    assert list(scratch.iterdir()) == []


def test_a_folder_others_can_write_is_not_built_in(tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o775)
    report = run_child(cache)
    assert report["loaded"] is True and report["origin"] == "private"
    (message,) = report["warnings"]
    assert "writable by group or others" in message and "chmod go-w" in message
    assert list(cache.iterdir()) == []


def hanging_compiler(tmp_path: Path, exec_sleep: bool) -> tuple[Path, Path]:
    """A `cc` that never returns: it records its pid (and its child's) and sleeps."""
    pids = tmp_path / "pids"
    script = tmp_path / "hanging-cc"
    body = "exec sleep 600" if exec_sleep else "sleep 600 &\necho $! >> \"$PIDS\"\nwait"
    script.write_text(f"#!/bin/sh\necho $$ >> \"$PIDS\"\n{body}\n")
    script.chmod(0o755)
    return script, pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its reaper counts as gone.
    with open(f"/proc/{pid}/stat") as stat_file:
        return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], seconds: float = 20.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def recorded(pids: Path) -> list[int]:
    return [int(line) for line in pids.read_text().split()]


def test_a_hanging_compiler_times_out_with_one_warning(tmp_path):
    script, pids = hanging_compiler(tmp_path, exec_sleep=False)
    report = run_child(tmp_path / "cache", "load", "120", CC=str(script), PIDS=str(pids),
                       **{cpu_loops.TIMEOUT_ENV: "3"})
    assert report["finished"] is True  # the build gave up at its 3 s deadline, before load's 120 s
    assert report["loaded"] is False and report["finite"] is True  # the eager loops serve
    (message,) = report["warnings"]
    assert "did not finish within" in message and cpu_loops.TIMEOUT_ENV in message and "Fix: " in message
    assert len(recorded(pids)) == 2 and wait_gone(recorded(pids)) == []  # the script and its sleep


def test_a_compiler_running_at_exit_is_killed(tmp_path):
    script, pids = hanging_compiler(tmp_path, exec_sleep=False)
    done = subprocess.run([sys.executable, "-c", CHILD, "hang-then-exit"], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, cpu_loops.CACHE_ENV: str(tmp_path / "c"),
                                                         "CC": str(script), "PIDS": str(pids)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started" in done.stdout and "Warning" not in done.stderr  # abandoned at exit, silently
    assert len(recorded(pids)) == 2 and wait_gone(recorded(pids)) == []


def test_a_compiler_dies_with_a_killed_process(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    script, pids = hanging_compiler(tmp_path, exec_sleep=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, "hang-then-exit", "sleep"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, cpu_loops.CACHE_ENV: str(tmp_path / "c"), "CC": str(script),
                                  "PIDS": str(pids)})
    try:
        deadline = time.monotonic() + 300
        while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        (compiler,) = recorded(pids)
        assert alive(compiler)
    finally:
        child.send_signal(signal.SIGKILL)  # no atexit: only the kernel can end the compiler
        child.communicate(timeout=60)
    assert wait_gone([compiler]) == []


def recording_compiler(tmp_path: Path, when_niced: str) -> tuple[Path, Path]:
    """A `cc` that records /proc/<pid>/stat of itself and of its parent (the Python process)
    and its arguments, then runs ``when_niced`` if its nice value is 19, else the real compiler."""
    log, script = tmp_path / "stats", tmp_path / "recording-cc"
    real = shutil.which("gcc") or shutil.which("cc")
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        read -r own < /proc/$$/stat
        read -r parent < /proc/$PPID/stat
        echo "$own|$parent|$*" >> "{log}"
        nice=$(echo "$own" | sed 's/.*) //' | cut -d' ' -f17)
        if [ "$nice" = 19 ]; then {when_niced}; fi
        exec "{real}" "$@"
        """))
    script.chmod(0o755)
    return script, log


def stat_fields(line: str) -> dict:
    """pid, nice, process group and session of one /proc/<pid>/stat line."""
    pid, rest = line.split(" (", 1)
    fields = rest.rsplit(") ", 1)[1].split()
    return {"pid": int(pid), "pgrp": int(fields[2]), "session": int(fields[3]), "nice": int(fields[16])}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_compiler_runs_at_the_lowest_priority_in_its_own_group_but_this_session(tmp_path):
    """Why (torch_handler/recurrent/compiler_process.py): a session of its own would give the
    compiler a scheduling group of its own, an equal share of the CPU whatever its nice value,
    and torch's intra-op threads would spin at every op of the first explanations."""
    script, log = recording_compiler(tmp_path, when_niced=":")
    assert_served(run_child(tmp_path / "cache", CC=str(script)), "compiled")
    starts = [line.split("|") for line in log.read_text().splitlines()]
    assert len(starts) == 3  # the --version and -march=native queries, the compilation
    for own, parent, args in ((stat_fields(o), stat_fields(p), a) for o, p, a in starts):
        # The compilation in the background; the short queries that key the cache at normal
        # priority, so a cached library loads at once in a busy process.
        assert own["nice"] == (19 if "-shared" in args else 0) and parent["nice"] == 0
        assert own["pgrp"] == own["pid"] != parent["pgrp"]  # a group of its own: killed as one
        assert own["session"] == parent["session"]  # the same session (and scheduling group)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_compiler_starved_at_the_lowest_priority_is_restarted_at_normal_priority(tmp_path):
    """A process keeping every core busy leaves a nice-19 compiler no cycles: after
    BACKGROUND_SECONDS it runs again at normal priority (here the niced one hangs)."""
    script, log = recording_compiler(tmp_path, when_niced="exec sleep 600")
    report = run_child(tmp_path / "cache", CC=str(script), TEST_BACKGROUND_SECONDS="2")
    assert_served(report, "compiled")
    assert report["warnings"] == []
    compilations = [stat_fields(line.split("|")[0]) for line in log.read_text().splitlines() if "-shared" in line]
    assert [s["nice"] for s in compilations] == [19, 0]
    assert wait_gone([compilations[0]["pid"]]) == []  # the starved one was killed


def test_cc_with_flags_is_honoured_and_keys_the_cache(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc")
    cache = tmp_path / "cache"
    plain = run_child(cache, CC="gcc")
    assert_served(plain, "compiled")
    report = run_child(cache, CC="gcc -O0")
    assert_served(report, "compiled")
    command = report["command"]
    assert command[0] == gcc and "-O0" in command and command.index("-O0") > command.index("-O3")  # -O0 wins
    assert report["path"] != plain["path"] and len(libraries(cache)) == 2
    assert_served(run_child(cache, CC="gcc -O0"), "cache")
    failing = run_child(cache, CC="gcc -fno-such-option-here")  # the flags reach the compiler
    (message,) = failing["warnings"]
    assert failing["loaded"] is False and "-fno-such-option-here" in message
    missing = run_child(cache, CC="no-such-compiler-here -O2")
    (message,) = missing["warnings"]
    assert missing["loaded"] is False and "names no executable" in message and "CC=" in message


def test_the_key_includes_the_resolved_cpu_features(monkeypatch):
    cc = cpu_loops._compiler()
    assert cc is not None, "needs a C compiler"
    build = cpu_loops._Build(300.0)
    features = cpu_loops._cpu_features(build, cc)
    native = subprocess.run([*cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                            text=True, check=True).stdout
    assert "\n".join(sorted(native.splitlines())) in features  # what -march=native resolves to
    source = cpu_loops.SOURCE.read_bytes()
    key = cpu_loops._key(build, cc, source)
    assert cpu_loops._key(build, cc, source) == key
    monkeypatch.setattr(cpu_loops, "_cpu_features", lambda b, c: features + "\n#define __ANOTHER_CPU__ 1")
    assert cpu_loops._key(build, cc, source) != key
    monkeypatch.undo()
    assert cpu_loops._key(build, cc, source + b"\n") != key


def test_a_process_exiting_right_after_its_first_explanation_fills_the_cache(tmp_path):
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", CHILD, "explain-and-exit"], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, cpu_loops.CACHE_ENV: str(cache)})
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    (built,) = libraries(cache)
    assert cpu_loops.check_cached(built) is None and leftovers(cache) == []
    assert_served(run_child(cache), "cache")


def test_the_opt_out_builds_nothing(tmp_path):
    """LSTM_DEEPSHAP_FUSED=0: no compiler runs, nothing is written."""
    done = subprocess.run([sys.executable, "-c", CHILD, "explain-and-exit"], capture_output=True, text=True,
                          timeout=600, check=False,
                          env={**os.environ, cpu_loops.CACHE_ENV: str(tmp_path / "cache"), fused_loops.ENV: "0"})
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()


def test_a_bad_timeout_setting_warns_once(tmp_path):
    report = run_child(tmp_path / "cache", **{cpu_loops.TIMEOUT_ENV: "soon"})
    (message,) = report["warnings"]
    assert report["loaded"] is False and report["finite"] is True
    assert cpu_loops.TIMEOUT_ENV in message and "'soon'" in message
