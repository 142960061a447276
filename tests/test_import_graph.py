"""The import structure: no import circle among nemoe/ and tools/ modules, and a light config.

The graph is read from the source with `ast`, not by importing: an edge A -> B for every
`import` / `from ... import` of a project module that runs when A is imported (module level,
inside `if` / `try` blocks and `if TYPE_CHECKING:` included: a circle that only a type checker
follows is still a circle). Imports inside functions are not edges; `function_level_imports`
lists them, so the count and the reason for each stay visible.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nemoe", "tools")
HEAVY = ("torch", "datasets", "pyarrow", "transformers", "pandas")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, importer: str, modules: dict[str, Path]) -> list[str]:
    """The project modules an import statement makes Python execute first: each module it names
    (`from P import name` names P, or P.name where that is a submodule), and the packages above a
    named module, except those already running because the importer is inside them."""
    named = []   # (module, needed whole): a `from P import attribute` needs P to have run to its end
    if isinstance(node, ast.Import):
        named = [(alias.name, True) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:   # relative: resolve against the importer's package
            package = importer.split(".") if modules[importer].name == "__init__.py" else importer.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            named += [(sub, True), (base, False)] if sub in modules else [(base, True)]
    out = []
    for name, whole in named:
        if name not in modules:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            running = importer == target or importer.startswith(target + ".")
            explicit = i == len(parts) and whole
            if target in modules and target != importer and (explicit or not running) and target not in out:
                out.append(target)
    return out


def _module_level(tree: ast.Module):
    """Import statements that run when the module is imported (not inside a def or class body's defs)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)) or type(node).__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    stack.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = {t for node in _module_level(tree) for t in _targets(node, name, modules)}
    return graph


def function_level_imports() -> list[tuple[str, int, str]]:
    """(module, line, the project module it imports) for each import statement inside a function
    that imports a project module."""
    modules = project_modules()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(node, name, modules):
                    found.append((name, node.lineno, _targets(node, name, modules)[-1]))
    return sorted(set(found))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import): each an import circle."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):   # Tarjan's algorithm, recursive (the graph has a few hundred nodes)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circle_among_project_modules():
    assert cycles(import_graph()) == []


def test_no_circle_hidden_behind_a_function_level_import():
    """An import inside a function that closes a circle only moves the circle to call time."""
    graph = import_graph()
    for module, _, target in function_level_imports():
        graph[module].add(target)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_the_imports_that_make_circles(tmp_path, monkeypatch):
    """A circle through `if TYPE_CHECKING:` and a relative import is found; one through a function is not."""
    pkg = tmp_path / "nemoe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nemoe.b import B\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("import nemoe.a\n\ndef f():\n    from nemoe.b import B\n")
    (tmp_path / "tools").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    graph = import_graph()
    assert graph["nemoe.a"] == {"nemoe.b"} and graph["nemoe.b"] == {"nemoe.a"}
    assert graph["nemoe.c"] == {"nemoe.a"}
    assert cycles(graph) == [["nemoe.a", "nemoe.b"]]
    assert function_level_imports() == [("nemoe.c", 4, "nemoe.b")]


def test_the_config_package_imports_no_data_or_model_library():
    code = ("import sys, nemoe.config; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
