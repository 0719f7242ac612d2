"""The DeepLIFT / DeepSHAP rule for recurrent cells, one class per cell type.

Every engine integration (shap, Captum, tangermeme) ends up here: the autograd Function in
:mod:`torch_handler.recurrent.function` runs a cell's ``step`` forward through time on the doubled batch
``cat([actual, reference])``, writing into the rule's ``forward_buffers`` (with per-step
scratch from ``step_workspace``), and, in backward, turns output multipliers into input
multipliers with ``coefficients`` (vectorised over a chunk of steps), ``step_factors`` (the
same, arranged so that a step needs few kernels) and ``step_backward``. Nothing else in the
package knows the cell equations.

Notation: every quantity has an actual value ``a`` (first half of the batch)
and a reference value ``r`` (second half); ``mean(u) = (u_a + u_r) / 2``.

* Linear maps use the chain rule.
* An elementwise nonlinearity ``y = φ(z)`` uses Rescale, ``m_z = m_y · (φ(z_a) − φ(z_r)) /
  (z_a − z_r)``. The quotient is evaluated in closed forms that need no small-Δ threshold
  (see :func:`rescale_sigmoid`), so float32 keeps full relative accuracy even when Δz → 0.
* A product ``y = u ⊙ v`` of two varying operands uses the two-player Shapley value:
  ``m_u = m_y · mean(v)`` and ``m_v = m_y · mean(u)``; then ``m_u Δu + m_v Δv = Δy`` exactly.

All multipliers are per hidden unit (nothing is pooled across units), so the chain is exact:
Σ m_in Δin = Σ m_out Δout up to floating-point rounding.

Shapes: ``T`` time steps, ``B = 2N`` doubled batch, ``N`` pairs, ``I`` input features, ``H``
hidden units, ``P`` the hidden-state size (``H``, or ``proj_size`` for a projected LSTM).
Multipliers inside backward are viewed as ``(2, N, ...)`` so that per-pair coefficients of
shape ``(N, ...)`` broadcast over both halves: each half keeps the multiplier that reached it
(shap reads the reference half, Captum the actual half) and both get the same rule.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GRURule",
    "LSTMRule",
    "RNNRule",
    "rescale_relu",
    "rescale_sigmoid",
    "rescale_tanh",
    "shapley_mean",
]


# --------------------------------------------------------------------------------------
# Elementwise pieces
# --------------------------------------------------------------------------------------


def _halves(both: Tensor) -> tuple[Tensor, Tensor]:
    """Actual and reference halves of a (T, B, ·) doubled-batch tensor: two (T, N, ·) views."""
    n = both.shape[1] // 2
    return both[:, :n], both[:, n:]


def shapley_mean(both: Tensor) -> Tensor:
    """``(a + r) / 2`` of a (T, B, ·) doubled-batch tensor: the (T, N, ·) value an operand
    passes to its partner in a Shapley product."""
    actual, reference = _halves(both)
    return (actual + reference) * 0.5


def rescale_sigmoid(z_a: Tensor, z_r: Tensor) -> Tensor:
    """Rescale factor ``(σ(z_a) − σ(z_r)) / (z_a − z_r)``, accurate for every Δz.

    With ``hi = max(z_a, z_r)``, ``lo = min(z_a, z_r)``, ``d = hi − lo ≥ 0``:
    ``σ(hi) − σ(lo) = σ(hi) · σ(−lo) · (1 − e^{−d})``, so the factor is
    ``σ(hi) σ(−lo) · (−expm1(−d) / d)``. Every term is computed without cancellation and
    without overflow, and ``−expm1(−d)/d → 1`` as ``d → 0`` gives ``σ'(z)`` in the limit
    (``d`` is clamped to the smallest normal number, where the ratio is exactly 1, so
    ``d = 0`` needs no special case). This is why no midpoint-derivative threshold is needed
    here (the JAX oracle, ``reference_jax.rescale.sigmoid_quotient``, uses the same identity
    with a series for ``(1 − e^{−d})/d``; the two agree to rounding).
    """
    return _rescale_sigmoid_scaled(z_a, z_r, 1.0)


def _rescale_sigmoid_scaled(z_a: Tensor, z_r: Tensor, k: float) -> Tensor:
    """``rescale_sigmoid(k·z_a, k·z_r)`` in seven fused-in-place passes and four temporaries
    (k = 1 or 2, a power of two: the scaling is exact)."""
    lo = torch.minimum(z_a, z_r)
    hi = torch.maximum(z_a, z_r)
    if k != 1.0:
        lo.mul_(k)
        hi.mul_(k)
    neg_d = torch.sub(lo, hi).clamp_max_(-torch.finfo(lo.dtype).tiny)
    factor = torch.expm1(neg_d).div_(neg_d)  # (1 − e^{−d}) / d, in (0, 1]
    return factor.mul_(hi.sigmoid_()).mul_(lo.neg_().sigmoid_())


def rescale_tanh(z_a: Tensor, z_r: Tensor) -> Tensor:
    """Rescale factor ``(tanh(z_a) − tanh(z_r)) / (z_a − z_r)``, accurate for every Δz.

    ``tanh(z) = 2σ(2z) − 1``, hence the factor is ``4 · rescale_sigmoid(2 z_a, 2 z_r)``.
    """
    return _rescale_sigmoid_scaled(z_a, z_r, 2.0).mul_(4.0)


def rescale_relu(z_a: Tensor, z_r: Tensor) -> Tensor:
    """Rescale factor ``(relu(z_a) − relu(z_r)) / (z_a − z_r)``.

    Exact in floating point: 1 when both are positive, 0 when both are non-positive, and a
    ratio of same-sign numbers otherwise. At Δz = 0 the midpoint derivative is used.
    """
    d = z_a - z_r
    nonzero = d != 0
    safe_d = torch.where(nonzero, d, torch.ones_like(d))
    quotient = (torch.relu(z_a) - torch.relu(z_r)) / safe_d
    midpoint_derivative = ((z_a + z_r) > 0).to(z_a.dtype)
    return torch.where(nonzero, quotient, midpoint_derivative)


# --------------------------------------------------------------------------------------
# Cell rules
# --------------------------------------------------------------------------------------


class LSTMWeights(NamedTuple):
    """Weights of one LSTM layer-direction, torch layout, gate order i, f, g, o, with the
    g rows doubled (see :meth:`LSTMRule.weights`).

    w_ih (4H, I); w_hh (4H, P); bias (4H,) = b_ih + b_hh or None; w_hr (P, H) or None;
    w_hh_t (P, 4H) = w_hh.T, contiguous (the forward step's matmul runs faster on it).
    """

    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor | None
    w_hr: Tensor | None
    w_hh_t: Tensor


def _input_projection(w_ih: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """All time steps' input projections in one matmul: (T, B, I) -> (T, B, G), contiguous."""
    T, B, _ = x.shape
    flat = x.reshape(T * B, -1)
    proj = flat @ w_ih.T if bias is None else torch.addmm(bias, flat, w_ih.T)
    return proj.view(T, B, -1)


def _previous(buffer: Tensor, first: Tensor, t0: int, t1: int) -> Tensor:
    """Steps t0..t1-1 of the sequence shifted by one: (first, buffer[0], buffer[1], ...)."""
    if t0 > 0:
        return buffer[t0 - 1 : t1 - 1]
    return torch.cat((first.unsqueeze(0), buffer[: t1 - 1]), dim=0)


def _double_block(tensor: Tensor | None, block: int, blocks: int) -> Tensor | None:
    """``tensor`` (blocks·H, ...) with rows block·H..(block+1)·H multiplied by 2 (exact).

    A pre-activation ``u = 2z`` of a ``tanh`` lets ``tanh(z) = 2σ(u) − 1`` share one sigmoid
    kernel with the gates (and tanh is several times slower than sigmoid on CPU); the rule
    is the same in exact arithmetic, since the multiplier of ``z`` is twice that of ``u``
    and the doubled weight rows apply exactly that factor.
    """
    if tensor is None:
        return None
    size = tensor.shape[0] // blocks
    scale = torch.ones(blocks, 1, dtype=tensor.dtype, device=tensor.device)
    scale[block] = 2.0
    return (tensor.reshape(blocks, size, -1) * scale.unsqueeze(-1)).reshape(tensor.shape)


class _CellRule:
    """Defaults of the rule protocol that :mod:`torch_handler.recurrent.function` calls, for cells whose
    step multiplier row is just the pre-activations (one column per row of ``w_hh``) and whose
    chunk coefficients a step uses as they are. LSTMRule overrides both."""

    reads_output = False
    """Whether ``coefficients`` reads the output buffer (the last of ``forward_buffers``); when
    not, backward is handed None in its place and the output is not kept for it."""

    @staticmethod
    def side_width(weights) -> int:
        """Columns of a step's multiplier row: the pre-activations, one per row of ``w_hh``."""
        return weights.w_hh.shape[0]

    @staticmethod
    def step_factors(weights, coeffs):
        """The per-step factors backward uses: here the chunk's coefficients unchanged."""
        return coeffs


class LSTMRule(_CellRule):
    """``z = W_ih x + W_hh h + b``; ``i, f, o = σ(z_·)``, ``g = tanh(z_g)``;
    ``c' = f ⊙ c + i ⊙ g``; ``h' = o ⊙ tanh(c')`` (times ``W_hr`` with a projection).

    State ``(h, c)``: h (B, P), c (B, H). Forward buffers: the pre-activations Z (T, B, 4H)
    with g's block doubled, ``u_g = 2 z_g`` (the input projection, to which each step adds
    its recurrent part in place), the cell states C (T, B, H) and the output OUT (T, B, P).
    The gates are recomputed from Z in backward: saving only Z and C keeps memory below
    native autograd's.
    """

    name = "LSTM"

    @staticmethod
    def weights(w_ih, w_hh, b_ih, b_hh, w_hr=None) -> LSTMWeights:
        """The layer's weights with g's rows doubled: ``g = 2σ(u_g) − 1`` with ``u_g = 2 z_g``."""
        bias = None if b_ih is None else b_ih + b_hh
        w_hh = _double_block(w_hh, 2, 4)
        return LSTMWeights(_double_block(w_ih, 2, 4), w_hh, _double_block(bias, 2, 4), w_hr, w_hh.T.contiguous())

    @staticmethod
    def forward_buffers(weights: LSTMWeights, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        Z = _input_projection(weights.w_ih, weights.bias, x)
        T, B = x.shape[:2]
        H = weights.w_hh.shape[0] // 4
        P = H if weights.w_hr is None else weights.w_hr.shape[0]
        return Z, x.new_empty(T, B, H), x.new_empty(T, B, P)

    @staticmethod
    def step_workspace(weights: LSTMWeights, x: Tensor):
        """Per-step scratch reused by every step: the gates (B, 4H), their four (B, H) views,
        and tanh(c') (B, H)."""
        gates = x.new_empty(x.shape[1], weights.w_hh.shape[0])
        return (gates, *gates.chunk(4, dim=1), x.new_empty(x.shape[1], weights.w_hh.shape[0] // 4))

    @staticmethod
    def step(weights: LSTMWeights, views, state: tuple[Tensor, Tensor], work):
        """One forward step: views = (Z[t], C[t], OUT[t]), written in place. Returns the new
        state (views of C[t] and OUT[t])."""
        z, c_new, h_new = views
        h, c = state
        gates, i, f, g, o, tanh_c = work
        # One sigmoid for all four gates; g = tanh(z_g) = 2σ(u_g) − 1 = 2·(σ(u_g) − 1/2).
        torch.sigmoid(z.addmm_(h, weights.w_hh_t), out=gates)
        g.sub_(0.5)
        torch.mul(f, c, out=c_new).addcmul_(i, g, value=2.0)
        torch.tanh(c_new, out=tanh_c)
        if weights.w_hr is None:
            torch.mul(o, tanh_c, out=h_new)
        else:
            torch.mm(tanh_c.mul_(o), weights.w_hr.T, out=h_new)
        return h_new, c_new

    @staticmethod
    def coefficients(weights: LSTMWeights, buffers, state0, t0: int, t1: int):
        """Per-pair rule coefficients for steps t0..t1-1 at once (vectorised over time).

        Returns K (τ, N, 4, H), the gate pre-activation factors (g's relative to u_g);
        A (τ, N, H) = mean(o)·R_tanh(c'); Kc (τ, N, H) = mean(f). (τ = t1 − t0.)
        """
        Z, C, _ = buffers
        u, c_new = Z[t0:t1], C[t0:t1]
        H = c_new.shape[-1]
        # One sigmoid and one Rescale call serve all four gates (u_g = 2 z_g: see weights()).
        K = rescale_sigmoid(*_halves(u))
        means = shapley_mean(torch.sigmoid(u))
        K = K.view(*K.shape[:-1], 4, H)
        means = means.view(*means.shape[:-1], 4, H)
        mean_i, mean_f, mean_g, mean_o = means.unbind(2)
        mean_g.mul_(2.0).sub_(1.0)  # mean(2σ(u_g) − 1) = mean(g)
        # m_i = m_c'·mean(g), m_f = m_c'·mean(c), m_g = m_c'·mean(i) (times dg/du_g = 2σ'),
        # m_o = m_h'·mean(tanh c')
        K[:, :, 0].mul_(mean_g)
        K[:, :, 1].mul_(shapley_mean(_previous(C, state0[1], t0, t1)))
        K[:, :, 2].mul_(mean_i).mul_(2.0)
        K[:, :, 3].mul_(shapley_mean(torch.tanh(c_new)))
        A = rescale_tanh(*_halves(c_new)).mul_(mean_o)
        return K, A, mean_f

    @staticmethod
    def side_width(weights: LSTMWeights) -> int:
        """Columns of a step's multiplier row: the four gates' pre-activations and c."""
        return weights.w_hh.shape[0] + weights.w_hh.shape[0] // 4

    @staticmethod
    def step_factors(weights: LSTMWeights, coeffs):
        """The coefficients as two (τ, N, 5, H) factors of the multipliers of c' and of the
        output path p (= h', or the pre-projection h), so that one step of backward is
        ``[m_i, m_f, m_g, m_o, m_c] = m_c' ⊙ F_c + m_p ⊙ F_p`` (two kernels):
        ``F_c = [K_i, K_f, K_g, 0, mean f]`` and ``F_p = A ⊙ [K_i, K_f, K_g, K_o / A, mean f]``
        with K_o in place of ``A ⊙ K_o / A`` (m_c'total = m_c' + m_p ⊙ A)."""
        K, A, Kc = coeffs
        tau, N, _, H = K.shape
        F_c = K.new_empty(tau, N, 5, H)
        F_c[:, :, :3] = K[:, :, :3]
        F_c[:, :, 3] = 0
        F_c[:, :, 4] = Kc
        F_p = F_c * A.unsqueeze(2)
        F_p[:, :, 3] = K[:, :, 3]
        return F_c, F_p

    @staticmethod
    def step_backward(weights: LSTMWeights, factors_t, m_h: Tensor, m_state, m_z: Tensor, grad_prev):
        """One backward step on multipliers viewed as (2, N, ·).

        m_h: multiplier of h' (2, N, P), including the output's; m_state = (m_c',);
        m_z: (2, N, 5H) written with the gates' pre-activation multipliers and m_c;
        grad_prev: None or the output multiplier of the previous step (B, P), added to
        m_h_prev. Returns (m_h_prev (2, N, P), (m_c_prev,)), m_c_prev a view of m_z.
        """
        F_c, F_p = factors_t
        (m_c,) = m_state
        two, N, P = m_h.shape
        m_p = m_h if weights.w_hr is None else (m_h.reshape(two * N, P) @ weights.w_hr).view(two, N, -1)
        m_z5 = m_z.view(two, N, 5, -1)
        torch.mul(m_c.unsqueeze(2), F_c, out=m_z5).addcmul_(m_p.unsqueeze(2), F_p)
        gates = weights.w_hh.shape[0]
        m_h_prev = _recurrent_multiplier(m_z[..., :gates], weights.w_hh, grad_prev)
        return m_h_prev.view(two, N, P), (m_z5[:, :, 4],)


def _recurrent_multiplier(m_side: Tensor, w_hh: Tensor, grad_prev: Tensor | None) -> Tensor:
    """``m_side (2, N, G) @ w_hh (G, P)`` as (B, P), plus ``grad_prev`` (B, P) when given.
    m_side may be a column slice of a wider row (its rows then have a larger stride)."""
    two, N, G = m_side.shape
    flat = m_side.as_strided((two * N, G), (m_side.stride(1), 1))
    return flat @ w_hh if grad_prev is None else torch.addmm(grad_prev, flat, w_hh)


class GRUWeights(NamedTuple):
    """One GRU layer-direction, gate order r, z, n, with the n rows doubled (see
    :meth:`GRURule.weights`).

    w_ih (3H, I); w_hh (3H, H); bias_x (3H,) = b_ih + (b_hr, b_hz, 0) or None (the r and z
    biases of both sides, added once with the input projection); b_hn (H,) or None;
    w_rz_t (H, 2H) and w_n_t (H, H): the transposed r, z and n rows of w_hh, contiguous.
    """

    w_ih: Tensor
    w_hh: Tensor
    bias_x: Tensor | None
    b_hn: Tensor | None
    w_rz_t: Tensor
    w_n_t: Tensor


class GRURule(_CellRule):
    """PyTorch's GRU equations, every product a two-operand Shapley product:

    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz + W_hz h + b_hz)``,
    ``hn = W_hn h + b_hn``, ``n = tanh(W_in x + b_in + r ⊙ hn)``, ``h' = (1 − z) ⊙ n + z ⊙ h``.

    The n rows of the weights are doubled, so the buffers hold ``hn' = 2 hn`` and the step
    computes ``u = 2 pre_n = W'_in x + b'_in + r ⊙ hn'`` and ``n = 2σ(u) − 1``: one sigmoid
    kernel instead of a (slower) tanh, the same rule in exact arithmetic.

    State ``(h,)`` with h (B, H). Forward buffers: GX (T, B, 3H), the input projection, whose
    r and z columns each step completes in place to the pre-activations pre_r, pre_z; HN
    (T, B, H) = hn'; OUT (T, B, H). Backward recomputes the gates.
    """

    name = "GRU"
    reads_output = True  # h_prev: the Shapley mean of h in h' = (1 − z) n + z h

    @staticmethod
    def weights(w_ih, w_hh, b_ih, b_hh, w_hr=None) -> GRUWeights:
        """The layer's weights with n's rows doubled (``u = 2 pre_n``)."""
        w_ih, w_hh, b_ih, b_hh = (_double_block(w, 2, 3) for w in (w_ih, w_hh, b_ih, b_hh))
        H = w_hh.shape[1]
        bias_x = b_hn = None
        if b_ih is not None:
            bias_x = torch.cat((b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]))
            b_hn = b_hh[2 * H :]
        return GRUWeights(w_ih, w_hh, bias_x, b_hn, w_hh[: 2 * H].T.contiguous(), w_hh[2 * H :].T.contiguous())

    @staticmethod
    def forward_buffers(weights: GRUWeights, x: Tensor):
        GX = _input_projection(weights.w_ih, weights.bias_x, x)
        H = weights.w_hh.shape[1]
        return GX, x.new_empty(*x.shape[:2], H), x.new_empty(*x.shape[:2], H)

    @staticmethod
    def step_workspace(weights: GRUWeights, x: Tensor):
        """Scratch reused by every step: gates (B, 3H) = [r, z, n] and h − n (B, H)."""
        gates = x.new_empty(x.shape[1], weights.w_hh.shape[0])
        H = weights.w_hh.shape[1]
        return gates[:, : 2 * H], gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H :], x.new_empty(x.shape[1], H)

    @staticmethod
    def step(weights: GRUWeights, views, state: tuple[Tensor], work):
        gx, hn, h_new = views
        (h,) = state
        rz, r, z, n, h_minus_n = work
        H = h.shape[1]
        torch.sigmoid(gx[:, : 2 * H].addmm_(h, weights.w_rz_t), out=rz)
        if weights.b_hn is None:
            torch.mm(h, weights.w_n_t, out=hn)
        else:
            torch.addmm(weights.b_hn, h, weights.w_n_t, out=hn)
        # n = tanh(pre_n) = 2σ(u) − 1 with u = 2 pre_n = gx_n' + r ⊙ hn'
        torch.addcmul(gx[:, 2 * H :], r, hn, out=n).sigmoid_().sub_(0.5).mul_(2.0)
        return (torch.addcmul(n, z, torch.sub(h, n, out=h_minus_n), out=h_new),)

    @staticmethod
    def coefficients(weights: GRUWeights, buffers, state0, t0: int, t1: int):
        """Returns K_x (τ, N, 3, H), the factors from m_h' to the pre-activations (r, z, u);
        K_h (τ, N, 3, H), the same to the recurrent side (r, z, hn'); mean(z) (τ, N, H)."""
        GX, HN, OUT = buffers
        gx, hn = GX[t0:t1], HN[t0:t1]
        H = hn.shape[-1]
        pre_rz = gx[..., : 2 * H]
        sig_rz = torch.sigmoid(pre_rz)
        r, z = sig_rz[..., :H], sig_rz[..., H:]
        u = torch.addcmul(gx[..., 2 * H :], r, hn)
        mean_n = shapley_mean(torch.sigmoid(u)).mul_(2.0).sub_(1.0)
        rescale_r, rescale_z = rescale_sigmoid(*_halves(pre_rz)).split(H, dim=-1)
        K = hn.new_empty(t1 - t0, hn.shape[1] // 2, 3, H)
        K_r, K_z, K_n = K.unbind(2)
        # h' = (1−z)⊙n + z⊙h:  m_z = m·(mean(h) − mean(n)),  m_n = m·mean(1 − z),  m_h = m·mean(z).
        # 1 − z is evaluated as σ(−pre_z): where z saturates at 1, 1.0 − z keeps no digits.
        torch.sub(shapley_mean(_previous(OUT, state0[0], t0, t1)), mean_n, out=K_z).mul_(rescale_z)
        # n = 2σ(u) − 1: dn/du = 2σ'(u)
        torch.mul(shapley_mean(torch.sigmoid(pre_rz[..., H:].neg())), rescale_sigmoid(*_halves(u)), out=K_n)
        K_n.mul_(2.0)
        # r ⊙ hn':  m_r = m_u·mean(hn'),  m_hn' = m_u·mean(r)
        torch.mul(shapley_mean(hn), rescale_r, out=K_r).mul_(K_n)
        K_h = K.clone()
        K_h[:, :, 2].mul_(shapley_mean(r))
        return K, K_h, shapley_mean(z)

    @staticmethod
    def step_backward(weights: GRUWeights, coeffs_t, m_h: Tensor, m_state, m_z: Tensor, grad_prev):
        """m_z (2, N, 3H) written with the pre-activations' multipliers (r, z, u); returns
        (m_h_prev (2, N, H), ())."""
        K_x, K_h, mean_z = coeffs_t
        two, N, H = m_h.shape
        m_h3 = m_h.unsqueeze(2)
        torch.mul(m_h3, K_x, out=m_z.view(two, N, 3, H))
        m_h_prev = _recurrent_multiplier((m_h3 * K_h).view(two, N, 3 * H), weights.w_hh, grad_prev)
        return m_h_prev.view(two, N, H).addcmul_(m_h, mean_z), ()


class RNNWeights(NamedTuple):
    """One Elman RNN layer-direction: w_ih (H, I), w_hh (H, H), bias (H,) = b_ih + b_hh or None."""

    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor | None


class RNNRule(_CellRule):
    """``h' = φ(W_ih x + b_ih + W_hh h + b_hh)`` with φ = tanh or relu, by Rescale.

    State ``(h,)``. Forward buffers: pre-activations PRE (T, B, H) and OUT (T, B, H).
    """

    name = "RNN"

    def __init__(self, nonlinearity: str = "tanh"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self._rescale = rescale_tanh if nonlinearity == "tanh" else rescale_relu

    @staticmethod
    def weights(w_ih, w_hh, b_ih, b_hh, w_hr=None) -> RNNWeights:
        bias = None if b_ih is None else b_ih + b_hh
        return RNNWeights(w_ih, w_hh, bias)

    @staticmethod
    def forward_buffers(weights: RNNWeights, x: Tensor):
        PRE = _input_projection(weights.w_ih, weights.bias, x)
        return PRE, torch.empty_like(PRE)

    @staticmethod
    def step_workspace(weights: RNNWeights, x: Tensor):
        return None

    def step(self, weights: RNNWeights, views, state: tuple[Tensor], work):
        pre, h_new = views
        pre.addmm_(state[0], weights.w_hh.T)
        if self.nonlinearity == "tanh":
            return (torch.tanh(pre, out=h_new),)
        return (torch.clamp(pre, min=0, out=h_new),)

    def coefficients(self, weights: RNNWeights, buffers, state0, t0: int, t1: int):
        """Returns (R (τ, N, H),)."""
        return (self._rescale(*_halves(buffers[0][t0:t1])),)

    @staticmethod
    def step_backward(weights: RNNWeights, coeffs_t, m_h: Tensor, m_state, m_z: Tensor, grad_prev):
        (R,) = coeffs_t
        torch.mul(m_h, R, out=m_z)
        return _recurrent_multiplier(m_z, weights.w_hh, grad_prev).view(m_h.shape), ()
