"""Whole recurrent models as people write them: a recurrent layer with a head around it.

Shared by ``tests/test_whole_models.py`` and ``benchmarks/whole_models.py``. Every model takes
one-hot sequences ``(N, 4, L)`` (the input format all three engines accept, tangermeme's
included) and returns ``(N, 2)``; each head family uses the functional calls and modules a user
would, without any rewriting for the explainer:

==========================  ========  =========================================================
family                      layer     head
==========================  ========  =========================================================
attention_nn_softmax        LSTM      additive attention: scores, ``nn.Softmax(dim=1)``, ``w * h``
attention_torch_softmax     GRU       ``torch.softmax`` over time and an elementwise product
relu_head                   RNN       last step, ``torch.relu`` between two Linear layers
layernorm_head              LSTM      ``nn.LayerNorm`` on every step, mean over time
mha_batch_first             LSTM      ``nn.MultiheadAttention(batch_first=True)`` self-attention
mha_time_major              GRU       time-major LSTM input, ``nn.MultiheadAttention(batch_first=False)``
time_major_softmax_tanh     LSTM      ``batch_first=False``, softmax over dim 0, ``torch.tanh``
bmm_attention               GRU       scaled dot-product attention written with ``torch.bmm``
sigmoid_gelu_gate           LSTM      ``torch.sigmoid(a) * F.gelu(b)`` gate on the last step
rmsnorm_glu_amax            GRU       ``nn.RMSNorm``, ``F.glu``, ``amax`` over time
==========================  ========  =========================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS, LENGTH, HIDDEN, OUTPUTS = 4, 10, 8, 2


class _Base(nn.Module):
    """(N, 4, L) one-hot -> (N, L, 4) (or (L, N, 4) time-major) -> recurrent layer -> head."""

    rnn_type = nn.LSTM
    batch_first = True

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.rnn = self.rnn_type(CHANNELS, hidden, batch_first=self.batch_first)
        self.out = nn.Linear(hidden, OUTPUTS)

    def sequence(self, x):
        """The recurrent layer's output: (N, L, H), or (L, N, H) when time-major."""
        x = x.transpose(1, 2) if self.batch_first else x.permute(2, 0, 1)
        return self.rnn(x)[0]


class AttentionNNSoftmax(_Base):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.score = nn.Linear(hidden, 1)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        h = self.sequence(x)
        weights = self.softmax(self.score(h))  # (N, L, 1)
        return self.out((weights * h).sum(dim=1))


class AttentionTorchSoftmax(_Base):
    rnn_type = nn.GRU

    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.score = nn.Linear(hidden, hidden)
        self.query = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))

    def forward(self, x):
        h = self.sequence(x)
        scores = torch.tanh(self.score(h)) @ self.query  # (N, L)
        weights = torch.softmax(scores, dim=1)
        return self.out((weights.unsqueeze(-1) * h).sum(dim=1))


class ReluHead(_Base):
    rnn_type = nn.RNN

    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.hidden = nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.sequence(x)[:, -1]
        return self.out(torch.relu(self.hidden(h)))


class LayerNormHead(_Base):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return self.out(self.norm(self.sequence(x)).mean(dim=1))


class MHABatchFirst(_Base):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.attention = nn.MultiheadAttention(hidden, num_heads=2, batch_first=True)

    def forward(self, x):
        h = self.sequence(x)
        context, _ = self.attention(h, h, h)
        return self.out(context.mean(dim=1))


class MHATimeMajor(_Base):
    rnn_type = nn.GRU
    batch_first = False

    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.attention = nn.MultiheadAttention(hidden, num_heads=2)

    def forward(self, x):
        h = self.sequence(x)  # (L, N, H)
        context, _ = self.attention(h, h, h, need_weights=False)
        return self.out(context.mean(dim=0))


class TimeMajorSoftmaxTanh(_Base):
    batch_first = False

    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.score = nn.Linear(hidden, 1)
        self.hidden = nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.sequence(x)  # (L, N, H)
        weights = torch.softmax(self.score(h), dim=0)  # over time, the batch on dim 1
        pooled = (weights * h).sum(dim=0)
        return self.out(torch.tanh(self.hidden(pooled)))


class BmmAttention(_Base):
    rnn_type = nn.GRU

    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x):
        h = self.sequence(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        context = torch.bmm(torch.softmax(scores, dim=-1), v)
        return self.out(context.mean(dim=1))


class SigmoidGeluGate(_Base):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.gate, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.sequence(x)[:, -1]
        return self.out(torch.sigmoid(self.gate(h)) * F.gelu(self.value(h)))


class RMSNormGluAmax(_Base):
    rnn_type = nn.GRU

    def __init__(self, hidden: int = HIDDEN):
        super().__init__(hidden)
        self.norm = nn.RMSNorm(hidden)
        self.expand = nn.Linear(hidden, 2 * hidden)

    def forward(self, x):
        h = F.glu(self.expand(self.norm(self.sequence(x))), dim=-1)  # (N, L, H)
        return self.out(h.amax(dim=1))


FAMILIES = {
    "attention_nn_softmax": AttentionNNSoftmax,
    "attention_torch_softmax": AttentionTorchSoftmax,
    "relu_head": ReluHead,
    "layernorm_head": LayerNormHead,
    "mha_batch_first": MHABatchFirst,
    "mha_time_major": MHATimeMajor,
    "time_major_softmax_tanh": TimeMajorSoftmaxTanh,
    "bmm_attention": BmmAttention,
    "sigmoid_gelu_gate": SigmoidGeluGate,
    "rmsnorm_glu_amax": RMSNormGluAmax,
}


def one_hot(n: int, generator: torch.Generator, dtype, length: int = LENGTH) -> torch.Tensor:
    """(n, 4, length) random one-hot sequences."""
    index = torch.randint(CHANNELS, (n, length), generator=generator)
    return F.one_hot(index, CHANNELS).transpose(1, 2).to(dtype)


def make(
    family: str,
    dtype=torch.float64,
    n: int = 3,
    n_references: int = 4,
    seed: int = 0,
    hidden: int = HIDDEN,
    length: int = LENGTH,
):
    """(model in eval mode, X (n, 4, length), references (n_references, 4, length)), in ``dtype``."""
    torch.manual_seed(seed)
    model = FAMILIES[family](hidden).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, one_hot(n, g, dtype, length), one_hot(n_references, g, dtype, length)
