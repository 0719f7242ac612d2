"""The DeepLIFT / DeepSHAP rule for recurrent cells, one class per cell type.

Every engine integration (shap, Captum, tangermeme) ends up here: the autograd Function in
:mod:`torch_handler.function` runs a cell's ``step`` forward through time on the doubled batch
``cat([actual, reference])``, writing into the rule's ``forward_buffers``, and, in backward,
turns output multipliers into input multipliers with ``coefficients`` (vectorised over a
chunk of steps) and ``step_backward``. Nothing else in the package knows the cell equations.

Notation (RULES.md §1): every quantity has an actual value ``a`` (first half of the batch)
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
    here (the JAX oracle uses a threshold and other closed forms; the two agree to rounding).
    """
    lo = torch.minimum(z_a, z_r)
    hi = torch.maximum(z_a, z_r)
    d = (hi - lo).clamp_min_(torch.finfo(lo.dtype).tiny)
    ratio = torch.expm1(d.neg()).div_(d).neg_()
    return torch.sigmoid(hi).mul_(torch.sigmoid(lo.neg_())).mul_(ratio)


def rescale_tanh(z_a: Tensor, z_r: Tensor) -> Tensor:
    """Rescale factor ``(tanh(z_a) − tanh(z_r)) / (z_a − z_r)``, accurate for every Δz.

    ``tanh(z) = 2σ(2z) − 1``, hence the factor is ``4 · rescale_sigmoid(2 z_a, 2 z_r)``.
    """
    return 4.0 * rescale_sigmoid(2.0 * z_a, 2.0 * z_r)


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
    """Weights of one LSTM layer-direction, torch layout, gate order i, f, g, o.

    w_ih (4H, I); w_hh (4H, P); bias (4H,) = b_ih + b_hh or None; w_hr (P, H) or None.
    """

    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor | None
    w_hr: Tensor | None


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


