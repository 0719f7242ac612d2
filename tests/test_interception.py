"""The interception machinery: batch tracking, engine hooks kept off, threads, warnings.

The per-head end-to-end exactness tests live in test_whole_models.py; these check the
mechanism itself. Errors are relative to the largest |output| (inputs and references).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import shap
import torch
import torch.nn.functional as F
from captum.attr import DeepLift
from helpers import TOLERANCE
from torch import nn

import torch_handler
from torch_handler.errors import DoubledBatchError, UnsupportedOpError, UnsupportedOpWarning
from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception import context, function_mode
from torch_handler.ops.interception.batch_axis import Axis
from torch_handler.ops.interception.function import from_pairs, to_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

BAR = TOLERANCE  # the project's one definition of "exact" (torch_handler.additivity)


def captum_error(model, x, r, target=0):
    """Captum DeepLift in deeplift_mode: (attributions, additivity error / output scale)."""
    with torch_handler.deeplift_mode(model):
        attributions = DeepLift(model).attribute(x, baselines=r, target=target).detach()
    with torch.no_grad():
        fx, fr = model(x), model(r)
    delta = fx[:, target] - fr[:, target]
    scale = max(fx.abs().max(), fr.abs().max())
    sums = attributions.reshape(len(x), -1).sum(1)
    return attributions, float((sums - delta).abs().max() / scale)


def graph_names(output) -> set[str]:
    """Names of every autograd node behind ``output``."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


# --- batch_axis: pure bookkeeping ------------------------------------------------------------


