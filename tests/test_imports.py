"""The shape of the code, read from the imports (ast): the layers `fklip <- export <- engines <- CLI`,
no import cycles, and imports inside functions only for optional heavy packages.

- The core (`fklip/`, but not `fklip/cli/`) imports neither `export` nor `engines`; `export` does
  not import `engines`; the CLI (`fklip/cli/`) is the only place that imports all three.
- No cycle among the modules of the three packages, counting imports inside functions.
- An import inside a function is for an optional heavy package (onnx, onnxruntime, tensorrt,
  triton, h5py, spacy), a POSIX-only one (fcntl), or the module that needs one (the Triton
  kernel); the CLI's commands
  import what they run inside their functions, so `fklip --help` loads no torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("fklip", "export", "engines")
OPTIONAL = {"onnx", "onnxruntime", "tensorrt", "triton", "h5py", "spacy",
            "fcntl"}  # fcntl: POSIX only (file locks), imported where a lock is taken
LAZY_MODULES = {"fklip.retrieval.kernel"}  # imports triton at its top
LAYER = {"fklip": 0, "export": 1, "engines": 2, "cli": 3}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    cli = module in ("fklip.cli", "fklip.__main__") or module.startswith("fklip.cli.")
    return "cli" if cli else module.split(".")[0]


def read_imports(root: Path) -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported module, inside a function, line)] for the three packages under `root`;
    `from a.b import c` counts as a.b.c when that is a module, else a.b."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    out: dict[str, list[tuple[str, bool, int]]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(n) for n in tree.body}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative imports
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            inside = id(node) not in top_level and not _in_type_checking(tree, node)
            found += [(n, inside, node.lineno) for n in names]
        out[module] = found
    return out


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and ast.unparse(top.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            if any(n is node for n in ast.walk(top)):
                return True
    return False


def problems(root: Path) -> list[str]:
    imports = read_imports(root)
    ours = set(imports)
    found = []
    for module, entries in imports.items():
        for target, inside, line in entries:
            top = target.split(".")[0]
            if top in PACKAGES and target in ours | {p for p in PACKAGES}:
                mine, theirs = layer_of(module), layer_of(target)
                if mine != "cli" and LAYER[theirs] > LAYER[mine]:
                    found.append(f"{module}:{line} imports {target}: {mine} may not import {theirs}")
            if inside and layer_of(module) != "cli" and top not in OPTIONAL and target not in LAZY_MODULES:
                found.append(f"{module}:{line} imports {target} inside a function (only optional heavy "
                             f"packages may be: {', '.join(sorted(OPTIONAL))})")
    graph = {m: {t for t, _, _ in e if t in ours and t != m} for m, e in imports.items()}
    found += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_follow_the_layers_without_cycles():
    assert problems(ROOT) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for pkg in PACKAGES:
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").touch()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(("files", "expected"), [
    ({"fklip/a.py": "from engines import b\n", "engines/b.py": ""}, "fklip may not import engines"),
    ({"fklip/a.py": "import export.c\n", "export/c.py": ""}, "fklip may not import export"),
    ({"export/a.py": "from engines.b import x\n", "engines/b.py": "x = 1\n"}, "export may not import engines"),
    ({"fklip/a.py": "def f():\n    import torch\n"}, "imports torch inside a function"),
    ({"fklip/a.py": "def f():\n    from fklip import b\n", "fklip/b.py": "from fklip import a\n"}, "import cycle"),
])
def test_the_check_fails_on_a_bad_layout(tmp_path, files, expected):
    _write(tmp_path, files)
    assert any(expected in p for p in problems(tmp_path)), problems(tmp_path)


def test_the_check_allows_what_the_rules_allow(tmp_path):
    _write(tmp_path, {"engines/a.py": "from export import b\nimport fklip.c\n", "export/b.py": "import fklip.c\n",
                      "fklip/c.py": "def f():\n    import onnxruntime\n    import triton\n",
                      "fklip/cli/__init__.py": "import engines.a\n\ndef cmd():\n    from export import b\n"})
    assert problems(tmp_path) == []
