"""The ``TorchFunctionMode`` that sees every torch call of the explained model's own forward and
hands it to its handler: an op rule (:mod:`.calls`), the batch tracking of a linear op
(:mod:`.tracking`), or a report for an op without a rule."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from torch_handler.errors import DoubledBatchError, UnsupportedOpError, UnsupportedOpWarning
from torch_handler.ops.interception import attention_block
from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception._shared import UNKNOWN, _flat, _inplace, _tensors
from torch_handler.ops.interception.batch_axis import Axis
from torch_handler.ops.interception.rows import _rows_by_index
from torch_handler.ops.interception.tensor_map import TensorMap
from torch_handler.ops.interception.tracking import (
    TRACKED,
    _halves_equal,
    _permute,
    _same,
)
from torch_handler.ops.table import CALL_OPS, CALL_READERS, OP_RULES

if TYPE_CHECKING:
    from torch_handler.ops.interception.context import _Explanation
from torch_handler.ops.interception.advice import (
    _caller,
    _constant_advice,
    _custom_function_advice,
    _no_rule_advice,
)

MINIMUM_TORCH = "2.13"


_HAS_REDISPATCH = hasattr(torch.overrides, "redispatch_function")


# Calls that never produce an input-dependent float tensor.
_PASS = frozenset(
    """__get__ __set__ dim size numel __len__ stride is_floating_point is_complex data_ptr
    element_size is_contiguous storage_offset get_device __format__ __repr__ __bool__ __index__
    __int__ __float__ tolist item __hash__ nelement ndimension has_names _is_view __iter__
    __contains__ requires_grad_ register_hook retain_grad backward _version _set_grad_enabled
    is_grad_enabled equal allclose isclose isnan isinf isfinite detach_ new_zeros
    new_ones new_empty new_full zeros_like ones_like empty_like full_like rand_like randn_like
    new_tensor __setstate__ __reduce_ex__ __deepcopy__ __array__ cpu cuda numpy __dlpack__
    untyped_storage _make_subclass""".split()
)


_TRANSPOSING_PROPERTIES = frozenset({"T", "mT", "H", "mH"})


_STEP_INTO = frozenset({"multi_head_attention_forward", "normalize"})


class InterceptMode(torch.overrides.TorchFunctionMode):
    """The torch function mode of one forward call of an explained model."""

    def __init__(self, explanation: _Explanation, root_args):
        super().__init__()
        self.explanation = explanation
        self.rules = OP_RULES  # op name -> rule; the handlers look rules up here
        self.paused = 0
        self.axes = TensorMap()
        self.seeds = TensorMap()
        for a in root_args:
            for t in a if isinstance(a, (tuple, list)) else (a,):
                if isinstance(t, Tensor):
                    self.seeds[t] = True
        self._reaches: dict = {}
        self.by_node: dict = {}
        self.packed_outputs = TensorMap()  # recurrent PackedSequence.data -> order
        self.sorted_rows = TensorMap()  # padded in sorted order -> (dim, unsorted)
        self.packed_order = TensorMap()  # data packed sorted by _pack_padded -> order
        # Input-dependent tensors without a gradient (masks, indices, integer casts) -> the op
        # that made one from the input, ("gt", "MaskedMean.forward").
        self.constants = TensorMap()
        self.halves_differ = TensorMap()  # constant -> (its _version, differs?)
        self.lost = TensorMap()  # tensor whose batch place is not known -> the op that lost it
        self.node_ids: set = set()  # autograd nodes of the tensors seen here (kept alive by by_node)
        self._audited: dict = {}  # (node id, output) of tensors made unseen -> node (see _audit_unseen)

    # -- tracking ---------------------------------------------------------------------------

    def mark(self, t, axis: Axis | None) -> None:
        if isinstance(t, Tensor) and axis is not None:
            if axis is not UNKNOWN:
                axis = ba.valid(tuple(t.shape), axis) or UNKNOWN
            self.axes[t] = axis
            if t.grad_fn is not None:
                # Also by autograd node: a module's full backward hook hands its forward a new
                # tensor object (BackwardHookFunction) that shares the node we record here.
                self.by_node[(id(t.grad_fn), t.output_nr)] = (t.grad_fn, axis)
                self.node_ids.add(id(t.grad_fn))

    def axis_of(self, t) -> Axis | None:
        """Where ``t``'s doubled batch is; None if ``t`` does not vary with the input."""
        if not isinstance(t, Tensor):
            return None
        axis = self.axes.get(t)
        if axis is not None:
            return axis
        # The model's arguments, and (passed by keyword, which the global hook does not see)
        # any other leaf that requires grad without being a Parameter: an explained input, batch
        # on dim 0 as every engine passes it.
        is_input = t.requires_grad and t.grad_fn is None and not isinstance(t, nn.Parameter)
        if t in self.seeds or is_input:
            axis = Axis(0, t.shape[0]) if t.dim() else UNKNOWN
            self.axes[t] = axis
            return axis
        node = t.grad_fn
        if node is not None and type(node).__name__ == "BackwardHookFunctionBackward":
            source, nr = node.next_functions[t.output_nr]
            if source is not None:
                variable = getattr(source, "variable", None)
                found = (
                    self.axis_of(variable)
                    if variable is not None
                    else self.by_node.get((id(source), nr), (None, None))[1]
                )
                if found is not None:
                    self.mark(t, found)
                    return found
        if t.requires_grad and t.grad_fn is not None and self._reaches_input(t.grad_fn):
            self._audit_unseen(t)
            return UNKNOWN
        return None

    def _audit_unseen(self, t: Tensor) -> None:
        """Report ``t`` if it was made where this mode could not see (a TorchScript module or
        function runs its ops in C++) by anything but linear steps: its autograd graph is read
        back to the tensors seen here, and a node of a nonlinear op (a tanh, a product of two
        input-dependent factors) means plain gradients where the rules belong."""
        key = (id(t.grad_fn), t.output_nr)
        if key in self._audited:
            return
        self._audited[key] = t.grad_fn  # the node is kept so that its id stays unique
        stack, visited = [t.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited or id(node) in self.node_ids:
                continue
            visited.add(id(node))
            if not self._reaches_input(node):
                continue
            kind = type(node).__name__
            varying = [n for n, _ in node.next_functions if n is not None and self._reaches_input(n)]
            if kind in _PRODUCT_NODES:
                factors, divisor = _PRODUCT_NODES[kind]
                varies = [node.next_functions[k][0] in varying for k in factors if k < len(node.next_functions)]
                linear = sum(varies) <= 1 and not (divisor is not None and node.next_functions[divisor][0] in varying)
            else:
                linear = kind not in _NONLINEAR_NODES
            if not linear:
                self.report_if_used(t, "torch.jit", _unseen_advice(kind))
                return
            stack.extend(varying)

    def _reaches_input(self, node) -> bool:
        """Whether an autograd node's graph reaches a leaf that is not a Parameter."""
        known = self._reaches.get(id(node))
        if known is not None:
            return known[1]
        stack, seen, found = [node], set(), False
        while stack and not found:
            n = stack.pop()
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            cached = self._reaches.get(id(n))
            if cached is not None:
                found = cached[1]
                continue
            variable = getattr(n, "variable", None)
            if variable is not None and not isinstance(variable, nn.Parameter):
                found = True
            stack.extend(next_node for next_node, _ in n.next_functions)
        self._reaches[id(node)] = (node, found)  # the node is kept so that its id stays unique
        return found

    # -- dispatch ---------------------------------------------------------------------------

    def __torch_function__(self, func, types, args, kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: only the transposing ones move the batch
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            if name == "data" and self.axis_of(args[0]) is not None:
                # .data is .detach() without its name: an input-dependent value without a gradient
                return self._follow_constants(_same(self, func, name, args, kwargs), name, args, kwargs)
            if name not in _TRANSPOSING_PROPERTIES or self.axis_of(args[0]) is None:
                return func(*args, **kwargs)
            return _permute(self, func, name, args, kwargs)
        if name in _PASS:
            return func(*args, **kwargs)
        if name in _STEP_INTO:
            if name == "multi_head_attention_forward":
                block = attention_block.read(self, func, args, kwargs)
                if block is not None:  # the plain form, as one call (see attention_block)
                    return block
            if _HAS_REDISPATCH:
                with self:
                    return torch.overrides.redispatch_function(func, types, args, kwargs)
            out = func(*args, **kwargs)
            if any(self.axis_of(t) is not None for t in _tensors(args, kwargs)):
                self.report_if_used(
                    out,
                    name,
                    f"stepping into this Python composite needs torch >= {MINIMUM_TORCH} "
                    f"(torch.overrides.redispatch_function; found {torch.__version__}), so its "
                    "inner ops run without rules. Upgrade torch",
                )
            return self._follow_same_shape(out, args, kwargs)
        if not any(self.axis_of(t) is not None for t in _tensors(args, kwargs)):
            return func(*args, **kwargs)
        handler = _HANDLERS.get(name)
        if handler is None and name.endswith("_") and not name.startswith("_"):
            base = _HANDLERS.get(name[:-1])
            if base is not None:
                return self._follow_constants(_inplace(self, func, name, base, args, kwargs), name, args, kwargs)
        if handler is None:
            return self._follow_constants(self._unknown(func, name, args, kwargs), name, args, kwargs)
        return self._follow_constants(handler(self, func, name, args, kwargs), name, args, kwargs)

    # -- input-dependent tensors without a gradient, and where the batch was lost ------------

    def _follow_constants(self, out, name, args, kwargs):
        """After an op on input-dependent tensors: record which op made each result without a
        gradient (a mask, indices, an integer cast) and which op lost a result's batch place;
        report a gradient-free input-dependent operand that differs within a pair and enters a
        differentiable result (the part of the output difference it causes gets no attribution)."""
        outs = [o for o in _flat(out) if isinstance(o, Tensor) and self.axes.get(o) is not None]
        if not outs:
            return out
        inputs = list(_tensors(args, kwargs))
        # A tensor made without a gradient can gain one later: a custom autograd Function's
        # forward runs without grad (the ops inside it are seen here, and their results recorded
        # as constants) and its outputs get the Function's own backward, plain gradients where
        # the rules' multipliers belong. It is then no constant, and it is reported.
        for t in inputs:
            if t.requires_grad and t.grad_fn is not None and t in self.constants:
                function = type(t.grad_fn).__name__.removesuffix("Backward")
                self.report_if_used(out, function, _custom_function_advice(function))
                break
        constants = [t for t in inputs if not t.requires_grad and t in self.constants]
        where = None
        for o in outs:
            if self.axes[o] is UNKNOWN and o not in self.lost:
                lost = next((self.lost[t] for t in inputs if t in self.lost), None)
                if lost is None:
                    where = where or _caller()
                    lost = (name, where)
                self.lost[o] = lost
            if not o.requires_grad and o not in self.constants and o not in self.seeds:
                if constants:
                    self.constants[o] = self.constants[constants[0]]
                else:
                    where = where or _caller()
                    # x != 0 arrives as __ne__, x > 0 as gt: name both as torch does (ne, gt)
                    self.constants[o] = (name[2:-2] if name.startswith("__") else name, where)
        if constants and _rows_by_index(self, name, args, kwargs):
            # The index only reorders the doubled batch's rows (pack_padded_sequence sorting by
            # length): the result's pairs are lost (UNKNOWN), so whatever needs them refuses
            # by name, and the recurrent module puts packed rows back in order itself.
            constants = []
        if constants and name not in _INDEX_CONSUMERS and any(o.requires_grad for o in outs):
            for c in constants:
                if self.differs(c):
                    origin, origin_where = self.constants[c]
                    self.report_if_used(out, origin, _constant_advice(name, self.axes.get(c) is UNKNOWN, origin),
                                        where=origin_where)
                    break
        return out

    def differs(self, t: Tensor) -> bool:
        """Whether a gradient-free input-dependent ``t`` differs between an input and its
        reference somewhere (True where its batch place is not known: it cannot be checked)."""
        known = self.halves_differ.get(t)
        if known is not None and known[0] == t._version:
            return known[1]
        differs = not _halves_equal(self, t, "")
        self.halves_differ[t] = (t._version, differs)
        return differs

    def varies(self, t) -> bool:
        """Whether ``t`` varies within a pair as far as a rule is concerned: input-dependent,
        and not a gradient-free tensor (a mask, indices) equal in both halves of every pair,
        which is a constant for the rule."""
        if self.axis_of(t) is None:
            return False
        return t.requires_grad or t not in self.constants or self.differs(t)

    def lost_note(self, tensors, otherwise: str = " Keep the batch as its own dim until this op.") -> str:
        """Where the batch place of the first of ``tensors`` that lost it was lost, and why
        (``otherwise`` where none did)."""
        for t in tensors:
            lost = self.lost.get(t) if isinstance(t, Tensor) else None
            if lost is not None:
                name, where = lost
                if name in _HANDLERS:
                    why = ("it reduces over, indexes into or merges the dim that holds the batch, "
                           "or combines tensors whose batches sit in different dims. Keep the batch "
                           "as its own dim there")
                else:
                    why = ("the library does not follow the batch through it (it has no rule). "
                           "Write that step with ops that have rules (see the README's support "
                           "table), or compute it from input-independent tensors")
                return f" The batch place was lost at `{name}` in {where}: {why}."
        return otherwise

    def _unknown(self, func, name, args, kwargs):
        out = func(*args, **kwargs)
        self.report_if_used(out, name, _no_rule_advice(name))
        return self._follow_same_shape(out, args, kwargs)

    def _follow_same_shape(self, out, args, kwargs):
        """Best effort after an op without a rule: a result shaped like its first varying input
        keeps that input's batch place; any other result is marked as not followed."""
        first = next((t for t in _tensors(args, kwargs) if self.axis_of(t) is not None), None)
        if first is None:
            return out
        for o in _flat(out):
            if isinstance(o, Tensor):
                self.mark(o, self.axis_of(first) if o.shape == first.shape else UNKNOWN)
        return out

    def report_if_used(self, out, name: str, why: str, where: str | None = None) -> None:
        """:meth:`report` once a gradient reaches ``out`` (its first backward): an op whose
        result only feeds masks, shapes or comparisons does not matter to the attributions.
        ``where``: the user's code that called the op (default: the caller of this op)."""
        used = [o for o in _flat(out) if isinstance(o, Tensor) and o.requires_grad and o.is_floating_point()]
        if used:
            where = where or _caller()
        for o in used:
            o.register_hook(lambda grad: self.report(name, why, where))

    def report(self, name: str, why: str, where: str | None = None) -> None:
        label = f"{name} in {where}" if where else name
        self.explanation.reported.setdefault(label, why)
        message = f"deeplift_mode: `{name}`{' in ' + where if where else ''} on input-dependent tensors: {why}."
        if self.explanation.strict:
            raise UnsupportedOpError(message + " (strict=True turns this warning into this error.)")
        if label not in self.explanation.warned:
            self.explanation.warned.add(label)
            warnings.warn(message, UnsupportedOpWarning, stacklevel=3)

    def known_axis(self, t: Tensor, op: str) -> Axis:
        """``t``'s batch place, or DoubledBatchError where it could not be followed."""
        axis = self.axis_of(t)
        if axis is UNKNOWN:
            raise DoubledBatchError(
                f"`{op}` gets an input-dependent tensor of shape {tuple(t.shape)} whose doubled "
                "batch (inputs and references) could not be followed through the ops before it "
                "(an index that picks batch rows, a merge of the batch with a dim outside it, a "
                "reduction over the batch, or an op without a rule): its rows cannot be paired."
                + self.lost_note([t])
            )
        return axis


# Autograd nodes of torch's nonlinear ops: a graph made where the mode could not see (TorchScript)
# that holds one gives plain gradients where a rule belongs (see InterceptMode._audit_unseen).
# Listed, not inferred: linear and indexing nodes, and nodes of custom Functions (the library's
# own, and the user's, which _follow_constants reports), pass.
_NONLINEAR_NODES = frozenset(
    """TanhBackward0 SigmoidBackward0 ReluBackward0 ExpBackward0 Exp2Backward0 Expm1Backward0 LogBackward0
    Log1pBackward0 Log2Backward0 Log10Backward0 SoftmaxBackward0 LogSoftmaxBackward0 LogsumexpBackward0
    PowBackward0 PowBackward1 PowBackward2 SqrtBackward0 RsqrtBackward0 ReciprocalBackward0 GeluBackward0
    SiluBackward0 SoftplusBackward0 EluBackward0 LeakyReluBackward0 HardtanhBackward0 HardsigmoidBackward0
    HardswishBackward0 MishBackward0 LogSigmoidBackward0 GluBackward0 ThresholdBackward0 SoftshrinkBackward0
    HardshrinkBackward0 PreluKernelBackward0 ClampBackward0 ClampBackward1 ClampMinBackward0 ClampMinBackward1
    ClampMaxBackward0 ClampMaxBackward1 AbsBackward0 SgnBackward0 SignBackward0 SinBackward0 CosBackward0
    TanBackward0 AsinBackward0 AcosBackward0 AtanBackward0 Atan2Backward0 SinhBackward0 CoshBackward0
    AsinhBackward0 AcoshBackward0 AtanhBackward0 ErfBackward0 ErfcBackward0 ErfinvBackward0
    NativeLayerNormBackward0 NativeBatchNormBackward0 NativeGroupNormBackward0 NormBackward0 NormBackward1
    NormBackward2 LinalgVectorNormBackward0 VarBackward0 StdBackward0 VarMeanBackward0 StdMeanBackward0
    ProdBackward0 ProdBackward1 CumprodBackward0 CummaxBackward0 CumminBackward0 MaxBackward0 MaxBackward1
    MinBackward0 MinBackward1 AmaxBackward0 AminBackward0 MaximumBackward0 MinimumBackward0 FmaxBackward0
    FminBackward0 SortBackward0 TopkBackward0 KthvalueBackward0 MedianBackward0 MedianBackward1
    MaxPool1DWithIndicesBackward0 MaxPool2DWithIndicesBackward0 MaxPool3DWithIndicesBackward0
    XlogyBackward0 SpecialEntrBackward0 LgammaBackward0 DigammaBackward0
    DifferentiableGraphBackward CppFunction""".split()  # TorchScript graphs fused after warm-up: opaque
)
# Autograd nodes of products and quotients: (the operands that are factors, the divisor's):
# linear while at most one factor varies with the input (a parameter times the input) and the
# divisor does not (the other operands, a bias or an added term, enter linearly).
_PRODUCT_NODES: dict[str, tuple[tuple[int, ...], int | None]] = {
    **{kind: ((0, 1), None) for kind in "MulBackward0 MmBackward0 BmmBackward0 MvBackward0 DotBackward0".split()},
    **{kind: ((1, 2), None) for kind in "AddmmBackward0 AddmvBackward0 BaddbmmBackward0 AddbmmBackward0".split()},
    "ConvolutionBackward0": ((0, 1), None),
    "AddcmulBackward0": ((1, 2), None),
    "DivBackward0": ((), 1),
    "AddcdivBackward0": ((), 2),
    "LerpBackward1": ((), 2),  # start + weight (end - start): the weight acts as a divisor would
}


def _unseen_advice(node: str) -> str:
    return (
        f"this result was computed where the interception cannot see (a TorchScript module or function "
        f"runs its ops in C++), and its graph holds `{node}`, which is not linear in the input (or, fused "
        "by TorchScript, cannot be read), so its plain "
        "gradient is used and the attributions may not sum to the output difference. Explain the eager "
        "code (the module or function before torch.jit.script / torch.jit.trace)"
    )


# Ops whose gradient-free input is token ids: the layer variants of the engines attribute at
# their output (docs/masks.md), where the ids' difference is carried. Packing reads its lengths
# only to lay the rows out; the recurrent module refuses a pair whose lengths differ.
_INDEX_CONSUMERS = frozenset({"embedding", "embedding_bag", "_pack_padded_sequence"})


# Every call name with a handler: the op table's (an op with a rule) and the tracking's (a
# linear or shape op, or a batch-preserving op reported as without a rule).
_HANDLERS: dict[str, Any] = {**TRACKED, **{name: reader(CALL_OPS[name]) for name, reader in CALL_READERS.items()}}


_REPORTING_HANDLERS = {"prod"}


def handles_call(name: str) -> bool:
    """Whether a torch function named ``name`` (``tanh``, ``__mul__``, ``relu_``, ...) runs an
    exact rule, or is linear, when it meets input-dependent tensors inside an explained model.

    For diagnostics that name the calls a model makes without a rule.
    """
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    return name in _STEP_INTO or (base in _HANDLERS and base not in _REPORTING_HANDLERS)
