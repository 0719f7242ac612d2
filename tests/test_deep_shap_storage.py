"""``deep_shap(..., out=path)``: streamed ``.npy`` results, resume after a kill, refusals."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
from test_deep_shap import LSTMHead, TwoInputs, make
from torch.utils.data import Dataset

import torch_handler
from torch_handler.dataset import driver

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, REFERENCES, BATCH = 40, 3, 6  # 2 rows per chunk: 20 chunks


def sidecar(path):
    return path.parent / f"{path.name}.deep_shap.json"


def test_results_stream_to_npy_memmaps(tmp_path):
    model, x, r = make(LSTMHead, torch.float32, n=ROWS, s=REFERENCES)
    expected = torch_handler.deep_shap(model, x, r, outputs="all", batch_size=BATCH)
    values = torch_handler.deep_shap(model, x, r, outputs="all", batch_size=BATCH, out=tmp_path / "shap.npy")
    assert isinstance(values, np.memmap) and values.dtype == np.float32 and values.shape == (ROWS, 7, 5, 3)
    assert np.array_equal(values, expected.numpy())
    assert np.array_equal(np.load(tmp_path / "shap.npy"), expected.numpy())
    record = json.loads(sidecar(tmp_path / "shap.npy").read_text())
    assert record["complete"] and record["done"] == ROWS
    # Resuming a complete run reuses it: the same arrays, nothing recomputed.
    again = torch_handler.deep_shap(model, x, r, outputs="all", batch_size=BATCH, out=tmp_path / "shap.npy",
                                    resume=True)
    assert np.array_equal(again, expected.numpy())


def test_several_inputs_write_one_file_each(tmp_path):
    torch.manual_seed(3)
    model = TwoInputs().double().eval()
    x, z = torch.randn(5, 7, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    refs = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    expected = torch_handler.deep_shap(model, (x, z), refs, target=0)
    values = torch_handler.deep_shap(model, (x, z), refs, target=0, out=tmp_path / "two")
    assert [os.path.basename(v.filename) for v in values] == ["two.input0.npy", "two.input1.npy"]
    for v, e in zip(values, expected, strict=True):
        assert np.array_equal(v, e.numpy())


def test_existing_results_are_never_overwritten(tmp_path):
    model, x, r = make(LSTMHead, torch.float64, n=4)
    torch_handler.deep_shap(model, x, r, target=0, out=tmp_path / "a.npy")
    with pytest.raises(FileExistsError, match="resume=True"):
        torch_handler.deep_shap(model, x, r, target=0, out=tmp_path / "a.npy")


def test_resume_never_overwrites_files_it_did_not_write(tmp_path):
    """A .npy without deep_shap's sidecar is the user's: resume=True refuses it, leaving it as found."""
    model, x, r = make(LSTMHead, torch.float64, n=4)
    theirs = np.arange(12.0)
    np.save(tmp_path / "shap.npy", theirs)
    with pytest.raises(FileExistsError, match="exist without the sidecar"):
        torch_handler.deep_shap(model, x, r, target=0, out=tmp_path / "shap.npy", resume=True)
    assert np.array_equal(np.load(tmp_path / "shap.npy"), theirs)
    assert not sidecar(tmp_path / "shap.npy").exists()


@pytest.mark.parametrize("change", ["model", "inputs shape", "input values", "references", "target",
                                    "outputs", "batch_size"])
def test_resume_with_other_arguments_is_refused(tmp_path, change):
    model, x, r = make(LSTMHead, torch.float64, n=6, s=REFERENCES)
    arguments = dict(target=1, batch_size=BATCH)
    path = tmp_path / "shap.npy"
    torch_handler.deep_shap(model, x, r, out=path, **arguments)
    record = json.loads(sidecar(path).read_text())
    before = path.read_bytes()
    if change == "model":
        with torch.no_grad():
            model.fc.bias[0] += 1e-6
    elif change == "inputs shape":
        x = torch.cat([x, x[:1]])
    elif change == "input values":
        x = x.clone()
        x[0, 0, 0] += 1e-9
    elif change == "references":
        r = r.flip(0)
    elif change == "target":
        arguments["target"] = 2
    elif change == "outputs":
        arguments = dict(outputs=[1], batch_size=BATCH)
    else:
        arguments["batch_size"] = BATCH + 1
    message = "the inputs .* differ" if change == "input values" else "resume=True refused"
    with pytest.raises(ValueError, match=message):
        torch_handler.deep_shap(model, x, r, out=path, resume=True, **arguments)
    assert path.read_bytes() == before and json.loads(sidecar(path).read_text()) == record


def test_corrupted_results_or_sidecar_are_not_trusted(tmp_path):
    model, x, r = make(LSTMHead, torch.float64, n=6)
    path = tmp_path / "shap.npy"
    torch_handler.deep_shap(model, x, r, target=0, out=path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last row
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="rows changed"):
        torch_handler.deep_shap(model, x, r, target=0, out=path, resume=True)
    record = json.loads(sidecar(path).read_text())
    record["done"] = 3
    sidecar(path).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="checksum"):
        torch_handler.deep_shap(model, x, r, target=0, out=path, resume=True)


def test_a_second_writer_is_refused(tmp_path):
    model, x, r = make(LSTMHead, torch.float64, n=4)
    path = tmp_path / "shap.npy"
    from torch_handler.dataset.storage import _lock

    held = _lock(tmp_path / "shap.npy.deep_shap.lock")
    try:
        with pytest.raises(RuntimeError, match="another process"):
            torch_handler.deep_shap(model, x, r, target=0, out=path)
    finally:
        held.close()
    torch_handler.deep_shap(model, x, r, target=0, out=path)  # the lock is free again


# ------------------------------------------------------------------ a run killed part-way


class SlowAfter(Dataset):
    """The test's inputs; from row ``stall`` on, each row waits (the run is killed there)."""

    def __init__(self, x, stall=None):
        self.x, self.stall = x, stall

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.stall is not None and i >= self.stall:
            time.sleep(60)
        return self.x[i]


def _killed_child(path, stall):
    """Runs in a spawned process: checkpoints after every chunk, stalls at row ``stall``."""
    torch.set_num_threads(1)
    driver.CHECKPOINT_SECONDS = 0.0
    model, x, r = make(LSTMHead, torch.float32, n=ROWS, s=REFERENCES)
    torch_handler.deep_shap(model, SlowAfter(x, stall), r, outputs=[0, 2], batch_size=BATCH, out=path)


def test_resume_after_a_kill_gives_the_uninterrupted_array(tmp_path):
    path, stall = tmp_path / "shap.npy", 26
    child = multiprocessing.get_context("spawn").Process(target=_killed_child, args=(path, stall))
    child.start()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # wait until the rows before the stall are recorded
            try:
                if json.loads(sidecar(path).read_text())["done"] == stall:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the child never recorded its progress")
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -9
    record = json.loads(sidecar(path).read_text())
    assert record["done"] == stall and not record["complete"]

    model, x, r = make(LSTMHead, torch.float32, n=ROWS, s=REFERENCES)
    arguments = dict(outputs=[0, 2], batch_size=BATCH)
    resumed = torch_handler.deep_shap(model, SlowAfter(x), r, out=path, resume=True, **arguments)
    whole = torch_handler.deep_shap(model, SlowAfter(x), r, out=tmp_path / "whole.npy", **arguments)
    assert np.array_equal(resumed, whole)  # bit for bit
    assert np.array_equal(whole, torch_handler.deep_shap(model, x, r, **arguments).numpy())
    assert json.loads(sidecar(path).read_text())["complete"]
