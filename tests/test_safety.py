"""Nothing silently wrong: non-finite values, models modified from outside (instance forwards,
batch statistics, TorchScript), copies and saved models, shap's constructor errors, and the
additivity error that tells its causes apart."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import shap
import torch
from captum.attr import DeepLift
from helpers import explain, model_state
from tangermeme.deep_lift_shap import deep_lift_shap
from tangermeme.utils import random_one_hot
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import torch_handler
from torch_handler import AdditivityError, DoubledBatchError, NonFiniteError, UnsupportedConfigurationError
from torch_handler.additivity import check_additivity
from torch_handler.errors import UnsupportedOpWarning
from torch_handler.explanation import is_active

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Classifier(nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.lstm = nn.LSTM(3, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def classifier(dtype=torch.float64):
    torch.manual_seed(0)
    return Classifier().to(dtype).eval()


def grads(model, x):
    """Output and gradients of a plain loss w.r.t. the input and every parameter."""
    x = x.detach().requires_grad_()
    out = model(x)
    return [out.detach(), *torch.autograd.grad(out.pow(2).sum(), (x, *model.parameters()))]


def assert_identical(a, b):
    assert len(a) == len(b)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# --- non-finite values inside a recurrent module --------------------------------------------


class Overflow(nn.Module):
    """A float32 relu RNN whose state grows ×4 per step: finite inputs, an Inf state after ~65
    steps, and finite outputs (1.0) because the head saturates."""

    def __init__(self, channels_first=False):
        super().__init__()
        self.channels_first = channels_first
        self.rnn = nn.RNN(4, 8, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(8, 1)
        self.squash = nn.Sigmoid()
        with torch.no_grad():
            for p in (self.rnn.weight_hh_l0, self.rnn.weight_ih_l0, self.rnn.bias_hh_l0):
                p.fill_(0.5)
            self.rnn.bias_ih_l0.zero_()
            self.head.weight.fill_(0.1)
            self.head.bias.zero_()

    def forward(self, x):
        out, _ = self.rnn(x.transpose(1, 2) if self.channels_first else x)
        return self.squash(self.head(out[:, -1]))


def test_overflow_inside_the_layer_raises_through_shap():
    model = Overflow().eval()
    background, X = torch.rand(4, 80, 4), torch.rand(2, 80, 4)
    assert torch.isfinite(model(X)).all()  # the model itself hides the overflow
    with pytest.raises(NonFiniteError, match=r"rnn \(RNN\).*NaN or Inf.*float64"):
        explain(model, background, X)


def test_overflow_inside_the_layer_raises_through_captum():
    model = Overflow().eval()
    X, baseline = torch.rand(2, 80, 4), torch.rand(2, 80, 4)
    with torch_handler.deeplift_mode(model), pytest.raises(NonFiniteError, match=r"rnn \(RNN\)"):
        DeepLift(model).attribute(X, baseline)


def test_overflow_inside_the_layer_raises_through_tangermeme():
    model = Overflow(channels_first=True).eval()
    X = random_one_hot((2, 4, 100), random_state=0).float()
    references = random_one_hot((2, 4, 100), random_state=1).float().unsqueeze(1)
    with torch_handler.deeplift_mode(model), pytest.raises(NonFiniteError, match=r"rnn \(RNN\)"):
        deep_lift_shap(model, X, references=references, device="cpu")


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class NaNHead(Classifier):
    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(NaNGradient.apply(out[:, -1]))


def test_non_finite_multipliers_from_downstream_name_the_module_they_reach():
    torch.manual_seed(0)
    model = NaNHead().double().eval()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with torch_handler.deeplift_mode(model), pytest.raises(NonFiniteError, match=r"lstm \(LSTM\).*downstream"):
        DeepLift(model).attribute(x[:2], x[2:], target=0)


def test_non_finite_multipliers_computed_by_the_rule_name_the_module(monkeypatch):
    # A rule whose backward breaks down (overflow in the coefficients) stands in for values
    # that are finite forward and non-finite backward.
    from torch_handler.recurrent import modules

    rule_function = modules.RecurrentRuleFunction

    class Broken(rule_function):
        @staticmethod
        def backward(ctx, *grads):
            result = list(rule_function.backward(ctx, *grads))
            result[3] = torch.full_like(result[3], float("inf"))
            return tuple(result)

    monkeypatch.setattr(modules, "RecurrentRuleFunction", Broken)
    model = classifier()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with torch_handler.deeplift_mode(model), pytest.raises(NonFiniteError, match=r"lstm \(LSTM\).*it computed"):
        DeepLift(model).attribute(x[:2], x[2:], target=0)


@pytest.mark.parametrize(
    "values, finite",
    [
        ([1.0, -2.0, 3.0], True),
        ([3e38, 3e38], True),  # finite elements whose float32 sum overflows: the exact check decides
        ([1.0, float("inf")], False),
        ([float("inf"), float("-inf")], False),
        ([1.0, float("nan")], False),
    ],
)
def test_all_finite_is_exact(values, finite):
    from torch_handler.recurrent.modules import all_finite

    assert all_finite(torch.tensor(values, dtype=torch.float32)) is finite


@pytest.mark.parametrize("where", ["sums", "deltas"])
def test_the_additivity_check_fails_on_nan(where):
    sums, deltas = np.ones((2, 1)), np.ones((2, 1))
    (sums if where == "sums" else deltas)[1, 0] = np.nan
    with pytest.raises(AdditivityError, match="NaN or Inf"):
        check_additivity(sums, deltas, 1.0, np.float32, "test")


@pytest.mark.parametrize(
    "error, model_rounding, accepted",
    [
        (5e-6, None, True),  # within the float32 bar: no evidence needed
        (5e-5, 1e-5, True),  # above the bar, but the model's own float32 forward is off by 1e-5
        (5e-5, 1e-7, False),  # above the bar and the model rounds far less: an op without a rule
        (5e-5, None, False),  # above the bar, rounding not measured
        (3e-4, 1e-3, False),  # above FLOAT32_ROUNDING_CAP: raised whatever the model's rounding
    ],
)
def test_float32_errors_above_the_bar_pass_only_with_the_models_rounding_measured(error, model_rounding, accepted):
    from torch_handler.additivity import Diagnosis

    sums, deltas = np.array([[1.0 + error]]), np.array([[1.0]])
    diagnose = lambda: Diagnosis(model_rounding, [])  # noqa: E731
    if accepted:
        assert check_additivity(sums, deltas, 1.0, np.float32, "test", diagnose) == pytest.approx(error)
    else:
        with pytest.raises(AdditivityError):
            check_additivity(sums, deltas, 1.0, np.float32, "test", diagnose)
    with pytest.raises(AdditivityError, match="tolerance 1e-10 for float64"):
        check_additivity(np.array([[1.0 + 1e-9]]), deltas, 1.0, np.float64, "test", diagnose)


# --- the model is explained as it is, or refused -------------------------------------------


def test_an_instance_level_forward_on_a_recurrent_module_is_refused_by_name():
    model = classifier()
    native = model.lstm.forward

    def placed(*args, **kwargs):  # what a device-placement wrapper does
        return native(*args, **kwargs)

    model.lstm.forward = placed
    before = model_state(model)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedConfigurationError, match=r"lstm \(LSTM\) has an instance-level forward"):
        with torch_handler.deeplift_mode(model):
            DeepLift(model).attribute(x[:2], x[2:], target=0)
    assert model_state(model) == before and model.lstm.forward is placed


class Normalised(Classifier):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(self.norm(out[:, -1]))


@pytest.mark.parametrize(
    "norm, train",
    [
        (nn.BatchNorm1d(4), True),
        (nn.BatchNorm1d(4, track_running_stats=False), False),  # batch statistics in eval mode too
        (nn.SyncBatchNorm(4), True),
        (nn.InstanceNorm1d(4, track_running_stats=True), True),
    ],
)
def test_modules_that_use_batch_statistics_are_refused_and_left_untouched(norm, train):
    torch.manual_seed(0)
    model = Normalised(norm).double().train(train)
    stats = {k: v.clone() for k, v in model.norm.state_dict().items()}
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedConfigurationError, match=r"norm \(\w+Norm\w*\).*batch statistics.*model\.eval"):
        with torch_handler.deeplift_mode(model):
            DeepLift(model).attribute(x[:2], x[2:], target=0)
    assert model.training == train
    assert all(torch.equal(stats[k], v) for k, v in model.norm.state_dict().items())


def test_batchnorm_in_eval_mode_is_explained_exactly():
    torch.manual_seed(0)
    model = Normalised(nn.BatchNorm1d(4)).double()
    model.train()(torch.randn(16, 5, 3, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    x, ref = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    with torch_handler.deeplift_mode(model):
        attr = DeepLift(model).attribute(x, ref, target=0)
    delta = (model(x) - model(ref))[:, 0].detach()
    np.testing.assert_allclose(attr.detach().sum(dim=(1, 2)), delta, rtol=0, atol=1e-12)


class WithSubmodule(nn.Module):
    def __init__(self, encoder, head):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x):
        out = self.encoder(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out[:, -1])


@pytest.mark.parametrize("make", ["trace", "script"])
def test_a_torchscript_recurrent_submodule_is_refused_by_name(make):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        encoder = torch.jit.trace(lstm, x) if make == "trace" else torch.jit.script(lstm)
    model = WithSubmodule(encoder, nn.Linear(4, 2).double()).eval()
    with pytest.raises(UnsupportedConfigurationError, match=r"encoder .*TorchScript.*aten::lstm.*eager model"):
        with torch_handler.deeplift_mode(model):
            pass


def test_a_torchscript_submodule_without_recurrent_ops_is_fine():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = torch.jit.script(nn.Linear(4, 2).double())
    encoder = nn.LSTM(3, 4, batch_first=True).double()
    model = WithSubmodule(encoder, head).eval()
    x, ref = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    with torch_handler.deeplift_mode(model):  # raised TypeError from the model snapshot before
        attr = DeepLift(model).attribute(x, ref, target=1)
    delta = (model(x) - model(ref))[:, 1].detach()
    np.testing.assert_allclose(attr.detach().sum(dim=(1, 2)), delta, rtol=0, atol=1e-12)


# --- copies and saved models ----------------------------------------------------------------


def test_a_deepcopy_made_while_explaining_is_a_native_model():
    model = classifier()
    x = torch.randn(3, 5, 3, dtype=torch.float64)  # odd batch: only a native model accepts it
    expected = grads(model, x)
    with torch_handler.deeplift_mode(model):
        clone = copy.deepcopy(model)
        assert not is_active(clone.lstm)
        assert_identical(grads(clone, x), expected)
    assert_identical(grads(clone, x), expected)
    assert "forward" not in vars(clone.lstm)


def test_torch_save_while_explaining_loads_as_a_native_model():
    model = classifier()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    expected = grads(model, x)
    buffer = io.BytesIO()
    with torch_handler.deeplift_mode(model):
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "forward" not in vars(loaded.lstm)
    assert_identical(grads(loaded, x), expected)


def test_torch_jit_script_of_a_recurrent_module_works_while_another_is_explained():
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 4).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch_handler.deeplift_mode(classifier()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        scripted = torch.jit.script(cell)  # compiles torch's forward, not the dispatcher
    assert torch.equal(scripted(x), cell(x))


# --- shap's constructor and packed batches get the documented errors ------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_through_shap_raises_the_documented_error(dtype):
    model = classifier(dtype)
    background = torch.randn(4, 5, 3, dtype=dtype)
    torch_handler.register()
    try:
        with pytest.raises(UnsupportedConfigurationError, match="float32 and float64 only"):
            shap.DeepExplainer(model, background)
    finally:
        torch_handler.unregister()


def test_background_dtype_different_from_the_weights_through_shap():
    model = classifier(torch.float64)
    torch_handler.register()
    try:
        with pytest.raises(TypeError, match=r"torch.float32 but the model's recurrent weights are torch.float64"):
            shap.DeepExplainer(model, torch.randn(4, 5, 3))
    finally:
        torch_handler.unregister()
    from shap.explainers._deep import deep_pytorch

    assert not hasattr(deep_pytorch.PyTorchDeep.__init__, "__wrapped__")


class PackedClassifier(Classifier):
    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        lengths[0] = 2
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


def test_an_odd_batch_of_packed_sequences_is_a_doubled_batch_error():
    torch.manual_seed(0)
    model = PackedClassifier().double().eval()
    x = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    with torch_handler.deeplift_mode(model), pytest.raises(DoubledBatchError, match="batch of 3 rows.*must be even"):
        model(x)


# --- the additivity error names its cause ---------------------------------------------------


class IllConditioned(Classifier):
    """f = (w + ε)·h − w·h, scaled by 1/ε: float32 rounding of w·h is amplified by 1/ε."""

    def __init__(self, epsilon=1e-4):
        super().__init__()
        self.wide = nn.Linear(4, 2)
        self.narrow = nn.Linear(2, 1)
        with torch.no_grad():
            self.wide.weight[1] = self.wide.weight[0] + epsilon
            self.wide.bias[1] = self.wide.bias[0]
            self.narrow.weight[:] = torch.tensor([[-1 / epsilon, 1 / epsilon]])
            self.narrow.bias.zero_()

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.narrow(self.wide(out[:, -1]))


def test_float32_rounding_of_an_ill_conditioned_model_is_named_as_such():
    torch.manual_seed(0)
    model = IllConditioned().eval()
    background, X = torch.randn(8, 5, 3), torch.randn(4, 5, 3)
    cause = r"float32 rounding of the model itself.*float64 forward by [\d.e-]+.*model\.double"
    with pytest.raises(AdditivityError, match=cause):
        explain(model, background, X)
    # The same model in float64 is explained exactly.
    explain(model.double(), background.double(), X.double())


# Functional calls without a DeepLIFT rule (calls with a rule, such as torch.tanh or a product
# of two input-dependent tensors, are exact inside deeplift_mode and are not culprits).
class FunctionalCumprod(Classifier):
    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(torch.cumprod(3.0 * out[:, -1], dim=-1))


class RunningMinimum(Classifier):
    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(torch.amin(out, dim=1))


@pytest.mark.parametrize(
    "model_class, culprit",
    [
        (FunctionalCumprod, "functional cumprod in FunctionalCumprod.forward"),
        (RunningMinimum, "functional amin in RunningMinimum.forward"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_op_without_a_rule_is_named_as_such(model_class, culprit, dtype):
    torch.manual_seed(0)
    model = model_class().to(dtype).eval()
    background, X = torch.randn(8, 5, 3, dtype=dtype), torch.randn(4, 5, 3, dtype=dtype)
    with pytest.raises(AdditivityError) as raised, pytest.warns(UnsupportedOpWarning, match="no DeepLIFT rule"):
        explain(model, background, X)
    message = str(raised.value)
    assert "no DeepLIFT rule" in message and f"Likely culprits: {culprit}." in message
    assert "float32 rounding of the model itself" not in message
    if dtype == torch.float32:
        assert "Not float32 rounding" in message


# --- one registry; what the current context explains ---------------------------------------


def test_every_table_derives_from_the_registry():
    from torch_handler.engines.shap import OP_HANDLERS
    from torch_handler.recurrent.modules import deeplift_forward_for, rule_for
    from torch_handler.recurrent.registry import REGISTRY

    assert torch_handler.SUPPORTED_MODULES == tuple(entry.cls for entry in REGISTRY)
    assert list(OP_HANDLERS) == [entry.cls.__name__ for entry in REGISTRY]
    for entry in REGISTRY:
        handler = OP_HANDLERS[entry.cls.__name__]
        assert handler.__name__ == entry.handler and getattr(torch_handler, entry.handler) is handler
        module = entry.cls(3, 4)
        assert type(rule_for(module)) is type(entry.rule(module))
        assert deeplift_forward_for(module).__name__ == f"{entry.layout}_forward"
    relu = nn.RNN(3, 4, nonlinearity="relu")
    assert rule_for(relu).nonlinearity == "relu"


def test_current_explanation_names_the_model_and_its_recurrent_modules():
    model = classifier()
    other = nn.GRUCell(3, 2)
    assert torch_handler.current_explanation() is None
    with torch_handler.deeplift_mode(model):
        outer = torch_handler.current_explanation()
        assert outer.model is model and dict(outer.modules) == {model.lstm: "lstm"}
        assert outer.parent is None and dict(outer.options) == {}
        with torch_handler.deeplift_mode(other):
            inner = torch_handler.current_explanation()
            assert inner.model is other and inner.parent is outer
            assert dict(inner.modules) == {model.lstm: "lstm", other: ""}
        assert torch_handler.current_explanation() is outer
    assert torch_handler.current_explanation() is None


def test_a_class_level_patch_of_a_recurrent_forward_is_refused(monkeypatch):
    def patched(self, input, hx=None):  # e.g. another library's global instrumentation
        raise AssertionError("never called: refused before anything runs")

    monkeypatch.setattr(nn.GRU, "forward", patched)
    with pytest.raises(UnsupportedConfigurationError, match=r"nn.GRU.forward has been replaced at class level"):
        with torch_handler.deeplift_mode(classifier()):
            pass
