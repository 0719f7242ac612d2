"""Models written the way practitioners write them, explained as a new user would.

Each model is explained through every engine that applies: ``shap.DeepExplainer`` after
``torch_handler.register()`` (additivity check on, its default), Captum ``DeepLift`` and
``DeepLiftShap`` inside ``torch_handler.deeplift_mode(model)``, and tangermeme's
``deep_lift_shap`` where the inputs are one-hot. Every test asserts

* additivity: Σ attributions == f(x) − E f(references), to the project's tolerance relative to
  the output scale (helpers.TOLERANCE: float64 1e-10, float32 1e-5);
* agreement: the engines give the same numbers element-wise on the same (input, reference)
  pairs (shap with one background row vs Captum ``DeepLift`` with that row as baseline; shap
  with a background of S rows vs Captum ``DeepLiftShap`` with the same S baselines; tangermeme
  vs Captum ``DeepLiftShap`` on the same shuffled references);
* the model is left exactly as found (state_dict, hooks, forward results), after success and
  after an exception;
* where exactness is impossible (a mask that differs between an input and its reference), the
  named warning / error.

Models: a time-series forecaster (LSTM + static MLP, concat, residual, LayerNorm, GELU, three
quantile outputs, batches from a DataLoader); an NLP classifier (Embedding(padding_idx=0),
BiLSTM, masked mean over ``ids != 0``); a GRU with additive attention and a ``-inf``-filled
mask from the input; a genomics Conv1d/MaxPool/BiLSTM model; an LSTM whose initial state is
computed from static features; a hand-written stacked LSTMCell loop with dropout; a
pack_padded_sequence model with lengths read from the input; an LSTM followed by an
nn.TransformerEncoderLayer; a many-to-many GRU regressor with per-step outputs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap, LayerDeepLift
from helpers import TOLERANCE, additivity_error, explain, model_state
from tangermeme.deep_lift_shap import deep_lift_shap
from tangermeme.utils import random_one_hot
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, TensorDataset

import torch_handler
from torch_handler import UnsupportedOpError, UnsupportedOpWarning, padded_references

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor [0-9]+ did not already require:UserWarning"),
    # an exact explanation must not warn: an UnsupportedOpWarning here is a failure
    pytest.mark.filterwarnings("error::torch_handler.UnsupportedOpWarning"),
]

DTYPES = [torch.float64, torch.float32]


# --- the harness --------------------------------------------------------------------------------


def as_tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def snapshot(model, probe):
    """What an explanation must leave unchanged: parameters and buffers (bit for bit), hooks and
    instance attributes of every submodule, and the forward result on ``probe``."""
    with torch.no_grad():
        out = model(*as_tuple(probe)).clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, model_state(model), out


def assert_unchanged(model, probe, before, tangermeme_ran=False):
    """tangermeme_ran: tangermeme itself (without the library too) leaves torch's
    ``_is_full_backward_hook`` flag set on the modules it hooked (its MaxPool1d here), after
    removing the hooks; that residue is tangermeme's, so the flag is not compared then."""
    state, hooks, out = before
    now_state, now_hooks, now_out = snapshot(model, probe)
    assert now_state.keys() == state.keys()
    for k in state:
        assert torch.equal(now_state[k], state[k]), k
    if tangermeme_ran:
        hooks = {k: v._replace(full_backward_hook=None) for k, v in hooks.items()}
        now_hooks = {k: v._replace(full_backward_hook=None) for k, v in now_hooks.items()}
    assert now_hooks == hooks
    assert torch.equal(now_out, out)


def output_scale(model, *batches):
    with torch.no_grad():
        return max(float(model(*as_tuple(b)).abs().max()) for b in batches)


def captum_deeplift(model, X, baselines, target):
    """Captum DeepLift inside deeplift_mode; X / baselines single tensors or tuples."""
    with torch_handler.deeplift_mode(model):
        return DeepLift(model).attribute(X, baselines=baselines, target=target)


def captum_deepliftshap(model, X, baselines, target):
    with torch_handler.deeplift_mode(model):
        return DeepLiftShap(model).attribute(X, baselines=baselines, target=target)


def captum_sums(attr):
    return sum(a.detach().reshape(a.shape[0], -1).sum(1) for a in as_tuple(attr))


