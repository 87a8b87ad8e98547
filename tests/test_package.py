"""The package's shape: a DAG of imports (function-level imports count: they would only hide a
cycle), and an MLX runtime that never imports torch or transformers."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mlx_listen"


def _modules() -> dict[str, Path]:
    """Dotted name -> file, the symlinked `convert/` and `cli.py` included."""
    out = {}
    for p in sorted(PKG.rglob("*.py")) + sorted((PKG / "convert").glob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        name = ".".join(("mlx_listen", *rel.parts)).removesuffix(".__init__")
        out[name] = p
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
            if t in known and t not in (name, "mlx_listen"):
                deps.add(t)
                break
    return deps


def test_import_graph_has_no_cycle():
    mods = _modules()
    assert len(mods) > 20 and "mlx_listen.cli" in mods and "mlx_listen.convert.convert" in mods
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    assert graph["mlx_listen.evaluate"] >= {"mlx_listen.records", "mlx_listen.conditions"}  # the check sees edges
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


@pytest.mark.parametrize("banned", ["torch", "transformers"])
def test_runtime_never_imports_the_reference_side(banned):
    for name, path in _modules().items():
        if name.startswith("mlx_listen.convert"):
            continue  # the converter and the PyTorch reference live there
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(r.split(".")[0] == banned for r in roots), f"{name} imports {banned}"
