"""The shape of the house, read from the source with `ast`: no module over 500 lines, imports only go downwards
(matvit <- retrieval <- app <- scripts), and no import circles (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("matvit", "retrieval", "app")  # each may import only from those before it
MAX_LINES = 500
ENTRY = "matvit.__main__"  # `python -m matvit` (what torchrun runs) is the `matvit` command: it may import app.cli


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(*tops: str) -> dict[str, Path]:
    """Every module under the given top-level folders, by dotted name."""
    return {module_name(p): p for top in tops for p in sorted((ROOT / top).rglob("*.py"))}


ALL = modules(*LAYERS, "scripts")


def _resolve(name: str) -> str | None:
    """The module of ours that `name` (a module or a name inside one) lies in, or None for one of outside."""
    while name and name not in ALL:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The modules of ours that `module` imports, at the top or inside functions."""
    path = ALL[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package[:len(package) - node.level + 1]
                base = ".".join([*prefix, base] if base else prefix)
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in ALL else base for alias in node.names]
        else:
            continue
        found.update(t for name in targets if (t := _resolve(name)) is not None and t != module)
    return found


GRAPH = {module: imports(module) for module in ALL}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _offences(rule) -> list[str]:
    return sorted(f"{ALL[m].relative_to(ROOT)} imports {t}" for m, targets in GRAPH.items() for t in targets
                  if rule(m, t))


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules(*LAYERS).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in sorted(long.items()))


def test_matvit_imports_nothing_above_it():
    def upward(module: str, target: str) -> bool:
        allowed = module == ENTRY and (target == "app.cli" or target.startswith("app.cli."))
        return _layer(module) == "matvit" and _layer(target) in ("retrieval", "app", "scripts") and not allowed

    offences = _offences(upward)
    assert not offences, "matvit/ imports from above it: " + "; ".join(offences)


def test_retrieval_imports_nothing_above_it():
    offences = _offences(lambda m, t: _layer(m) == "retrieval" and _layer(t) in ("app", "scripts"))
    assert not offences, "retrieval/ imports from above it: " + "; ".join(offences)


def test_app_imports_no_script():
    offences = _offences(lambda m, t: _layer(m) == "app" and _layer(t) == "scripts")
    assert not offences, "app/ imports from scripts/: " + "; ".join(offences)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert circles(graph) == [["a", "b", "c"], ["e", "f"]]


def test_imports_are_read_inside_functions_and_relative():
    assert "retrieval.store" in GRAPH["retrieval.build"]  # `from .store import ...`
    assert "retrieval.milvus_store" in GRAPH["retrieval.store"]  # inside `open_store`
    assert "app.cli" in GRAPH["matvit.__main__"]


def test_no_import_circles():
    found = circles(GRAPH)
    assert not found, "import circles: " + "; ".join(
        " <-> ".join(str(ALL[m].relative_to(ROOT)) for m in component) for component in found)