def test_reshape_follows_merged_heads_and_time_major_merges():
    B, H, L, d = 4, 2, 5, 3
    # (B, H, L, d) -> (B*H, L, d): the batch is the outer factor, heads inside it.
    merged = ba.after_reshape((B, H, L, d), Axis(0, B), (B * H, L, d))
    assert merged == Axis(0, B, H)
    assert ba.after_reshape((B * H, L, d), merged, (B, H, L, d)) == Axis(0, B, 1)
    # Time-major (L, B, E) -> (L, B*H, d) (nn.MultiheadAttention) and (L*B, E): batch inside L.
    assert ba.after_reshape((L, B, H * d), Axis(1, B), (L, B * H, d)) == Axis(1, B, H)
    inner_time = ba.after_reshape((L, B, H * d), Axis(1, B), (L * B, H * d))
    assert inner_time == Axis(0, B, 1) and ba.outer_of((L * B, H * d), inner_time) == L
    # Splitting the batch itself loses it.
    assert ba.after_reshape((L, B, d), Axis(1, B), (L, 2, B // 2 * d)) is None


def test_batch_equal_to_time_is_told_apart_by_layout_not_size():
    n = 4  # batch == time steps
    batch_major = ba.after_reshape((n, n, 3), Axis(0, n), (n * n, 3))
    time_major = ba.after_reshape((n, n, 3), Axis(1, n), (n * n, 3))
    assert batch_major == Axis(0, n, n)  # row b*T + t
    assert time_major == Axis(0, n, 1)  # row t*B + b
    assert ba.after_permute(Axis(1, n), (1, 0, 2)) == Axis(0, n)
    assert ba.after_transpose(Axis(0, n), 0, 1, 3) == Axis(1, n)


def test_indexing_and_reductions():
    shape = (6, 4, 5)  # (T, B, H), batch at dim 1
    axis = Axis(1, 4)
    assert ba.after_getitem(shape, axis, (-1,)) == Axis(0, 4)  # last step
    assert ba.after_getitem(shape, axis, (slice(None), slice(None), 0)) == Axis(1, 4)
    assert ba.after_getitem(shape, axis, (Ellipsis, None, slice(1, 3))) == Axis(1, 4)
    assert ba.after_getitem(shape, axis, (slice(None), slice(0, 2))) is None  # picks batch rows
    assert ba.after_reduce(axis, 0, 3, keepdim=False) == Axis(0, 4)
    assert ba.after_reduce(axis, (0, 2), 3, keepdim=True) == axis
    assert ba.after_reduce(axis, 1, 3, keepdim=False) is None  # over the batch


@pytest.mark.parametrize("axis_shape", [(Axis(1, 4, 3), (5, 24, 2)), (Axis(0, 4, 1), (20, 3)), (Axis(2, 6), (2, 3, 6))])
def test_pairs_split_each_row_from_its_reference(axis_shape):
    axis, shape = axis_shape
    # Each element holds the batch row it belongs to.
    d, size, inner = axis
    outer = shape[d] // (size * inner)
    rows = torch.arange(size).view(1, size, 1).expand(outer, size, inner).reshape(shape[d])
    view = [1] * len(shape)
    view[d] = shape[d]
    t = rows.view(view).expand(shape).double()
    pairs = to_pairs(t, axis)
    n = size // 2
    assert pairs.shape[:2] == (2, n)
    for j in range(n):
        assert torch.all(pairs[0, j] == j) and torch.all(pairs[1, j] == j + n)
    assert torch.equal(from_pairs(pairs, shape, axis), t)


# --- exactness where the batch hides ---------------------------------------------------------


class TimeMajorSoftmax(nn.Module):
    """Time-major LSTM; softmax over time (dim 0) of a tanh score; nn.Softmax and nn.Tanh."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 6)
        self.score = nn.Linear(6, 1)
        self.tanh = nn.Tanh()
        self.softmax = nn.Softmax(dim=0)
        self.out = nn.Linear(6, 2)

    def forward(self, x):  # x (B, T, F)
        h, _ = self.rnn(x.transpose(0, 1))  # (T, B, H)
        w = self.softmax(self.tanh(self.score(h)))  # (T, B, 1)
        return self.out((w * h).sum(0))


class MHAHead(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, heads: int = 2):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, heads, batch_first=batch_first)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h, _ = self.rnn(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.mha(h, h, h, need_weights=self.need_weights)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.out(F.gelu(a).mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_time_major_softmax_with_batch_equal_to_time(dtype):
    torch.manual_seed(0)
    model = TimeMajorSoftmax().to(dtype).eval()
    pairs, steps = 2, 4  # the doubled batch (T, 2N, H) is square: 2N == T
    x, r = torch.randn(pairs, steps, 3, dtype=dtype), torch.randn(pairs, steps, 3, dtype=dtype)
    _, error = captum_error(model, x, r)
    assert error <= BAR[dtype]


@pytest.mark.parametrize("pairs", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_with_batch_equal_to_heads_and_time(batch_first, need_weights, pairs):
    # The doubled batch 2N equals the number of heads and the sequence length: (2N*H, L, d)
    # views cannot be told apart by size.
    torch.manual_seed(1)
    n = 2 * pairs
    model = MHAHead(batch_first, need_weights, heads=n).double().eval()
    x, r = torch.randn(pairs, n, 3, dtype=torch.float64), torch.randn(pairs, n, 3, dtype=torch.float64)
    _, error = captum_error(model, x, r)
    assert error <= 1e-10


def test_same_attributions_from_shap_and_captum_for_one_reference():
    torch.manual_seed(2)
    model = MHAHead(batch_first=False, need_weights=True).double().eval()
    x, r = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(1, 5, 3, dtype=torch.float64)
    captum, error = captum_error(model, x, r.expand_as(x).clone())
    assert error <= 1e-10
    torch_handler.register()
    try:
        values = shap.DeepExplainer(model, r).shap_values(x)  # one background row = DeepLIFT
    finally:
        torch_handler.unregister()
    assert np.abs(values[..., 0] - captum.numpy()).max() <= 1e-12 * np.abs(captum.numpy()).max()


# --- engine rules kept off handled modules, and only there -------------------------------------


class SoftmaxAndPool(nn.Module):
    """batch_first LSTM, nn.MaxPool1d over features (engine rule kept), nn.Softmax (ours)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 6, batch_first=True)
        self.pool = nn.MaxPool1d(2)
        self.softmax = nn.Softmax(dim=1)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h, _ = self.rnn(x)  # (B, T, 6)
        p = self.pool(h)  # (B, T, 3)
        w = self.softmax(p.sum(-1, keepdim=True))  # over time
        return self.out((w * p).sum(1))


def test_captum_hooks_only_modules_without_library_rules():
    model = SoftmaxAndPool().double().eval()
    engine = DeepLift(model)
    assert engine._can_register_hook(model.softmax)  # outside: Captum's own behaviour
    with torch_handler.deeplift_mode(model):
        assert not engine._can_register_hook(model.softmax)
        assert engine._can_register_hook(model.pool)
    plain = nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="no nn.LSTM"), torch_handler.deeplift_mode(plain):
        assert DeepLift(plain)._can_register_hook(plain[1])  # not a model the library handles


