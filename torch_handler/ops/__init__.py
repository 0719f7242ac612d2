"""The ops around the recurrent layers: their DeepLIFT rules (:mod:`.rules`), the table that
declares each op once (:mod:`.table`), and the interception that runs the rules inside an
explained model's forward (:mod:`.interception`)."""

from torch_handler.ops.table import OP_RULES, OP_TABLE, OpEntry, rule_for

__all__ = ["OP_RULES", "OP_TABLE", "OpEntry", "rule_for"]
