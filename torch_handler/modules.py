"""DeepLIFT forwards for torch's recurrent modules.

While a model is in :func:`torch_handler.deeplift_mode`, each supported module's ``forward``
is one of the functions below: the same outputs as torch's own forward (same shapes, same
values up to rounding), computed through :class:`~torch_handler.function.RecurrentRuleFunction`
so that backward yields DeepLIFT multipliers. Layers, directions, projections, packed
sequences and the initial states are plain tensor plumbing around that Function; the cell
equations live only in :mod:`torch_handler.rules`.

With gradients disabled (``torch.no_grad()``: shap's expected-value pass, Captum's
convergence-delta pass) the module's own forward runs: nothing to attribute, exact same values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .errors import DoubledBatchError, UnsupportedConfigurationError
from .function import RecurrentRuleFunction
from .rules import GRURule, LSTMRule, RNNRule

SEQUENCE_MODULES = (nn.LSTM, nn.GRU, nn.RNN)
CELL_MODULES = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
SUPPORTED_MODULES = SEQUENCE_MODULES + CELL_MODULES
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def rule_for(module: nn.Module):
    """The rule object of a supported recurrent module."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return LSTMRule()
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return GRURule()
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        return RNNRule(module.nonlinearity)
    raise UnsupportedConfigurationError(f"no DeepLIFT rule for {type(module).__name__}")


def check_supported(module: nn.Module) -> None:
    """Raise UnsupportedConfigurationError for a recurrent module the rule cannot serve."""
    base = next(cls for cls in SUPPORTED_MODULES if isinstance(module, cls))
    if type(module).forward is not base.forward:
        raise UnsupportedConfigurationError(
            f"{type(module).__name__} subclasses nn.{base.__name__} and overrides forward(); the "
            "DeepLIFT rule only knows torch's own equations. Call an unmodified "
            f"nn.{base.__name__} inside your model instead of overriding its forward."
        )
    dtypes = {p.dtype for p in module.parameters()}
    bad = [d for d in dtypes if d not in SUPPORTED_DTYPES]
    if bad:
        raise UnsupportedConfigurationError(
            f"{type(module).__name__} has {bad[0]} parameters; exact DeepLIFT is supported in "
            "float32 and float64 only (half precision cannot keep the summation-to-delta "
            "property). Cast the model and inputs with model.float() or model.double()."
        )


