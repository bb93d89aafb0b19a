"""Imports between trellis' top-level folders (and engine/'s subpackages), counted from the source.

    python tools/import_graph.py [--root DIR] [--check] [--lazy]

Nodes: errors (trellis/errors.py), trellis (the package root: __version__), cli (trellis/cli.py and
trellis/commands/), configs, parallel, launchers, slurm, engine (its top-level modules) and one node per
engine subpackage (engine.backends, engine.checkpoint, engine.peft, engine.memory). An edge A -> B counts the
import statements in A's files that name a module of B; "lazy" counts those inside a function body.

--check exits 1 when an edge breaks the import rules (RULES below): configs import only errors; parallel
imports only errors and configs (plus torch, transformers and optional libraries); launchers only errors;
engine never imports cli; the estimator (engine.memory) imports no other engine room. --lazy lists every
in-function import of an internal module (the ones a cycle would force are the ones to look at).
Standard library only; reads files, imports nothing of trellis.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

# top-level folder -> import package (pyproject.toml [tool.setuptools] package-dir)
FOLDERS = {"trellis": "trellis", "engine": "trellis.engine", "parallel": "trellis.parallel",
           "configs": "trellis.configs", "launchers": "trellis.launchers", "slurm": "trellis.slurm"}
ENGINE_ROOMS = ("backends", "checkpoint", "peft", "memory")  # the subpackages; a tree without them is flat

# node -> nodes it may import (None: anything)
RULES: dict[str, set[str] | None] = {
    "errors": set(),
    "trellis": set(),
    "configs": {"errors"},
    "parallel": {"errors", "configs"},
    "launchers": {"errors"},
    "slurm": {"errors", "trellis", "launchers", "configs"},
    "engine.memory": {"errors", "configs", "parallel"},
    "cli": None,
}
ENGINE_MAY_IMPORT = {"errors", "trellis", "configs", "parallel", "launchers", "engine", *(f"engine.{r}" for r in ENGINE_ROOMS)}


def node_of(module: str, rooms=ENGINE_ROOMS) -> str | None:
    """The graph node of a dotted trellis module name, None for anything outside trellis."""
    parts = module.split(".")
    if parts[0] != "trellis":
        return None
    if len(parts) == 1:
        return "trellis"
    top = parts[1]
    if top == "errors":
        return "errors"
    if top in ("cli", "commands", "__main__"):
        return "cli"
    if top == "engine":
        return f"engine.{parts[2]}" if len(parts) > 2 and parts[2] in rooms else "engine"
    if top in ("parallel", "configs", "launchers", "slurm"):
        return top
    return "trellis"


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a source file under the repository root."""
    rel = path.relative_to(root)
    pkg = FOLDERS[rel.parts[0]]
    inner = list(rel.parts[1:])
    is_pkg = inner[-1] == "__init__.py"
    inner[-1] = inner[-1][:-3]
    if is_pkg:
        inner = inner[:-1]
    return ".".join([pkg, *inner]), is_pkg


def _imports(tree: ast.AST):
    """(node, inside a function) for every import statement."""
    def walk(n, in_fn):
        for child in ast.iter_child_nodes(n):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_fn
            yield from walk(child, fn)
    yield from walk(tree, False)


def targets(stmt, module: str, is_pkg: bool) -> list[str]:
    if isinstance(stmt, ast.Import):
        return [a.name for a in stmt.names]
    if stmt.level == 0:
        base = stmt.module or ""
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (stmt.level - 1)]
        base = ".".join(pkg + ([stmt.module] if stmt.module else []))
    if stmt.module is None:  # from . import a, b: the names are modules
        return [f"{base}.{a.name}" for a in stmt.names]
    return [base]


def collect(root: Path):
    edges: Counter = Counter()
    lazy: Counter = Counter()
    lazy_sites: list[str] = []
    rooms = tuple(r for r in ENGINE_ROOMS if (root / "engine" / r / "__init__.py").is_file())
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            module, is_pkg = module_name(root, path)
            src = node_of(module, rooms)
            tree = ast.parse(path.read_text(), str(path))
            for stmt, in_fn in _imports(tree):
                for tgt in targets(stmt, module, is_pkg):
                    dst = node_of(tgt, rooms)
                    if dst is None:
                        continue
                    if in_fn:
                        lazy_sites.append(f"{path.relative_to(root)}:{stmt.lineno} {tgt}")
                    if dst != src:
                        edges[(src, dst)] += 1
                        if in_fn:
                            lazy[(src, dst)] += 1
    return edges, lazy, lazy_sites


def forbidden(edges: Counter) -> list[tuple[str, str]]:
    bad = []
    for (src, dst) in edges:
        allowed = RULES.get(src, ENGINE_MAY_IMPORT if src.startswith("engine") else None)
        if allowed is not None and dst not in allowed:
            bad.append((src, dst))
    return sorted(bad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/import_graph.py", description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="repository root")
    ap.add_argument("--check", action="store_true", help="exit 1 on a forbidden edge")
    ap.add_argument("--lazy", action="store_true", help="list in-function imports of internal modules")
    args = ap.parse_args(argv)
    root = Path(args.root)
    edges, lazy, lazy_sites = collect(root)
    bad = set(forbidden(edges))
    print(f"{'from':<18} {'to':<18} {'imports':>7} {'lazy':>5}")
    for (src, dst), n in sorted(edges.items()):
        mark = "  FORBIDDEN" if (src, dst) in bad else ""
        print(f"{src:<18} {dst:<18} {n:>7} {lazy[(src, dst)]:>5}{mark}")
    print(f"{sum(edges.values())} imports across nodes ({sum(lazy.values())} inside functions); "
          f"{len(lazy_sites)} in-function imports of trellis modules in all; {len(bad)} forbidden edge(s)")
    if args.lazy:
        print("\n".join(lazy_sites))
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
