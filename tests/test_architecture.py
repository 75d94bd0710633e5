"""Architecture guard: the ``cdp`` package must have no import cycles between its modules.

Imports inside functions (lazy imports) count the same as top-level ones: a cycle that only
closes at call time is still a layering error. Imports under ``if TYPE_CHECKING:`` never
execute and are ignored (the ``else:`` branch of such a block does execute and is counted).

Edges are resolved statically with ``ast`` (standard library only, nothing is imported):
``import cdp.x.y``, ``from cdp.x import y`` and relative imports. ``from P import name`` points
at ``P.name`` when that is a module of the package, else at ``P``. Importing ``cdp.a.b`` also
executes ``cdp/a/__init__.py``, so an edge to ``cdp.a`` is added too, except when ``cdp.a`` is
the importing module itself or one of its ancestors (those are already being imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG_ROOT = REPO / "src" / "cdp"
MAX_CYCLES_LISTED = 100

# edge (src, dst) -> list of "file:line" of the import statements that create it
Graph = dict[str, dict[str, list[str]]]


def _module_map(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every ``*.py`` under ``root`` (``pkg/__init__.py`` -> ``pkg``)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            and isinstance(test.value, ast.Name) and test.value.id == "typing")


def _runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom in the whole tree (function bodies included), skipping the
    body of ``if TYPE_CHECKING:`` blocks (their ``else:`` branch is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(node: ast.Import | ast.ImportFrom, mod: str, is_pkg: bool,
             modules: dict[str, Path]) -> list[str]:
    """In-package modules named by one import statement (before parent-package expansion)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        out.append(sub if alias.name != "*" and sub in modules else prefix)
    return out


def _build_graph(root: Path, package: str) -> tuple[dict[str, Path], Graph]:
    modules = _module_map(root, package)
    graph: Graph = {m: {} for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        try:
            where = path.relative_to(REPO)
        except ValueError:
            where = path
        skip = {mod, *_ancestors(mod)}
        for node in _runtime_imports(tree):
            for target in _targets(node, mod, is_pkg, modules):
                # importing a.b.c also executes a.b and a (their __init__)
                for dst in [*_ancestors(target), target]:
                    if dst in modules and dst not in skip:
                        locs = graph[mod].setdefault(dst, [])
                        if f"{where}:{node.lineno}" not in locs:
                            locs.append(f"{where}:{node.lineno}")
    for edges in graph.values():
        for locs in edges.values():
            locs.sort(key=lambda loc: int(loc.rsplit(":", 1)[1]))
    return modules, graph


def _sccs(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def _find_cycles(graph: Graph, limit: int = MAX_CYCLES_LISTED) -> list[list[str]]:
    """Elementary cycles, each as [a, b, ..., a] starting at its smallest module name."""
    cycles: list[list[str]] = []
    for comp in _sccs(graph):
        if len(comp) < 2 and comp[0] not in graph[comp[0]]:
            continue
        members = set(comp)
        for root in comp:  # sorted: enumerate cycles whose smallest node is root
            allowed = {m for m in members if m >= root}
            path, on_path = [root], {root}
            work = [iter(sorted(d for d in graph[root] if d in allowed))]
            while work:
                nxt = next(work[-1], None)
                if nxt is None:
                    work.pop()
                    on_path.discard(path.pop())
                    continue
                if nxt == root:
                    cycles.append([*path, root])
                    if len(cycles) >= limit:
                        return cycles
                elif nxt not in on_path:
                    path.append(nxt)
                    on_path.add(nxt)
                    work.append(iter(sorted(d for d in graph[nxt] if d in allowed)))
    return cycles


def _format_cycles(cycles: list[list[str]], graph: Graph) -> str:
    lines = []
    for cyc in cycles:
        lines.append(" -> ".join(cyc))
        for a, b in zip(cyc, cyc[1:]):
            lines.append(f"    {a} -> {b}: {', '.join(graph[a][b])}")
    return "\n".join(lines)


def test_package_modules_found():
    modules, graph = _build_graph(PKG_ROOT, "cdp")
    assert PKG_ROOT.is_dir(), f"package directory not found: {PKG_ROOT}"
    assert "cdp" in modules, f"no cdp/__init__.py under {PKG_ROOT}"
    assert len(modules) > 5, f"only {len(modules)} modules found under {PKG_ROOT}: {sorted(modules)}"
    assert any(graph.values()), "no intra-package import edges found; is the resolver broken?"


def test_no_import_cycles():
    _, graph = _build_graph(PKG_ROOT, "cdp")
    cycles = _find_cycles(graph)
    more = " (list truncated)" if len(cycles) >= MAX_CYCLES_LISTED else ""
    assert not cycles, (
        f"{len(cycles)} import cycle(s) in the cdp package{more} "
        "(lazy imports inside functions count; only `if TYPE_CHECKING:` is exempt):\n"
        + _format_cycles(cycles, graph))


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def test_cycle_finder_on_synthetic_packages(tmp_path):
    # Two modules that import each other only inside functions: one cycle.
    cyc = tmp_path / "cyc" / "pkg"
    _write(cyc, {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b\n    return b\n",
        "b.py": "def g():\n    import pkg.a\n    return pkg.a\n",
    })
    _, graph = _build_graph(cyc, "pkg")
    cycles = _find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]], cycles
    assert graph["pkg.a"]["pkg.b"][0].endswith("a.py:2")
    assert graph["pkg.b"]["pkg.a"][0].endswith("b.py:2")
    assert "pkg.a -> pkg.b -> pkg.a" in _format_cycles(cycles, graph)

    # A DAG with a subpackage, relative imports and a TYPE_CHECKING back-edge: no cycle.
    dag = tmp_path / "dag" / "pkg"
    _write(dag, {
        "__init__.py": "",
        "a.py": "from .sub import c\nfrom .sub.c import X\n",
        "b.py": ("import typing\nfrom typing import TYPE_CHECKING\n"
                 "if TYPE_CHECKING:\n    from .a import Y\n"
                 "if typing.TYPE_CHECKING:\n    import pkg.a\n"
                 "def h():\n    from pkg.sub import c\n"),
        "sub/__init__.py": "from pkg.sub.c import X\n",
        "sub/c.py": "X = 1\n\ndef k():\n    from .. import d\n    return d\n",
        "d.py": "",
    })
    _, graph = _build_graph(dag, "pkg")
    assert _find_cycles(graph) == []
    assert set(graph["pkg.a"]) == {"pkg.sub", "pkg.sub.c"}  # parent package edge added
    assert set(graph["pkg.sub"]) == {"pkg.sub.c"}  # no self edge for the package __init__
    assert set(graph["pkg.sub.c"]) == {"pkg.d"}  # no edge to its own ancestor pkg.sub
    assert set(graph["pkg.b"]) == {"pkg.sub", "pkg.sub.c"}  # TYPE_CHECKING imports ignored

    # A lazy back-edge from the leaf closes cycles, also through the subpackage's __init__.
    _write(dag, {"d.py": "def m():\n    from .a import Y\n"})
    _, graph = _build_graph(dag, "pkg")
    assert _find_cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.d", "pkg.a"],
                                   ["pkg.a", "pkg.sub.c", "pkg.d", "pkg.a"]]
