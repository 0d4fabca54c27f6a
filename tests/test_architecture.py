"""The package's shape, checked from its source: no import cycles, and the model file stays the model.

Module-level imports form the import graph (what runs when a module is imported); imports inside functions are
lazy on purpose (heavy or optional dependencies) and do not make cycles at import time, but they still count for
the rule that `model.py` holds only the model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "phiforge"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """phiforge modules that `module` imports (`from pkg import name` counts `pkg.name` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    known = _modules()
    nodes: list[ast.AST]
    if top_level_only:
        # Module body, including `if`/`try` blocks at module level, but not function or class bodies, and not
        # `if TYPE_CHECKING:` blocks (type-only imports never run).
        nodes = []
        stack = list(tree.body)
        while stack:
            n = stack.pop()
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                stack.extend(n.orelse)
                continue
            if isinstance(n, (ast.If, ast.Try)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    stack.extend(getattr(n, field, []))
            elif isinstance(n, ast.ExceptHandler):
                stack.extend(n.body)
            else:
                nodes.append(n)
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names if a.name.split(".")[0] == "phiforge")
        elif isinstance(n, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", n)
            if target.split(".")[0] != "phiforge":
                continue
            out.add(target)
            out.update(f"{target}.{a.name}" for a in n.names if f"{target}.{a.name}" in known)
    return {m for m in out if m in known}


def _graph(top_level_only: bool = True) -> dict[str, set[str]]:
    return {m: _imports(m, p, top_level_only=top_level_only) - {m} for m, p in _modules().items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None. A package importing its own submodule from its
    `__init__` is how packages re-export, so edges from a package to its own children are not counted."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if dep.startswith(m + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_checker_finds_a_planted_cycle():
    """The cycle finder is not vacuous: a -> b -> c -> a is found, a DAG is not."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package re-exporting its child


def test_the_graph_sees_phiforge_imports():
    graph = _graph()
    assert "phiforge.model" in graph
    assert "phiforge.config" in graph["phiforge.model"]  # model.py imports its config


def test_no_import_cycles_at_import_time():
    cycle = _find_cycle(_graph(top_level_only=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("forbidden", ["phiforge.kernels", "phiforge.decode", "phiforge.serve", "phiforge.generate",
                                       "phiforge.eval", "phiforge.train"])
def test_model_file_holds_only_the_model(forbidden):
    """`model.py` is the model: no native kernels, decode plans, serving, evaluation or training code, not even
    lazily (those hold a model from outside, as torchtitan applies parallelism from outside)."""
    imported = _imports("phiforge.model", ROOT / "model.py", top_level_only=False)
    bad = sorted(m for m in imported if m == forbidden or m.startswith(forbidden + "."))
    assert not bad, f"phiforge/model.py imports {bad}"


def test_config_imports_no_torch():
    """`phiforge.config` is read by tools that must not pay for torch (info on a preset, YAML validation)."""
    tree = ast.parse((ROOT / "config.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names
