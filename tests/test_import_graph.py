"""The packages' import graph has no cycle: every `import` / `from ... import` between project modules (at any depth
of a module, `TYPE_CHECKING` blocks included), relative ones resolved, read with `ast` without importing anything."""

import ast
import os

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("modeling_nlip", "trainers", "nlip_cli")


def _modules() -> dict[str, str]:
    modules = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[module.removesuffix(".__init__")] = path
    return modules


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """The project modules `module` imports (a `from package import name` that names a submodule counts as it)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == 1:
                return stack[stack.index(neighbour):] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {module: _imports(module, path, set(modules)) for module, path in modules.items()}
    assert graph["trainers.trainer"] >= {"trainers.callbacks", "trainers.objectives"}  # the reader sees imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["trainers.trainer", "trainers.callbacks"])
def test_no_method_is_named_in_the_trainer_or_its_callback(module):
    """The trainer and its schedule callback name no method: no method name as a string (`"npc" in methods`) and no
    identifier made of one (`npc_sibling`, `srcl_alpha`); imports (`modeling_nlip`) aside."""
    methods = {"clip", "nlip", "npc", "srcl", "rcl"}
    tree = ast.parse(open(_modules()[module], encoding="utf-8").read())
    named = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in methods:
            named.append(repr(node.value))
        identifier = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                      else node.arg if isinstance(node, ast.arg) else node.name
                      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None)
        if identifier and methods & set(identifier.lower().split("_")):
            named.append(identifier)
    assert not named, f"{module} names methods: {sorted(set(named))}"
