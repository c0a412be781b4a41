"""export/ imports only fklip (and itself): never engines/, at module level or inside a function.

Imports run one way, fklip <- export <- engines <- the CLI; a step of `fklip export` that needs a
runner (building and checking TensorRT engines) lives in engines/ and is passed in by the CLI.
"""

import ast
from pathlib import Path

EXPORT = Path(__file__).resolve().parents[2] / "export"


def engines_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of engines in `source`: `import engines...`, `from engines...
    import ...`, anywhere in the tree (functions included), and `importlib.import_module("engines...")`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            names = [node.args[0].value]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "engines" or name.startswith("engines.")]
    return found


def test_export_never_imports_engines():
    files = sorted(EXPORT.rglob("*.py"))
    assert EXPORT / "pipeline.py" in files and EXPORT / "manifest.py" in files
    edges = [f"{path.relative_to(EXPORT.parent)}:{line} imports {name}"
             for path in files for line, name in engines_imports(path.read_text(encoding="utf-8"))]
    assert not edges, "export/ must not import engines/ (fklip <- export <- engines <- CLI): " + "; ".join(edges)


def test_the_check_sees_every_kind_of_import():
    source = """
import engines
import numpy, engines.base as base
from engines.trt_runner import TrtRunner
from enginesque import x
from . import specs


def build():
    from engines import trt_build
    import importlib
    return importlib.import_module("engines.trt_runner"), importlib.import_module("export.trt")
"""
    assert engines_imports(source) == [(2, "engines"), (3, "engines.base"), (4, "engines.trt_runner"),
                                       (10, "engines"), (12, "engines.trt_runner")]
