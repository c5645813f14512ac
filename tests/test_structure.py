"""The package's shape, checked from its source: no import cycles, mode names compared only by the
reference factory, and no class or function too long to read in one sitting."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdpo")
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 60
# (module, qualified name) -> why it may be longer. Keep it empty unless splitting would hide the logic.
LONG_ALLOWED: dict[tuple[str, str], str] = {
    ("jaxdpo.models.hf_io", "save_pretrained"): "plan, then stream: splitting it passes the plan around",
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


REFERENCE_MODES = {"device", "host", "cached", "lora_base", "none"}
# Where a reference mode name may be compared: the factory that picks the reference's class.
MODE_COMPARISONS_ALLOWED = {("jaxdpo.preference.reference", "choose_reference")}


def _mentions_mode(node: ast.AST) -> bool:
    names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    names += [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
    return any("mode" in name for name in names)


def _mode_literals(node: ast.AST) -> set[str]:
    elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {e.value for e in elements if isinstance(e, ast.Constant) and e.value in REFERENCE_MODES}


def mode_comparisons(tree: ast.Module, module: str) -> list[str]:
    """`x.mode == "host"`, `mode in ("device", "host")`, ... outside the allowed functions."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Compare) and (module, name) not in MODE_COMPARISONS_ALLOWED:
                operands = [child.left, *child.comparators]
                literals = set().union(*(_mode_literals(o) for o in operands))
                if literals and any(_mentions_mode(o) for o in operands):
                    found.append(f"{module}:{child.lineno} compares a mode with {sorted(literals)}")
            visit(child, name)

    visit(tree, None)
    return found


def test_reference_modes_are_compared_only_by_the_factory():
    found = [line for module, tree in MODULES.items() for line in mode_comparisons(tree, module)]
    assert found == []


def test_the_mode_comparison_finder_finds_them():
    source = "def f(cfg):\n    if cfg.reference.mode in ('device', 'host'):\n        return mode == 'none'\n"
    assert len(mode_comparisons(ast.parse(source), "jaxdpo.x")) == 2
    assert mode_comparisons(ast.parse("remat == 'none'"), "jaxdpo.x") == []


TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "train.py", "sample.py", "config.py", "errors.py"}


def test_the_top_level_holds_only_the_clis_the_config_and_the_errors():
    files = {name for name in os.listdir(PACKAGE) if name.endswith(".py")}
    assert files <= TOP_LEVEL_MODULES and len(files) <= 6, sorted(files - TOP_LEVEL_MODULES)


def test_every_subpackage_says_what_it_holds():
    undocumented = [module for module, tree in MODULES.items()
                    if _is_package(module) and module != "jaxdpo" and not ast.get_docstring(tree)]
    assert undocumented == []


def test_at_most_one_long_function_is_allowed():
    functions = [key for key in LONG_ALLOWED if key[0] in MODULES]
    assert len(functions) <= 1, functions
