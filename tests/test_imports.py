"""No import circles inside the megamor package (read from the source with ast: fast, nothing
is imported).

What counts as an import of module A by module B:
- every `import` / `from ... import` statement in B, at module level or inside a function or
  method: a function-level import is a dependency deferred to call time, and hiding a circle
  behind one is what this test is meant to stop. Imports under `if TYPE_CHECKING:` are not
  counted (they never run);
- `from P import name` counts as an import of `P.name` when that is a module, of the submodule
  that a package's lazy `_EXPORTS` table maps `name` to (megamor/data/__init__.py), else of P;
- importing `a.b.c` also imports the packages `a` and `a.b` (their `__init__` runs first), except
  the importing module's own packages, which Python has initialised before the module runs.
Only modules of megamor count (launch/, tokenizer/ and third-party modules are not followed).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "_EXPORTS"):
            return ast.literal_eval(node.value)
    return {}


def _import_nodes(tree: ast.Module):
    """Import statements that can run (not those under `if TYPE_CHECKING:`)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (see the module docstring)."""
    mods = _modules(root, package)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in mods.items()}
    lazy = {name: _lazy_exports(t) for name, t in trees.items() if mods[name].name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        is_pkg = mods[name].name == "__init__.py"
        targets: set[str] = set()
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:
                    targets.add(sub)
                elif a.name in lazy.get(base, {}):
                    targets.add(f"{base}.{lazy[base][a.name]}")
                else:
                    targets.add(base)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1 + is_pkg)}
        edges = set()
        for t in targets:
            parts = t.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[name] = {t for t in edges if t in mods and t != name and t not in own}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) per back edge of a depth-first search."""
    cycles, state, path = [], {}, []

    def visit(v: str) -> None:
        state[v] = "open"
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return cycles


def test_no_import_circles_in_megamor():
    graph = import_graph(ROOT, "megamor")
    assert len(graph) > 40 and graph["megamor.data.loader"] >= {"megamor.data.shard_reader"}
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_circles(tmp_path):
    """The kinds of circle megamor had: through a function-level import, through a package's
    __init__ (importing pkg.b runs pkg/__init__), and through a lazy export."""
    pkg = tmp_path / "p"
    files = {
        "__init__.py": "",
        "flops.py": "from p.m.layout import Plan\n",
        "m/__init__.py": "def plan_for():\n    from p.flops import x\n",
        "m/layout.py": "Plan = 1\n",
        "m/a.py": "from .b import B\n",
        "m/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.m.a import A\n",
        "d/__init__.py": "_EXPORTS = {'Reader': 'reader', 'Spec': 'spec'}\n",
        "d/reader.py": "def f():\n    from p.d import Spec\n",
        "d/spec.py": "from p.d import Reader\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    cycles = {tuple(c) for c in find_cycles(import_graph(tmp_path, "p"))}
    assert cycles == {("p.flops", "p.m", "p.flops"), ("p.d.reader", "p.d.spec", "p.d.reader")}, cycles