MEASURED: dict[str, tuple[float, float]] = {}


def record(name, additivity, disagreement):
    """Keep the worst figures per model; printed at the end with ``pytest -s``."""
    old = MEASURED.get(name, (0.0, 0.0))
    MEASURED[name] = (max(old[0], additivity), max(old[1], disagreement))


@pytest.fixture(scope="module", autouse=True)
def print_measured():
    yield
    for name, (add, dis) in sorted(MEASURED.items()):
        print(f"\n{name:45s} max additivity error {add:.2e}  max engine disagreement {dis:.2e}", end="")


def relative(a, b, scale):
    """max |a − b| / scale over tensors / arrays (or tuples of them)."""
    worst = 0.0
    for x, y in zip(as_tuple(a), as_tuple(b), strict=True):
        x = torch.as_tensor(np.asarray(x.detach() if torch.is_tensor(x) else x), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(y.detach() if torch.is_tensor(y) else y), dtype=torch.float64)
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def check_all_engines(model, X, background, outputs, dtype):
    """shap (background of S rows and of one row) against Captum DeepLiftShap and DeepLift,
    element-wise, plus additivity of each; returns (max additivity error, max disagreement)."""
    tol = TOLERANCE[dtype]
    X, background = as_tuple(X), as_tuple(background)
    scale = output_scale(model, X, background)
    before = snapshot(model, X)

    values = explain(model, list(background) if len(X) > 1 else background[0], list(X) if len(X) > 1 else X[0])
    additivity = additivity_error(model, list(background), list(X), values)
    assert additivity <= tol
    values = as_tuple(values)

    one = tuple(b[:1] for b in background)
    values_one = as_tuple(explain(model, list(one) if len(X) > 1 else one[0], list(X) if len(X) > 1 else X[0]))
    additivity = max(additivity, additivity_error(model, list(one), list(X), values_one))
    assert additivity <= tol

    disagreement = 0.0
    for t in range(outputs):
        dls = captum_deepliftshap(model, X if len(X) > 1 else X[0], background if len(X) > 1 else background[0], t)
        disagreement = max(disagreement, relative(dls, tuple(v[..., t] for v in values), scale))
        expanded = tuple(b.expand(len(X[0]), *b.shape[1:]) for b in one)
        dl = captum_deeplift(model, X if len(X) > 1 else X[0], expanded if len(X) > 1 else expanded[0], t)
        disagreement = max(disagreement, relative(dl, tuple(v[..., t] for v in values_one), scale))
        with torch.no_grad():
            delta = model(*X)[:, t] - model(*expanded)[:, t]
        additivity = max(additivity, float((captum_sums(dl) - delta).abs().max()) / scale)
    assert additivity <= tol
    assert disagreement <= tol
    assert_unchanged(model, X, before)
    return additivity, disagreement


# --- (1) a time-series forecaster ----------------------------------------------------------------


class Forecaster(nn.Module):
    """history (N, T, F) -> LSTM(batch_first) -> last step; covariates (N, C) -> MLP; concat,
    a residual block (Linear + skip), LayerNorm, GELU head with three quantile outputs."""

    def __init__(self, features=3, covariates=4, hidden=8, quantiles=3):
        super().__init__()
        self.encoder = nn.LSTM(features, hidden, num_layers=2, batch_first=True, dropout=0.1)
        self.static = nn.Sequential(nn.Linear(covariates, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.mix = nn.Linear(2 * hidden, 2 * hidden)
        self.norm = nn.LayerNorm(2 * hidden)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, quantiles))

    def forward(self, history, covariates):
        out, _ = self.encoder(history)
        joined = torch.cat([out[:, -1], self.static(covariates)], dim=-1)
        joined = self.norm(joined + self.mix(joined))  # residual connection
        return self.head(joined)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forecaster_through_shap_and_captum_with_a_dataloader(dtype):
    torch.manual_seed(0)
    model = Forecaster().to(dtype).eval()
    history, covariates = torch.randn(8, 6, 3, dtype=dtype), torch.randn(8, 4, dtype=dtype)
    loader = DataLoader(TensorDataset(history, covariates), batch_size=4, shuffle=False)
    background = (torch.randn(3, 6, 3, dtype=dtype), torch.randn(3, 4, dtype=dtype))
    for batch in loader:  # the usual way: explain batch after batch
        record(f"forecaster {dtype}", *check_all_engines(model, tuple(batch), background, outputs=3, dtype=dtype))


