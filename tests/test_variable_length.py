"""Variable-length sequences: references padded like their input (torch_handler.padded_references).

The helper's contract (shapes, padding where the input has it, the valid steps a shuffle of
the input or a background sequence cut to the input's length, reproducible draws), and
exactness through Captum's DeepLiftShap and shap for packed sequences and for padding masks:
with every reference padded like its input, the lengths / mask are equal in both halves of
every pair, and the attributions sum to f(x) − mean f(references).
"""

from __future__ import annotations

import numpy as np
import pytest
import shap
import torch
from captum.attr import DeepLiftShap
from helpers import TOLERANCE
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import torch_handler
from torch_handler import UnsupportedConfigurationError, padded_references

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LENGTHS = torch.tensor([3, 7, 5, 1])


def padded_batch(dtype=torch.float64, steps=7, features=3, pad_value=0.0):
    """(4, steps, features) inputs with lengths LENGTHS, ``pad_value`` after each length."""
    torch.manual_seed(0)
    x = torch.randn(len(LENGTHS), steps, features, dtype=dtype)
    for i, length in enumerate(LENGTHS.tolist()):
        x[i, length:] = pad_value
    return x


# --- the helper's contract -------------------------------------------------------------------


@pytest.mark.parametrize("time_dim", [1, 2])
def test_shuffled_references_are_padded_like_their_input(time_dim):
    x = padded_batch(pad_value=-1.0)
    inputs = x if time_dim == 1 else x.transpose(1, 2)
    refs = padded_references(inputs, LENGTHS, n=5, pad_value=-1.0, generator=torch.Generator().manual_seed(0),
                             time_dim=time_dim)
    assert refs.shape == (4, 5, *inputs.shape[1:])
    assert refs.dtype == inputs.dtype
    refs = refs if time_dim == 1 else refs.transpose(2, 3)  # (N, n, T, F)
    for i, length in enumerate(LENGTHS.tolist()):
        assert (refs[i, :, length:] == -1.0).all()  # padding exactly where the input has it
        for k in range(5):  # the valid steps: a permutation of the input's own steps
            ref_steps = sorted(map(tuple, refs[i, k, :length].tolist()))
            assert ref_steps == sorted(map(tuple, x[i, :length].tolist()))


def test_background_references_are_background_sequences_cut_to_each_length():
    x = padded_batch()
    background = torch.randn(6, 9, 3, dtype=torch.float64)  # longer than the inputs: cut
    refs = padded_references(x, LENGTHS, background)
    assert refs.shape == (4, 6, 7, 3)  # n=None: the whole background, in order
    for i, length in enumerate(LENGTHS.tolist()):
        torch.testing.assert_close(refs[i, :, :length], background[:, :length], rtol=0, atol=0)
        assert (refs[i, :, length:] == 0).all()
    drawn = padded_references(x, LENGTHS, background, n=2, generator=torch.Generator().manual_seed(1))
    assert drawn.shape == (4, 2, 7, 3)
    for i, length in enumerate(LENGTHS.tolist()):
        for k in range(2):  # each one some background sequence, cut
            assert any(torch.equal(drawn[i, k, :length], b[:length]) for b in background)
        assert not torch.equal(drawn[i, 0], drawn[i, 1])  # drawn without replacement


def test_draws_are_reproducible_with_a_generator():
    x = padded_batch()
    background = torch.randn(6, 7, 3, dtype=torch.float64)
    for kwargs in ({"n": 4}, {"background": background, "n": 3}):
        a = padded_references(x, LENGTHS, generator=torch.Generator().manual_seed(7), **kwargs)
        b = padded_references(x, LENGTHS, generator=torch.Generator().manual_seed(7), **kwargs)
        c = padded_references(x, LENGTHS, generator=torch.Generator().manual_seed(8), **kwargs)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: padded_references(x, LENGTHS), r"give n >= 1"),
        (lambda x: padded_references(x, torch.tensor([3, 8, 5, 1]), n=2), r"lengths must lie in 1..7"),
        (lambda x: padded_references(x, torch.tensor([3, 0, 5, 1]), n=2), r"lengths must lie in 1..7"),
        (lambda x: padded_references(x, LENGTHS[:3], n=2), r"lengths must have shape \(4,\)"),
        (lambda x: padded_references(x, LENGTHS, torch.randn(2, 5, 3, dtype=torch.float64)), r"at least as long"),
        (lambda x: padded_references(x, LENGTHS, torch.randn(2, 7, 3, dtype=torch.float64), n=3),
         r"n must lie in 1..2"),
        (lambda x: padded_references(x, LENGTHS, torch.randn(2, 7, 4, dtype=torch.float64)),
         r"laid out like the inputs"),
        (lambda x: padded_references(x, LENGTHS, n=2, time_dim=3), r"time_dim"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(padded_batch())


# --- exactness with packed sequences and padding masks --------------------------------------


class Packed(nn.Module):
    """(N, T, F) padded + lengths (N,) -> pack -> LSTM -> h_n -> (N, 2)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


class MaskedMean(nn.Module):
    """(N, T, F) padded + mask (N, T) -> GRU -> mean of the outputs over the valid steps."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x, mask):
        out, _ = self.gru(x)
        weights = mask.to(out.dtype).unsqueeze(-1)
        return self.head((out * weights).sum(1) / weights.sum(1))


def side_input(model, lengths, steps):
    """The lengths (Packed) or the padding mask (MaskedMean) of inputs with these lengths."""
    if isinstance(model, Packed):
        return lengths
    return torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)


