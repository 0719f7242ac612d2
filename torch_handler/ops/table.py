"""The op table: one entry per op, keyed by the op's name (the same names as the JAX twins'
table, ``reference_jax.ops.table``), from which everything else about the op is derived.

An entry (:class:`OpEntry`) holds

* ``rule``: the op's DeepLIFT rule (:mod:`torch_handler.ops.rules`);
* ``calls``: the torch functions and methods that reach it (``"relu"`` covers ``torch.relu``,
  ``F.relu``, ``Tensor.relu`` and ``nn.ReLU``'s call; ``relu_`` is its in-place form), each with
  its reader, which says how the call's operands and parameters are read
  (:mod:`torch_handler.ops.interception.calls`: ``unary_call``, ``binary_call``,
  ``single_call`` with a parse function, or ``call`` for a handler that reads the call itself);
* ``cases``: how models call it, as heads on an input-dependent tensor ``h`` of shape
  ``(N, L, 6)`` (a recurrent layer's output, values in (−1, 1)); ``tests/test_op_table.py``
  explains a model with each head through shap, Captum and tangermeme.

Derived: :data:`OP_RULES` (name -> rule), :data:`CALL_READERS` (torch call name -> reader, for
the interception), the docs table (``crosscheck/op_tables.py``). The rule-level test cases
(operand shapes, domains, parameters) are the JAX twin's entry's, shared through the
crosscheck.

Adding an op: its rule in the module of its family under ``rules/``, and one entry here (plus
its twin and one entry in ``reference_jax/ops/table.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_handler.ops.interception.calls import (
    Reader,
    arg,
    binary_call,
    call,
    const,
    dim_of,
    read_baddbmm,
    read_clamp,
    read_div,
    read_einsum,
    read_linear,
    read_matmul,
    read_max,
    read_mul,
    read_pow,
    read_sdpa,
    single_call,
    unary_call,
)
from torch_handler.ops.rules import attention, bilinear, binary, norms, reductions, softmax, unary

__all__ = ["CALL_READERS", "OP_RULES", "OP_TABLE", "OpEntry", "rule_for"]


class Case(NamedTuple):
    """A head that calls the op on an input-dependent tensor ``h`` (N, L, 6)."""

    id: str
    head: Callable[[Tensor], Tensor]


class OpEntry(NamedTuple):
    """One op: its rule, the torch calls that reach it (name -> reader), the cases its engine
    tests draw."""

    rule: Callable
    calls: Mapping[str, Reader]
    cases: tuple[Case, ...]


def _cases(**heads: Callable[[Tensor], Tensor]) -> tuple[Case, ...]:
    return tuple(Case(k, v) for k, v in heads.items())


def _split(h: Tensor) -> tuple[Tensor, Tensor]:
    """Two input-dependent operands of one shape: h's first and last three features."""
    return h[..., :3], h[..., 3:]


# --------------------------------------------------------------------------- parse functions
# parse(x, args, kwargs) -> (params for the rule, reduced dims, keepdim, constant tensors), or
# None when the call is not a form the rule covers (it is then reported as an op without a rule).

def _parse_softmax(x, args, kwargs):
    dim = dim_of(args, kwargs)
    if dim is None or arg(args, kwargs, 3 if len(args) > 3 else 2, "dtype") is not None:
        return None
    return {"dim": dim}, [], True, []


