"""The version policy (torch_handler/engines/versions.py): each branch, through the real register().

Inside the tested range silent; a newer shap warns and still explains exactly (the additivity
check is the guard); an older shap, or one without the internals register() patches, is an
UnsupportedVersionError that names what is missing and the tested range.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings

import numpy as np
import pytest
import shap
import torch
from shap.explainers._deep import deep_pytorch
from torch import nn

import torch_handler
from torch_handler.engines import versions
from torch_handler.engines.versions import (
    TESTED,
    UnsupportedVersionError,
    UntestedVersionWarning,
    check_version,
    require_attributes,
)

SHAP_RANGE = r"shap>=0\.49\.1,<0\.55"


@pytest.fixture(autouse=True)
def registration_restored():
    """Every test starts unregistered and leaves registration as it found it."""
    registered = torch_handler.is_registered()
    torch_handler.unregister()
    yield
    (torch_handler.register if registered else torch_handler.unregister)()


def _exact_lstm_explanation() -> float:
    """Relative additivity error of shap.DeepExplainer on a float64 nn.LSTM classifier."""
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model = Classifier().double().eval()
    background, x = torch.randn(6, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    explainer = shap.DeepExplainer(model, background)
    phi = np.asarray(explainer.shap_values(x))  # (2, 5, 3, outputs)
    with torch.no_grad():
        fx = model(x).numpy()
    delta = fx - np.asarray(explainer.expected_value)
    return float(np.abs(phi.sum(axis=(1, 2)) - delta).max() / np.abs(fx).max())


def test_inside_the_tested_range_is_silent():
    assert TESTED["shap"].position(shap.__version__) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntestedVersionWarning)
        torch_handler.register()
    assert torch_handler.is_registered()


def test_newer_shap_warns_with_the_tested_range_and_stays_exact(monkeypatch):
    monkeypatch.setattr(shap, "__version__", "0.55.0")
    with pytest.warns(UntestedVersionWarning, match=rf"shap 0\.55\.0 is newer than .*{SHAP_RANGE}") as seen:
        torch_handler.register()
    assert seen[0].filename == __file__  # points at the caller of register()
    assert torch_handler.is_registered()
    assert _exact_lstm_explanation() < 1e-10


@pytest.mark.parametrize("version", ["0.48.0", "0.49.0", "0.46.0"])
def test_older_shap_is_an_error_naming_the_range(monkeypatch, version):
    monkeypatch.setattr(shap, "__version__", version)
    with pytest.raises(UnsupportedVersionError, match=rf"{SHAP_RANGE}.*found shap {version}"):
        torch_handler.register()
    assert not torch_handler.is_registered()
    assert issubclass(UnsupportedVersionError, RuntimeError)


def test_no_shap_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "shap", None)
    with pytest.raises(ImportError, match=rf"lstm-deepshap\[shap\].*{SHAP_RANGE}"):
        torch_handler.register()
    assert not torch_handler.is_registered()


@pytest.mark.parametrize("owner, name", [
    (None, "op_handler"),
    (None, "PyTorchDeep"),
    ("PyTorchDeep", "shap_values"),
    ("PyTorchDeep", "add_handles"),
    ("PyTorchDeep", "gradient"),
])
def test_missing_shap_internal_is_named(monkeypatch, owner, name):
    target = deep_pytorch if owner is None else getattr(deep_pytorch, owner)
    monkeypatch.delattr(target, name)
    dotted = name if owner is None else f"{owner}.{name}"
    with pytest.raises(UnsupportedVersionError, match=rf"{dotted}.*{SHAP_RANGE}"):
        torch_handler.register()
    assert not torch_handler.is_registered()
    assert getattr(deep_pytorch, "op_handler", {}).get("LSTM") is not torch_handler.lstm_handler


def test_missing_deep_pytorch_module_is_named(monkeypatch):
    from shap.explainers import _deep

    monkeypatch.delattr(_deep, "deep_pytorch")
    monkeypatch.setitem(sys.modules, "shap.explainers._deep.deep_pytorch", None)
    with pytest.raises(UnsupportedVersionError, match=rf"shap\.explainers\._deep\.deep_pytorch.*{SHAP_RANGE}"):
        torch_handler.register()
    assert not torch_handler.is_registered()


def test_changed_shap_values_signature_is_named(monkeypatch):
    def shap_values(self, X, check_additivity=True):
        raise AssertionError("never called")

    monkeypatch.setattr(deep_pytorch.PyTorchDeep, "shap_values", shap_values)
    with pytest.raises(UnsupportedVersionError, match=r"PyTorchDeep\.shap_values\(self, X, ranked_outputs"):
        torch_handler.register()
    assert not torch_handler.is_registered()


def test_op_handler_that_is_not_a_dict_is_named(monkeypatch):
    monkeypatch.setattr(deep_pytorch, "op_handler", tuple(deep_pytorch.op_handler.items()))
    with pytest.raises(UnsupportedVersionError, match=r"op_handler to be a dict, found tuple"):
        torch_handler.register()
    assert not torch_handler.is_registered()


@pytest.mark.parametrize("version, expected", [
    ("0.49.0", -1), ("0.49.1", 0), ("0.51.0", 0), ("0.54.1", 0), ("0.54.9", 0),
    ("0.55.0rc1", 1), ("0.55.0", 1), ("1.0", 1),
])
def test_position_in_the_shap_range(version, expected):
    assert TESTED["shap"].position(version) == expected


def test_local_torch_builds_compare_by_release():
    assert TESTED["torch"].position("2.13.0+cpu") == 0
    assert TESTED["torch"].position("2.15.0+cu130") == 0
    assert TESTED["torch"].position("2.12.1+cpu") == -1
    assert TESTED["torch"].position("2.16.0.dev20270101") == 1


def test_check_version_for_another_package():
    check_version("torch", "2.14.1", "something")  # silent: nothing recorded, nothing raised
    with pytest.warns(UntestedVersionWarning, match=r"torch 2\.16\.0 is newer .*torch>=2\.13\.0,<2\.16"):
        check_version("torch", "2.16.0", "something")
    with pytest.raises(UnsupportedVersionError, match=r"something needs torch>=2\.13\.0,<2\.16 .*found torch 2\.2\.0"):
        check_version("torch", "2.2.0", "something")


def test_require_attributes_on_captum_internals():
    import captum.attr

    require_attributes(captum.attr, ["DeepLift", "DeepLift.attribute", "DeepLiftShap"], "captum",
                       "a Captum integration")
    with pytest.raises(UnsupportedVersionError) as error:
        require_attributes(captum.attr, ["DeepLift.attribute", "DeepLift.no_such_method", "NoSuchClass"],
                           "captum", "a Captum integration")
    message = str(error.value)
    assert "captum.attr.DeepLift.no_such_method, captum.attr.NoSuchClass" in message
    assert "DeepLift.attribute," not in message
    assert f"captum {importlib.metadata.version('captum')}" in message
    assert "captum>=0.9.0,<0.10" in message and "lstm-deepshap[captum]" in message


def test_require_attributes_on_tangermeme_internals():
    import tangermeme.deep_lift_shap as dls

    require_attributes(dls, ["deep_lift_shap"], "tangermeme", "a tangermeme integration")
    with pytest.raises(UnsupportedVersionError, match=r"tangermeme\.deep_lift_shap\.gone.*tangermeme>=1\.6\.0,<1\.7"):
        require_attributes(dls, ["gone"], "tangermeme", "a tangermeme integration")


def test_this_environment_is_inside_the_tested_ranges():
    """CI runs each constraint set; a pin that leaves the tested range fails here."""
    found = {"python": ".".join(map(str, sys.version_info[:3]))}
    for package in TESTED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    assert {"python", "torch", "numpy", "shap"} <= set(found)
    outside = {p: v for p, v in found.items() if TESTED[p].position(v) != 0}
    assert outside == {}, f"installed versions outside the tested ranges: {outside}"


def test_describe_and_specifier():
    shap_range = TESTED["shap"]
    assert shap_range.specifier == ">=0.49.1,<0.55"
    assert shap_range.describe() == "shap>=0.49.1,<0.55 (CI runs 0.49.1 to 0.54.1)"
    assert versions.SHAP_INTERNALS == ("op_handler", "PyTorchDeep", "PyTorchDeep.shap_values",
                                       "PyTorchDeep.add_handles", "PyTorchDeep.gradient")
