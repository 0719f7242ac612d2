"""The rules' weights are built once per value of a module's parameters
(torch_handler/recurrent/modules.py, ``_rule_weights``): a changed parameter, however it was
changed, gives new weights, never stale attributions."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import torch_handler
from torch_handler.recurrent import modules


def explain(model, x, r):
    return torch_handler.deep_shap(model, x, r, target=0, progress=False)


class Net(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = getattr(nn, cell)(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("how", ["data", "in_place", "replace", "load_state_dict"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_a_changed_parameter_changes_the_attributions(cell, how):
    torch.manual_seed(0)
    model = Net(cell).double().eval()
    fresh = Net(cell).double().eval()  # other weights
    x, r = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)
    before = explain(model, x, r)
    assert torch.equal(explain(model, x, r), before)  # cached weights: the same values
    with torch.no_grad():
        if how == "data":  # no version counter moves
            model.rnn.weight_hh_l0.data.copy_(fresh.rnn.weight_hh_l0)
        elif how == "in_place":
            model.rnn.weight_hh_l0.copy_(fresh.rnn.weight_hh_l0)
        elif how == "replace":
            model.rnn.weight_hh_l0 = nn.Parameter(fresh.rnn.weight_hh_l0.clone())
        else:
            model.rnn.load_state_dict(fresh.rnn.state_dict())
    after = explain(model, x, r)
    rebuilt = Net(cell).double().eval()
    rebuilt.load_state_dict(model.state_dict())
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, explain(rebuilt, x, r), rtol=0, atol=1e-13)


def test_the_cache_keeps_no_module_alive():
    model = Net("LSTM").eval()
    explain(model, torch.randn(2, 4, 3), torch.randn(2, 4, 3))
    assert model.rnn in modules._RULE_WEIGHTS
    alive = weakref.ref(model.rnn)
    del model
    gc.collect()
    assert alive() is None