class LSTMRule:
    """``z = W_ih x + W_hh h + b``; ``i, f, o = σ(z_·)``, ``g = tanh(z_g)``;
    ``c' = f ⊙ c + i ⊙ g``; ``h' = o ⊙ tanh(c')`` (times ``W_hr`` with a projection).

    State ``(h, c)``: h (B, P), c (B, H). Forward buffers: the pre-activations Z (T, B, 4H)
    (the input projection, to which each step adds its recurrent part in place), the cell
    states C (T, B, H) and the output OUT (T, B, P). The gates are recomputed from Z in
    backward: saving only Z and C keeps memory below native autograd's.
    """

    name = "LSTM"

    @staticmethod
    def weights(w_ih, w_hh, b_ih, b_hh, w_hr=None) -> LSTMWeights:
        bias = None if b_ih is None else b_ih + b_hh
        return LSTMWeights(w_ih, w_hh, bias, w_hr)

    @staticmethod
    def forward_buffers(weights: LSTMWeights, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        Z = _input_projection(weights.w_ih, weights.bias, x)
        T, B = x.shape[:2]
        H = weights.w_hh.shape[0] // 4
        P = H if weights.w_hr is None else weights.w_hr.shape[0]
        return Z, x.new_empty(T, B, H), x.new_empty(T, B, P)

    @staticmethod
    def step(weights: LSTMWeights, buffers, t: int, state: tuple[Tensor, Tensor]):
        """One forward step, writing Z[t], C[t], OUT[t]. Returns the new state (views)."""
        Z, C, OUT = buffers
        h, c = state
        z = Z[t].addmm_(h, weights.w_hh.T)
        H = c.shape[1]
        # One sigmoid over all four gates, then g's tanh: fewer kernels per step.
        gates = torch.sigmoid(z)
        g = torch.tanh(z[:, 2 * H : 3 * H])
        i, f, _, o = gates.chunk(4, dim=1)
        c_new = torch.addcmul(f * c, i, g, out=C[t])
        if weights.w_hr is None:
            h_new = torch.mul(o, torch.tanh(c_new), out=OUT[t])
        else:
            h_new = torch.mm(o * torch.tanh(c_new), weights.w_hr.T, out=OUT[t])
        return h_new, c_new

    @staticmethod
    def coefficients(weights: LSTMWeights, buffers, state0, t0: int, t1: int):
        """Per-pair rule coefficients for steps t0..t1-1 at once (vectorised over time).

        Returns K (τ, N, 4, H), the gate-input factors; A (τ, N, H) = mean(o)·R_tanh(c');
        Kc (τ, N, H) = mean(f). (τ = t1 − t0.)
        """
        Z, C, _ = buffers
        z, c_new = Z[t0:t1], C[t0:t1]
        c_prev = _previous(C, state0[1], t0, t1)
        H = c_new.shape[-1]
        # tanh(z) = 2σ(2z) − 1: with g's pre-activations doubled, one sigmoid and one Rescale
        # call serve all four gates (g's factor is then 4 · R_σ(2z_a, 2z_r)).
        z = z.clone()
        z[..., 2 * H : 3 * H] *= 2.0
        gates = torch.sigmoid(z)
        gates[..., 2 * H : 3 * H].mul_(2.0).sub_(1.0)
        rescale = rescale_sigmoid(*_halves(z))
        rescale[..., 2 * H : 3 * H] *= 4.0
        mean_i, mean_f, mean_g, mean_o = shapley_mean(gates).chunk(4, dim=-1)
        r_i, r_f, r_g, r_o = rescale.chunk(4, dim=-1)
        # m_i = m_c'·mean(g), m_f = m_c'·mean(c), m_g = m_c'·mean(i), m_o = m_h'·mean(tanh c')
        K = torch.stack(
            (mean_g * r_i, shapley_mean(c_prev) * r_f, mean_i * r_g, shapley_mean(torch.tanh(c_new)) * r_o),
            dim=2,
        )
        A = mean_o * rescale_tanh(*_halves(c_new))
        return K, A, mean_f

    @staticmethod
    def step_backward(weights: LSTMWeights, coeffs_t, m_h: Tensor, m_state: tuple[Tensor, ...]):
        """One backward step on multipliers viewed as (2, N, ·).

        m_h: multiplier of h' (2, N, P), already including the output's; m_state = (m_c',).
        Returns (m_z (2, N, 4H), m_h_prev (2, N, P), (m_c_prev,)).
        """
        K, A, Kc = coeffs_t
        (m_c,) = m_state
        m_p = m_h if weights.w_hr is None else m_h @ weights.w_hr
        m_c_total = torch.addcmul(m_c, m_p, A)
        m_z = torch.stack((m_c_total, m_c_total, m_c_total, m_p), dim=2).mul_(K).flatten(2)
        return m_z, m_z @ weights.w_hh, (m_c_total.mul_(Kc),)


class GRUWeights(NamedTuple):
    """One GRU layer-direction, gate order r, z, n: w_ih (3H, I), w_hh (3H, H), b_ih, b_hh (3H,)."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None


class GRURule:
    """PyTorch's GRU equations, every product a two-operand Shapley product:

    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz + W_hz h + b_hz)``,
    ``hn = W_hn h + b_hn``, ``n = tanh(W_in x + b_in + r ⊙ hn)``, ``h' = (1 − z) ⊙ n + z ⊙ h``.

    State ``(h,)`` with h (B, H). Forward buffers: the input side GX (T, B, 3H), the
    recurrent side GH (T, B, 3H) and OUT (T, B, H); backward recomputes the gates.
    """

    name = "GRU"

    @staticmethod
    def weights(w_ih, w_hh, b_ih, b_hh, w_hr=None) -> GRUWeights:
        return GRUWeights(w_ih, w_hh, b_ih, b_hh)

    @staticmethod
    def forward_buffers(weights: GRUWeights, x: Tensor):
        GX = _input_projection(weights.w_ih, weights.b_ih, x)
        return GX, torch.empty_like(GX), x.new_empty(*x.shape[:2], weights.w_hh.shape[1])

    @staticmethod
    def step(weights: GRUWeights, buffers, t: int, state: tuple[Tensor]):
        GX, GH, OUT = buffers
        (h,) = state
        H = h.shape[1]
        if weights.b_hh is None:
            gh = torch.mm(h, weights.w_hh.T, out=GH[t])
        else:
            gh = torch.addmm(weights.b_hh, h, weights.w_hh.T, out=GH[t])
        gx = GX[t]
        rz = torch.sigmoid(gx[:, : 2 * H] + gh[:, : 2 * H])
        r, z = rz.chunk(2, dim=1)
        n = torch.tanh(torch.addcmul(gx[:, 2 * H :], r, gh[:, 2 * H :]))
        return (torch.addcmul(n, z, h - n, out=OUT[t]),)

    @staticmethod
    def _pointwise(buffers, state0, t0: int, t1: int):
        GX, GH, OUT = buffers
        gx, gh = GX[t0:t1], GH[t0:t1]
        H = gh.shape[-1] // 3
        pre_rz = gx[..., : 2 * H] + gh[..., : 2 * H]
        r, z = torch.sigmoid(pre_rz).chunk(2, dim=-1)
        h_n = gh[..., 2 * H :]
        pre_n = torch.addcmul(gx[..., 2 * H :], r, h_n)
        return pre_rz, r, z, h_n, pre_n, torch.tanh(pre_n), _previous(OUT, state0[0], t0, t1)

    @staticmethod
    def coefficients(weights: GRUWeights, buffers, state0, t0: int, t1: int):
        """Returns K_n, K_r, K_z, mean(r), mean(z), each (τ, N, H)."""
        pre_rz, r, z, h_n, pre_n, n, h_prev = GRURule._pointwise(buffers, state0, t0, t1)
        H = h_n.shape[-1]
        rescale_r, rescale_z = rescale_sigmoid(*_halves(pre_rz)).split(H, dim=-1)
        mean_z = shapley_mean(z)
        # h' = (1−z)⊙n + z⊙h:  m_z = m·(mean(h) − mean(n)),  m_n = m·mean(1 − z),  m_h = m·mean(z).
        # 1 − z is evaluated as σ(−pre_z): where z saturates at 1, 1.0 − z keeps no digits.
        K_z = (shapley_mean(h_prev) - shapley_mean(n)) * rescale_z
        K_n = shapley_mean(torch.sigmoid(-pre_rz[..., H:])) * rescale_tanh(*_halves(pre_n))
        # r ⊙ hn:  m_r = m·mean(hn),  m_hn = m·mean(r)
        K_r = shapley_mean(h_n) * rescale_r
        return K_n, K_r, K_z, shapley_mean(r), mean_z

    @staticmethod
    def step_backward(weights: GRUWeights, coeffs_t, m_h: Tensor, m_state: tuple[Tensor, ...]):
        """Returns (m_x_side (2, N, 3H), m_h_prev (2, N, H), ())."""
        K_n, K_r, K_z, mean_r, mean_z = coeffs_t
        m_pre_n = m_h * K_n
        m_pre_r = m_pre_n * K_r
        m_pre_z = m_h * K_z
        m_x_side = torch.cat((m_pre_r, m_pre_z, m_pre_n), dim=-1)
        m_h_side = torch.cat((m_pre_r, m_pre_z, m_pre_n * mean_r), dim=-1)
        m_h_prev = torch.addcmul(m_h_side @ weights.w_hh, m_h, mean_z)
        return m_x_side, m_h_prev, ()


class RNNWeights(NamedTuple):
    """One Elman RNN layer-direction: w_ih (H, I), w_hh (H, H), bias (H,) = b_ih + b_hh or None."""

    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor | None


class RNNRule:
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

    def step(self, weights: RNNWeights, buffers, t: int, state: tuple[Tensor]):
        PRE, OUT = buffers
        pre = PRE[t].addmm_(state[0], weights.w_hh.T)
        if self.nonlinearity == "tanh":
            return (torch.tanh(pre, out=OUT[t]),)
        return (torch.clamp(pre, min=0, out=OUT[t]),)

    def coefficients(self, weights: RNNWeights, buffers, state0, t0: int, t1: int):
        """Returns (R (τ, N, H),)."""
        return (self._rescale(*_halves(buffers[0][t0:t1])),)

    @staticmethod
    def step_backward(weights: RNNWeights, coeffs_t, m_h: Tensor, m_state: tuple[Tensor, ...]):
        (R,) = coeffs_t
        m_pre = m_h * R
        return m_pre, m_pre @ weights.w_hh, ()
