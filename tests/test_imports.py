"""The package's shape: its import graph has no cycle (package ``__init__`` files included), the layers
below the loop never import the loop's own modules, and every module has its test module."""

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


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    return {m: imports_of(p, modules) - {m} for m, p in files.items() if m != "sftune"}


def test_no_import_cycle():
    graph = import_graph()
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


LOOP = ("sftune.training", "sftune.faults", "sftune.checkpoint")
BELOW_THE_LOOP = ("sftune.data", "sftune.model", "sftune.console", "sftune.safeio", "sftune.config",
                  "sftune.errors", "sftune.capabilities", "sftune.attention", "sftune.loss")


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_layers_below_the_loop_never_import_the_loop():
    graph = import_graph()
    for m in graph:
        if m.startswith(BELOW_THE_LOOP):
            bad = sorted(d for d in reach(graph, m) if d.startswith(LOOP))
            assert not bad, f"{m} imports the loop's modules (directly or through others): {bad}"


TESTS = Path(__file__).resolve().parent


def mirror_test_file(path: Path) -> str:
    """Where a module's unit tests live: ``sftune/x.py`` -> ``test_x.py``, ``sftune/data/x.py`` ->
    ``test_data_x.py`` (a package's ``__init__``/``__main__`` only re-export: none needed)."""
    return "test_" + "_".join(path.relative_to(SRC).with_suffix("").parts) + ".py"


def test_every_module_has_its_test_module():
    """Tests mirror src/: "where is X tested?" is answered by the file name. Claim-level suites
    (first hour, faults, model families, distributed, ...) live beside them."""
    modules = [p for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    missing = sorted(f"{p.relative_to(SRC)} -> tests/{mirror_test_file(p)}" for p in modules
                     if not (TESTS / mirror_test_file(p)).exists())
    assert not missing, "modules without their test module (add its unit tests there):\n  " + "\n  ".join(missing)


COMMANDS = ("sftune.cli", "sftune.inference", "sftune.evaluate", "sftune.export.hf", "sftune.export.gguf",
            "sftune.export.ollama", "sftune.export.verify", "sftune.dashboard", "sftune.preview", "sftune.compat")


def test_training_imports_no_command():
    """Training reaches the training-time parts of export and eval (sftune.export.save,
    sftune.eval_metrics), never the commands that use them, nor inference's run loading. (Generation
    itself is a library training uses for its eval samples and exact match.)"""
    graph = import_graph()
    bad = sorted(d for d in reach(graph, "sftune.training") if d.startswith(COMMANDS))
    assert not bad, f"sftune.training reaches command modules: {bad}"