# --- (2) an NLP classifier on token ids -----------------------------------------------------------


class TextClassifier(nn.Module):
    """ids (N, L) -> Embedding(padding_idx=0) -> BiLSTM -> masked mean over ids != 0 -> Linear."""

    def __init__(self, vocab=20, dim=6, hidden=5, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, classes)

    def forward(self, ids):
        mask = (ids != 0).unsqueeze(-1).float()
        out, _ = self.lstm(self.embedding(ids))
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.classifier(pooled)


def token_batch(lengths=(5, 8, 3, 6), steps=8, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), steps), generator=g)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    return ids, torch.tensor(lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_text_classifier_from_embeddings_through_shap_equals_layer_deeplift(dtype):
    torch.manual_seed(0)
    model = TextClassifier().to(dtype).eval()
    ids, lengths = token_batch()
    refs = padded_references(ids, lengths, n=3, generator=torch.Generator().manual_seed(1))  # (N, 3, L)
    explained = torch_handler.from_embeddings(model, model.embedding)
    tol, scale = TOLERANCE[dtype], output_scale(model, ids, refs.flatten(0, 1))
    before = snapshot(model, ids)
    worst_add = worst_dis = 0.0
    for i in range(len(ids)):
        with torch.no_grad():
            background, embedded = model.embedding(refs[i]), model.embedding(ids[i : i + 1])
        values = explain(explained, background, embedded)  # (1, L, E, classes)
        with torch.no_grad():
            delta = model(ids[i : i + 1])[0] - model(refs[i]).mean(0)
        worst_add = max(worst_add, float(np.abs(values.sum(axis=(0, 1, 2)) - delta.double().numpy()).max()) / scale)
        # one reference: shap on the embeddings vs Captum LayerDeepLift on the embedding layer
        with torch.no_grad():
            one = model.embedding(refs[i, :1])
        values_one = explain(explained, one, embedded)
        for t in range(3):
            with torch_handler.deeplift_mode(model):
                layer = LayerDeepLift(model, model.embedding).attribute(ids[i : i + 1], baselines=refs[i, :1], target=t)
            worst_dis = max(worst_dis, relative(layer, values_one[..., t], scale))
    record(f"text classifier (from_embeddings) {dtype}", worst_add, worst_dis)
    assert worst_add <= tol
    assert worst_dis <= tol
    assert_unchanged(model, ids, before)


def test_text_classifier_with_all_padding_references_is_named():
    """The all-padding reference has another mask than its input: no rule can attribute the
    difference the mask makes, and from_embeddings says so (strict: raises), model untouched."""
    torch.manual_seed(0)
    model = TextClassifier().double().eval()
    ids, _ = token_batch()
    explained = torch_handler.from_embeddings(model, model.embedding)
    before = snapshot(model, ids)
    with torch.no_grad():
        background, embedded = model.embedding(torch.zeros(1, 8, dtype=torch.long)), model.embedding(ids)
    with pytest.raises(UnsupportedOpError, match="padded like"):
        with torch_handler.deeplift_mode(explained, strict=True):
            DeepLift(explained).attribute(embedded, baselines=background.expand_as(embedded), target=0)
    assert_unchanged(model, ids, before)
    with pytest.warns(UnsupportedOpWarning, match="padded like"), pytest.raises(torch_handler.AdditivityError):
        explain(explained, background, embedded)
    assert_unchanged(model, ids, before)


# --- (3) a GRU with additive attention over a padding mask read from the input ---------------------


class AttentionGRU(nn.Module):
    """x (N, T, F), zero rows = padding -> GRU -> additive attention (v·tanh(W h)) with
    ``masked_fill(~mask, -inf)`` + softmax, mask = (x != 0).any(-1) -> Linear."""

    def __init__(self, features=3, hidden=6, classes=2):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        mask = (x != 0).any(-1)  # (N, T)
        h, _ = self.gru(x)
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return self.out((weights.unsqueeze(-1) * h).sum(1))


def padded_series(dtype, lengths=(4, 7, 2, 5), steps=7, features=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), steps, features, generator=g, dtype=dtype)
    for i, n in enumerate(lengths):
        x[i, n:] = 0
    return x, torch.tensor(lengths)


