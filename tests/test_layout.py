"""The package's shape: no import cycles, each layer imports only layers below it, and
align's own modules are imported at the top of a module (where a reader looks for them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "align"

# Lowest first: a module may import its own layer and those before it (align/__init__.py).
LAYERS = (
    ("align.errors", "align.files", "align.numerics"),
    ("align.runtime",),
    ("align.record",),
    ("align.zoo",),
    ("align.judge",),
    ("align.api",),
    ("align.train", "align.report"),
    ("align.commands", "align.pytest_plugin", "align.testing", "align"),
)
# Modules that import parts of align on use. The pytest plugin loads in every pytest run
# of an environment where align is installed: it imports the rest only when a test asks.
# `align run` imports align.train only to run: it needs the `run` extra (mmengine).
LAZY = {"align.pytest_plugin", "align.commands.run"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported align module, at module level, line) for each import in module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = set()
    for node in tree.body:
        top |= (
            {id(n) for n in ast.walk(node)}
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            else set()
        )
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            targets = [f"{base}.{a.name}" for a in node.names]
            targets = [t if t in MODULES else base for t in targets]
        else:
            continue
        for target in targets:
            if target in MODULES and target != "align":
                out.append((target, id(node) in top, node.lineno))
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    if name.endswith(".__main__"):
        return len(LAYERS) - 1  # a `python -m` entry point is a command
    assert best is not None, f"{name} is in no layer: add its package to LAYERS"
    return best[0]


def _cycle() -> list[str] | None:
    """One import cycle through align's modules (imports inside functions included)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target, _, _ in GRAPH[name]:
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "align.errors", [("align.api", True, 1)])
    assert _cycle() is not None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    upward = [
        f"line {line}: {target}"
        for target, _, line in GRAPH[name]
        if _layer(target) > _layer(name) and not target.startswith(name + ".")
    ]
    assert not upward, f"{name} (layer {_layer(name)}) imports a higher layer: {upward}"


@pytest.mark.parametrize("name", sorted(set(MODULES) - LAZY))
def test_align_imports_sit_at_module_level(name):
    inner = [f"line {line}: {target}" for target, top, line in GRAPH[name] if not top]
    assert not inner, f"{name} imports align modules inside functions: {inner}"
