"""The import rules of the tree (issue 14), read from the source: configs/ imports only the standard library
and trellis.errors; parallel/ never imports trellis.engine (nor the CLI / launchers) and otherwise only
torch, transformers and the optional quantization library, lazily; the whole graph passes
tools/import_graph.py --check."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(folder: str):
    """(file, line, imported module, inside a function, relative level) for every import under `folder`."""
    for path in sorted((REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))

        def walk(node, in_fn):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    for a in child.names:
                        yield path, child.lineno, a.name, in_fn, 0
                elif isinstance(child, ast.ImportFrom):
                    yield path, child.lineno, child.module or "", in_fn, child.level
                yield from walk(child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        yield from walk(tree, False)


def test_configs_import_only_the_standard_library_and_errors():
    bad = [f"{p.relative_to(REPO)}:{line} {mod}" for p, line, mod, _, level in _imports("configs")
           if level == 0 and mod.split(".")[0] not in sys.stdlib_module_names and mod != "trellis.errors"]
    assert not bad, bad


def test_parallel_never_imports_the_engine():
    bad = [f"{p.relative_to(REPO)}:{line} {mod}" for p, line, mod, _, level in _imports("parallel")
           if level == 0 and mod.startswith(("trellis.engine", "trellis.cli", "trellis.commands", "trellis.launchers",
                                              "trellis.slurm"))]
    assert not bad, bad
    text = "\n".join(p.read_text() for p in (REPO / "parallel").rglob("*.py"))
    assert "trellis.engine" not in text  # not even in a string or a comment (`grep -rn trellis.engine parallel/`)


def test_parallel_third_party_imports_are_torch_transformers_or_lazy_bitsandbytes():
    allowed = {"torch", "transformers", "trellis"}
    bad = []
    for p, line, mod, in_fn, level in _imports("parallel"):
        top = mod.split(".")[0]
        if level or top in sys.stdlib_module_names or top in allowed:
            continue
        if top == "bitsandbytes" and in_fn:
            continue  # optional: imported where a 4-bit linear is built
        bad.append(f"{p.relative_to(REPO)}:{line} {mod}")
    assert not bad, bad


def test_import_graph_has_no_forbidden_edge():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 forbidden edge(s)" in out.stdout


def test_import_graph_catches_a_forbidden_edge(tmp_path):
    """The checker itself: a parallel/ file importing the engine is reported and fails --check."""
    for folder in ("trellis", "engine", "parallel", "configs", "launchers", "slurm"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "parallel" / "bad.py").write_text("def f():\n    from trellis.engine.model import build_model\n")
    out = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--root", str(tmp_path), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "FORBIDDEN" in out.stdout, out.stdout


def test_no_python_file_over_500_lines_and_engine_top_level_stays_small():
    long = [f"{p.relative_to(REPO)}: {n}" for p in REPO.glob("*/**/*.py")
            if ".venv" not in p.parts and (n := len(p.read_text().splitlines())) > 500]
    assert not long, long
    assert len(list((REPO / "engine").glob("*.py"))) <= 15
