"""``torch_handler.deep_shap`` equals shap, Captum and tangermeme element-wise, for every form of inputs.

The engines run the same doubled batch inside ``deeplift_mode`` (shap through ``register()``),
so the DeepSHAP values agree to rounding: the bar is the project's "exact" per dtype
(``torch_handler.additivity``), relative to the scale of the values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import DeepLiftShap
from helpers import TOLERANCE, explain, model_state
from tangermeme.deep_lift_shap import deep_lift_shap
from tangermeme.ersatz import dinucleotide_shuffle
from tangermeme.utils import random_one_hot
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import torch_handler

DTYPES = [torch.float64, torch.float32]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require:UserWarning"),
]

class LSTMHead(nn.Module):
    """2-layer nn.LSTM, linear head on h_n: no op rules outside the recurrence."""

    def __init__(self, features=5, hidden=8, classes=3):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        _, (h_n, _) = self.lstm(x)
        return self.fc(h_n[-1])


class LSTMClassifier(LSTMHead):
    """The same with a ReLU MLP head (an op rule: nn.ReLU)."""

    def __init__(self, features=5, hidden=8, classes=3):
        super().__init__(features, hidden, classes)
        self.fc = nn.Sequential(nn.Linear(hidden, 6), nn.ReLU(), nn.Linear(6, classes))


class TwoInputs(nn.Module):
    """A sequence through a GRU and a static vector, concatenated into a linear head."""

    def __init__(self, features=5, static=4, hidden=8, classes=3):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden + static, classes)

    def forward(self, x, z):
        _, h_n = self.gru(x)
        return self.fc(torch.cat([h_n[-1], z], dim=1))


class OneHotLSTM(nn.Module):
    """(N, 4, L) one-hot -> nn.LSTM -> last step -> Linear, ReLU, Linear (tangermeme's layout)."""

    def __init__(self, hidden=8, targets=2):
        super().__init__()
        self.lstm = nn.LSTM(4, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, 6), nn.ReLU(), nn.Linear(6, targets))

    def forward(self, x):
        out, _ = self.lstm(x.transpose(1, 2))
        return self.head(out[:, -1])


def make(cls=LSTMHead, dtype=torch.float64, n=6, s=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(**kwargs).to(dtype).eval()
    return model, torch.randn(n, 7, 5, dtype=dtype), torch.randn(s, 7, 5, dtype=dtype)


def assert_same(actual, expected, dtype):
    """Element-wise equal to rounding: the dtype's bar relative to the values' scale."""
    actual, expected = (np.asarray(torch.as_tensor(a).detach().double()) for a in (actual, expected))
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), np.finfo(np.float64).tiny)
    assert np.abs(actual - expected).max() / scale <= TOLERANCE[dtype]


# ------------------------------------------------------------------ the three engines


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_size", [None, 8, 3], ids=["auto", "two-rows", "split-references"])
def test_equals_captum_deeplift_shap(dtype, batch_size):
    """batch_size 8 with 4 references: two rows per chunk (the last chunk shorter); 3: one row per
    chunk, its references in passes of 3 + 1."""
    model, x, r = make(LSTMClassifier, dtype, n=5)
    values = torch_handler.deep_shap(model, x, r, target=2, batch_size=batch_size)
    with torch_handler.deeplift_mode(model):
        expected = DeepLiftShap(model).attribute(x, r, target=2)
    assert values.dtype == dtype and values.shape == x.shape
    assert_same(values, expected, dtype)


def test_inputs_that_require_grad_give_plain_values(tmp_path):
    """Values are gradients times (x - r): an input carrying a graph must not carry it into them."""
    model, x, r = make(LSTMClassifier, torch.float64, n=5)
    expected = torch_handler.deep_shap(model, x, r, target=1)
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    values = torch_handler.deep_shap(model, x, r, target=1)
    assert not values.requires_grad and torch.equal(values, expected)
    stored = torch_handler.deep_shap(model, x, r, target=1, out=tmp_path / "v.npy")
    assert np.array_equal(stored, expected.numpy())
    assert x.grad is None and r.grad is None


def test_zero_dimensional_targets_as_in_captum():
    model, x, r = make(LSTMClassifier, torch.float64, n=5)
    expected = torch_handler.deep_shap(model, x, r, target=2)
    for target in (torch.tensor(2), np.int64(2), np.array(2), -1):
        assert torch.equal(torch_handler.deep_shap(model, x, r, target=target), expected)


