"""The shape of the house: no import cycles among forvalue's modules, a torch-free client, short functions.

These read the source (ast), not the running interpreter, so a cycle hidden in a function-local import is
found too; imports under `if TYPE_CHECKING:` are type hints only and left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"indexer": "forvalue.indexer", "server": "forvalue.server", "client": "forvalue.client"}
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, Path]:
    """forvalue module name → its source file (generated protocol code left out)."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "generated" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [] if rel.name == "__init__" else list(rel.parts)
            out[".".join([pkg, *parts])] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The forvalue modules that module `name` imports anywhere in its source (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert graph["forvalue.indexer.index"], "the import walk found nothing: it is broken"
    assert cycles(graph) == []


def test_client_import_loads_no_model_library():
    """`from forvalue.client import InfluenceClient` (and the CLI module) load neither torch, faiss nor
    transformers: a user who only queries a server needs none of them."""
    code = ("import sys; from forvalue.client import InfluenceClient; import forvalue.client.cli; "
            "print(','.join(m for m in ('torch', 'faiss', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_client_check_can_fail():
    code = "import sys; import forvalue.indexer.index; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """"file:line name (N lines)" of every function or method of `path` longer than `limit` lines."""
    tree = ast.parse(path.read_text())
    return [f"{path.name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


@pytest.mark.parametrize("name", sorted(module_files()))
def test_no_function_over_80_lines(name):
    assert long_functions(module_files()[name]) == []


def test_long_function_check_can_fail(tmp_path):
    src = tmp_path / "long.py"
    src.write_text("def short():\n    return 1\n\n\nclass A:\n    def long(self):\n" + "        x = 1\n" * 80)
    assert long_functions(src) == ["long.py:6 long (81 lines)"]
