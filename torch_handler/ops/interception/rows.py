"""Row orders of the doubled batch: ``index_select`` / ``gather`` along a dim, ``sort`` /
``argsort``, and packing (``pack_padded_sequence`` sorts the doubled batch by length, the
recurrent module puts its rows back in order, ``pad_packed_sequence`` unsorts them)."""

from __future__ import annotations

import torch
from torch import Tensor

from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception._shared import _IN_ORDER, UNKNOWN, _flat, arg
from torch_handler.ops.interception.advice import _no_rule_advice
from torch_handler.ops.interception.batch_axis import Axis


def _index_select(mode, func, name, args, kwargs):
    """index_select / gather / take_along_dim along a dim other than the batch: linear, rows kept.

    Along the batch dim only one case is followed: ``pad_packed_sequence`` putting its sorted
    rows back in the original order (the index is the packed sequence's ``unsorted_indices``).
    """
    out = func(*args, **kwargs)
    x, dim = args[0], arg(args, kwargs, 1, "dim")
    index = arg(args, kwargs, 2, "index", None if name != "take_along_dim" else args[1])
    if name == "take_along_dim":
        dim, index = arg(args, kwargs, 2, "dim"), args[1]
    sorted_rows = mode.sorted_rows.get(x)
    if sorted_rows is not None and name == "index_select":
        batch_dim, unsorted = sorted_rows
        if dim % x.dim() == batch_dim and torch.equal(index.cpu(), unsorted.cpu()):
            mode.mark(out, Axis(batch_dim, x.shape[batch_dim]))
            return out
    axis = mode.axis_of(x)
    if axis is not UNKNOWN and axis is not None:
        same = dim is not None and dim % x.dim() != axis.dim and out.dim() == x.dim()
        same = same and out.shape[axis.dim] == x.shape[axis.dim]
        axis = axis if same else UNKNOWN
    mode.mark(out, axis)
    return out


def _rows_by_index(mode, name, args, kwargs) -> bool:
    """Whether this ``index_select`` picks rows of the dim that holds its input's batch."""
    if name != "index_select":
        return False
    axis = mode.axis_of(args[0])
    dim = arg(args, kwargs, 1, "dim")
    sorted_rows = mode.sorted_rows.get(args[0])
    if sorted_rows is not None:  # pad_packed_sequence putting its sorted rows back in order
        batch_dim, unsorted = sorted_rows
        index = arg(args, kwargs, 2, "index")
        return dim % args[0].dim() == batch_dim and torch.equal(index.cpu(), unsorted.cpu())
    return axis not in (None, UNKNOWN) and dim is not None and args[0].dim() > 0 and dim % args[0].dim() == axis.dim


def _sort(mode, func, name, args, kwargs):
    """sort / argsort: rows are kept unless the sort runs along the batch dim, which mixes the
    pairs (pack_padded_sequence sorts the lengths of the whole doubled batch)."""
    out = func(*args, **kwargs)
    axis = mode.axis_of(args[0])
    dim = arg(args, kwargs, 1, "dim", -1)
    if isinstance(dim, bool):  # torch.sort(x, descending) written positionally: dim is -1
        dim = -1
    if axis is not UNKNOWN and args[0].dim() and dim % args[0].dim() == axis.dim:
        axis = UNKNOWN
    for o in _flat(out):
        if isinstance(o, Tensor):
            if o.is_floating_point():
                mode.report_if_used(o, name, _no_rule_advice(name))
            mode.mark(o, axis)
    return out


def _pack_padded(mode, func, name, args, kwargs):
    """The packed data interleaves rows by time: not pairable; the recurrent module unpacks it.

    Unsorted lengths here mean ``enforce_sorted=True`` (otherwise torch sorted them already): a
    batch sorted by length, whose doubled batch cat([x, refs]) is not. It is packed sorted, as
    ``enforce_sorted=False`` would, and the order is kept (``packed_order``) for the recurrent
    module (see ``_pre_hook``), which returns its rows in the original order, as torch does."""
    x, lengths = args[0], args[1]
    axis = mode.axis_of(x)
    batch_dim = 0 if arg(args, kwargs, 2, "batch_first") else 1
    order = None
    if (axis not in (None, UNKNOWN) and axis.dim == batch_dim and ba.is_plain(tuple(x.shape), axis)
            and lengths.dim() == 1 and bool((lengths[1:] > lengths[:-1]).any())):
        order = torch.sort(lengths, descending=True, stable=True).indices
        args = (x.index_select(batch_dim, order.to(x.device)), lengths[order], *args[2:])
    out = func(*args, **kwargs)
    if order is not None:
        mode.packed_order[out[0]] = order.to(x.device)
    for o in _flat(out):
        mode.mark(o, UNKNOWN if isinstance(o, Tensor) and o.is_floating_point() else None)
    return out


def _pad_packed(mode, func, name, args, kwargs):
    """``_pad_packed_sequence(data, batch_sizes, batch_first, ...)`` of a recurrent output."""
    out = func(*args, **kwargs)
    padded = out[0]
    source = mode.packed_outputs.get(args[0])
    batch_dim = 0 if arg(args, kwargs, 2, "batch_first") else 1
    if source is None:
        mode.mark(padded, UNKNOWN)
    elif source is _IN_ORDER:
        mode.mark(padded, Axis(batch_dim, padded.shape[batch_dim]))
    else:
        mode.sorted_rows[padded] = (batch_dim, source)
        mode.mark(padded, UNKNOWN)
    return out
