"""Layouts the engines' doubled batch does not fit at first sight (issue 19).

The engines run ``cat([inputs, references])`` along dim 0 of every model input. A time-major
model input (T, N, F) fed to ``nn.GRU`` / ``nn.LSTM(batch_first=False)`` is then doubled along
time: the recurrent rule, which pairs rows along its batch dim, would pair the wrong rows (with
an even N without any error). Its input is refused with a ``DoubledBatchError`` naming the
module and the layout, in Captum and shap; the same model written batch-first, moving the batch
inside ``forward``, is exact.

A batch sorted by length and packed with ``pack_padded_sequence(enforce_sorted=True)`` (the
default) is sorted, but its doubled batch cat([x, refs]) is not: torch raised "`lengths` array
must be sorted" inside every engine. The doubled batch is now packed as ``enforce_sorted=False``
would, the recurrent module puts its rows back: exact.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap
from helpers import TOLERANCE, additivity_error, explain
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import torch_handler
from torch_handler import DoubledBatchError, padded_references

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor [0-9]+ did not already require:UserWarning"),
    pytest.mark.filterwarnings("error::torch_handler.UnsupportedOpWarning"),
]


class TimeMajor(nn.Module):
    """x (T, N, F) -> recurrent(batch_first=False) -> last state -> Linear;
    ``transpose_inside``: x is (N, T, F) and the model makes it time-major itself."""

    def __init__(self, cls, transpose_inside=False):
        super().__init__()
        self.rnn = cls(3, 4)
        self.out = nn.Linear(4, 2)
        self.transpose_inside = transpose_inside

    def forward(self, x):
        if self.transpose_inside:
            x = x.transpose(0, 1)
        h = self.rnn(x)[1]
        return self.out((h[0] if isinstance(h, tuple) else h)[-1])


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("n", [4, 3])
def test_a_time_major_model_input_is_refused_naming_module_and_layout(cls, n):
    torch.manual_seed(0)
    model = TimeMajor(cls).double().eval()
    x, baseline = torch.randn(5, n, 3, dtype=torch.float64), torch.randn(5, n, 3, dtype=torch.float64)
    pattern = rf"{cls.__name__} \(batch_first=False.*doubled batch .* is dim 0, not its batch dim 1.*time-major"
    for engine in (DeepLift, DeepLiftShap):
        with pytest.raises(DoubledBatchError, match=pattern):
            with torch_handler.deeplift_mode(model):
                engine(model).attribute(x, baselines=baseline if engine is DeepLift else baseline[:2], target=0)
    with pytest.raises(DoubledBatchError, match=pattern):
        explain(model, baseline[:2], x)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM], ids=lambda c: c.__name__)
def test_batch_first_input_made_time_major_inside_forward_is_exact(cls):
    torch.manual_seed(0)
    model = TimeMajor(cls, transpose_inside=True).double().eval()
    x, background = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    with torch_handler.deeplift_mode(model):
        attr = DeepLift(model).attribute(x, baselines=background[:1].expand_as(x), target=0)
    with torch.no_grad():
        delta = model(x)[:, 0] - model(background[:1])[:, 0]
        scale = float(model(x).abs().max())
    assert float((attr.detach().sum((1, 2)) - delta).abs().max()) / scale <= TOLERANCE[torch.float64]
    assert additivity_error(model, background, x, explain(model, background, x)) <= TOLERANCE[torch.float64]


class SortedPacked(nn.Module):
    """x (N, T, F) zero-padded, sorted by decreasing length; lengths from the input; packed with
    enforce_sorted=True (the default); ``padded``: the padded outputs' valid-step mean, else h_n."""

    def __init__(self, cls, bidirectional=False, padded=False):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(4 * (2 if bidirectional else 1), 2)
        self.padded = padded

    def forward(self, x):
        lengths = (x != 0).any(-1).sum(1).cpu()
        out, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True))
        if self.padded:
            out, lens = pad_packed_sequence(out, batch_first=True)
            return self.out(out.sum(1) / lens.unsqueeze(1).to(out.dtype))
        h = h[0] if isinstance(h, tuple) else h
        return self.out(torch.cat(list(h[-2:] if self.rnn.bidirectional else h[-1:]), dim=-1))


def sorted_padded(dtype, lengths=(7, 5, 5, 2), steps=7):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(lengths), steps, 3, generator=g, dtype=dtype) + 0.5
    for row, length in enumerate(lengths):
        x[row, length:] = 0
    return x, torch.tensor(lengths)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "cls,bidirectional,padded",
    [(nn.LSTM, False, False), (nn.GRU, True, False), (nn.LSTM, True, True)],
    ids=["lstm-h_n", "bigru-h_n", "bilstm-padded"],
)
def test_a_sorted_batch_packed_with_enforce_sorted_is_exact(cls, bidirectional, padded, dtype):
    torch.manual_seed(0)
    model = SortedPacked(cls, bidirectional, padded).to(dtype).eval()
    x, lengths = sorted_padded(dtype)
    refs = padded_references(x, lengths, n=1, generator=torch.Generator().manual_seed(5))[:, 0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch_handler.deeplift_mode(model, strict=True):
        attr = DeepLift(model).attribute(x, baselines=refs, target=0)
    with torch.no_grad():
        delta = model(x)[:, 0] - model(refs)[:, 0]
        scale = max(float(model(x).abs().max()), float(model(refs).abs().max()))
    assert float((attr.detach().sum((1, 2)) - delta).abs().max()) / scale <= TOLERANCE[dtype]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # shap: one input, a background padded like it (the same length)
    one = x[1:2]
    background = padded_references(one, lengths[1:2], n=2, generator=torch.Generator().manual_seed(6))[0]
    assert additivity_error(model, background, one, explain(model, background, one)) <= TOLERANCE[dtype]


def test_an_unsorted_batch_with_enforce_sorted_still_fails_as_in_torch_outside_explanations():
    """Outside an explanation nothing changes: torch's own error for an unsorted batch."""
    model = SortedPacked(nn.LSTM).double().eval()
    x, _ = sorted_padded(torch.float64, lengths=(2, 7, 5, 5))
    with pytest.raises(RuntimeError, match="must be sorted"):
        model(x)