def per_input_engines(model, x, refs, outputs, dtype):
    """Per input i: shap with background refs[i] vs Captum DeepLiftShap(refs[i]), and shap with
    refs[i, :1] vs Captum DeepLift(refs[:, 0]) on the whole batch; returns the worst figures."""
    scale = output_scale(model, x, refs.flatten(0, 1))
    worst_add = worst_dis = 0.0
    firsts = refs[:, 0]
    dl = [captum_deeplift(model, x, firsts, t) for t in range(outputs)]
    for i in range(len(x)):
        values = explain(model, refs[i], x[i : i + 1])
        worst_add = max(worst_add, additivity_error(model, refs[i], x[i : i + 1], values))
        values_one = explain(model, refs[i, :1], x[i : i + 1])
        worst_add = max(worst_add, additivity_error(model, refs[i, :1], x[i : i + 1], values_one))
        for t in range(outputs):
            dls = captum_deepliftshap(model, x[i : i + 1], refs[i], t)
            worst_dis = max(worst_dis, relative(dls, values[..., t], scale),
                            relative(dl[t][i : i + 1], values_one[..., t], scale))
    with torch.no_grad():
        fx, fr = model(x), model(firsts)
    for t in range(outputs):
        worst_add = max(worst_add, float((captum_sums(dl[t]) - (fx[:, t] - fr[:, t])).abs().max()) / scale)
    return worst_add, worst_dis


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_gru_with_references_padded_like_the_input_is_exact(dtype):
    torch.manual_seed(0)
    model = AttentionGRU().to(dtype).eval()
    x, lengths = padded_series(dtype)
    refs = padded_references(x, lengths, n=3, generator=torch.Generator().manual_seed(2))
    before = snapshot(model, x)
    add, dis = per_input_engines(model, x, refs, outputs=2, dtype=dtype)
    record(f"attention GRU, -inf mask {dtype}", add, dis)
    assert add <= TOLERANCE[dtype]
    assert dis <= TOLERANCE[dtype]
    assert_unchanged(model, x, before)


def test_attention_gru_with_full_length_references_is_named_in_every_engine():
    """Full-length references: the mask differs within each pair. Captum warns naming the op
    that made the mask (``ne`` / ``any`` in AttentionGRU.forward), raises under strict; shap
    warns and then raises AdditivityError; the model is left as found after each exception."""
    torch.manual_seed(0)
    model = AttentionGRU().double().eval()
    x, _ = padded_series(torch.float64)
    background = torch.randn(2, 7, 3, dtype=torch.float64)
    before = snapshot(model, x)
    with pytest.warns(UnsupportedOpWarning, match=r"AttentionGRU\.forward"):
        captum_deeplift(model, x, background[:1].expand_as(x), 0)
    with pytest.raises(UnsupportedOpError, match=r"AttentionGRU\.forward"):
        with torch_handler.deeplift_mode(model, strict=True):
            DeepLiftShap(model).attribute(x, baselines=background, target=0)
    assert_unchanged(model, x, before)
    with pytest.warns(UnsupportedOpWarning), pytest.raises(torch_handler.AdditivityError,
                                                          match=r"AttentionGRU\.forward"):
        explain(model, background, x)
    assert_unchanged(model, x, before)


# --- (4) a genomics model on one-hot DNA ----------------------------------------------------------


