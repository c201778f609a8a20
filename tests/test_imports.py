"""No import circles in the project's packages, imports that follow the layers of
docs/architecture.md (both read from the source with ast: fast, nothing is imported), and
`megamor.launch` / `megamor.tokenizer` resolving to the right folders, from a checkout and
installed.

What counts as an import of module A by module B:
- every `import` / `from ... import` statement in B, at module level or inside a function or
  method: a function-level import is a dependency deferred to call time, and hiding a circle
  behind one is what this test is meant to stop. Imports under `if TYPE_CHECKING:` are not
  counted (they never run);
- `from P import name` counts as an import of `P.name` when that is a module, of the submodule
  that a package's lazy `_EXPORTS` table maps `name` to (megamor/data/__init__.py), else of P;
- importing `a.b.c` also imports the packages `a` and `a.b` (their `__init__` runs first), except
  the importing module's own packages, which Python has initialised before the module runs.
Every module of the megamor namespace counts, launch/ and tokenizer/ included (they are
`megamor.launch` and `megamor.tokenizer`); third-party modules are not followed.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Packages of the megamor namespace that live in folders of their own (setup.py's package_dir).
FOLDERS = {"megamor.launch": "launch", "megamor.tokenizer": "tokenizer"}


def _modules(root: Path, package: str, folders: dict[str, str]) -> dict[str, Path]:
    out = {}
    for name, folder in [(package, package), *folders.items()]:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join([name, *parts])] = path
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


def import_graph(root: Path, package: str, folders: dict[str, str] = {}) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (see the module docstring); `folders`:
    subpackages kept in other folders of `root` (name -> folder)."""
    mods = _modules(root, package, folders)
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
    graph = import_graph(ROOT, "megamor", FOLDERS)
    assert len(graph) > 40 and graph["megamor.data.loader"] >= {"megamor.data.shard_reader"}
    assert graph["megamor.launch.slurm"] >= {"megamor.pretrain", "megamor.launch.network"}
    assert graph["megamor.cli"] >= {"megamor.launch.slurm"} and "megamor.tokenizer" in graph
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


# The layers of docs/architecture.md, lowest first: a module may import modules of its own layer
# and of the layers below it, never above (a prefix names a package and everything in it).
LAYERS = [
    ("foundation", ["megamor.errors", "megamor.lazy_exports", "megamor.layout", "megamor.presets", "megamor.kernels",
                    "megamor.device", "megamor.precision", "megamor.shims", "megamor.parallel",
                    "megamor.lifecycle", "megamor.progress", "megamor.watchdog",
                    "megamor.stragglers", "megamor.step_health", "megamor.checksums",
                    "megamor.lineage", "megamor.checkpoint_meta", "megamor.tracking",
                    "megamor.depth_map", "megamor.flops", "megamor.testing",
                    "megamor.tokenizer"]),
    ("data", ["megamor.data"]),
    ("config", ["megamor.config", "megamor.planner"]),
    ("model", ["megamor.model"]),
    ("checkpoints", ["megamor.checkpoint", "megamor.schedule", "megamor.inference",
                     "megamor.preflight"]),
    ("engines", ["megamor.engines"]),
    ("training", ["megamor.training", "megamor.console"]),
    ("tools", ["megamor.hf", "megamor.evaluate", "megamor.generation", "megamor.commands",
               "megamor.node_watcher"]),
    ("entry points", ["megamor.pretrain", "megamor.launch", "megamor.cli"]),
]


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_imports.py (LAYERS) and "
                             f"docs/architecture.md: add it")
    return best[0]


def test_imports_follow_the_layers():
    graph = import_graph(ROOT, "megamor", FOLDERS)
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m in sorted(graph) if m != "megamor" for t in sorted(graph[m])
              if t != "megamor" and layer_of(t) > layer_of(m)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
    # What the layers are for: engines below the loop, the checkpointer below both.
    assert layer_of("megamor.engines.megatron") < layer_of("megamor.training.loop")
    assert layer_of("megamor.checkpoint") < layer_of("megamor.engines.base")


def _copy_sources(dest: Path, layout: str) -> Path:
    """megamor/, launch/ and tokenizer/ of this checkout, as a checkout (`layout="checkout"`:
    the folders side by side, with setup.py) or as installed (inside the package), each copy's
    launch and tokenizer marked with a variable naming the copy."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "megamor", dest / "megamor", ignore=ignore)
    for name in ("launch", "tokenizer"):
        target = dest / name if layout == "checkout" else dest / "megamor" / name
        shutil.copytree(ROOT / name, target, ignore=ignore)
        with open(target / "__init__.py", "a") as f:
            f.write(f"\nCOPY = {str(dest)!r}\n")
    if layout == "checkout":
        shutil.copy(ROOT / "setup.py", dest / "setup.py")
    return dest


IMPORT_BOTH = ("import megamor.launch.slurm, megamor.tokenizer.bpe, sys; "
               "print(megamor.launch.COPY, megamor.tokenizer.COPY, megamor.launch.slurm.__file__, "
               "megamor.tokenizer.bpe.__file__, 'launch' in sys.modules, "
               "'tokenizer' in sys.modules)")


def _imported(path: Path, cwd: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(path))
    out = subprocess.run([sys.executable, "-c", IMPORT_BOTH], cwd=cwd, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout.split()
    return out


def test_a_checkout_imports_its_own_launch_and_tokenizer(tmp_path):
    """A checkout run from PYTHONPATH (tests' rank subprocesses, worktrees beside a shared venv
    whose editable install maps another checkout) imports the launch/ and tokenizer/ beside its
    own megamor/; an installed layout (both inside the package) imports those, with no finder."""
    for layout in ("checkout", "installed"):
        copy = _copy_sources(tmp_path / layout, layout)
        launch_copy, tok_copy, slurm, bpe, top_launch, top_tok = _imported(copy, tmp_path)
        assert launch_copy == tok_copy == str(copy), (layout, launch_copy, tok_copy)
        assert slurm.startswith(str(copy)) and bpe.startswith(str(copy))
        assert top_launch == top_tok == "False"  # no generic top-level names imported


@pytest.mark.slow
def test_install_puts_launch_and_tokenizer_inside_megamor(tmp_path):
    """`pip install .` (no dependencies, no network): site-packages gains `megamor` only, and
    the installed package imports its own launch and tokenizer."""
    src = tmp_path / "src"
    _copy_sources(src, "checkout")
    for name in ("README.md", "setup.cfg"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["bin", "megamor"], top
    assert {"launch", "tokenizer"} <= {p.name for p in (site / "megamor").iterdir()}
    launch_copy, tok_copy, slurm, bpe, _, _ = _imported(site, tmp_path)
    assert launch_copy == tok_copy == str(src)  # the installed copies of this source tree
    assert slurm.startswith(str(site / "megamor" / "launch"))
    assert bpe.startswith(str(site / "megamor" / "tokenizer"))
