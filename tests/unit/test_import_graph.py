"""The package keeps its layering: no import circles, no forbidden edges (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "app" / "hivemind_worker"
ROOT = "hivemind_worker"

# What the pool may import of the package: the wire stubs and the shared domain modules.
POOL_MAY_IMPORT = {
    f"{ROOT}",
    f"{ROOT}.protocol",
    f"{ROOT}.tasks",
    f"{ROOT}.task_params",
    f"{ROOT}.spec_checks",
    f"{ROOT}.net",
    f"{ROOT}.errors",
    f"{ROOT}.archives",
    f"{ROOT}.pool",
}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(
    path: Path, package: Path, *, top_level_only: bool, type_checking: bool = False
) -> set[str]:
    """The package modules a file imports; top level only, or also inside functions; with
    `type_checking`, also those imported for annotations only."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    this = module_name(path, package)
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        if is_type_checking_block(node) and not type_checking:
            return  # annotations only: no import at run time
        if isinstance(node, ast.Import):
            if not (in_function and top_level_only):
                found.update(a.name for a in node.names if a.name.startswith(ROOT))
        elif isinstance(node, ast.ImportFrom) and not (in_function and top_level_only):
            base = node.module or ""
            if node.level:
                anchor = this.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith(ROOT):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return found


def sources(package: Path) -> dict[str, Path]:
    return {
        module_name(p, package): p
        for p in package.rglob("*.py")
        if "protocol" not in p.relative_to(package).parts
    }


def known(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an import names (a `from pkg import name` may name a function)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def circles(package: Path, *, every_import: bool = False) -> list[str]:
    """Import circles as 'a -> b -> a': among module-level imports, or (`every_import`) also
    counting imports inside functions and for annotations, which tie modules together too."""
    modules = sources(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = imports(path, package, top_level_only=not every_import, type_checking=every_import)
        targets = {known(i, modules) for i in found}
        # A package's __init__ importing its own submodules is no circle.
        graph[name] = {m for m in targets if m and m != name and not name.startswith(m + ".")}
    found: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name)
    return found


def forbidden_edges(package: Path) -> list[str]:
    problems = []
    for name, path in sources(package).items():
        used = imports(path, package, top_level_only=False)
        if name.startswith(f"{ROOT}.pool"):
            bad = {
                i
                for i in used
                if not any(i == ok or i.startswith(ok + ".") for ok in POOL_MAY_IMPORT - {ROOT})
                and i != ROOT
                and not i.startswith(f"{ROOT}.__version__")
            }
            problems += [f"{name} (pool) imports {i}" for i in sorted(bad)]
        if name.startswith(f"{ROOT}.engine") and name != f"{ROOT}.engine.pool_client":
            problems += [
                f"{name} (engine) imports {i}"
                for i in sorted(used)
                if i.startswith(f"{ROOT}.protocol")
                or i.startswith(f"{ROOT}.gui")
                or i.startswith(f"{ROOT}.cli")
                or i.startswith(f"{ROOT}.pool")
                or i.startswith(f"{ROOT}.wiring")
            ]
        if name.startswith(f"{ROOT}.gui"):
            problems += [
                f"{name} (gui) imports {i}"
                for i in sorted(used)
                if i.startswith(f"{ROOT}.cli") or i.startswith(f"{ROOT}.pool.cli")
            ]
        if name in (f"{ROOT}.wiring", f"{ROOT}.demo"):
            problems += [
                f"{name} (Qt-free composition) imports {i}"
                for i in sorted(used)
                if i.startswith(f"{ROOT}.gui") or i.startswith(f"{ROOT}.cli")
            ]
    return problems


def test_no_import_circles_at_module_level() -> None:
    assert not circles(PACKAGE), "\n".join(circles(PACKAGE))


def test_no_import_circles_counting_deferred_and_annotation_imports() -> None:
    """A circle hidden in a function or a TYPE_CHECKING block still ties two rooms together."""
    assert not circles(PACKAGE, every_import=True), "\n".join(circles(PACKAGE, every_import=True))


def test_no_forbidden_edges() -> None:
    problems = forbidden_edges(PACKAGE)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_circle_and_a_forbidden_edge(tmp_path: Path) -> None:
    """The walk must notice what it is there to notice: a checker that sees nothing passes."""
    fake = tmp_path / "hivemind_worker"
    (fake / "pool").mkdir(parents=True)
    (fake / "pool" / "server.py").write_text("from hivemind_worker.engine.engine import X\n")
    (fake / "a.py").write_text("from hivemind_worker import b\n")
    (fake / "b.py").write_text(
        "def f():\n    from hivemind_worker import gui\nimport hivemind_worker.a\n"
    )
    assert "hivemind_worker.gui" not in imports(fake / "b.py", fake, top_level_only=True)
    assert "hivemind_worker.gui" in imports(fake / "b.py", fake, top_level_only=False)
    assert circles(fake) == ["hivemind_worker.a -> hivemind_worker.b -> hivemind_worker.a"]
    (fake / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hivemind_worker import d\n"
    )
    (fake / "d.py").write_text("def f():\n    from hivemind_worker import c\n")
    assert not any("hivemind_worker.c" in c for c in circles(fake))
    assert "hivemind_worker.c -> hivemind_worker.d -> hivemind_worker.c" in circles(
        fake, every_import=True
    )
    assert "hivemind_worker.pool.server (pool) imports hivemind_worker.engine.engine" in (
        forbidden_edges(fake)
    )


QT_BINDINGS = ("PySide6", "shiboken6", "pyqtgraph")


def qt_imports(path: Path) -> list[str]:
    """Every Qt binding a file imports, at any level (functions and annotations too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else []
        )
        found += [n for n in names if n.split(".")[0] in QT_BINDINGS]
    return found


def test_only_the_gui_imports_a_qt_binding() -> None:
    """The engine thread, the pool and the headless worker run this code: PySide is not safe
    to import beside the GUI thread (a crash CI found: docs/reliability.md), so only `gui`,
    whose code runs on the GUI thread, may import it."""
    problems = [
        f"{name} imports {qt}"
        for name, path in sources(PACKAGE).items()
        if not name.startswith(f"{ROOT}.gui")
        for qt in qt_imports(path)
    ]
    assert problems == []
    # The check itself: the GUI's modules are found importing PySide6.
    assert qt_imports(PACKAGE / "gui" / "main.py")