class ConvPoolBiLSTM(nn.Module):
    """one-hot (N, 4, L) -> Conv1d -> ReLU -> MaxPool1d -> BiLSTM -> last step -> Linear."""

    def __init__(self, filters=6, hidden=5, targets=2):
        super().__init__()
        self.conv = nn.Conv1d(4, filters, kernel_size=5, padding=2)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool1d(2)
        self.lstm = nn.LSTM(filters, hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(2 * hidden, targets)

    def forward(self, x):
        h = self.pool(self.relu(self.conv(x)))
        out, _ = self.lstm(h.transpose(1, 2))
        return self.linear(out[:, -1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_genomics_model_through_tangermeme_captum_and_shap(dtype):
    torch.manual_seed(0)
    model = ConvPoolBiLSTM().to(dtype).eval()
    X = random_one_hot((3, 4, 20), random_state=0).to(dtype)
    before = snapshot(model, X)
    tol = TOLERANCE[dtype]
    worst_add = worst_dis = 0.0
    for t in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tangermeme's convergence warning would fail the test
            with torch_handler.deeplift_mode(model):
                result = deep_lift_shap(model, X, target=t, n_shuffles=3, random_state=0,
                                        return_references=True, device="cpu")
        attr, refs = result.attributions, result.references.to(dtype)  # the default dinucleotide shuffles
        scale = output_scale(model, X, refs.flatten(0, 1))
        with torch.no_grad():
            delta = model(X)[:, t] - model(refs.flatten(0, 1)).reshape(3, 3, -1)[..., t].mean(1)
        worst_add = max(worst_add, float((captum_sums(attr) - delta).abs().max()) / scale)
        for i in range(len(X)):  # Captum on the same references; tangermeme projects per position
            dls = captum_deepliftshap(model, X[i : i + 1], refs[i], t)
            worst_dis = max(worst_dis, relative(dls.sum(1), attr[i : i + 1].sum(1), scale))
            if t == 0:  # shap with the same references as its background
                values = explain(model, refs[i], X[i : i + 1])
                worst_add = max(worst_add, additivity_error(model, refs[i], X[i : i + 1], values))
                for u in range(2):
                    dls_u = dls if u == 0 else captum_deepliftshap(model, X[i : i + 1], refs[i], u)
                    worst_dis = max(worst_dis, relative(dls_u, values[..., u], scale))
    record(f"genomics conv/pool/BiLSTM {dtype}", worst_add, worst_dis)
    assert worst_add <= tol
    assert worst_dis <= tol
    assert_unchanged(model, X, before, tangermeme_ran=True)


# --- (5) an initial state computed from a second input --------------------------------------------


class StaticInitLSTM(nn.Module):
    """covariates (N, C) -> h0 = tanh(Linear), c0 = zeros; series (N, T, F) -> LSTM(h0, c0) ->
    h_n -> Linear."""

    def __init__(self, features=3, covariates=4, hidden=6, outputs=2):
        super().__init__()
        self.init = nn.Linear(covariates, hidden)
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, series, covariates):
        h0 = torch.tanh(self.init(covariates)).unsqueeze(0)
        _, (h_n, _) = self.lstm(series, (h0, torch.zeros_like(h0)))
        return self.out(h_n[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_initial_state_from_static_features(dtype):
    torch.manual_seed(0)
    model = StaticInitLSTM().to(dtype).eval()
    X = (torch.randn(4, 5, 3, dtype=dtype), torch.randn(4, 4, dtype=dtype))
    background = (torch.randn(3, 5, 3, dtype=dtype), torch.randn(3, 4, dtype=dtype))
    record(f"initial state from static {dtype}", *check_all_engines(model, X, background, outputs=2, dtype=dtype))


# --- (6) a stacked LSTMCell loop written by hand --------------------------------------------------


class StackedCells(nn.Module):
    """Two nn.LSTMCell layers unrolled by hand over (N, T, F), dropout between them (inactive in
    eval), a Linear on the last hidden state of the top layer."""

    def __init__(self, features=3, hidden=5, outputs=2):
        super().__init__()
        self.cells = nn.ModuleList([nn.LSTMCell(features, hidden), nn.LSTMCell(hidden, hidden)])
        self.dropout = nn.Dropout(0.3)
        self.out = nn.Linear(hidden, outputs)
        self.hidden = hidden

    def forward(self, x):
        n = x.shape[0]
        states = [(x.new_zeros(n, self.hidden), x.new_zeros(n, self.hidden)) for _ in self.cells]
        for t in range(x.shape[1]):
            inp = x[:, t]
            for k, cell in enumerate(self.cells):
                states[k] = cell(inp, states[k])
                inp = self.dropout(states[k][0])
        return self.out(states[-1][0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hand_written_stacked_lstm_cells(dtype):
    torch.manual_seed(0)
    model = StackedCells().to(dtype).eval()
    X, background = torch.randn(4, 5, 3, dtype=dtype), torch.randn(3, 5, 3, dtype=dtype)
    record(f"stacked LSTMCell loop {dtype}", *check_all_engines(model, X, background, outputs=2, dtype=dtype))


# --- (7) pack_padded_sequence with lengths read from the input ------------------------------------


class PackedLSTM(nn.Module):
    """x (N, T, F) zero-padded; lengths = (x != 0).any(-1).sum(1); packed LSTM; h_n -> Linear."""

    def __init__(self, features=3, hidden=6, outputs=2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x):
        lengths = (x != 0).any(-1).sum(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.out(h_n[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_lstm_with_lengths_from_the_input(dtype):
    torch.manual_seed(0)
    model = PackedLSTM().to(dtype).eval()
    x, lengths = padded_series(dtype)
    refs = padded_references(x, lengths, n=2, generator=torch.Generator().manual_seed(3))
    before = snapshot(model, x)
    add, dis = per_input_engines(model, x, refs, outputs=2, dtype=dtype)
    record(f"packed LSTM, lengths from input {dtype}", add, dis)
    assert add <= TOLERANCE[dtype]
    assert dis <= TOLERANCE[dtype]
    assert_unchanged(model, x, before)


def test_packed_lstm_with_full_length_references_is_refused_and_leaves_the_model():
    torch.manual_seed(0)
    model = PackedLSTM().double().eval()
    x, _ = padded_series(torch.float64)
    before = snapshot(model, x)
    with pytest.raises(torch_handler.UnsupportedConfigurationError, match="different lengths"):
        captum_deeplift(model, x, torch.randn(1, 7, 3, dtype=torch.float64).expand_as(x), 0)
    assert_unchanged(model, x, before)


# --- (8) an LSTM followed by a TransformerEncoderLayer --------------------------------------------


class LSTMTransformer(nn.Module):
    """x (N, T, F) -> LSTM -> TransformerEncoderLayer (MultiheadAttention, FFN, LayerNorm) ->
    mean over time -> Linear."""

    def __init__(self, features=3, hidden=8, outputs=2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(hidden, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.out(self.encoder(h).mean(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lstm_then_transformer_encoder_layer(dtype):
    torch.manual_seed(0)
    model = LSTMTransformer().to(dtype).eval()
    X, background = torch.randn(4, 5, 3, dtype=dtype), torch.randn(3, 5, 3, dtype=dtype)
    record(f"LSTM + TransformerEncoderLayer {dtype}", *check_all_engines(model, X, background, outputs=2, dtype=dtype))


# --- (9) a many-to-many regressor: one output per step ---------------------------------------------


class PerStepRegressor(nn.Module):
    """x (N, T, F) -> GRU(2 layers) -> per-step Linear -> (N, T) regression targets, the
    multi-horizon forecaster's shape; Softplus keeps them positive."""

    def __init__(self, features=3, hidden=5):
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, 1), nn.Softplus())

    def forward(self, x):
        return self.head(self.gru(x)[0]).squeeze(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_step_regression_targets(dtype):
    torch.manual_seed(0)
    model = PerStepRegressor().to(dtype).eval()
    X, background = torch.randn(3, 4, 3, dtype=dtype), torch.randn(2, 4, 3, dtype=dtype)
    record(f"per-step GRU regressor {dtype}", *check_all_engines(model, X, background, outputs=4, dtype=dtype))


class PadPackedMean(nn.Module):
    """x (N, T, F) zero-padded -> lengths from the input -> packed BiLSTM -> pad_packed_sequence
    -> mean over the valid steps (with the lengths pad_packed_sequence returns) -> Linear.

    pad_packed_sequence puts the rows back in the original order with ``index_select`` by the
    packed sequence's ``unsorted_indices`` (computed from the input's lengths): a row order, not
    a mask. It used to raise a spurious UnsupportedOpWarning ("`ne` ... reaches the output
    through `index_select`") on this exact explanation."""

    def __init__(self, features=3, hidden=4, outputs=2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, outputs)

    def forward(self, x):
        lengths = (x != 0).any(-1).sum(1).cpu()
        out, _ = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        out, lens = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.out(out.sum(1) / lens.unsqueeze(1).to(out.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pad_packed_sequence_mean_is_exact_without_a_warning(dtype):
    torch.manual_seed(0)
    model = PadPackedMean().to(dtype).eval()
    x, lengths = padded_series(dtype)
    refs = padded_references(x, lengths, n=2, generator=torch.Generator().manual_seed(4))
    before = snapshot(model, x)
    add, dis = per_input_engines(model, x, refs, outputs=2, dtype=dtype)
    record(f"pad_packed_sequence mean {dtype}", add, dis)
    assert add <= TOLERANCE[dtype]
    assert dis <= TOLERANCE[dtype]
    assert_unchanged(model, x, before)



# --- (10) a seq2seq decoder: GRUCell steps with dot attention over a GRU encoder --------------------


class AttentionDecoder(nn.Module):
    """x (N, T, F) -> GRU encoder; a GRUCell decoder runs 3 steps, each attending (dot product,
    softmax over time) to the encoder outputs with its state; one forecast per step (N, 3)."""

    def __init__(self, features=3, hidden=6, horizon=3):
        super().__init__()
        self.encoder = nn.GRU(features, hidden, batch_first=True)
        self.cell = nn.GRUCell(hidden, hidden)
        self.out = nn.Linear(2 * hidden, 1)
        self.horizon = horizon

    def forward(self, x):
        encoded, h = self.encoder(x)
        h, forecasts = h[0], []
        for _ in range(self.horizon):
            weights = torch.softmax(torch.einsum("bth,bh->bt", encoded, h), dim=-1)
            context = torch.einsum("bt,bth->bh", weights, encoded)
            h = self.cell(context, h)
            forecasts.append(self.out(torch.cat([h, context], dim=-1)))
        return torch.cat(forecasts, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seq2seq_attention_decoder(dtype):
    torch.manual_seed(0)
    model = AttentionDecoder().to(dtype).eval()
    X, background = torch.randn(3, 5, 3, dtype=dtype), torch.randn(2, 5, 3, dtype=dtype)
    figures = check_all_engines(model, X, background, outputs=3, dtype=dtype)
    record(f"seq2seq GRUCell attention decoder {dtype}", *figures)


def test_text_classifier_layer_deeplift_with_an_all_padding_baseline_is_named():
    """The Captum route with the all-padding baseline: the mask differs within each pair; the
    warning names `ne` in TextClassifier.forward, strict raises, the model is left as found."""
    torch.manual_seed(0)
    model = TextClassifier().double().eval()
    ids, _ = token_batch()
    before = snapshot(model, ids)
    with pytest.warns(UnsupportedOpWarning, match=r"`ne` in TextClassifier\.forward"):
        with torch_handler.deeplift_mode(model):
            LayerDeepLift(model, model.embedding).attribute(ids, baselines=torch.zeros_like(ids), target=0)
    with pytest.raises(UnsupportedOpError, match=r"`ne` in TextClassifier\.forward"):
        with torch_handler.deeplift_mode(model, strict=True):
            LayerDeepLift(model, model.embedding).attribute(ids, baselines=torch.zeros_like(ids), target=0)
    assert_unchanged(model, ids, before)


def test_an_exception_inside_an_explanation_leaves_the_model_as_found():
    """A baseline with the wrong number of features fails inside the LSTM, midway through each
    engine's forward (its hooks registered): the model is left exactly as found."""
    torch.manual_seed(0)
    model = Forecaster().double().eval()
    X = (torch.randn(3, 6, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    wrong = (torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    before = snapshot(model, X)
    with pytest.raises(RuntimeError, match="input_size"):
        captum_deepliftshap(model, wrong, wrong, 0)
    assert_unchanged(model, X, before)
    with pytest.raises(RuntimeError, match="input_size"):
        explain(model, list(wrong), list(X))
    assert_unchanged(model, X, before)


# --- known bugs, held by strict xfails (each fails loudly once fixed) ------------------------------


class RevINForecaster(nn.Module):
    """Reversible instance normalisation around an LSTM, as in the RevIN reference code: the
    per-series statistics are computed from the input and ``detach()``-ed, the output is
    de-normalised with them."""

    def __init__(self, features=3, hidden=5):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, features)

    def forward(self, x):
        mean = torch.mean(x, dim=1, keepdim=True).detach()
        std = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + 1e-5).detach()
        y = self.out(self.lstm((x - mean) / std)[0][:, -1])
        return y * std[:, 0] + mean[:, 0]


def test_revin_detached_statistics_are_named_under_strict():
    """detach() of input-dependent statistics used to be invisible to deeplift_mode: Captum
    missed ~100 % of the output scale with no warning, even under strict=True."""
    torch.manual_seed(0)
    model = RevINForecaster().double().eval()
    X, baseline = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(1, 6, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedOpError, match="detach"):
        with torch_handler.deeplift_mode(model, strict=True):
            DeepLift(model).attribute(X, baselines=baseline.expand_as(X), target=0)


class SortedPackedLSTM(nn.Module):
    """The older idiom: the batch is sorted by decreasing length and packed with
    ``enforce_sorted=True`` (the default)."""

    def __init__(self, features=3, hidden=5, outputs=2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x):
        lengths = (x != 0).any(-1).sum(1).cpu()
        _, (h_n, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True))
        return self.out(h_n[-1])


def test_sorted_batch_packed_with_enforce_sorted_is_exact_or_named():
    """pack_padded_sequence(enforce_sorted=True) used to fail inside deeplift_mode with torch's
    RuntimeError '`lengths` array must be sorted' (the doubled batch cat([x, refs]) is not)."""
    torch.manual_seed(0)
    model = SortedPackedLSTM().double().eval()
    x, lengths = padded_series(torch.float64, lengths=(7, 5, 4, 2))  # sorted, as the idiom requires
    refs = padded_references(x, lengths, n=1, generator=torch.Generator().manual_seed(5))[:, 0]
    try:
        attr = captum_deeplift(model, x, refs, 0)
    except torch_handler.UnsupportedConfigurationError as error:
        assert "enforce_sorted" in str(error)
        return
    with torch.no_grad():
        delta = model(x)[:, 0] - model(refs)[:, 0]
    assert float((captum_sums(attr) - delta).abs().max()) / output_scale(model, x, refs) <= TOLERANCE[torch.float64]



class TimeMajorGRU(nn.Module):
    """A model that takes time-major input (T, N, F) into nn.GRU(batch_first=False): the
    engines double dim 0 (time), not the batch."""

    def __init__(self, features=3, hidden=5, outputs=2):
        super().__init__()
        self.gru = nn.GRU(features, hidden)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.out(self.gru(x)[1][-1])


def test_a_time_major_model_input_is_refused_by_name():
    """Captum doubles dim 0 (time): with an even N the GRU rule used to pair batch rows j and
    j + N/2 without an error (odd N: a DoubledBatchError blaming an odd batch). Now the GRU's
    input is refused by name, with even and odd N, in Captum and shap; the model is left as found."""
    torch.manual_seed(0)
    model = TimeMajorGRU().double().eval()
    for n in (4, 3):
        x, baseline = torch.randn(6, n, 3, dtype=torch.float64), torch.randn(6, n, 3, dtype=torch.float64)
        before = snapshot(model, x)
        with pytest.raises(torch_handler.DoubledBatchError, match=r"GRU \(batch_first=False.*time-major"):
            captum_deeplift(model, x, baseline, 0)
        with pytest.raises(torch_handler.DoubledBatchError, match=r"GRU \(batch_first=False.*time-major"):
            explain(model, baseline, x)
        assert_unchanged(model, x, before)


# --- torch.compile'd models -------------------------------------------------------------------------


def test_a_compiled_model_is_refused_by_name_and_its_original_is_exact():
    """``torch.compile(model)`` used to fail inside TorchDynamo's tracer with an AssertionError
    ("... is already tracked for mutation") in every engine. Now: UnsupportedConfigurationError
    naming torch.compile and ``_orig_mod``, before anything runs; the original module (which
    shares the weights) is explained exactly, and the compiled one still runs natively."""
    torch.manual_seed(0)
    model = StaticInitLSTM().double().eval()
    compiled = torch.compile(model, backend="eager")
    X = (torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    background = (torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    before = snapshot(model, X)
    with pytest.raises(torch_handler.UnsupportedConfigurationError, match=r"torch\.compile.*_orig_mod"):
        captum_deeplift(compiled, X, tuple(b[:1].expand(3, *b.shape[1:]) for b in background), 0)
    with pytest.raises(torch_handler.UnsupportedConfigurationError, match=r"torch\.compile.*_orig_mod"):
        explain(compiled, list(background), list(X))
    assert_unchanged(model, X, before)
    figures = check_all_engines(compiled._orig_mod, X, background, 2, torch.float64)
    record("initial state from static, via _orig_mod", *figures)
