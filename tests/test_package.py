"""The package's shape: a DAG of imports (function-level imports count: they would only hide a
cycle), an MLX runtime that never imports torch, transformers or the reference side, one module
object per file, no module far over 400 lines, and no symlink in the repository."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mlx_listen": ROOT / "mlx_listen", "mlx_listen_convert": ROOT / "convert"}
# Modules allowed past ~400 lines, and why (see the README's layout section).
LONG = {
    "mlx_listen.interp.patching": "one batched mechanism (runs, caches, patches) whose docstring is its cost model",
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for both import packages."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for p in sorted(folder.rglob("*.py")):
            rel = p.relative_to(folder).with_suffix("")
            out[".".join((pkg, *rel.parts)).removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports, anywhere in its file."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            if t in known and t != name and t not in PACKAGES:
                deps.add(t)
                break
    return deps


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 40 and "mlx_listen.cli" in graph and "mlx_listen_convert.convert" in graph
    assert graph["mlx_listen.eval.evaluate"] >= {"mlx_listen.records", "mlx_listen.eval.conditions"}  # edges seen
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_a_cycle_would_be_caught(tmp_path):
    """The checker on a planted two-module cycle hidden in a function."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    known = {"p.a", "p.b"}
    graph = {"p.a": _imports("p.a", tmp_path / "a.py", known), "p.b": _imports("p.b", tmp_path / "b.py", known)}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


def _roots(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add((node.module or "").split(".")[0])
    return out


@pytest.mark.parametrize("banned", ["torch", "transformers"])
def test_only_the_reference_side_imports_torch(banned):
    for name, path in _modules().items():
        if not name.startswith("mlx_listen_convert.reference"):
            assert banned not in _roots(path), f"{name} imports {banned}"


def test_runtime_never_imports_torch():
    """The MLX runtime must run on a Mac without PyTorch (or transformers' torch side)."""
    import ast

    root = ROOT / "mlx_listen"
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("torch", "transformers"), f"{f.name} imports {n}"



def test_the_runtime_never_imports_the_reference_side():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("mlx_listen."):
            assert not any(d.startswith("mlx_listen_convert.reference") for d in deps), name


def test_layers_depend_downward():
    """models and interp never reach up into the runs; interp never into eval or method."""
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("mlx_listen.models", "mlx_listen.interp")):
            bad = [d for d in deps if d.startswith(("mlx_listen.eval", "mlx_listen.method", "mlx_listen.cli"))]
            assert not bad, f"{name} imports {bad}"
        if name.startswith("mlx_listen.eval"):
            assert not [d for d in deps if d.startswith(("mlx_listen.method", "mlx_listen.cli"))], name


def test_modules_stay_short():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    over = {n: k for n, k in long.items() if k > 440 and n not in LONG}
    assert not over, f"modules over ~400 lines: {over}"


@pytest.mark.slow
def test_convert_is_one_module_per_file():
    """From the repository root `convert/` is not importable under a second name."""
    r = subprocess.run([sys.executable, "-c", "import convert"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "mlx_listen_convert" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import mlx_listen_convert.convert, mlx_listen.cli, sys; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('convert', 'cli')))"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_no_symlinks_are_tracked():
    r = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist): nothing is tracked")
    links = [line.split("\t")[1] for line in r.stdout.splitlines() if line.startswith("120000")]
    assert not links, f"symlinks: {links}"
