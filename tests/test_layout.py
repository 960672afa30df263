"""The package's layout: no import cycles among the project's own modules, a short top level.

The import graph counts every ``import`` statement in a module, at the top and inside
functions alike, so a cycle cannot hide behind a deferred import. An import of
``prompt_tasks.a.b`` also imports the packages ``prompt_tasks`` and ``prompt_tasks.a``
(their ``__init__`` runs first), so those edges are counted too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prompt_tasks", "workers")


def module_name(path: Path, root: Path) -> str:
    """``prompt_tasks/flow/router.py`` → ``prompt_tasks.flow.router`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_names(module: str, path: Path) -> Iterator[str]:
    """Every dotted name ``module`` imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"  # ``from pkg import submodule``


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges module → project module it imports (with the parent packages that import runs)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target in imported_names(name, path):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    graph[name].add(prefix)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:
        nonlocal counter
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    """One path around ``cycle``: ``a → b → c → a``."""
    members = set(cycle)
    start = cycle[0]
    path, seen, node = [start], {start}, start
    while True:
        nxt = sorted(graph[node] & members)
        step = next((n for n in nxt if n == start), None) or next((n for n in nxt if n not in seen), None)
        if step is None or step == start:
            path.append(start)
            return " → ".join(path)
        path.append(step)
        seen.add(step)
        node = step


def test_no_import_cycle() -> None:
    graph = import_graph(project_modules(ROOT))
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)


def test_cycle_finder_names_a_cycle(tmp_path: Path) -> None:
    """The checker itself: a planted cycle (one import inside a function) is found and named."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from . import a\n")
    graph = import_graph(project_modules(tmp_path, ["pkg"]))
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert describe(cycles[0], graph) == "pkg.a → pkg.sub.b → pkg.c → pkg.a"


def test_top_level_is_short() -> None:
    """The few modules everyone imports; everything else lives in a subsystem package."""
    top = sorted(p.name for p in (ROOT / "prompt_tasks").glob("*.py"))
    assert len(top) <= 12, top


def test_only_the_instrument_names_its_camera() -> None:
    """The framework reaches SimCam only through the instrument plugin."""
    allowed = ("prompt_tasks/instruments/", "prompt_tasks/demo/", "prompt_tasks/cli/simcam.py")
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "prompt_tasks").rglob("*.py"))
        if not str(path.relative_to(ROOT)).startswith(allowed) and "simcam" in path.read_text().lower()
    ]
    assert not offenders, offenders