# Exact, and no warning: packing sorts the doubled batch by length (a row order, not a value).
@pytest.mark.filterwarnings("error::torch_handler.UnsupportedOpWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [Packed, MaskedMean])
@pytest.mark.parametrize("source", ["shuffles", "background"])
def test_references_padded_like_their_input_are_exact_through_captum(make, source, dtype):
    torch.manual_seed(0)
    model = make().to(dtype).eval()
    x = padded_batch(dtype)
    generator = torch.Generator().manual_seed(0)
    background = torch.randn(5, 7, 3, dtype=dtype) if source == "background" else None
    refs = padded_references(x, LENGTHS, background, n=4, generator=generator)
    side = side_input(model, LENGTHS, 7)
    scale = 0.0
    with torch_handler.deeplift_mode(model):
        for i in range(len(x)):
            # Captum repeats the side input for every row: input i and all its references
            # share its lengths / mask, which is right because they are padded like it.
            attr = DeepLiftShap(model).attribute(
                x[i : i + 1], baselines=refs[i], additional_forward_args=(side[i : i + 1],), target=1
            )
            with torch.no_grad():
                f_x = model(x[i : i + 1], side[i : i + 1])[0, 1]
                f_refs = model(refs[i], side[i : i + 1].expand(len(refs[i]), *side.shape[1:]))[:, 1]
            scale = max(float(f_x.abs()), float(f_refs.abs().max()))
            error = abs(float(attr.detach().sum()) - float(f_x - f_refs.mean())) / scale
            assert error <= TOLERANCE[dtype]
            assert (attr[0, LENGTHS[i] :] == 0).all()  # padding equal in both halves: no attribution


@pytest.mark.parametrize("make", [Packed, MaskedMean])
def test_references_padded_like_their_input_are_exact_through_shap(make):
    # shap takes one background per explainer and float inputs only: one explainer per input,
    # the model's side input fixed to that input's lengths / mask (shared by its references).
    torch.manual_seed(0)
    model = make().double().eval()
    x = padded_batch()
    refs = padded_references(x, LENGTHS, n=4, generator=torch.Generator().manual_seed(0))
    side = side_input(model, LENGTHS, 7)

    class WithSide(nn.Module):
        def __init__(self, model, side_row):
            super().__init__()
            self.model, self.side_row = model, side_row

        def forward(self, rows):
            return self.model(rows, self.side_row.expand(len(rows), *self.side_row.shape[1:]))

    torch_handler.register()
    try:
        for i in range(len(x)):
            explained = WithSide(model, side[i : i + 1])
            values = shap.DeepExplainer(explained, refs[i]).shap_values(x[i : i + 1])  # (1, T, F, 2)
            with torch.no_grad():
                delta = (explained(x[i : i + 1]) - explained(refs[i]).mean(0)).numpy()
            np.testing.assert_allclose(values.sum(axis=(1, 2)), delta, rtol=0, atol=1e-10)
            assert (values[0, LENGTHS[i] :] == 0).all()
    finally:
        torch_handler.unregister()


def test_a_reference_of_another_length_is_refused_for_packed_sequences():
    # Why references must be padded like their input: the rule pairs the steps of input j
    # and reference j + N, so a doubled batch whose halves differ in length is refused.
    torch.manual_seed(0)
    model = Packed().double().eval()
    x = padded_batch()
    doubled = torch.cat([x[:1], torch.randn(1, 7, 3, dtype=torch.float64)])
    with torch_handler.deeplift_mode(model), pytest.raises(UnsupportedConfigurationError, match=r"same length"):
        model(doubled, torch.tensor([3, 7]))


class FromInput(nn.Module):
    """The padding read from the input itself, as NLP / time-series code does: a masked mean
    with ``mask = x.abs().sum(-1) > 0``, or packing with lengths counted from ``x != 0``."""

    def __init__(self, packed: bool):
        super().__init__()
        self.packed = packed
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if self.packed:
            lengths = (x != 0).any(-1).sum(1)
            _, h = self.gru(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
            return self.head(h[-1])
        mask = x.abs().sum(-1) > 0
        out, _ = self.gru(x)
        weights = mask.to(out.dtype).unsqueeze(-1)
        return self.head((out * weights).sum(1) / weights.sum(1))


# Exact, and no warning: packing sorts the doubled batch by length (a row order, not a value).
@pytest.mark.filterwarnings("error::torch_handler.UnsupportedOpWarning")
@pytest.mark.parametrize("packed", [False, True], ids=["mask", "packed"])
def test_padding_read_from_the_input_is_exact_with_references_padded_like_it(packed):
    # The mask / lengths the model computes from input and reference are then equal in both
    # halves of every pair: a constant for the rules. (References of other lengths: packed ones
    # are refused; a mask differing between the halves is the interception's to name.)
    torch.manual_seed(0)
    model = FromInput(packed).double().eval()
    x = padded_batch()
    refs = padded_references(x, LENGTHS, n=4, generator=torch.Generator().manual_seed(0))
    with torch_handler.deeplift_mode(model):
        for i in range(len(x)):
            attr = DeepLiftShap(model).attribute(x[i : i + 1], baselines=refs[i], target=1)
            with torch.no_grad():
                delta = model(x[i : i + 1])[0, 1] - model(refs[i])[:, 1].mean()
                scale = max(float(model(x[i : i + 1]).abs().max()), float(model(refs[i]).abs().max()))
            assert abs(float(attr.detach().sum() - delta)) / scale <= TOLERANCE[torch.float64]
    unpadded = torch.randn(4, 7, 3, dtype=torch.float64)  # every step valid: other lengths
    if packed:
        with torch_handler.deeplift_mode(model), pytest.raises(UnsupportedConfigurationError, match=r"same length"):
            DeepLiftShap(model).attribute(x[:1], baselines=unpadded, target=1)