def _check_input(module: nn.Module, x: Tensor, what: str) -> None:
    weight = next(module.parameters())
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{type(module).__name__}: {what} has dtype {x.dtype} but the module's weights are "
            f"{weight.dtype}; cast one to match (e.g. inputs.to({weight.dtype}))."
        )
    if x.device != weight.device:
        raise ValueError(
            f"{type(module).__name__}: {what} is on {x.device} but the module is on "
            f"{weight.device}; move them to the same device."
        )
    check_finite(x, f"{type(module).__name__}: {what}")


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` if ``tensor`` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"{what} contains NaN or Inf; DeepLIFT needs finite inputs and references. "
            "Clean or impute the data before explaining."
        )


def _check_doubled(module: nn.Module, batch: int) -> None:
    if batch % 2:
        raise DoubledBatchError(
            f"{type(module).__name__} received a batch of {batch} rows while explaining; DeepLIFT "
            "engines run cat([inputs, references]) so the batch must be even, row j paired with "
            f"row j + {batch // 2}. Call the model through shap / Captum / tangermeme, or pass "
            "such a doubled batch yourself."
        )


def _detached(weights):
    return type(weights)(*(None if w is None else w.detach() for w in weights))


def _layer_weights(module: nn.Module, layer: int, direction: int):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    get = lambda name: getattr(module, name + suffix, None)  # noqa: E731
    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")


def _reversal(lengths: Tensor, steps: int) -> Tensor:
    """Gather index (T, B) reversing each row within its own length, padding left in place.

    The reverse direction of a packed sequence starts at each row's last valid step. Reversed
    this way (rather than flipping the padded tensor) the padding stays a suffix of every row,
    which is what the Function's mask expects.
    """
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)
    return torch.where(t < lengths, lengths - 1 - t, t)


def _reverse(seq: Tensor, index: Tensor | None) -> Tensor:
    if index is None:
        return seq.flip(0)
    return seq.gather(0, index.unsqueeze(-1).expand_as(seq))


def _run_stack(module, rule, x: Tensor, state0: tuple[Tensor, ...], lengths: Tensor | None):
    """All layers and directions: x (T, B, I), state0 each (L*D, B, ·) -> (out, finals)."""
    num_directions = 2 if module.bidirectional else 1
    mask = reversal = None
    if lengths is not None:
        steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        mask = steps < lengths
        reversal = _reversal(lengths, x.shape[0])
    layer_input = x
    finals: list[list[Tensor]] = [[] for _ in state0]
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(num_directions):
            weights = _detached(rule.weights(*_layer_weights(module, layer, direction)))
            index = layer * num_directions + direction
            # The reverse direction runs forward in time over the reversed sequence.
            seq = _reverse(layer_input, reversal) if direction else layer_input
            out, *final = RecurrentRuleFunction.apply(rule, weights, mask, seq, *(s[index] for s in state0))
            outputs.append(_reverse(out, reversal) if direction else out)
            for k, f in enumerate(final):
                finals[k].append(f)
        layer_input = torch.cat(outputs, dim=2) if num_directions == 2 else outputs[0]
    return layer_input, tuple(torch.stack(f) for f in finals)


def _unpack(module, packed: PackedSequence):
    """Padded (T, B, F) input in the original batch order, and the lengths (B,) on its device."""
    x, lengths = pad_packed_sequence(packed, batch_first=False)
    n = x.shape[1] // 2
    if not torch.equal(lengths[:n], lengths[n:]):
        raise UnsupportedConfigurationError(
            f"{type(module).__name__}: packed sequence j and its reference j + {n} have different "
            f"lengths ({lengths[:n].tolist()} vs {lengths[n:].tolist()}); the rule pairs them "
            "step by step. Give each reference the same length as the input it explains."
        )
    return x, lengths.to(x.device)


def _repack(out: Tensor, packed: PackedSequence) -> PackedSequence:
    """Gather the padded output (T, B, F) back into ``packed``'s order."""
    batch_sizes = packed.batch_sizes
    order = packed.sorted_indices
    if order is None:
        order = torch.arange(int(batch_sizes[0]))
    order = order.to(out.device)
    time_index = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes).to(out.device)
    row_index = torch.cat([order[: int(size)] for size in batch_sizes])
    data = out[time_index, row_index]
    return PackedSequence(data, batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def sequence_forward(module: nn.Module, input, hx=None):
    """DeepLIFT forward of nn.LSTM / nn.GRU / nn.RNN, same signature and outputs as torch's."""
    if not torch.is_grad_enabled():
        return type(module).forward(module, input, hx)
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise UnsupportedConfigurationError(
            f"{type(module).__name__} has dropout={module.dropout} between layers and is in "
            "training mode: attributions would be random. Call model.eval() before explaining."
        )
    is_lstm = isinstance(module, nn.LSTM)
    packed = input if isinstance(input, PackedSequence) else None
    lengths = None
    if packed is not None:
        x, lengths = _unpack(module, packed)
    else:
        if input.dim() != 3:
            raise DoubledBatchError(
                f"{type(module).__name__} received unbatched input of shape {tuple(input.shape)}; "
                "a DeepLIFT engine needs a batch dimension to pair inputs with references."
            )
        x = input.transpose(0, 1) if module.batch_first else input
    _check_input(module, x, "input")
    T, B = x.shape[:2]
    _check_doubled(module, B)
    num_states = module.num_layers * (2 if module.bidirectional else 1)
    hidden = module.hidden_size
    out_size = module.proj_size if is_lstm and module.proj_size > 0 else hidden
    if hx is None:
        zeros = lambda size: x.new_zeros(num_states, B, size)  # noqa: E731
        state0 = (zeros(out_size), zeros(hidden)) if is_lstm else (zeros(hidden),)
    else:
        state0 = tuple(hx) if is_lstm else (hx,)
        expected = [(num_states, B, out_size), (num_states, B, hidden)][: len(state0)]
        for name, s, shape in zip(("h0", "c0"), state0, expected, strict=False):
            if tuple(s.shape) != shape:
                raise ValueError(
                    f"{type(module).__name__}: {name} has shape {tuple(s.shape)}, expected {shape} "
                    "(num_layers * num_directions, batch, size) for this input."
                )
            _check_input(module, s, name)
    out, finals = _run_stack(module, rule_for(module), x, state0, lengths)
    if packed is not None:
        output = _repack(out, packed)
    else:
        output = out.transpose(0, 1) if module.batch_first else out
    return (output, finals) if is_lstm else (output, finals[0])


def cell_forward(module: nn.Module, input: Tensor, hx=None):
    """DeepLIFT forward of nn.LSTMCell / nn.GRUCell / nn.RNNCell: one step, T = 1."""
    if not torch.is_grad_enabled():
        return type(module).forward(module, input, hx)
    if input.dim() != 2:
        raise DoubledBatchError(
            f"{type(module).__name__} received unbatched input of shape {tuple(input.shape)}; "
            "a DeepLIFT engine needs a batch dimension to pair inputs with references."
        )
    _check_input(module, input, "input")
    B = input.shape[0]
    _check_doubled(module, B)
    is_lstm = isinstance(module, nn.LSTMCell)
    if hx is None:
        zeros = input.new_zeros(B, module.hidden_size)
        state0 = (zeros, zeros) if is_lstm else (zeros,)
    else:
        state0 = tuple(hx) if is_lstm else (hx,)
        for name, s in zip(("h", "c"), state0, strict=False):
            if tuple(s.shape) != (B, module.hidden_size):
                raise ValueError(
                    f"{type(module).__name__}: {name} has shape {tuple(s.shape)}, expected "
                    f"{(B, module.hidden_size)} (batch, hidden_size)."
                )
            _check_input(module, s, name)
    rule = rule_for(module)
    weights = _detached(rule.weights(module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh))
    _, *final = RecurrentRuleFunction.apply(rule, weights, None, input.unsqueeze(0), *state0)
    return tuple(final) if is_lstm else final[0]


def deeplift_forward_for(module: nn.Module):
    """The DeepLIFT forward function to bind to ``module``."""
    return sequence_forward if isinstance(module, SEQUENCE_MODULES) else cell_forward
