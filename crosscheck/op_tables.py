"""The two op tables side by side: ``torch_handler.ops.OP_TABLE`` (rule, the torch calls that
reach it, the engine cases) and ``reference_jax.ops.OP_SPECS`` (the JAX twin, the rule-level
cases), keyed by the same op names. Renders docs/ops.md:

    PYTHONPATH=. python crosscheck/op_tables.py > docs/ops.md

``crosscheck/test_op_tables.py`` checks that the tables name the same ops and that docs/ops.md
is what this renders.
"""

from __future__ import annotations

from reference_jax import ops as oracle_ops
from torch_handler.ops import OP_TABLE

HEADER = """# The op rules

Every op with a DeepLIFT rule, generated from the two op tables (`torch_handler/ops/table.py`
and `reference_jax/ops/table.py`, one entry per op on each side) by
`PYTHONPATH=. python crosscheck/op_tables.py > docs/ops.md`; `crosscheck/test_op_tables.py`
fails when this page is out of date. How the rules are derived: [whole-models.md](whole-models.md#the-op-rules);
adding an op: [architecture.md](architecture.md#adding-an-op).

- **torch calls**: the torch functions, methods and operators that run the rule when an operand
  depends on the explained input (their in-place `_` forms too; `nn` modules call them).
- **rule**: the first line of the torch rule's docstring.
- **crosscheck cases**: the JAX twin's cases, each drawn at two shapes, in float64 and float32,
  in five scenarios, against the torch rule (`crosscheck/test_crosscheck_ops.py`), and by the
  oracle's own tests (`tests/test_oracle_ops.py`).
- **model cases**: the torch entry's calls inside a model, explained by shap, Captum and
  tangermeme (`tests/test_op_table.py`).

| op | family | torch calls | rule | crosscheck cases | model cases |
|---|---|---|---|---|---|
"""


def _first_line(doc: str | None) -> str:
    line = (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""
    return line.replace("|", "\\|")


def rows() -> list[str]:
    out = []
    for name, entry in OP_TABLE.items():
        spec = oracle_ops.OP_SPECS[name]
        calls = ", ".join(f"`{c}`" for c in entry.calls) or "(through another op's calls)"
        cases = ", ".join(case.id for case in spec.cases)
        model_cases = ", ".join(case.id for case in entry.cases) or "—"
        rule = _first_line(entry.rule.__doc__)
        out.append(f"| {name} | {spec.family} | {calls} | {rule} | {cases} | {model_cases} |")
    return out


def render() -> str:
    return HEADER + "\n".join(rows()) + "\n"


if __name__ == "__main__":
    print(render(), end="")
