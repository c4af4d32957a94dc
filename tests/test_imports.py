"""The package's import graph has no cycle: each module only imports the stages below it."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sftune"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """sftune modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "sftune":
                found.add(name)
    return found


def test_no_import_cycle():
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    graph = {m: imports_of(p, modules) - {m} for m, p in files.items() if m != "sftune"}
    for m in graph:  # a package's __init__ re-exports; importing it is not a dependency on its children
        graph[m] = {d for d in graph[m] if not (files[d].name == "__init__.py" and m.startswith(d + "."))}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
