"""The torch and JAX op tables name the same ops, and docs/ops.md is rendered from them."""

from __future__ import annotations

from pathlib import Path

import op_tables

from reference_jax import ops as oracle_ops
from torch_handler.ops import OP_RULES, OP_TABLE

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"


def test_both_sides_declare_the_same_ops():
    assert set(OP_TABLE) == set(oracle_ops.OP_SPECS) == set(OP_RULES) == set(oracle_ops.OP_RULES)


def test_every_torch_call_reaches_one_op():
    calls = [call for entry in OP_TABLE.values() for call in entry.calls]
    assert len(calls) == len(set(calls)), sorted({c for c in calls if calls.count(c) > 1})


def test_the_docs_table_is_current():
    assert DOC.read_text() == op_tables.render(), (
        "docs/ops.md is out of date: PYTHONPATH=. python crosscheck/op_tables.py > docs/ops.md"
    )