def test_engine_rule_kept_where_the_library_has_none_is_still_exact():
    torch.manual_seed(3)
    model = SoftmaxAndPool().double().eval()
    x, r = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)
    _, error = captum_error(model, x, r)
    # Captum's maxpool rule is exact for a 1-D max over pairs of features.
    assert error <= 1e-10


def test_shap_attaches_no_hooks_to_handled_modules():
    torch_handler.register()
    try:
        model = TimeMajorSoftmax().double().eval()
        background = torch.randn(4, 5, 3, dtype=torch.float64)
        explainer = shap.DeepExplainer(model, background)
        engine = explainer.explainer  # shap's PyTorchDeep
        with torch_handler.deeplift_mode(model):
            assert engine.add_handles(model.softmax, lambda *a: None, lambda *a: None) == []
            assert engine.add_handles(model.tanh, lambda *a: None, lambda *a: None) == []
        handles = engine.add_handles(model.softmax, lambda *a: None, lambda *a: None)
        assert len(handles) == 2  # shap's own behaviour outside an explanation
        for handle in handles:
            handle.remove()
        # shap's nn.Softmax / nn.Tanh rules on the time-major tensor would pair time steps.
        values = explainer.shap_values(torch.randn(2, 5, 3, dtype=torch.float64))
        assert values.shape == (2, 5, 3, 2)  # the strict additivity check passed
    finally:
        torch_handler.unregister()


def test_tangermeme_registers_no_hooks_on_handled_modules():
    import tangermeme.deep_lift_shap as tdls
    from tangermeme._deep_lift_utils import _build_nonlinear_ops

    model = TimeMajorSoftmax().double().eval()
    ops = _build_nonlinear_ops()
    with torch_handler.deeplift_mode(model):
        for module in (model.softmax, model.tanh):
            module._NON_LINEAR_OPS = ops
            tdls._register_hooks(module)
            assert len(module._backward_hooks) == 0
            del module._NON_LINEAR_OPS


_IMPORTED_INSIDE = """
import sys
import torch
from torch import nn
import torch_handler

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.softmax, self.out = nn.GRU(3, 4, batch_first=True), nn.Softmax(-1), nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.softmax(self.rnn(x)[0][:, -1]))

torch.manual_seed(0)
model = Model().double().eval()
x, r = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)
with torch_handler.deeplift_mode(model):
    lazy = [m for m in ("captum.attr._core.deep_lift", "tangermeme.deep_lift_shap") if m in sys.modules]
    from captum.attr import DeepLiftShap  # first imported while the explanation is active
    import tangermeme.deep_lift_shap as tdls
    guarded = [getattr(f, "_torch_handler_guard", False)
               for f in (DeepLiftShap.__mro__[1]._can_register_hook, tdls._register_hooks)]
    phi = DeepLiftShap(model).attribute(x, baselines=r, target=0)
restored = [not hasattr(f, "_torch_handler_guard")
            for f in (DeepLiftShap.__mro__[1]._can_register_hook, tdls._register_hooks)]
with torch.no_grad():
    gap = (phi.sum((1, 2)) - (model(x)[:, 0] - model(r)[:, 0].mean())).abs().max().item()
print(lazy, guarded, restored, gap)
"""


