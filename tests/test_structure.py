"""The shape of the code: packages depend on each other without cycles, model/ on none of the
others, and only the runtime asks which backend it runs on."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "sharding", "checkpoints", "training", "experiments")


def _imports(package: str) -> set[str]:
    """The other top-level packages of this repository that `package` imports anywhere (lazy
    imports inside functions included)."""
    found = set()
    for file in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found - {package}


def test_no_import_cycle_between_packages():
    graph = {p: _imports(p) for p in PACKAGES}
    assert graph["model"] == set(), "model/ imports nothing above it"
    done, path = set(), []

    def visit(p):
        if p in path:
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(p):] + [p])}")
        if p in done:
            return
        path.append(p)
        for q in sorted(graph[p]):
            visit(q)
        path.pop()
        done.add(p)

    for p in PACKAGES:
        visit(p)


def test_only_the_runtime_asks_for_the_backend():
    asking = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "model").rglob("*.py")
                    if "default_backend" in f.read_text())
    assert asking == ["model/runtime.py"]
