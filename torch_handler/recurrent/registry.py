"""The one table of recurrent module classes the DeepLIFT rule serves.

Each supported class is declared exactly once, below, with everything the rest of the package
needs to know about it:

* ``rule``: a factory ``module -> rule object`` from :mod:`torch_handler.recurrent.rules` (the cell
  equations; an RNN's nonlinearity is read off the module);
* ``layout``: ``"sequence"`` (nn.LSTM-like: layers, directions, ``(T, B, I)`` or packed input)
  or ``"cell"`` (one step, ``(B, I)`` input), which picks the DeepLIFT forward in
  :mod:`torch_handler.recurrent.modules`;
* ``num_states``: how many state tensors the cell carries (2 for ``(h, c)``, 1 for ``h``), so
  the forwards know whether ``hx`` is a tuple;
* ``handler``: the name of the shap ``op_handler`` function registered for the class.

``SUPPORTED_MODULES``, ``rule_for``, the DeepLIFT forward of a module and shap's
``OP_HANDLERS`` are all derived from this table: supporting a new cell type means writing its
rule class in ``rules.py`` and adding one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from torch import nn

from torch_handler.recurrent.rules import GRURule, LSTMRule, RNNRule


class RecurrentClass(NamedTuple):
    """One supported recurrent module class and how the package serves it."""

    cls: type[nn.Module]
    rule: Callable[[nn.Module], object]
    layout: Literal["sequence", "cell"]
    num_states: int
    handler: str


REGISTRY: tuple[RecurrentClass, ...] = (
    RecurrentClass(nn.LSTM, lambda m: LSTMRule(), "sequence", 2, "lstm_handler"),
    RecurrentClass(nn.GRU, lambda m: GRURule(), "sequence", 1, "gru_handler"),
    RecurrentClass(nn.RNN, lambda m: RNNRule(m.nonlinearity), "sequence", 1, "rnn_handler"),
    RecurrentClass(nn.LSTMCell, lambda m: LSTMRule(), "cell", 2, "lstm_cell_handler"),
    RecurrentClass(nn.GRUCell, lambda m: GRURule(), "cell", 1, "gru_cell_handler"),
    RecurrentClass(nn.RNNCell, lambda m: RNNRule(m.nonlinearity), "cell", 1, "rnn_cell_handler"),
)

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = tuple(entry.cls for entry in REGISTRY)


def entry_for(module: nn.Module) -> RecurrentClass | None:
    """The registry entry of ``module``'s supported base class (a subclass finds its base), or
    None for a module the rule does not serve."""
    for entry in REGISTRY:
        if isinstance(module, entry.cls):
            return entry
    return None

# torch's own forward of each class, captured at import, before torch_handler.mode can install
# its dispatcher on the class: the "native" path every non-explaining caller gets.
TORCH_FORWARD: dict[type[nn.Module], Callable] = {entry.cls: vars(entry.cls)["forward"] for entry in REGISTRY}
