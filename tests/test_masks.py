"""Padding masks computed from the input, through shap, Captum and tangermeme (issue 19, items 2 and 6).

A mask (``x != 0``, ``.any`` / ``.all``, ``x.abs().sum(-1) > 0``), indices (``argmax``, a
length from ``mask.sum``) or an integer cast is an input-dependent tensor without a gradient.
The interception follows its doubled batch through comparisons, boolean reductions, logical
ops, casts, ``where`` / ``masked_fill`` and indexing:

* equal in both halves of every pair (references padded like their input): a constant for the
  rules, and the attributions are exact in every engine, with no warning even under
  ``strict=True``;
* different within a pair (references of other lengths): ``UnsupportedOpWarning`` naming the op
  that made it and where (``gt in MaskedMean.forward``), ``UnsupportedOpError`` under
  ``strict=True``, in every engine; shap's ``AdditivityError`` names the same op (not ``abs``,
  which only feeds the mask) with advice that applies;
* a mask whose batch was lost (a reduction over every dim): ``DoubledBatchError`` naming the
  op that lost it, with advice that applies.

Models take one-hot sequences (N, 4, L) whose padded positions are all-zero columns, as
tangermeme expects (an all-zero column is an "N" base there).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap
from helpers import TOLERANCE, additivity_error, explain
from tangermeme.deep_lift_shap import deep_lift_shap
from tangermeme.utils import TangermemeWarning
from torch import nn
from torch.nn import functional as F

import torch_handler
from torch_handler.errors import AdditivityError, DoubledBatchError, UnsupportedOpError, UnsupportedOpWarning

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require:UserWarning"),
]

DTYPES = [torch.float64, torch.float32]
LENGTH, TARGET = 10, 1


class MaskedMean(nn.Module):
    """LSTM outputs averaged over the valid steps; the mask is computed from the input."""

    def __init__(self, mask: str):
        super().__init__()
        self.mask = mask
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(x.transpose(1, 2))
        valid = (x != 0).any(1) if self.mask == "any" else x.abs().sum(1) > 0  # (N, L)
        m = valid.unsqueeze(-1).to(h.dtype)
        return self.out(torch.tanh((h * m).sum(1) / m.sum(1)))


class MaskedAttention(nn.Module):
    """Attention over the LSTM outputs with the padded steps' scores filled with -inf."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.score = nn.Linear(6, 1)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(x.transpose(1, 2))
        scores = self.score(h).squeeze(-1).masked_fill((x == 0).all(1), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return self.out((weights.unsqueeze(-1) * h).sum(1))


class LastValidStep(nn.Module):
    """The LSTM output at each row's last valid step: a length from the sum of a bool mask,
    used as an index."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(x.transpose(1, 2))
        lengths = (x != 0).any(1).sum(1)
        return self.out(torch.tanh(h[torch.arange(h.shape[0]), lengths - 1]))


class LogicalWhere(nn.Module):
    """Logical ops, ``where`` on the mask, a float cast of the mask and its count as a divisor."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.GRU(4, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(x.transpose(1, 2))
        padded = torch.logical_and((x == 0).all(1), ~(x.sum(1) > 0.5))
        valid = torch.logical_not(padded) | torch.logical_xor(padded, padded)
        gated = torch.where(valid.unsqueeze(-1), F.silu(h), torch.zeros_like(h))
        return self.out(gated.sum(1) / valid.float().sum(1, keepdim=True))


class ValidStepsFirst(nn.Module):
    """An integer cast of the padding mask, ``argsort`` of it (the valid steps, latest first),
    and the LSTM outputs reordered by those indices, weighted per position."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.weights = nn.Parameter(torch.linspace(1.0, 0.1, LENGTH).unsqueeze(-1))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(x.transpose(1, 2))
        positions = torch.arange(x.shape[-1], device=x.device)
        order = ((x != 0).any(1).long() * positions).argsort(dim=1, descending=True, stable=True)  # (N, L)
        reordered = torch.take_along_dim(h, order.unsqueeze(-1), dim=1)
        return self.out(torch.tanh((reordered * self.weights).sum(1)))


MODELS = {
    "masked_mean_any": lambda: MaskedMean("any"),
    "masked_mean_abs_gt": lambda: MaskedMean("abs"),
    "masked_attention": MaskedAttention,
    "last_valid_step": LastValidStep,
    "logical_where": LogicalWhere,
    "valid_steps_first": ValidStepsFirst,
}
# The op that makes each model's mask from the input (where the gradient ends).
MASK_OP = {
    "masked_mean_any": "ne",
    "masked_mean_abs_gt": "gt",
    "masked_attention": "eq",
    "last_valid_step": "ne",
    "logical_where": "eq",
    "valid_steps_first": "ne",
}


def one_hot(lengths, generator, dtype) -> torch.Tensor:
    """(len(lengths), 4, LENGTH) one-hot sequences, all-zero columns after each length."""
    index = torch.randint(0, 4, (len(lengths), LENGTH), generator=generator)
    x = F.one_hot(index, 4).transpose(1, 2).to(dtype)
    for row, length in enumerate(lengths):
        x[row, :, length:] = 0
    return x


def setup(name, dtype, x_lengths, reference_lengths, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]().to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, one_hot(x_lengths, g, dtype), one_hot(reference_lengths, g, dtype)


def output_scale(model, *tensors) -> float:
    with torch.no_grad():
        return max(float(model(t).abs().max()) for t in tensors)


def deeplift_error(model, X, baselines, strict=False) -> float:
    """Captum DeepLift inside deeplift_mode: max |Σ attr − Δf| / scale for pairs (X[i], baselines[i])."""
    with torch_handler.deeplift_mode(model, strict=strict):
        attr = DeepLift(model).attribute(X, baselines=baselines, target=TARGET)
    with torch.no_grad():
        delta = (model(X) - model(baselines))[:, TARGET].double()
    return float((attr.detach().double().sum(dim=(1, 2)) - delta).abs().max()) / output_scale(model, X, baselines)


def deeplift_shap_error(model, X, references) -> float:
    with torch_handler.deeplift_mode(model):
        attr = DeepLiftShap(model).attribute(X, baselines=references, target=TARGET)
    with torch.no_grad():
        delta = (model(X)[:, TARGET] - model(references)[:, TARGET].mean()).double()
    return float((attr.detach().double().sum(dim=(1, 2)) - delta).abs().max()) / output_scale(model, X, references)


def tangermeme_multipliers(model, X, references, strict=False) -> torch.Tensor:
    """deep_lift_shap's raw multipliers (N, S, 4, L) for references (N, S, 4, L)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Convergence deltas", RuntimeWarning)
        # Padded positions are all-zero columns ("N"), which tangermeme accepts in X only with
        # only_warn=True.
        warnings.filterwarnings("ignore", "X must be one-hot", TangermemeWarning)
        with torch_handler.deeplift_mode(model, strict=strict):
            return deep_lift_shap(
                model, X, references=references, target=TARGET, raw_outputs=True, device="cpu", only_warn=True
            )


def tangermeme_error(model, X, references, strict=False) -> float:
    """deep_lift_shap with references (N, S, 4, L): max |Σ (x − r)·m − Δf| / scale."""
    m = tangermeme_multipliers(model, X, references, strict)
    with torch.no_grad():
        fx = model(X)[:, TARGET].double()
        fr = model(references.flatten(0, 1))[:, TARGET].double().view(references.shape[:2])
    contributions = ((X.unsqueeze(1) - references) * m).double().sum(dim=(2, 3))
    flat = references.flatten(0, 1)
    return float((contributions - (fx[:, None] - fr)).abs().max()) / output_scale(model, X, flat)


# --- equal in both halves of every pair: exact, silent, even under strict=True ---------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_masks_equal_within_each_pair_are_exact_in_every_engine(name, dtype):
    bar = TOLERANCE[dtype]
    # shap pairs every input with every background row: one length for all.
    model, X, references = setup(name, dtype, [7, 7, 7], [7, 7, 7, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        values = explain(model, references, X)  # shap's strict additivity check runs too
        assert additivity_error(model, references, X, values) <= bar
        assert deeplift_shap_error(model, X, references) <= bar
    # Captum DeepLift and tangermeme pair each input with its own references: each reference
    # padded like its input, lengths differing between inputs.
    model, X, baselines = setup(name, dtype, [4, 7, 10], [4, 7, 10])
    assert deeplift_error(model, X, baselines, strict=True) <= bar
    g = torch.Generator().manual_seed(5)
    per_example = torch.stack([one_hot([n] * 3, g, dtype) for n in (4, 7, 10)])  # (N, S, 4, L)
    assert tangermeme_error(model, X, per_example, strict=True) <= bar


def test_engines_agree_on_a_masked_model():
    """shap (background of one), Captum DeepLift and tangermeme on the same pairs."""
    model, X, references = setup("masked_attention", torch.float64, [6, 6, 6], [6])
    reference = references[:1]
    shap_values = np.asarray(explain(model, reference, X))[..., TARGET]
    with torch_handler.deeplift_mode(model, strict=True):
        captum = DeepLift(model).attribute(X, baselines=reference.expand_as(X), target=TARGET)
    captum = captum.detach().numpy()
    m = tangermeme_multipliers(model, X, reference.expand_as(X).unsqueeze(1), strict=True)
    tangermeme = ((X - reference) * m[:, 0]).numpy()
    scale = np.abs(captum).max()
    assert scale > 0
    assert np.abs(shap_values - captum).max() <= 1e-10 * scale
    assert np.abs(tangermeme - captum).max() <= 1e-10 * scale


# --- different within a pair: named in every engine -------------------------------------------


def _named(record, op, model_name):
    pattern = rf"`{op}` in {model_name}\.forward on input-dependent tensors: its result has no gradient and differs"
    return [w for w in record if issubclass(w.category, UnsupportedOpWarning) and re.search(pattern, str(w.message))]


@pytest.mark.parametrize("name", list(MODELS))
def test_masks_that_differ_within_a_pair_are_named_in_every_engine(name):
    op, cls = MASK_OP[name], type(MODELS[name]()).__name__
    model, X, references = setup(name, torch.float64, [10, 10, 10], [5, 6, 7, 8])
    baselines = references[:3]
    # Captum DeepLift and DeepLiftShap: a warning naming the op that made the mask, and where
    for run in (lambda: deeplift_error(model, X, baselines), lambda: deeplift_shap_error(model, X, references)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            error = run()
        assert _named(record, op, cls), [str(w.message) for w in record]
        assert error > 1e-3  # the miss the warning announces is real
    # tangermeme
    per_example = references[:3].unsqueeze(1)  # (N, 1, 4, L)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tangermeme_error(model, X, per_example)
    assert _named(record, op, cls)
    # strict=True: the same op, raised, in both deeplift_mode engines
    with pytest.raises(UnsupportedOpError, match=rf"`{op}` in {cls}\.forward"):
        deeplift_error(model, X, baselines, strict=True)
    with pytest.raises(UnsupportedOpError, match=rf"`{op}` in {cls}\.forward"):
        tangermeme_error(model, X, per_example, strict=True)
    # shap inside an enclosing deeplift_mode(strict=True): raised too
    with pytest.raises(UnsupportedOpError, match=rf"`{op}` in {cls}\.forward"):
        with torch_handler.deeplift_mode(model, strict=True):
            explain(model, references, X)
    # shap: the warning, then AdditivityError naming the same op, with a fix that applies
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(AdditivityError) as raised:
            explain(model, references, X)
    assert _named(record, op, cls)
    message = str(raised.value)
    assert f"Likely culprits: functional {op} in {cls}.forward." in message
    assert f"Fix for {op} in {cls}.forward: " in message and "padded like their input" in message
    assert "abs" not in message  # feeds only the mask: not a culprit
    assert "nn.Module form" not in message


def test_the_issue_case_gt_is_named_not_abs():
    """`mask = x.abs().sum(-1) > 0` with references of other lengths (issue 19, item 2): Captum
    DeepLiftShap was off by 0.09–0.19 of the output scale without a word."""
    model, X, references = setup("masked_mean_abs_gt", torch.float32, [10, 10, 10], [4, 6, 8, 9])
    with pytest.warns(UnsupportedOpWarning, match=r"`gt` in MaskedMean\.forward") as record:
        deeplift_shap_error(model, X, references)
    assert not any("`abs`" in str(w.message) for w in record)
    with pytest.raises(UnsupportedOpError, match=r"`gt` in MaskedMean\.forward"):
        with torch_handler.deeplift_mode(model, strict=True):
            DeepLiftShap(model).attribute(X, baselines=references, target=TARGET)


# --- a mask whose batch is lost: the op that lost it is named ---------------------------------


class MaskOverEverything(nn.Module):
    """``(x != 0).any()`` without a dim reduces over the batch too: it mixes the pairs."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(x.transpose(1, 2))
        return self.out(torch.tanh(h[:, -1] * (x != 0).any().to(h.dtype)))


def test_a_mask_that_lost_the_batch_names_the_op_that_lost_it():
    torch.manual_seed(0)
    model = MaskOverEverything().double().eval()
    g = torch.Generator().manual_seed(1)
    X, baselines = one_hot([10, 10], g, torch.float64), one_hot([5, 5], g, torch.float64)
    lost = r"lost at `any` in MaskOverEverything\.forward: it reduces over, indexes into or merges the dim that holds"
    with pytest.raises(DoubledBatchError, match=lost):
        deeplift_error(model, X, baselines)
    with pytest.raises(DoubledBatchError, match=lost):
        explain(model, baselines, X)
    with pytest.raises(DoubledBatchError, match=lost):
        tangermeme_error(model, X, baselines.unsqueeze(1))


# --- item 6: AdditivityError's advice applies to the culprit ------------------------------------


class FunctionalLog1pHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(x.transpose(1, 2))
        return self.out(torch.log1p(h[:, -1]))


def test_additivity_error_gives_a_fix_that_applies_to_log1p():
    """log1p has no rule and no module form: the advice is an exact rewrite with ops that have
    rules."""
    model, _, _ = setup("masked_mean_any", torch.float64, [1], [1])
    torch.manual_seed(0)
    model = FunctionalLog1pHead().double().eval()
    g = torch.Generator().manual_seed(1)
    X, references = one_hot([10, 10], g, torch.float64), one_hot([10, 10, 10], g, torch.float64)
    with pytest.warns(UnsupportedOpWarning, match=r"`log1p` in FunctionalLog1pHead\.forward.*log\(1 \+ x\)"):
        with pytest.raises(AdditivityError) as raised:
            explain(model, references, X)
    message = str(raised.value)
    assert "Likely culprits: functional log1p in FunctionalLog1pHead.forward." in message
    assert "Fix for log1p in FunctionalLog1pHead.forward: " in message and "log(1 + x)" in message
    assert "nn.Module form" not in message


def test_additivity_message_without_reports_has_no_stale_advice():
    from torch_handler.additivity import Diagnosis, failure_message

    message = failure_message(
        "shap.DeepExplainer",
        np.array([0.1]),
        0.1,
        1e-10,
        np.float64,
        Diagnosis(None, ["functional amin in Head.forward"], {}),
    )
    assert "Likely culprits: functional amin in Head.forward." in message
    assert "nn.Module form" not in message and "-amax(-x, d)" in message


# --- detach(): input-dependent statistics without a gradient (RevIN) ---------------------------


class DetachedStats(nn.Module):
    """Reversible instance normalisation as in the RevIN reference code: per-sequence mean and
    std over time, computed from the input and ``detach()``-ed; normalise, LSTM, de-normalise."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        s = x.transpose(1, 2)
        mean = s.mean(1, keepdim=True).detach()
        std = torch.sqrt(s.var(1, keepdim=True, unbiased=False) + 1e-5).detach()
        y = self.out(self.lstm((s - mean) / std)[0][:, -1])
        return y * std[:, 0, :2] + mean[:, 0, :2]


def permutations_of_one_sequence(n, generator, dtype) -> torch.Tensor:
    """(n, 4, LENGTH) one-hot: each row the same bases in another order, so the statistics over
    time (mean, variance) are the same for every row."""
    base = one_hot([LENGTH], generator, dtype)[0]
    return torch.stack([base[:, torch.randperm(LENGTH, generator=generator)] for _ in range(n)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_detached_statistics_equal_within_every_pair_are_exact_in_every_engine(dtype):
    """Same statistics for an input and its references (same base composition): the detached
    mean / std are constants for the rules; exact, no warning, under strict=True."""
    torch.manual_seed(0)
    model = DetachedStats().to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    rows = permutations_of_one_sequence(7, g, dtype)
    X, references = rows[:3], rows[3:]
    tol = TOLERANCE[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        assert deeplift_error(model, X, references[:3], strict=True) <= tol
        assert deeplift_shap_error(model, X, references) <= tol
        # tangermeme's dinucleotide shuffles keep the composition, hence the statistics
        with torch_handler.deeplift_mode(model, strict=True):
            assert tangermeme_error(model, X, references[:3].unsqueeze(1)) <= tol
        assert additivity_error(model, references, X, explain(model, references, X)) <= tol


def test_detached_statistics_that_differ_within_a_pair_are_named_in_every_engine():
    """Different statistics for an input and its reference: the output difference they cause
    has no gradient (detach), so no attribution. Captum used to miss ~100 % of the output scale
    without a word, even under strict=True, and shap's AdditivityError blamed `var`."""
    pattern = r"`detach` in DetachedStats\.forward on input-dependent tensors: its result has no gradient and differs"
    torch.manual_seed(0)
    model = DetachedStats().double().eval()
    g = torch.Generator().manual_seed(2)
    X, references = one_hot([LENGTH] * 3, g, torch.float64), one_hot([LENGTH] * 4, g, torch.float64)
    with pytest.warns(UnsupportedOpWarning, match=pattern):
        assert deeplift_error(model, X, references[:3]) > 1e-3  # the miss the warning announces
    with pytest.warns(UnsupportedOpWarning, match=pattern):
        deeplift_shap_error(model, X, references)
    with pytest.warns(UnsupportedOpWarning, match=pattern):
        tangermeme_error(model, X, references[:3].unsqueeze(1))
    with pytest.raises(UnsupportedOpError, match=pattern):
        deeplift_error(model, X, references[:3], strict=True)
    with pytest.raises(UnsupportedOpError, match=pattern):
        tangermeme_error(model, X, references[:3].unsqueeze(1), strict=True)
    with pytest.warns(UnsupportedOpWarning, match=pattern):
        with pytest.raises(AdditivityError) as raised:
            explain(model, references, X)
    message = str(raised.value)
    assert "Likely culprits: functional detach in DetachedStats.forward." in message
    assert "drop the `.detach()`" in message
    assert "var" not in message.split("Likely culprits")[1]  # only feeds the detached std
