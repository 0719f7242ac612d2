"""Every refusal of ``deep_shap``: a clear error naming the problem, before any work is done."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_deep_shap import LSTMHead, TwoInputs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_handler
from torch_handler import AdditivityError, NonFiniteError, UnsupportedOpWarning

pytestmark = pytest.mark.usefixtures("one_thread")


class Spy(LSTMHead):
    """Counts the model's forward passes: "before any work" means none beyond the one-row probe."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


@pytest.fixture
def spy():
    torch.manual_seed(0)
    Spy.calls = 0
    return Spy().double().eval()


X = torch.randn(6, 7, 5, dtype=torch.float64)
R = torch.randn(4, 7, 5, dtype=torch.float64)


@pytest.mark.parametrize("inputs, references, kwargs, error, message", [
    (X[:0], R, dict(target=0), ValueError, "inputs is empty"),
    (DataLoader(TensorDataset(X[:0]), batch_size=2), R, dict(target=0), ValueError, "inputs is empty"),
    (X, R[:0], dict(target=0), ValueError, "no rows"),
    (X, R[:, :6], dict(target=0), ValueError, r"rows of shape \(6, 5\).*input 0 has rows of shape \(7, 5\)"),
    (X, R.float(), dict(target=0), ValueError, "torch.float32"),
    (X, R.to("meta"), dict(target=0), ValueError, "on meta"),
    (X, (R, R), dict(target=0), ValueError, "2 tensors but the inputs have 1"),
    (X, R, dict(target=3), IndexError, "target 3 is out of range for a model with 3 outputs"),
    (X, R, dict(outputs=[0, 5]), IndexError, "outputs entry 5 is out of range"),
    (X, R, dict(outputs="some"), ValueError, "'all'"),
    (X, R, dict(outputs=[]), ValueError, "outputs is empty"),
    (X, R, dict(target=torch.tensor([0, 1, 2, 3, 0, 1])), IndexError, "target holds 3"),
    (X, R, dict(target=torch.tensor([0, 1])), ValueError, "target has 2 entries for 6 inputs"),
    (X, R, dict(target=torch.zeros(6)), TypeError, "integer"),
    (X, R, dict(target=0, outputs=[1]), ValueError, "not both"),
    (X, R, {}, ValueError, "the model has 3 outputs; say which"),
    (X, R, dict(target=0, batch_size=0), ValueError, "positive"),
    (X, R, dict(target=0, resume=True), ValueError, "resume=True needs out"),
    ((x for x in [X]), R, dict(target=0, out="never.npy"), ValueError, "number of inputs in advance"),
    (X, R, dict(target=0, device="meta"), ValueError, "model.to"),
    ([X, X[:3]], R, dict(target=0), ValueError, "different numbers of rows"),
    ("ACGT", R, dict(target=0), TypeError, "inputs is a str"),
    (X, lambda b: R, dict(target=0), ValueError, "references callable"),
    (X, lambda b: "refs", dict(target=0), TypeError, "returned a str"),
    (X, 3.0, dict(target=0), TypeError, "references is a float"),
    ((X, torch.ones(6, 2, dtype=torch.long)), (R, torch.ones(4, 2, dtype=torch.long)), dict(target=0), TypeError,
     "model input 1 of inputs is torch.int64.*from_embeddings"),
])
def test_refused_before_any_work(spy, inputs, references, kwargs, error, message):
    with pytest.raises(error, match=message):
        torch_handler.deep_shap(spy, inputs, references, **kwargs)
    assert Spy.calls <= 1  # at most the probe of the first row


def test_batches_must_agree_with_the_first(spy):
    batches = iter([X[:3], X[3:, :5]])
    with pytest.raises(ValueError, match=r"input 0 of batch 1 has rows of shape \(5, 5\)"):
        torch_handler.deep_shap(spy, batches, R, target=0)
    with pytest.raises(ValueError, match="batch 1 has 2 tensors"):
        torch_handler.deep_shap(spy, iter([(X[:3],), (X[3:], X[3:])]), R, target=0)


