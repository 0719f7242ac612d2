"""glu (``a·σ(b)``: Rescale and Shapley) and amax over dims (half of Δy through each half's arg-max)."""

from __future__ import annotations

import torch
from torch import Tensor

from torch_handler.ops.rules._common import Multipliers, _f64, _mean, _pair_dims, _safe
from torch_handler.recurrent.rules import rescale_sigmoid


def glu(m: Tensor, actual, reference, *, dim: int = -1) -> Multipliers:
    """y = a · sigmoid(b), (a, b) the halves of x along dim: m_a = m · mean(σ(b)),
    m_b = m · mean(a) · R_σ(b_a, b_r); m_x = cat(m_a, m_b) along dim.

    actual = (x_a,): (N, *s) (even size along dim); m (2, N, *s with half along dim) -> (m_x,).
    """
    (x_a,), (x_r,) = actual, reference
    (d,) = _pair_dims(dim, x_a.ndim)
    a_a, b_a = _f64(x_a).chunk(2, dim=d)
    a_r, b_r = _f64(x_r).chunk(2, dim=d)
    m64 = _f64(m)
    m_first = m64 * _mean(torch.sigmoid(b_a), torch.sigmoid(b_r))
    m_second = m64 * _mean(a_a, a_r) * rescale_sigmoid(b_a, b_r)
    return (torch.cat((m_first, m_second), dim=d).to(x_a.dtype),)


def amax(m: Tensor, actual, reference, *, dim, keepdim: bool = False) -> Multipliers:
    """y = amax(x, dim) (also max(x, dim).values), exact routing between the two maxima.

    j* = argmax of actual, k* = argmax of reference along dim (first index on ties),
    dy = y_a − y_r. If j* = k*: m_{j*} = m. Else half of dy goes through each route:
    m_{j*} = m · (dy/2) / dx_{j*}, m_{k*} = m · (dy/2) / dx_{k*}; a route whose dx is exactly 0
    gives its half to the other. All other entries 0. A tuple of dims is flattened into one.

    actual = (x_a,): (N, *s); dim negative; m (2, N, *s_out) -> (m_x (2, N, *s),).
    """
    (x_a,), (x_r,) = actual, reference
    dims = _pair_dims(dim, x_a.ndim)
    if len(dims) > 1:
        return _amax_over_several_dims(m, x_a, x_r, dims, keepdim)
    (d,) = dims
    x_a64, x_r64 = _f64(x_a), _f64(x_r)
    j = x_a64.argmax(dim=d, keepdim=True)
    k = x_r64.argmax(dim=d, keepdim=True)
    dx = x_a64 - x_r64
    dy = x_a64.gather(d, j) - x_r64.gather(d, k)
    dx_j, dx_k = dx.gather(d, j), dx.gather(d, k)
    same = j == k
    half = dy * 0.5
    c_j = torch.where(dx_j == 0, 0.0, torch.where(dx_k == 0, dy, half) / _safe(dx_j))
    c_k = torch.where(dx_k == 0, 0.0, torch.where(dx_j == 0, dy, half) / _safe(dx_k))
    c_j = torch.where(same, 1.0, c_j)
    c_k = torch.where(same, 0.0, c_k)
    m64 = _f64(m) if keepdim else m.to(torch.float64).unsqueeze(d)
    out = torch.zeros((2,) + tuple(x_a.shape), dtype=torch.float64, device=m.device)
    index_shape = (2,) + tuple(j.shape)
    out.scatter_add_(d, j.expand(index_shape), m64 * c_j)
    out.scatter_add_(d, k.expand(index_shape), m64 * c_k)
    return (out.to(x_a.dtype),)


def _amax_over_several_dims(m, x_a, x_r, dims, keepdim):
    """amax over several axes: move them last, flatten them into one, route, undo."""
    ndim = x_a.ndim
    pos = [ndim + d for d in dims]
    moved_shape = [s for i, s in enumerate(x_a.shape) if i not in pos] + [x_a.shape[p] for p in pos]
    kept = ndim - len(pos)

    def flat(t: Tensor) -> Tensor:
        return t.movedim(pos, list(range(kept, ndim))).reshape(*moved_shape[:kept], -1)

    m_kept = _f64(m) if not keepdim else _f64(m).squeeze(tuple(p + 1 for p in pos))
    (m_flat,) = amax(m_kept, (flat(x_a),), (flat(x_r),), dim=-1)
    m_moved = m_flat.reshape(2, *moved_shape)
    back = m_moved.movedim(list(range(1 + ndim - len(pos), 1 + ndim)), [p + 1 for p in pos])
    return (back,)
