"""Glue for the differential tests: the same cell or stack, run by the torch handler and by
the JAX oracle, compared element-wise.

The torch side is the production path: a real ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (or cell)
inside ``torch_handler.deeplift_mode``, run on the doubled batch ``cat([actual, reference])``
and differentiated with ``torch.autograd.grad`` given output multipliers for both halves.
The oracle side is ``reference_jax`` in float64. The two share nothing but torch's weight
layout: this file only converts arrays.

Relative error is ``max |torch − oracle| / max |oracle|`` over a whole tensor (the error is
measured against the tensor's scale, the way floating-point rounding behaves; a single
element whose true value is ~0 cannot blow it up).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import reference_jax as oracle
import torch_handler
from torch_handler.additivity import tolerance_for

TOLERANCE = {dtype: tolerance_for(dtype) for dtype in (torch.float64, torch.float32)}  # the one definition


def relative_error(ours, reference) -> float:
    ours = np.asarray(ours, np.float64)
    reference = np.asarray(reference, np.float64)
    scale = np.abs(reference).max()
    if scale == 0:
        return float(np.abs(ours).max())
    return float(np.abs(ours - reference).max() / scale)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _bias(module, name, rows):
    b = getattr(module, name, None)
    return np.zeros(rows) if b is None else _np(b)


def cell_params(cell: nn.Module):
    """Oracle params of an nn.LSTMCell / GRUCell / RNNCell (biases as zeros when absent)."""
    rows = cell.weight_ih.shape[0]
    args = (_np(cell.weight_ih), _np(cell.weight_hh), _bias(cell, "bias_ih", rows), _bias(cell, "bias_hh", rows))
    if isinstance(cell, nn.LSTMCell):
        return oracle.LSTMParams(*args)
    if isinstance(cell, nn.GRUCell):
        return oracle.GRUParams(*args)
    return oracle.RNNParams(*args)


def stack_params(module: nn.Module):
    """Oracle params[layer][direction] of an nn.LSTM / GRU / RNN."""
    params = []
    for layer in range(module.num_layers):
        directions = []
        for direction in range(2 if module.bidirectional else 1):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih = getattr(module, "weight_ih" + suffix)
            rows = w_ih.shape[0]
            args = (
                _np(w_ih),
                _np(getattr(module, "weight_hh" + suffix)),
                _bias(module, "bias_ih" + suffix, rows),
                _bias(module, "bias_hh" + suffix, rows),
            )
            if isinstance(module, nn.LSTM):
                w_hr = getattr(module, "weight_hr" + suffix, None)
                directions.append(oracle.LSTMParams(*args, None if w_hr is None else _np(w_hr)))
            elif isinstance(module, nn.GRU):
                directions.append(oracle.GRUParams(*args))
            else:
                directions.append(oracle.RNNParams(*args))
        params.append(directions)
    return params


def handler_multipliers(module, call, actual, reference, batch_dims, output_multipliers, output_batch_dims):
    """DeepLIFT multipliers from the torch handler, for both halves of the doubled batch.

    actual, reference: one tensor per module input, batch on ``batch_dims``;
    output_multipliers: one tensor per output of ``call(module, *doubled_inputs)`` (a tuple),
    batch on ``output_batch_dims``, given to both halves. Returns, per input, the pair
    (multiplier of the actual half, multiplier of the reference half).
    """
    doubled = [
        torch.cat((a, r), dim=d).requires_grad_() for a, r, d in zip(actual, reference, batch_dims, strict=True)
    ]
    grad_outputs = [torch.cat((m, m), dim=d) for m, d in zip(output_multipliers, output_batch_dims, strict=True)]
    with torch_handler.deeplift_mode(module):
        outputs = call(module, *doubled)
        grads = torch.autograd.grad(outputs, doubled, grad_outputs)
    return [g.chunk(2, dim=d) for g, d in zip(grads, batch_dims, strict=True)]
