"""Layouts the engines' doubled batch does not fit, refused by name (issue 19).

The engines run ``cat([inputs, references])`` along dim 0 of every model input. A time-major
model input (T, N, F) fed to ``nn.GRU`` / ``nn.LSTM(batch_first=False)`` is then doubled along
time: the recurrent rule, which pairs rows along its batch dim, would pair the wrong rows (with
an even N without any error). Its input is refused with a ``DoubledBatchError`` naming the
module and the layout, in Captum and shap; the same model written batch-first, moving the batch
inside ``forward``, is exact.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap
from helpers import TOLERANCE, additivity_error, explain
from torch import nn

import torch_handler
from torch_handler import DoubledBatchError

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
