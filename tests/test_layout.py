"""The layout's rules, checked on the source (docs/architecture.md): no import cycles among the
modules of torch_handler or of reference_jax (lazy imports inside functions count; imports under
``if TYPE_CHECKING:`` do not run and do not count), no module over 600 lines, private helpers
(``_name``) imported only within their own folder, and a README a newcomer reads in minutes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch_handler", "reference_jax")
MAX_LINES = 600
README_MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never imported at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement that runs."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                out.append((child, []) if child in known else (source, [alias.name]))
    return [(m, n) for m, n in out if m.split(".")[0] in PACKAGES]


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {m for m, _ in imports(name, path, known) if m in known and m != name} for name, path in known.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_layout_rules_find_what_they_look_for():
    """The checks bite: a cycle is found, a TYPE_CHECKING import is not an edge."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch_handler.mode\n")
    assert len(_type_checking_nodes(tree)) > 0
    graph = import_graph()
    assert "torch_handler.ops.table" in graph["torch_handler.ops"]
    assert "torch_handler.recurrent.rules" in graph["torch_handler.recurrent.registry"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"modules that import each other (directly or in a circle): {found}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_the_size_limit(name):
    lines = modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}): split it by concern"


def test_private_helpers_stay_in_their_folder():
    known = modules()
    crossing = []
    for name, path in known.items():
        folder = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for source, names in imports(name, path, known):
            source_folder = source if known.get(source, Path()).name == "__init__.py" else source.rpartition(".")[0]
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and source_folder != folder:
                crossing.append(f"{name} imports {', '.join(private)} from {source}")
    assert not crossing, crossing


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"
