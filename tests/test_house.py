"""The house rules, checked over the package's source with ``ast``.

- ``import conceptprobe`` loads neither torch nor transformers (a notebook imports it for free);
- no module imports another module's private (``_``-prefixed) names;
- no import cycles between modules (imports under ``if TYPE_CHECKING:`` are not run, so they do not count);
- each layer imports only downward: tasks, measures and models never import training, report or the CLI;
  training never imports report.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "conceptprobe"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Import statements outside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in mods.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != name:
                        edges[name].add(alias.name)
                continue
            if not node.module or not node.module.startswith("conceptprobe"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                target = sub if sub in mods else node.module
                if target in mods and target != name:
                    edges[name].add(target)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append((name, node.module, alias.name))
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    return out


def test_import_conceptprobe_is_light():
    code = "import sys, conceptprobe; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]"


def test_no_module_imports_another_modules_private_names():
    _edges, private = _graph()
    assert not private, private


def test_there_are_no_import_cycles():
    edges, _ = _graph()
    cycles = [c for c in _cycles(edges) if c != ["conceptprobe"]]
    assert not cycles, cycles


def test_layers_import_only_downward():
    edges, _ = _graph()
    upper = ("conceptprobe.training", "conceptprobe.report", "conceptprobe.commands", "conceptprobe.cli")
    for name, targets in edges.items():
        if name.startswith(("conceptprobe.tasks", "conceptprobe.measures", "conceptprobe.models")):
            bad = [t for t in targets if t.startswith(upper)]
            assert not bad, (name, bad)
        if name.startswith("conceptprobe.training"):
            bad = [t for t in targets if t.startswith(("conceptprobe.report", "conceptprobe.commands"))]
            assert not bad, (name, bad)