def test_an_engine_imported_inside_an_explanation_gets_its_seam_wrapped(tmp_path):
    """The first explanation does not import the engines (seconds); one imported while it is
    active is wrapped on import, exact, and put back when the explanation ends."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(torch_handler.__file__).resolve().parents[1])  # this checkout first
    done = subprocess.run([sys.executable, "-c", _IMPORTED_INSIDE], capture_output=True, text=True,
                          check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("[] [True, True] [True, True] "), line  # not imported, wrapped, put back
    assert float(line.rsplit(" ", 1)[1]) <= TOLERANCE[torch.float64]


# --- threads, no_grad, models without recurrent modules --------------------------------------


def test_other_threads_and_no_grad_passes_run_native_ops():
    torch.manual_seed(4)
    model = MHAHead(batch_first=True, need_weights=True).double().eval()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    seen = {}

    def other_thread():
        y = model(x.clone().requires_grad_())
        seen["names"] = graph_names(y)

    with torch_handler.deeplift_mode(model):
        mine = model(x.clone().requires_grad_())
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        with torch.no_grad():
            quiet = model(x)
    assert "RuleFunctionBackward" in graph_names(mine)
    assert "RuleFunctionBackward" not in seen["names"]
    with torch.no_grad():
        native = model(x)
    assert torch.allclose(mine, native, rtol=0, atol=1e-12) and torch.equal(quiet, native)


def test_models_without_recurrent_modules_are_left_to_the_engine():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1), nn.Linear(6, 2)).double().eval()
    x, r = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    before = DeepLift(model).attribute(x, baselines=r, target=0)
    with pytest.warns(UserWarning, match="no nn.LSTM"), torch_handler.deeplift_mode(model):
        from torch.nn.modules import module as torch_module

        assert not torch_module._global_forward_pre_hooks  # nothing installed
        inside = DeepLift(model).attribute(x, baselines=r, target=0)
    assert torch.equal(before, inside)


def test_nothing_is_left_behind():
    import tangermeme.deep_lift_shap as tdls
    from shap.explainers._deep.deep_pytorch import PyTorchDeep
    from torch.nn.modules import module as torch_module

    seams = [(PyTorchDeep, "add_handles"), (DeepLift, "_can_register_hook"), (tdls, "_register_hooks")]
    engines = [getattr(owner, name) for owner, name in seams]
    model = MHAHead(batch_first=True, need_weights=False).double().eval()
    state = {name: set(vars(m)) for name, m in model.named_modules()}
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    with torch_handler.deeplift_mode(model):
        assert all(getattr(owner, name) is not engine for (owner, name), engine in zip(seams, engines, strict=True))
        captum_error(model, x, r)  # nested: the seams stay until the outer explanation ends
        assert all(getattr(owner, name) is not engine for (owner, name), engine in zip(seams, engines, strict=True))
    # The engines are exactly as found once nothing is explained.
    assert all(getattr(owner, name) is engine for (owner, name), engine in zip(seams, engines, strict=True))
    assert not torch_module._global_forward_pre_hooks and not torch_module._global_forward_hooks
    assert {name: set(vars(m)) for name, m in model.named_modules()} == state
    assert context.current() is None


def test_an_engine_without_its_seam_is_refused_and_nothing_is_wrapped(monkeypatch):
    from captum.attr._core import deep_lift
    from shap.explainers._deep.deep_pytorch import PyTorchDeep

    shap_seam = PyTorchDeep.add_handles
    monkeypatch.delattr(deep_lift.DeepLift, "_can_register_hook")
    model = MHAHead(batch_first=True, need_weights=False).double().eval()
    with pytest.raises(torch_handler.UnsupportedVersionError, match=r"DeepLift\._can_register_hook.*captum"):
        with torch_handler.deeplift_mode(model):
            pass
    assert PyTorchDeep.add_handles is shap_seam  # checked before anything was wrapped


# --- ops without rules, and rows that cannot be paired ---------------------------------------


class Cumprod(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.op = op
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out(self.op(h))


def test_op_without_rule_warns_with_its_name_and_raises_when_strict():
    model = Cumprod(lambda h: torch.cumprod(torch.sigmoid(h), dim=1)[:, -1]).double().eval()
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.warns(UnsupportedOpWarning, match="`cumprod`"), torch_handler.deeplift_mode(model):
        DeepLift(model).attribute(x, baselines=r, target=0)
    with pytest.raises(UnsupportedOpError, match="`cumprod`"), torch_handler.deeplift_mode(model, strict=True):
        DeepLift(model).attribute(x, baselines=r, target=0)


def test_where_warns_only_when_its_condition_differs_between_input_and_reference():
    model = Cumprod(lambda h: torch.where(h > 0, h, 0.1 * h).mean(1)).double().eval()
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    made_by_gt = r"`gt` in .*<lambda>.*differs between an input and its reference.*through `where`"
    with pytest.warns(UnsupportedOpWarning, match=made_by_gt), torch_handler.deeplift_mode(model):
        DeepLift(model).attribute(x, baselines=r, target=0)
    mask = torch.tensor([True, False, True, True])
    fixed = Cumprod(lambda h: torch.where(mask[:, None], torch.tanh(h), h).mean(1)).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        _, error = captum_error(fixed, x, r)
    assert error <= 1e-10


def test_rows_of_the_batch_picked_by_an_index_raise():
    model = Cumprod(lambda h: torch.tanh(h[:1]).mean(1).expand(h.shape[0], -1)).double().eval()
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(DoubledBatchError, match="could not be followed"), torch_handler.deeplift_mode(model):
        DeepLift(model).attribute(x, baselines=r, target=0)


class PoolTimeMajor(nn.Module):
    """nn.MaxPool1d on a time-major (T, B, H) tensor: its engine rule would split T in half."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 6)
        self.pool = nn.MaxPool1d(2)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h, _ = self.rnn(x.transpose(0, 1))
        return self.out(self.pool(h).sum(0))