def test_inputs_of_two_dtypes_keep_their_own(tmp_path):
    """A float32 sequence and a float64 static input: each result in its input's dtype, as Captum's."""
    torch.manual_seed(2)

    class Mixed(TwoInputs):
        def forward(self, x, z):
            return super().forward(x, z.float())

    model = Mixed().eval()
    x, z = torch.randn(5, 7, 5), torch.randn(5, 4, dtype=torch.float64)
    rx, rz = torch.randn(3, 7, 5), torch.randn(3, 4, dtype=torch.float64)
    values = torch_handler.deep_shap(model, (x, z), (rx, rz), target=1)
    with torch_handler.deeplift_mode(model):
        expected = DeepLiftShap(model).attribute((x, z), (rx, rz), target=1)
    assert [v.dtype for v in values] == [e.dtype for e in expected] == [torch.float32, torch.float64]
    for v, e in zip(values, expected, strict=True):
        assert_same(v, e, torch.float32)
    stored = torch_handler.deep_shap(model, (x, z), (rx, rz), target=1, out=tmp_path / "mixed")
    assert [s.dtype for s in stored] == [np.float32, np.float64]
    for s, v in zip(stored, values, strict=True):
        assert np.array_equal(s, v.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_input_target_equals_captum(dtype):
    model, x, r = make(LSTMClassifier, dtype, n=5)
    target = torch.tensor([0, 2, 1, 2, 0])
    values = torch_handler.deep_shap(model, x, r, target=target, batch_size=8)
    with torch_handler.deeplift_mode(model):
        expected = DeepLiftShap(model).attribute(x, r, target=target)
    assert_same(values, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_outputs_equal_shap_register(dtype):
    model, x, r = make(LSTMHead, dtype)
    values = torch_handler.deep_shap(model, x, r, outputs="all", batch_size=8)
    expected = explain(model, r, x)  # (N, 7, 5, 3), outputs last
    assert values.shape == (6, 7, 5, 3)
    assert_same(values, expected, dtype)
    chosen = torch_handler.deep_shap(model, x, r, outputs=[2, 0], batch_size=8)
    assert_same(chosen, expected[..., [2, 0]], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_outputs_with_a_relu_head_equal_shap_register(dtype):
    model, x, r = make(LSTMClassifier, dtype)
    values = torch_handler.deep_shap(model, x, r, outputs="all", batch_size=8)
    assert_same(values, explain(model, r, x), dtype)


def test_several_outputs_on_one_hot_sequences_equal_tangermeme():
    model, X, refs = _one_hot(torch.float64)
    values = torch_handler.deep_shap(model, X, _shuffles, outputs=[1, 0])
    for k, target in enumerate([1, 0]):
        assert_same(values[..., k], _tangermeme_values(model, X, refs, target), torch.float64)


def test_one_output_model_needs_no_target():
    model, x, r = make(LSTMHead, torch.float64, classes=1)
    values = torch_handler.deep_shap(model, x, r)
    assert values.shape == x.shape
    assert_same(values, explain(model, r, x)[..., 0], torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_inputs_equal_captum_and_shap(dtype):
    torch.manual_seed(1)
    model = TwoInputs().to(dtype).eval()
    x, z = torch.randn(5, 7, 5, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    rx, rz = torch.randn(3, 7, 5, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    values = torch_handler.deep_shap(model, (x, z), (rx, rz), target=1, batch_size=7)
    with torch_handler.deeplift_mode(model):
        expected = DeepLiftShap(model).attribute((x, z), (rx, rz), target=1)
    assert isinstance(values, tuple) and len(values) == 2
    for v, e in zip(values, expected, strict=True):
        assert_same(v, e, dtype)
    every = torch_handler.deep_shap(model, (x, z), (rx, rz), outputs="all")
    shap_values = explain(model, [rx, rz], [x, z])
    for v, e in zip(every, shap_values, strict=True):
        assert_same(v, e, dtype)


# ------------------------------------------------------------------ tangermeme, per-input references

S_SHUFFLES, LENGTH = 3, 24


def _shuffles(batch):
    """Each sequence's own dinucleotide shuffles, seeded per sequence (independent of batching)."""
    return torch.stack([dinucleotide_shuffle(row[None], n=S_SHUFFLES, random_state=int(row.argmax(0)[:8].sum()))[0]
                        for row in batch])


def _one_hot(dtype, n=5):
    torch.manual_seed(0)
    model = OneHotLSTM().to(dtype).eval()
    X = random_one_hot((n, 4, LENGTH), random_state=0).to(dtype)
    return model, X, _shuffles(X)


def _tangermeme_values(model, X, refs, target):
    """mean over references of tangermeme's multipliers times (X − r): its raw_outputs, averaged
    like DeepSHAP (tangermeme's default output projects the same sum onto the observed bases)."""
    with torch_handler.deeplift_mode(model):
        m = deep_lift_shap(model, X, references=refs, target=target, raw_outputs=True, batch_size=4, device="cpu")
    return (m * (X[:, None] - refs)).mean(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_input_references_equal_tangermeme(dtype):
    model, X, refs = _one_hot(dtype)
    values = torch_handler.deep_shap(model, X, _shuffles, target=1, batch_size=4)
    assert_same(values, _tangermeme_values(model, X, refs, 1), dtype)
    with torch_handler.deeplift_mode(model):  # tangermeme's own output: the same sums per sequence
        projected = deep_lift_shap(model, X, references=refs, target=1, device="cpu")
    assert_same(values.sum((1, 2)), projected.sum((1, 2)), dtype)


# ------------------------------------------------------------------ forms of inputs


def test_every_form_of_inputs_gives_the_same_values():
    """A tensor, a TensorDataset's DataLoader (one-element lists of 4 rows), a Dataset of
    tensors, and a generator of uneven batches (length unknown): the same chunks, bit for bit."""
    model, x, r = make(LSTMHead, torch.float64, n=11)
    expected = torch_handler.deep_shap(model, x, r, target=0, batch_size=12)

    class Rows(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i]

    forms = {
        "loader": DataLoader(TensorDataset(x), batch_size=4),
        "dataset": Rows(),
        "generator": (x[a:b] for a, b in [(0, 2), (2, 7), (7, 8), (8, 11)]),
        "iterator over a list of batches": iter([x[:5], x[5:]]),
    }
    for name, inputs in forms.items():
        values = torch_handler.deep_shap(model, inputs, r, target=0, batch_size=12)
        assert torch.equal(values, expected), name


def test_dataloader_of_several_inputs_and_per_input_target():
    torch.manual_seed(2)
    model = TwoInputs().double().eval()
    x, z = torch.randn(9, 7, 5, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    rx, rz = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    target = torch.arange(9) % 3
    loader = DataLoader(TensorDataset(x, z), batch_size=4)
    values = torch_handler.deep_shap(model, loader, (rx, rz), target=target, batch_size=6)
    with torch_handler.deeplift_mode(model):
        expected = DeepLiftShap(model).attribute((x, z), (rx, rz), target=target)
    for v, e in zip(values, expected, strict=True):
        assert_same(v, e, torch.float64)


# ------------------------------------------------------------------ behaviour


def test_model_is_left_as_found_and_progress_goes_to_stderr(capsys):
    model, x, r = make(LSTMClassifier, torch.float64)
    before = model_state(model)
    params = [p.detach().clone() for p in model.parameters()]
    torch_handler.deep_shap(model, x, r, target=1, progress=True)
    assert "deep_shap" in capsys.readouterr().err  # the bar
    torch_handler.deep_shap(model, x, r, target=1)  # default: stderr is not a terminal here
    assert capsys.readouterr().err == ""
    with pytest.raises(IndexError):
        torch_handler.deep_shap(model, x, r, target=7)
    assert model_state(model) == before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_default_batch_size_comes_from_the_memory_a_pair_needs():
    from torch_handler.dataset import chunking

    model, x, r = make(LSTMHead, torch.float32)
    batch = torch.cat([x[:1].expand(4, -1, -1), r]).requires_grad_()
    with torch_handler.deeplift_mode(model):
        per_pair = chunking.pair_bytes(lambda: model(batch), 4, x[0].numel() * 4, 1)
    # The rule saves at least the gates of both layers for both rows of a pair: 2 x 2 x 7 x 32 floats.
    assert per_pair >= 2 * 2 * 7 * 4 * 8 * 4
    pairs = chunking.choose_pairs(per_pair, torch.device("cpu"))
    assert 1 <= pairs <= chunking.CPU_MAX_PAIRS and pairs * per_pair <= chunking.CPU_BUDGET_BYTES
