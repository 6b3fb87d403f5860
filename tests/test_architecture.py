"""The package's structure: no import cycles between dynexec's modules, and a runtime that
knows models only through the RoutedModel interface (dynexec.models.common)."""
from __future__ import annotations

import ast
from pathlib import Path

import dynexec

PACKAGE = Path(dynexec.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dynexec module that ``path`` imports, at module level or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # 'from . import x'
    return {m for m in found if m.split(".")[0] == "dynexec"}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # an import of a package's attribute counts as an import of the package
        graph[name] = {m if m in modules else m.rsplit(".", 1)[0] for m in _imports(path)} & modules.keys()
        graph[name].discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a module's own package __init__ runs before it: not an edge of a cycle
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_module_graph_has_no_cycles():
    graph = _graph()
    assert "dynexec.runtime.program" in graph and "dynexec.runtime.executors.cpu_loop" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_runtime_knows_models_only_through_their_interface():
    """dynexec.runtime imports no paper-specific model module (SkipNet, BlockDrop)."""
    graph = _graph()
    runtime = {m: deps for m, deps in graph.items() if m.startswith("dynexec.runtime")}
    assert len(runtime) >= 8
    for module, deps in runtime.items():
        models = {d for d in deps if d.startswith("dynexec.models")}
        assert models <= {"dynexec.models.common", "dynexec.models"}, (module, models)
        assert "dynexec.models" not in models or module == "dynexec.runtime", (module, models)
        assert not any(d.startswith("dynexec.tools") for d in deps), (module, deps)