def test_engine_rule_on_a_tensor_whose_batch_is_not_dim_0_raises():
    model = PoolTimeMajor().double().eval()
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(DoubledBatchError, match="MaxPool1d.*not dim 0"), torch_handler.deeplift_mode(model):
        DeepLift(model).attribute(x, baselines=r, target=0)


# --- every ruled op, in strict mode, in one model ---------------------------------------------


class EveryOp(nn.Module):
    """Three heads that together call each op with a rule (functionally, as a user writes them),
    on batch-first and time-major LSTMs. strict=True: any op seen without a rule raises."""

    def __init__(self, head: int, batch_first: bool):
        super().__init__()
        self.head = head
        self.rnn = nn.LSTM(3, 8, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.query = nn.Parameter(torch.randn(8))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h, (h_n, c_n) = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        if not self.rnn.batch_first:
            h = h.transpose(0, 1)
        if self.head == 0:  # normalize (stepped into), einsum, log_softmax, exp, matmul, glu, amax, logsumexp
            a = F.normalize(self.norm(h), dim=-1)
            p = torch.log_softmax(torch.einsum("btd,bsd->bts", a, h), -1).exp()
            z = F.glu(self.rms(p @ h), dim=-1)
            return self.out(z.amax(1) + torch.logsumexp(z, dim=1) / (1 + z.pow(2).mean(1)))
        if self.head == 1:  # activations, gates, maximum/minimum, clamp, vector_norm, sqrt, rsqrt, max, log, atan2
            g = torch.sigmoid(h) * F.gelu(h) + F.silu(h) - F.softplus(-h) + F.elu(h) + F.leaky_relu(h, 0.2)
            g = (
                torch.maximum(g, h)
                + torch.minimum(g, h_n[-1].unsqueeze(1))
                + torch.clamp(h, -0.5, 0.5)
                + F.relu6(3 * h)
            )
            w = torch.softmax(h @ self.query, dim=1)  # a matmul with a constant vector is linear
            y = (w.unsqueeze(-1) * g).sum(1)
            y = (
                y / (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + 1)
                + torch.sqrt(y.square() + 1)
                - torch.rsqrt(y.square() + 1)
            )
            head = y.view(len(y), 4, 2).max(dim=-1).values + torch.log(y[:, :4].exp() + 1)
            return self.out(head + torch.tanh(h_n[-1][:, :4]) ** 3 + torch.atan2(y[:, :4], c_n[-1][:, 4:] + 2))
        y = h.max(dim=1).values  # causal scaled_dot_product_attention, scalar ** tensor
        y = (
            F.scaled_dot_product_attention(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1), is_causal=True)
            .squeeze(1)
            .mean(1)
            + y
        )
        return self.out(torch.relu(y)[:, :4] * 2 ** torch.tanh(y[:, 4:]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("head", [0, 1, 2])
def test_every_ruled_op_is_exact_in_strict_mode(head, batch_first, dtype):
    torch.manual_seed(head)
    model = EveryOp(head, batch_first).to(dtype).eval()
    x, r = torch.randn(4, 4, 3, dtype=dtype), torch.randn(4, 4, 3, dtype=dtype)
    with torch_handler.deeplift_mode(model, strict=True):
        attributions = DeepLift(model).attribute(x, baselines=r, target=1).detach()
    with torch.no_grad():
        fx, fr = model(x), model(r)
    error = (attributions.sum((1, 2)) - (fx[:, 1] - fr[:, 1])).abs().max() / max(fx.abs().max(), fr.abs().max())
    assert error <= BAR[dtype]


def test_without_redispatch_composites_are_reported_not_silently_wrong(monkeypatch):
    # torch < 2.13 has no torch.overrides.redispatch_function to step into Python composites.
    monkeypatch.setattr(function_mode, "_HAS_REDISPATCH", False)
    model = MHAHead(batch_first=True, need_weights=True).double().eval()
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.warns(UnsupportedOpWarning, match="`multi_head_attention_forward`.*torch >= 2.13"):
        captum_error(model, x, r)


def test_inplace_activations_and_accumulation_are_exact():
    def head(h):
        acc = torch.zeros(h.shape[0], h.shape[2], dtype=h.dtype)
        acc += F.leaky_relu(h.clone(), 0.2, True).sum(1)  # positional inplace=True
        g = h.clone()
        g.sigmoid_()
        acc.add_(nn.ReLU(inplace=True)(g * h).mean(1))
        return acc.repeat(1, 1)

    torch.manual_seed(6)
    model = Cumprod(head).double().eval()
    x, r = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        _, error = captum_error(model, x, r)
    assert error <= 1e-10


def test_properties_and_slice_assignment_keep_the_batch():
    def head(h):  # h (2N, T, H)
        scores = torch.softmax(h @ h.mT, dim=-1)  # the .mT property
        buffer = torch.zeros(h.shape[0], 2, h.shape[2], dtype=h.dtype)
        buffer[:, 0] = (scores @ h).mean(1)  # a constant buffer filled with input-dependent rows
        buffer[:, 1] = torch.tanh(h[:, -1])
        return torch.sigmoid(buffer).sum(1)

    torch.manual_seed(7)
    model = Cumprod(head).double().eval()
    x, r = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        _, error = captum_error(model, x, r)
    assert error <= 1e-10


def test_last_valid_step_picked_with_arange_keeps_the_batch():
    def head(h):  # h (rows, T, H): the last valid step of each row (the same for each pair)
        last = torch.tensor([3, 1, 2]).repeat(h.shape[0] // 3)
        return torch.tanh(h[torch.arange(h.shape[0]), last]) * torch.sigmoid(h[:, 0])

    torch.manual_seed(8)
    model = Cumprod(head).double().eval()
    x, r = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        _, error = captum_error(model, x, r)
    assert error <= 1e-10


def test_an_index_that_depends_on_the_input_is_reported():
    torch.manual_seed(9)
    model = Cumprod(lambda h: torch.tanh(h[torch.arange(h.shape[0]), h.sum(-1).argmax(1)])).double().eval()
    x, r = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    made_by_argmax = r"`argmax` in .*<lambda>.*differs between an input and its reference.*through `__getitem__`"
    with pytest.warns(UnsupportedOpWarning, match=made_by_argmax), torch_handler.deeplift_mode(model):
        DeepLift(model).attribute(x, baselines=r, target=0)


class PaddedAttention(nn.Module):
    """The input used directly (a tanh skip path and a padding mask computed from it) around a GRU
    and nn.MultiheadAttention with key_padding_mask."""

    def __init__(self, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.skip = nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        padding = x.abs().sum(-1) == 0  # only feeds a mask: no rule needed, nothing reported
        h, _ = self.rnn(x)
        a, _ = self.mha(h, h, h, key_padding_mask=padding, need_weights=self.need_weights)
        return self.out(torch.tanh(a).mean(1) * torch.sigmoid(self.skip(torch.tanh(x)).mean(1)))


@pytest.mark.parametrize("need_weights", [True, False])
def test_the_input_itself_and_masks_computed_from_it(need_weights):
    torch.manual_seed(10)
    model = PaddedAttention(need_weights).double().eval()
    x, r = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)
    x[:, -1], r[:, -1] = 0, 0  # the same padding for each input and its reference
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        _, error = captum_error(model, x, r)  # Captum builds cat([x, r]) in a forward pre-hook
        torch_handler.register()
        try:
            values = shap.DeepExplainer(model, r).shap_values(x)  # shap passes the doubled batch
        finally:
            torch_handler.unregister()
    assert error <= 1e-10 and values.shape == (3, 5, 3, 2)


class BiLSTMTransformer(nn.Module):
    """A bidirectional LSTM under two nn.TransformerEncoderLayer (attention, layer norms, GELU)."""

    def __init__(self, batch_first: bool, norm_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = nn.LSTM(3, 8, batch_first=True, bidirectional=True)
        layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h, _ = self.rnn(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        e = self.encoder(h)
        if not self.batch_first:
            e = e.transpose(0, 1)
        return self.out(e[:, 0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_on_a_bidirectional_lstm(batch_first, norm_first, dtype):
    torch.manual_seed(11)
    model = BiLSTMTransformer(batch_first, norm_first).to(dtype).eval()
    x, r = torch.randn(4, 4, 3, dtype=dtype), torch.randn(4, 4, 3, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        _, error = captum_error(model, x, r)
    assert error <= BAR[dtype]


def test_an_operand_written_in_place_after_its_op_raises():
    def head(h):
        g = h * 1.0
        y = torch.tanh(g)
        g.add_(1.0)  # the tanh rule would read the shifted values
        return y.mean(1) + g.mean(1)

    model = Cumprod(head).double().eval()
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an in-place operation"), torch_handler.deeplift_mode(model):
        DeepLift(model).attribute(x, baselines=r, target=0)


def test_followed_batch_places_always_pair_the_right_rows():
    """Random chains of reshapes (merges and splits of adjacent dims) and permutes of a tensor
    whose elements hold their batch row: wherever the bookkeeping says the batch is, the pairs
    it cuts are rows (j, j + N); where it cannot say, it says so."""
    rng = np.random.default_rng(0)
    followed = lost = 0
    for _ in range(300):
        ndim = int(rng.integers(2, 5))
        shape = [int(rng.integers(1, 4)) for _ in range(ndim)]
        size = 2 * int(rng.integers(1, 4))
        d = int(rng.integers(0, ndim))
        shape[d] = size
        view = [1] * ndim
        view[d] = size
        t = torch.arange(size).view(view).expand(shape).clone()
        axis = Axis(d, size)
        for _ in range(4):
            if rng.random() < 0.5:
                order = list(rng.permutation(t.dim()))
                axis, t = ba.after_permute(axis, order), t.permute(order)
            else:
                new_shape = _random_regrouping(rng, tuple(t.shape))
                axis, t = ba.after_reshape(tuple(t.shape), axis, new_shape), t.reshape(new_shape)
            if axis is None:
                break
        if axis is None:
            lost += 1
            continue
        followed += 1
        pairs = to_pairs(t, axis)
        n = size // 2
        for j in range(n):
            assert torch.all(pairs[0, j] == j) and torch.all(pairs[1, j] == j + n)
    assert followed > 100 and lost > 10  # both outcomes exercised


def _random_regrouping(rng, shape):
    """Merge two adjacent dims or split one dim into two factors (row-major reshapes)."""
    shape = list(shape)
    k = int(rng.integers(0, len(shape)))
    if rng.random() < 0.5 and k + 1 < len(shape):
        return tuple(shape[:k] + [shape[k] * shape[k + 1]] + shape[k + 2 :])
    n = shape[k]
    factors = [f for f in range(1, n + 1) if n % f == 0]
    f = int(rng.choice(factors))
    return tuple(shape[:k] + [f, n // f] + shape[k + 1 :])


def test_strict_carries_into_the_shap_wrapper_inside_a_strict_context():
    model = Cumprod(lambda h: torch.cumprod(torch.sigmoid(h), dim=1)[:, -1]).double().eval()
    x, background = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    torch_handler.register()
    try:
        explainer = shap.DeepExplainer(model, background)
        with pytest.raises(UnsupportedOpError, match="`cumprod`"), torch_handler.deeplift_mode(model, strict=True):
            assert torch_handler.current_explanation().options["strict"] is True
            explainer.shap_values(x)
    finally:
        torch_handler.unregister()


def test_an_input_passed_by_keyword_is_followed_from_dim_0():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.out = nn.Linear(4, 2)

        def forward(self, *, x):
            h, _ = self.rnn(torch.tanh(x) * torch.sigmoid(x))
            return self.out(h[:, -1])

    torch.manual_seed(12)
    model = Keyword().double().eval()
    x, r = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    doubled = torch.cat([x, r]).requires_grad_()
    with torch_handler.deeplift_mode(model):
        y = model(x=doubled)[:, 0]
        (grad,) = torch.autograd.grad(y.sum(), doubled)
    attributions = (grad[:2] * (x - r)).sum((1, 2))
    with torch.no_grad():
        delta = model(x=x)[:, 0] - model(x=r)[:, 0]
    assert (attributions - delta).abs().max() <= 1e-10 * max(model(x=x).abs().max(), model(x=r).abs().max())
