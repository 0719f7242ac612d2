"""DeepLIFT forwards for torch's recurrent modules.

While a model is in :func:`torch_handler.deeplift_mode`, each of its supported modules runs
one of the functions below, for that explanation only (see :mod:`torch_handler.mode` for the
dispatch): the same outputs as torch's own forward (same shapes, same
values up to rounding), computed through :class:`~torch_handler.recurrent.function.RecurrentRuleFunction`
so that backward yields DeepLIFT multipliers. Layers, directions, projections, packed
sequences and the initial states are plain tensor plumbing around that Function; the cell
equations live only in :mod:`torch_handler.recurrent.rules`.

With gradients disabled (``torch.no_grad()``: shap's expected-value pass, Captum's
convergence-delta pass) the module's own forward runs: nothing to attribute, exact same values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils.weak import WeakIdKeyDictionary

from torch_handler.errors import DoubledBatchError, NonFiniteError, UnsupportedConfigurationError
from torch_handler.explanation import module_label
from torch_handler.recurrent.function import RecurrentRuleFunction, all_finite
from torch_handler.recurrent.registry import REGISTRY, TORCH_FORWARD, entry_for

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def rule_for(module: nn.Module):
    """The rule object of a supported recurrent module (from :mod:`torch_handler.recurrent.registry`)."""
    entry = entry_for(module)
    if entry is None:
        raise UnsupportedConfigurationError(f"no DeepLIFT rule for {type(module).__name__}")
    return entry.rule(module)


def forward_owner(module: nn.Module) -> type:
    """The class whose ``forward`` an instance of ``type(module)`` runs (first in the MRO).

    Read from the class dictionaries rather than compared as attributes, so the answer does
    not depend on whether :mod:`torch_handler.mode` has installed its dispatcher on the base.
    """
    return next(cls for cls in type(module).__mro__ if "forward" in vars(cls))


def check_supported(module: nn.Module, name: str | None = None) -> None:
    """Raise UnsupportedConfigurationError for a recurrent module the rule cannot serve.

    ``name``: the module's qualified name in the explained model, for the message.
    """
    base = entry_for(module).cls
    label = f"{name} ({type(module).__name__})" if name else type(module).__name__
    if forward_owner(module) is not base:
        raise UnsupportedConfigurationError(
            f"{label} subclasses nn.{base.__name__} and overrides forward(); the "
            "DeepLIFT rule only knows torch's own equations. Call an unmodified "
            f"nn.{base.__name__} inside your model instead of overriding its forward."
        )
    if "forward" in vars(module):
        # An instance-level forward (a monkeypatch, a device-placement wrapper) runs instead of
        # the class's: the module would compute something the rule does not know, and the
        # engine would explain another function than the one the model computes.
        raise UnsupportedConfigurationError(
            f"{label} has an instance-level forward ({vars(module)['forward']!r}) replacing "
            f"nn.{base.__name__}.forward; the DeepLIFT rule only knows torch's own equations. "
            f"Remove it before explaining (del <module>.forward) or explain an unwrapped copy."
        )
    dtypes = {p.dtype for p in module.parameters()}
    bad = [d for d in dtypes if d not in SUPPORTED_DTYPES]
    if bad:
        raise UnsupportedConfigurationError(
            f"{label} has {bad[0]} parameters; exact DeepLIFT is supported in "
            "float32 and float64 only (half precision cannot keep the summation-to-delta "
            "property). Cast the model and inputs with model.float() or model.double()."
        )


def _label(module: nn.Module) -> str:
    """``name (Type)`` of a module in the current explanation, for error messages."""
    return module_label(module)


class _FiniteMultipliers(torch.autograd.Function):
    """Identity in forward; in backward, raise NonFiniteError if a multiplier is NaN or Inf.

    ``apply(message, *tensors) -> tensors`` (views). Put on a recurrent module's inputs it
    checks the multipliers the rule hands back; on its outputs, those that reach it from the
    rest of the model. Without it a float32 overflow inside the layer yields NaN attributions
    that every engine returns silently.
    """

    @staticmethod
    def forward(ctx, message, *tensors):
        ctx.message = message
        return tensors[0].view_as(tensors[0]) if len(tensors) == 1 else tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if not all_finite(*(g for g in grads if g is not None)):
            raise NonFiniteError(ctx.message)
        return (None, *grads)


def _guard_inputs(module: nn.Module, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    if not any(t.requires_grad for t in tensors):
        return tensors
    guarded = _FiniteMultipliers.apply(
        f"{_label(module)}: the DeepLIFT multipliers it computed are NaN or Inf. Its values "
        "overflowed or cancelled catastrophically inside the layer (typically a relu recurrence "
        "growing without bound in float32). Explain in float64 (model.double(), inputs "
        ".double()) or rescale the inputs / weights.",
        *tensors,
    )
    return guarded if isinstance(guarded, tuple) else (guarded,)


def _guard_outputs(module: nn.Module, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Check the multipliers that reach the outputs in backward. (Their forward values need no
    check here: every layer's forward buffers, which hold them, were checked as each layer ran,
    ``check_finite_buffers``, whose NonFiniteError the caller names the module in.)"""
    guarded = _FiniteMultipliers.apply(
        f"{_label(module)}: the multipliers reaching it from the layers after it are NaN or "
        "Inf; the non-finite values arise downstream of this module, in the model's head.",
        *tensors,
    )
    return guarded if isinstance(guarded, tuple) else (guarded,)


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
    if what == "input" and x.dim() and x.size(-1) != module.input_size:
        # torch's own message (the rule's matmul would otherwise say "mat1 and mat2 shapes ...")
        raise RuntimeError(
            f"{type(module).__name__}: input.size(-1) must be equal to input_size. Expected "
            f"{module.input_size}, got {x.size(-1)}"
        )
    check_finite(x, f"{type(module).__name__}: {what}")


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` if ``tensor`` holds NaN or Inf."""
    if not all_finite(tensor):
        raise ValueError(
            f"{what} contains NaN or Inf; DeepLIFT needs finite inputs and references. "
            "Clean or impute the data before explaining."
        )


def _check_doubled(module: nn.Module, batch: int) -> None:
    if batch == 0:
        # Torch returns an empty result, but no engine can attribute one (Captum and shap fail
        # inside their own code on it): say so here, where the batch is still visible.
        raise DoubledBatchError(
            f"{type(module).__name__} received an empty batch (0 rows) while explaining: there is "
            "nothing to attribute. Skip empty batches before calling the explainer (e.g. "
            "`if len(x) == 0: continue`)."
        )
    if batch % 2:
        raise DoubledBatchError(
            f"{type(module).__name__} received a batch of {batch} rows while explaining; DeepLIFT "
            "engines run cat([inputs, references]) so the batch must be even, row j paired with "
            f"row j + {batch // 2}. Call the model through shap / Captum / tangermeme, or pass "
            "such a doubled batch yourself."
        )


def _detached(*params):
    """Parameters as the rules take them: detached (under DeepLIFT, parameter "gradients"
    would be meaningless, so none are produced)."""
    return tuple(None if p is None else p.detach() for p in params)


def _layer_weights(module: nn.Module, layer: int, direction: int):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    get = lambda name: getattr(module, name + suffix, None)  # noqa: E731
    return _detached(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr"))


# The rules' weights of each module, built once per value of its parameters: a cell in a
# Python loop, or shap's one call per sample, would otherwise rebuild them (doubled blocks,
# transposed copies) on every call. Keyed by the module object, weakly (nothing of the user's
# changes or stays alive), one entry per (rule, layer, direction) holding a copy of the
# parameters it was built from: reused only while every parameter still equals its copy
# element for element. (Not version counters: an update through ``param.data`` bumps none.)
_RULE_WEIGHTS = WeakIdKeyDictionary()


def _rule_weights(module: nn.Module, rule, params: tuple, slot) -> tuple:
    """``rule.weights(*params)`` (params detached, see _detached), from the cache when the
    parameters equal those it was built from."""
    entries = _RULE_WEIGHTS.get(module)
    if entries is None:
        entries = _RULE_WEIGHTS.setdefault(module, {})
    key = (getattr(rule, "name", type(rule).__name__), slot)
    cached = entries.get(key)
    if cached is not None and _same(cached[0], params):
        return cached[1]
    weights = rule.weights(*params)
    entries[key] = (tuple(None if p is None else p.clone() for p in params), weights)
    return weights


def _same(copies: tuple, params: tuple) -> bool:
    return all(
        (c is None and p is None)
        or (c is not None and p is not None and c.dtype == p.dtype and c.device == p.device and torch.equal(c, p))
        for c, p in zip(copies, params, strict=True)
    )


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


def _apply_rule(module: nn.Module, rule, weights, mask, x: Tensor, *state0: Tensor):
    """``RecurrentRuleFunction.apply`` for one layer-direction of ``module``, its
    NonFiniteError (a non-finite pre-activation or state) naming the module."""
    try:
        return RecurrentRuleFunction.apply(rule, weights, mask, x, *state0)
    except NonFiniteError as error:
        raise NonFiniteError(f"{_label(module)}: {error}") from None


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
            weights = _rule_weights(module, rule, _layer_weights(module, layer, direction), (layer, direction))
            index = layer * num_directions + direction
            # The reverse direction runs forward in time over the reversed sequence.
            seq = _reverse(layer_input, reversal) if direction else layer_input
            out, *final = _apply_rule(module, rule, weights, mask, seq, *(s[index] for s in state0))
            outputs.append(_reverse(out, reversal) if direction else out)
            for k, f in enumerate(final):
                finals[k].append(f)
        layer_input = torch.cat(outputs, dim=2) if num_directions == 2 else outputs[0]
    return layer_input, tuple(torch.stack(f) for f in finals)


def _unpack(module, packed: PackedSequence):
    """Padded (T, B, F) input in the original batch order, and the lengths (B,) on its device."""
    x, lengths = pad_packed_sequence(packed, batch_first=False)
    _check_doubled(module, x.shape[1])
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


def _states(entry, hx) -> tuple:
    """``hx`` as a tuple of state tensors: ``(h, c)`` for two-state cells, ``(h,)`` otherwise."""
    return tuple(hx) if entry.num_states == 2 else (hx,)


def _as_hx(entry, states: tuple):
    """The inverse of :func:`_states`: what torch's forward returns as the state."""
    return tuple(states) if entry.num_states == 2 else states[0]


def sequence_forward(module: nn.Module, input, hx=None):
    """DeepLIFT forward of nn.LSTM / nn.GRU / nn.RNN, same signature and outputs as torch's."""
    entry = entry_for(module)
    if not torch.is_grad_enabled():
        return TORCH_FORWARD[entry.cls](module, input, hx)
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise UnsupportedConfigurationError(
            f"{_label(module)} has dropout={module.dropout} between layers and is in "
            "training mode: attributions would be random. Call model.eval() before explaining."
        )
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
    out_size = getattr(module, "proj_size", 0) or hidden
    if hx is None:
        sizes = (out_size, hidden)[: entry.num_states]
        state0 = tuple(x.new_zeros(num_states, B, size) for size in sizes)
    else:
        state0 = _states(entry, hx)
        expected = [(num_states, B, out_size), (num_states, B, hidden)][: len(state0)]
        for name, s, shape in zip(("h0", "c0"), state0, expected, strict=False):
            if tuple(s.shape) != shape:
                raise ValueError(
                    f"{type(module).__name__}: {name} has shape {tuple(s.shape)}, expected {shape} "
                    "(num_layers * num_directions, batch, size) for this input."
                )
            _check_input(module, s, name)
    x, *state0 = _guard_inputs(module, (x, *state0))
    out, finals = _run_stack(module, entry.rule(module), x, tuple(state0), lengths)
    out, *finals = _guard_outputs(module, (out, *finals))
    if packed is not None:
        output = _repack(out, packed)
    else:
        output = out.transpose(0, 1) if module.batch_first else out
    return output, _as_hx(entry, finals)


def cell_forward(module: nn.Module, input: Tensor, hx=None):
    """DeepLIFT forward of nn.LSTMCell / nn.GRUCell / nn.RNNCell: one step, T = 1."""
    entry = entry_for(module)
    if not torch.is_grad_enabled():
        return TORCH_FORWARD[entry.cls](module, input, hx)
    if input.dim() != 2:
        raise DoubledBatchError(
            f"{type(module).__name__} received unbatched input of shape {tuple(input.shape)}; "
            "a DeepLIFT engine needs a batch dimension to pair inputs with references."
        )
    _check_input(module, input, "input")
    B = input.shape[0]
    _check_doubled(module, B)
    if hx is None:
        zeros = input.new_zeros(B, module.hidden_size)
        state0 = (zeros,) * entry.num_states
    else:
        state0 = _states(entry, hx)
        for name, s in zip(("h", "c"), state0, strict=False):
            if tuple(s.shape) != (B, module.hidden_size):
                raise ValueError(
                    f"{type(module).__name__}: {name} has shape {tuple(s.shape)}, expected "
                    f"{(B, module.hidden_size)} (batch, hidden_size)."
                )
            _check_input(module, s, name)
    input, *state0 = _guard_inputs(module, (input, *state0))
    rule = entry.rule(module)
    weights = _rule_weights(module, rule, _detached(module.weight_ih, module.weight_hh, module.bias_ih,
                                                    module.bias_hh), "cell")
    _, *final = _apply_rule(module, rule, weights, None, input.unsqueeze(0), *state0)
    return _as_hx(entry, _guard_outputs(module, tuple(final)))


_FORWARDS = {"sequence": sequence_forward, "cell": cell_forward}


def deeplift_forward_for(module: nn.Module):
    """The DeepLIFT forward function of ``module``: ``f(module, input, hx=None)``."""
    return _FORWARDS[entry_for(module).layout]


assert {entry.layout for entry in REGISTRY} <= set(_FORWARDS), "a registry layout has no forward"
