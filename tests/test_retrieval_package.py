"""fklip.retrieval's imports, read with ast: no module of the package imports one that imports it
back (at the top or inside a function, where the old retrieval.py <-> fused_topk.py cycle hid),
only kernel.py imports triton, and the kernel is imported only inside functions (triton is
optional), which are the only imports allowed there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = "fklip.retrieval"
KERNEL = f"{PACKAGE}.kernel"
LAZY = ("triton", KERNEL)  # the only imports allowed inside a function: optional heavy packages


def _module_names(folder: Path, package: str) -> dict[str, Path]:
    return {package if path.stem == "__init__" else f"{package}.{path.stem}": path
            for path in sorted(folder.glob("*.py"))}


def imports(tree: ast.Module, modules: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import in `tree`; `from package
    import name` counts as an import of the submodule `package.name` where that is one of
    `modules`."""
    functions = [fn for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(node) for fn in functions for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        found += [(name, id(node) in nested, node.lineno) for name in dict.fromkeys(names)]
    return found


def problems(sources: dict[str, str]) -> list[str]:
    """Every cycle among the modules of `sources` (module name -> source text), every triton import
    outside the kernel module, every import of the kernel at module level and every other import
    inside a function."""
    modules = set(sources)
    edges: dict[str, set[str]] = {}
    found = []
    for module, text in sources.items():
        edges[module] = set()
        for name, lazy, line in imports(ast.parse(text), modules):
            target = next((m for m in sorted(modules, key=len, reverse=True)
                           if name == m or name.startswith(m + ".")), None)
            if target is not None and target != module:
                edges[module].add(target)
            if (name == "triton" or name.startswith("triton.")) and module != KERNEL:
                found.append(f"{module}:{line} imports {name}: only {KERNEL} may import triton")
            if name == KERNEL and not lazy:
                found.append(f"{module}:{line} imports {KERNEL} at module level: it imports triton, "
                             "an optional package; import it inside the function that runs it")
            if lazy and not any(name == p or name.startswith(p + ".") for p in LAZY):
                found.append(f"{module}:{line} imports {name} inside a function: only optional heavy "
                             f"packages ({', '.join(LAZY)}) go there; import it at the top")

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in path:
                cycle = cycle_from(start, path + [nxt])
                if cycle:
                    return cycle
        return None

    cycles = {tuple(c) for m in sorted(edges) if (c := cycle_from(m, [m]))}
    seen: set[frozenset[str]] = set()
    for cycle in sorted(cycles):
        if frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            found.append("import cycle: " + " -> ".join(cycle))
    return found


def test_retrieval_package_imports():
    folder = ROOT / "fklip" / "retrieval"
    sources = {name: path.read_text() for name, path in _module_names(folder, PACKAGE).items()}
    assert {f"{PACKAGE}.{m}" for m in ("codec", "chunked", "fused", "kernel", "recall")} <= set(sources)
    assert problems(sources) == []


@pytest.mark.parametrize("sources,expected", [
    # the old layout's cycle: the search imports the fused path inside a function, which takes
    # the codec back from it
    ({PACKAGE: "def search():\n    from fklip.retrieval.fused import search_fused\n",
      f"{PACKAGE}.fused": "def search_fused():\n    from fklip.retrieval import _decode\n"},
     "import cycle: fklip.retrieval -> fklip.retrieval.fused -> fklip.retrieval"),
    ({f"{PACKAGE}.codec": "from fklip.retrieval import chunked\n",
      f"{PACKAGE}.chunked": "from fklip.retrieval.codec import merge\n"},
     "import cycle: fklip.retrieval.chunked -> fklip.retrieval.codec -> fklip.retrieval.chunked"),
    ({f"{PACKAGE}.fused": "import triton.language as tl\n"}, "only fklip.retrieval.kernel may import triton"),
    ({f"{PACKAGE}.fused": "from fklip.retrieval.kernel import fused_topk\n", KERNEL: "import triton\n"},
     "imports fklip.retrieval.kernel at module level"),
    ({f"{PACKAGE}.chunked": "def f():\n    from tqdm import tqdm\n"}, "imports tqdm inside a function"),
])
def test_import_check_finds(sources, expected):
    """The check itself: each bad layout is reported."""
    assert any(expected in problem for problem in problems(sources)), problems(sources)