def _parse_logsumexp(x, args, kwargs):
    dim = dim_of(args, kwargs)
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    keepdim = arg(args, kwargs, 2, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def _parse_amax(x, args, kwargs):
    dim = dim_of(args, kwargs, default=())
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    if not isinstance(dim, int):
        return None
    keepdim = arg(args, kwargs, 2, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def _parse_glu(x, args, kwargs):
    return {"dim": dim_of(args, kwargs, default=-1)}, [], True, []


def _parse_layer_norm(x, args, kwargs):
    shape = tuple(arg(args, kwargs, 1, "normalized_shape"))
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = arg(args, kwargs, 4, "eps", 1e-5)
    dims = list(range(x.dim() - len(shape), x.dim()))
    params = {"normalized_shape": shape, "weight": const(weight), "bias": const(bias), "eps": eps}
    return params, dims, True, [t for t in (weight, bias) if isinstance(t, Tensor)]


def _parse_rms_norm(x, args, kwargs):
    shape = tuple(arg(args, kwargs, 1, "normalized_shape"))
    weight = arg(args, kwargs, 2, "weight")
    eps = arg(args, kwargs, 3, "eps")
    dims = list(range(x.dim() - len(shape), x.dim()))
    params = {"normalized_shape": shape, "weight": const(weight), "eps": eps}
    return params, dims, True, [t for t in (weight,) if isinstance(t, Tensor)]


def _parse_vector_norm(x, args, kwargs):
    ord_ = arg(args, kwargs, 1, "ord" if "ord" in kwargs or len(args) > 1 else "p", 2)
    if "p" in kwargs:
        ord_ = kwargs["p"]
    if ord_ not in (2, 2.0, "fro") or arg(args, kwargs, 4, "dtype") is not None:
        return None
    dim = arg(args, kwargs, 2, "dim")
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    if dim is None:
        return None
    keepdim = arg(args, kwargs, 3, "keepdim", False)
    return {"dim": dim, "keepdim": keepdim}, [dim], keepdim, []


def _parse_variance(x, args, kwargs):
    """var / std over one dim: ``(x, dim, *, correction=1, keepdim=False)`` or the older
    ``(x, dim, unbiased, keepdim)``. Over every dim (the doubled batch too), or several: None."""
    rest = list(args[1:])
    dim = kwargs.get("dim", rest[0] if rest else None)
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:
            return None
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    correction = kwargs.get("correction", 1)
    if "unbiased" in kwargs or len(rest) > 1:
        correction = 1 if kwargs.get("unbiased", rest[1] if len(rest) > 1 else True) else 0
    keepdim = kwargs.get("keepdim", rest[2] if len(rest) > 2 else False)
    return {"dim": dim, "correction": correction, "keepdim": keepdim}, [dim], keepdim, []


# --------------------------------------------------------------------------- the table

_CLAMP_CALLS = ("clamp", "clip", "clamp_min", "clamp_max", "hardtanh")
_POW_CALLS = ("pow", "__pow__", "__rpow__", "float_power")

OP_TABLE: dict[str, OpEntry] = {
    # -- unary (Rescale) ------------------------------------------------------------------
    "relu": OpEntry(unary.relu, {"relu": unary_call()},
                    _cases(torch_relu=torch.relu, module=nn.ReLU(), inplace=lambda h: F.relu(h * 1.0, inplace=True))),
    "leaky_relu": OpEntry(unary.leaky_relu, {"leaky_relu": unary_call(("negative_slope", 1, 0.01))},
                          _cases(functional=lambda h: F.leaky_relu(h, 0.2), module=nn.LeakyReLU(0.1))),
    "relu6": OpEntry(unary.relu6, {"relu6": unary_call()}, _cases(functional=lambda h: F.relu6(4 * h + 3))),
    "elu": OpEntry(unary.elu, {"elu": unary_call(("alpha", 1, 1.0))}, _cases(module=nn.ELU(1.3))),
    "gelu": OpEntry(unary.gelu, {"gelu": unary_call(("approximate", 1, "none"))},
                    _cases(exact=F.gelu, tanh=lambda h: F.gelu(h, approximate="tanh"))),
    "silu": OpEntry(unary.silu, {"silu": unary_call()}, _cases(functional=F.silu, module=nn.SiLU())),
    "softplus": OpEntry(unary.softplus, {"softplus": unary_call(("beta", 1, 1.0), ("threshold", 2, 20.0))},
                        _cases(functional=F.softplus, beta=lambda h: F.softplus(h, beta=2.0, threshold=1.0))),
    "sigmoid": OpEntry(unary.sigmoid, {"sigmoid": unary_call(), "expit": unary_call()},
                       _cases(torch_sigmoid=torch.sigmoid, method=lambda h: (2 * h).sigmoid())),
    "tanh": OpEntry(unary.tanh, {"tanh": unary_call()}, _cases(torch_tanh=lambda h: torch.tanh(3 * h))),
    "exp": OpEntry(unary.exp, {"exp": unary_call()}, _cases(torch_exp=torch.exp)),
    "log": OpEntry(unary.log, {"log": unary_call()}, _cases(torch_log=lambda h: torch.log(h + 1.5))),
    "sqrt": OpEntry(unary.sqrt, {"sqrt": unary_call()}, _cases(torch_sqrt=lambda h: torch.sqrt(h + 1.5))),
    "rsqrt": OpEntry(unary.rsqrt, {"rsqrt": unary_call()}, _cases(torch_rsqrt=lambda h: torch.rsqrt(h + 1.5))),
    "reciprocal": OpEntry(unary.reciprocal, {"reciprocal": unary_call()},
                          _cases(method=lambda h: (h + 1.5).reciprocal())),
    "square": OpEntry(unary.square, {"square": unary_call()}, _cases(torch_square=torch.square)),
    "abs": OpEntry(unary.absolute, {"abs": unary_call(), "absolute": unary_call(), "__abs__": unary_call()},
                   _cases(torch_abs=torch.abs, builtin=lambda h: abs(h - 0.1))),
    "clamp": OpEntry(unary.clamp, {name: call(read_clamp) for name in _CLAMP_CALLS},
                     _cases(clamp=lambda h: h.clamp(-0.2, 0.3), clamp_min=lambda h: torch.clamp_min(h, 0.1),
                            hardtanh=lambda h: F.hardtanh(2 * h, -0.5, 0.5))),
    # reached through pow's calls when the exponent is a number
    "pow_scalar": OpEntry(unary.pow_scalar, {}, _cases(square=lambda h: h**2, root=lambda h: (h + 1.5) ** 0.5)),
    # -- binary (two-player Shapley) --------------------------------------------------------
    "mul": OpEntry(binary.mul, {name: call(read_mul) for name in ("mul", "__mul__", "__rmul__", "multiply")},
                   _cases(operator=lambda h: _split(h)[0] * _split(h)[1])),
    "div": OpEntry(binary.div, {name: call(read_div) for name in (
                       "div", "divide", "true_divide", "__truediv__", "__div__", "__rtruediv__", "__rdiv__")},
                   _cases(operator=lambda h: _split(h)[0] / (_split(h)[1] + 1.5))),
    "maximum": OpEntry(binary.maximum, {"maximum": binary_call(), "fmax": binary_call()},
                       _cases(torch_maximum=lambda h: torch.maximum(*_split(h)))),
    "minimum": OpEntry(binary.minimum, {"minimum": binary_call(), "fmin": binary_call()},
                       _cases(torch_minimum=lambda h: torch.minimum(*_split(h)))),
    "pow": OpEntry(binary.power, {name: call(read_pow) for name in _POW_CALLS},
                   _cases(operator=lambda h: (_split(h)[0] + 1.5) ** _split(h)[1])),
    "atan2": OpEntry(binary.atan2, {"atan2": binary_call(), "arctan2": binary_call()},
                     _cases(torch_atan2=lambda h: torch.atan2(*_split(h)))),
    # -- bilinear ---------------------------------------------------------------------------------
    "matmul": OpEntry(bilinear.matmul, {name: call(read_matmul) for name in ("matmul", "__matmul__", "__rmatmul__")},
                      _cases(operator=lambda h: h @ h.transpose(-1, -2))),
    "bmm": OpEntry(bilinear.bmm, {"bmm": call(read_matmul)},
                   _cases(torch_bmm=lambda h: torch.bmm(h, h.transpose(1, 2)))),
    # No call: torch.mm's operands are 2-D, so two input-dependent ones always mix the pairs of
    # the doubled batch (DoubledBatchError); the rule serves pairs (crosscheck) and callers.
    "mm": OpEntry(bilinear.mm, {}, ()),
    "einsum": OpEntry(bilinear.einsum, {"einsum": call(read_einsum)},
                      _cases(torch_einsum=lambda h: torch.einsum("nlk,nmk->nlm", h, h))),
    "baddbmm": OpEntry(bilinear.baddbmm, {"baddbmm": call(read_baddbmm)},
                       _cases(torch_baddbmm=lambda h: torch.baddbmm(h[..., :1], h, h.transpose(1, 2), beta=0.5))),
    "linear": OpEntry(bilinear.linear, {"linear": call(read_linear)},
                      ()),  # a weight has no batch dim: on the doubled batch it is never input-dependent
    # -- softmax family -------------------------------------------------------------------------
    "softmax": OpEntry(softmax.softmax, {"softmax": single_call(_parse_softmax)},
                       _cases(torch_softmax=lambda h: torch.softmax(3 * h, -1), module=nn.Softmax(dim=1))),
    "log_softmax": OpEntry(softmax.log_softmax, {"log_softmax": single_call(_parse_softmax)},
                           _cases(functional=lambda h: F.log_softmax(h, dim=-1))),
    "logsumexp": OpEntry(softmax.logsumexp, {"logsumexp": single_call(_parse_logsumexp)},
                         _cases(torch_logsumexp=lambda h: torch.logsumexp(h, dim=1))),
    # -- norms ------------------------------------------------------------------------------------
    "layer_norm": OpEntry(norms.layer_norm, {"layer_norm": single_call(_parse_layer_norm)},
                          _cases(module=nn.LayerNorm(6), functional=lambda h: F.layer_norm(h, (6,)))),
    "rms_norm": OpEntry(norms.rms_norm, {"rms_norm": single_call(_parse_rms_norm)},
                        _cases(module=nn.RMSNorm(6, eps=1e-6))),
    "vector_norm": OpEntry(norms.vector_norm,
                           {name: single_call(_parse_vector_norm) for name in ("linalg_vector_norm", "norm")},
                           _cases(method=lambda h: h.norm(dim=-1),
                                  linalg=lambda h: torch.linalg.vector_norm(h, dim=1))),
    "var": OpEntry(norms.var, {"var": single_call(_parse_variance)},
                   _cases(method=lambda h: h.var(dim=1),
                          biased=lambda h: torch.var(h, -1, unbiased=False, keepdim=True))),
    "std": OpEntry(norms.std, {"std": single_call(_parse_variance)},
                   _cases(method=lambda h: h.std(-1), population=lambda h: torch.std(h, dim=1, correction=0))),
    # -- others -----------------------------------------------------------------------------------
    "glu": OpEntry(reductions.glu, {"glu": single_call(_parse_glu)}, _cases(functional=F.glu)),
    "amax": OpEntry(reductions.amax, {"amax": single_call(_parse_amax), "max": call(read_max)},
                    _cases(torch_amax=lambda h: torch.amax(h, dim=1), max_values=lambda h: h.max(dim=-1).values)),
    "scaled_dot_product_attention": OpEntry(
        attention.scaled_dot_product_attention, {"scaled_dot_product_attention": call(read_sdpa)},
        _cases(self_attention=lambda h: F.scaled_dot_product_attention(h, h, h),
               causal=lambda h: F.scaled_dot_product_attention(h, h, h, is_causal=True)),
    ),
}

# --------------------------------------------------------------------------- derived views

#: op name -> rule(m, actual, reference, **params).
OP_RULES: dict[str, Callable] = {name: entry.rule for name, entry in OP_TABLE.items()}
#: torch call name -> reader (the interception's handler for that call, given the op's name).
CALL_READERS: dict[str, Reader] = {
    call_name: reader for name, entry in OP_TABLE.items() for call_name, reader in entry.calls.items()
}
#: torch call name -> the op whose reader it runs.
CALL_OPS: dict[str, str] = {call_name: name for name, entry in OP_TABLE.items() for call_name in entry.calls}


def rule_for(name: str) -> Callable:
    """The rule registered under ``name``; a clear error naming the supported ops otherwise."""
    try:
        return OP_RULES[name]
    except KeyError:
        raise KeyError(f"no DeepLIFT rule for op {name!r}; rules exist for: {', '.join(sorted(OP_RULES))}") from None