def test_model_outputs_must_be_one_or_two_dimensional():
    class Sequence(LSTMHead):
        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out)  # (B, T, C)

    model = Sequence().double().eval()
    with pytest.raises(ValueError, match=r"must return \(B,\) or \(B, C\)"):
        torch_handler.deep_shap(model, X, R, target=0)


def test_several_inputs_need_references_for_each():
    model = TwoInputs().double().eval()
    z = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="1 tensors but the inputs have 2"):
        torch_handler.deep_shap(model, (X, z), R, target=0)


@pytest.mark.parametrize("where", ["input", "reference"])
def test_non_finite_inputs_and_references(spy, where):
    x, r = X.clone(), R.clone()
    (x if where == "input" else r)[-1, 2, 1] = float("nan")
    match = r"input 5 \(model input 0\) holds NaN" if where == "input" else r"reference 3 \(model input 0\)"
    with pytest.raises(NonFiniteError, match=match):
        torch_handler.deep_shap(spy, x, r, target=0, batch_size=8)


def test_non_finite_references_from_a_callable(spy):
    def references(batch):
        refs = R[None].expand(len(batch), -1, -1, -1).clone()
        if len(batch) > 1:  # not for the one-row probe: found in the chunk, named by input index
            refs[-1] = float("inf")
        return refs

    with pytest.raises(NonFiniteError, match="the callable gave for input 1 .* holds NaN or Inf"):
        torch_handler.deep_shap(spy, X, references, target=0, batch_size=8)


def test_non_finite_values():
    """Finite inputs whose outputs overflow: named, never returned as NaN attributions (by the
    recurrent rule when the multipliers reach it, by deep_shap's own check otherwise)."""

    class Overflow(LSTMHead):
        def forward(self, x):
            return super().forward(x) * 1e200 * 1e200

    class LinearOverflow(nn.Module):  # no recurrent module: nothing but deep_shap's check sees it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(35, 3)

        def forward(self, x):
            return self.fc(x.flatten(1)) * 1e200 * 1e200

    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"lstm \(LSTM\): the multipliers .* NaN or Inf"):
        torch_handler.deep_shap(Overflow().double().eval(), X, R, target=0, check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # deeplift_mode: no recurrent module
        with pytest.raises(NonFiniteError, match="values of input 0"):
            torch_handler.deep_shap(LinearOverflow().double().eval(), X, R, target=0, check=False)


def test_additivity_error_names_the_input():
    """An op without a DeepLIFT rule (cumprod) gets plain gradients: the sums miss Δf, and the
    error names the first input that misses (inputs 0 and 1 equal the reference: nothing to
    miss; one pair per chunk, so input 2 is found in the third chunk); check=False returns the
    approximate values."""

    class Cumulative(LSTMHead):
        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(torch.cumprod(out, dim=1)[:, -1])

    torch.manual_seed(0)
    model = Cumulative().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        x = torch.cat([R[:1], R[:1], X[2:]])
        with pytest.raises(AdditivityError, match=r"deep_shap, input 2: attributions do not sum"):
            torch_handler.deep_shap(model, x, R[:1], target=0, batch_size=1)
        values = torch_handler.deep_shap(model, X, R, target=0, check=False)
    assert values.shape == X.shape and bool(torch.isfinite(values).all())


def test_a_function_is_not_a_model():
    with pytest.raises(TypeError, match="model is a function; it must be a torch.nn.Module"):
        torch_handler.deep_shap(lambda x: x.sum((1, 2)), X, R)


def test_not_inside_inference_mode(spy):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inside torch.inference_mode"):
        torch_handler.deep_shap(spy, X, R, target=0)
    assert Spy.calls == 0


def test_a_stream_must_yield_one_row_per_target_entry(spy):
    """An unsized stream's per-input target is checked against the rows it yielded, at its end."""
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0])  # 7 entries, 6 rows
    with pytest.raises(ValueError, match="target has 7 entries but the inputs yielded 6 rows"):
        torch_handler.deep_shap(spy, (X[i : i + 4] for i in range(0, 6, 4)), R, target=target)
    exact = torch_handler.deep_shap(spy, (X[i : i + 4] for i in range(0, 6, 4)), R, target=target[:6])
    assert torch.equal(exact, torch_handler.deep_shap(spy, X, R, target=target[:6]))
