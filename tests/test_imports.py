"""Imports point down: no two patchdb modules import each other, at the top of the file or
inside a function (a deferred import is still a dependency)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "patchdb"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: patchdb modules it imports}, read from the source with ast (nothing runs).
    `from patchdb.x import y` counts as importing patchdb.x.y when that is a module, else
    as importing patchdb.x."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("patchdb"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if not base.startswith("patchdb"):
                    continue
                subs = {f"{base}.{a.name}" for a in node.names} & modules.keys()
                found.update(subs)
                if len(subs) < len(node.names):  # a name defined in the module itself
                    found.add(base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_graph_sees_deferred_imports() -> None:
    """The reader itself: a deferred import inside a function is found (the CLI's commands
    load their stages lazily)."""
    graph = import_graph()
    assert "patchdb.label.server" in graph["patchdb.cli.label_cmd"]  # imported inside label()
    assert "patchdb.store.merge" in graph["patchdb.label.transfer"]


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, set())})
    assert pairs == [], f"modules that import each other: {pairs}"
