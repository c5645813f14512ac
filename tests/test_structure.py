"""The package's shape, checked from its source: no import cycles, mode names compared only by the
reference factory, and no class or function too long to read in one sitting."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdpo")
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 60
# (module, qualified name) -> why it may be longer. Keep it empty unless splitting would hide the logic.
LONG_ALLOWED: dict[tuple[str, str], str] = {
    ("jaxdpo.losses", "pair_losses"): "one short branch per loss formula, read side by side with LOSSES.md",
    ("jaxdpo.losses", "preference_loss"): "the weighted sum of the losses and every metric TRL logs, in one place",
    ("jaxdpo.models.families", "config_from_hf"): "a translation table: one line per config.json key",
    ("jaxdpo.models.families", "config_to_hf"): "the same table backwards",
    ("jaxdpo.distributed", "plan"): "the precedence config > environment > cluster, one field after another",
    ("jaxdpo.models.hf_io", "save_pretrained"): "plan, then stream: splitting it passes the plan around",
    # Replaced by jaxdpo/build.py + jaxdpo/loop.py (issue 14, phase 4).
    ("jaxdpo.trainer", "Trainer"): "being replaced",
    ("jaxdpo.trainer", "Trainer.run"): "being replaced",
}


def _modules() -> dict[str, ast.Module]:
    """'jaxdpo.models.lora' -> its syntax tree, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                with open(path) as f:
                    out[module] = ast.parse(f.read(), path)
    return out


MODULES = _modules()


def _imported_modules(module: str, tree: ast.Module) -> set[str]:
    """The jaxdpo modules `module` imports anywhere (module level or inside functions)."""
    found = set()
    package = module if module in MODULES and _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


def _is_package(module: str) -> bool:
    return os.path.isdir(os.path.join(os.path.dirname(PACKAGE), *module.split(".")))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = {m: _imported_modules(m, tree) for m, tree in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _definitions(tree: ast.Module, prefix: str = ""):
    """(qualified name, node) of every class and function, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _definitions(node, name + ".")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_classes_and_functions_are_short(module):
    too_long = []
    for name, node in _definitions(MODULES[module]):
        lines = node.end_lineno - node.lineno + 1
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if lines > limit and (module, name) not in LONG_ALLOWED:
            too_long.append(f"{module}.{name}: {lines} lines (limit {limit})")
    assert too_long == []
