"""Smoke tests of the ``lstm-deepshap`` command, the demo and the benchmark scripts.

Small sizes only: the demo test runs in about 10 s, the benchmark tests in about 20 s on two
cores.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOLERANCE

from torch_handler.demo import cli

REPO = Path(__file__).resolve().parents[1]


def _script(relative: str):
    path = REPO / relative
    name = "_test_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _command() -> list[str]:
    script = Path(sys.executable).with_name("lstm-deepshap")
    if script.exists():
        return [str(script)]
    found = shutil.which("lstm-deepshap")
    return [found] if found else [sys.executable, "-m", "torch_handler.demo.cli"]


def test_demo_command_is_exact_and_writes_pngs(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [*_command(), "demo", "--out", str(out), "--samples", "2", "--quick", "--no-progress"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"max abs err (\S+), max rel err ([0-9.e+-]+)", done.stdout)
    assert match, done.stdout
    assert float(match.group(2)) < TOLERANCE[torch.float32]
    rows = re.findall(r"^\s+\d{4}Q\d\s.*$", done.stdout, flags=re.MULTILINE)
    assert len(rows) == 2
    for name in ("heatmap_mean_abs_shap.png", "heatmap_example_shap.png", "series_shap.png"):
        png = out / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in done.stdout


def test_cuda_requested_without_gpu_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    assert cli.main(["demo", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_demo_without_its_extra_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "statsmodels", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(["demo", "--quick"]) == 2
    assert "the demo needs statsmodels, tqdm: pip install 'lstm-deepshap[demo]'" in capsys.readouterr().err


def test_cli_forwards_options(monkeypatch):
    from torch_handler import demo

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    assert cli.main(["demo", "--out", "o", "--samples", "3", "--quick", "--epochs", "5",
                     "--no-progress"]) == 0
    assert seen["argv"] == ["--out", "o", "--device", "cpu", "--seed", "0", "--samples", "3",
                            "--epochs", "5", "--quick", "--no-progress"]


def test_benchmarks_are_not_a_subcommand(capsys):
    """The benchmarks are repository scripts (make bench), not part of the installed package."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench"])
    assert exit_.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    assert "benchmarks/run_all.py" in cli.build_parser().format_help()


def test_demo_ships_inside_the_package():
    """Nothing the command runs is loaded by path from a checkout."""
    import torch_handler.demo

    assert Path(torch_handler.demo.__file__).parent == Path(cli.__file__).parent
    source = Path(cli.__file__).read_text() + Path(torch_handler.demo.__file__).read_text()
    assert "spec_from_file_location" not in source and "__file__" not in source


def test_example_script_is_the_packaged_demo():
    example = _script("examples/demo.py")
    import torch_handler.demo

    assert example.main is torch_handler.demo.main
    assert example.make_dataset is torch_handler.demo.make_dataset


# --------------------------------------------------------------------------- benchmarks


@pytest.fixture
def isolated():
    """One torch thread (steady on a shared machine); registration and threads restored."""
    import torch_handler

    threads, registered = torch.get_num_threads(), torch_handler.is_registered()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    (torch_handler.register if registered else torch_handler.unregister)()


def test_overhead_core_functions(tmp_path, isolated):
    overhead = _script("benchmarks/overhead.py")
    result = overhead.run(tmp_path, samples=2, quick=True, memory=False)
    assert result["forward_backward_ratio"] > 0 and result["shap_values_ratio"] > 0
    assert result["shap_additivity_error"]["handler"] < TOLERANCE[torch.float32]
    assert result["shap_additivity_error"]["plain"] > 1e-3  # plain gradients through the LSTM
    assert json.loads((tmp_path / "overhead.json").read_text())["benchmark"] == "overhead"
    probe = overhead.measure_memory("deeplift", overhead.QUICK, 2, torch.device("cpu"), 0)
    assert probe["peak_bytes"] is None or probe["peak_bytes"] >= 0


def test_engines_core_functions(isolated):
    engines = _script("benchmarks/engines.py")
    model, X, bg = engines.demo_problem(samples=2, background=4, seed=0, epochs=2,
                                        device=torch.device("cpu"))
    rows = engines.compare(model, X, bg, seed=0, permutations=1, warmup=False)
    assert len(rows) == 7
    by_name = {r["engine"]: r for r in rows}
    for row in rows:
        assert row["seconds"] > 0 and np.isfinite(row["additivity_error"])
    assert by_name["shap DeepExplainer + torch_handler"]["additivity_error"] < TOLERANCE[torch.float32]
    assert by_name["Captum DeepLiftShap + deeplift_mode"]["additivity_error"] < TOLERANCE[torch.float32]
    assert by_name["shap PermutationExplainer (1 permutations)"]["additivity_error"] < TOLERANCE[torch.float32]
    assert by_name["Captum DeepLiftShap + deeplift_mode"]["max_diff_vs_exact_deepshap"] < TOLERANCE[torch.float32]


def test_shapley_gap_core_functions(tmp_path):
    gap = _script("benchmarks/shapley_gap.py")
    rows = gap.gap_table(((2, 1), (2, 2)), (1.0,), cells=2, seed=0)
    assert [r["players"] for r in rows] == [4, 6]
    for row in rows:
        assert row["max_deepshap_additivity"] < 1e-10
        assert row["max_torch_vs_oracle"] < 1e-10
        assert 0 <= row["mean_rel_gap"] <= row["max_rel_gap"]
        assert -1 <= row["mean_spearman"] <= 1
    assert gap.spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])) == pytest.approx(0.5)


def test_run_all_runs_a_subset(tmp_path):
    run_all = _script("benchmarks/run_all.py")
    assert run_all.main(["--quick", "--only", "shapley_gap", "--samples", "1",
                         "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "run_all.json").read_text())
    assert summary["failed"] == [] and set(summary["seconds"]) == {"shapley_gap"}
    assert (tmp_path / "shapley_gap.json").is_file()
