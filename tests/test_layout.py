"""The package layout (issue: rooms that follow the data flow): every package is installed, under
the mergebench namespace only; no module reaches into another's private names; no import cycle,
not even one hidden inside a function; no sys.path edits."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR = PYPROJECT["tool"]["setuptools"]["package-dir"]  # dotted name -> folder
SOURCES = {"mergebench": ROOT / "mergebench", **{k: ROOT / v for k, v in PACKAGE_DIR.items()}}


def _modules() -> dict[str, tuple[Path, bool]]:
    """dotted module name -> (file, is_package) for every module mergebench installs."""
    mods: dict[str, tuple[Path, bool]] = {}
    for dotted, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if dotted == "mergebench" and rel[0] in {k.split(".")[1] for k in PACKAGE_DIR}:
                continue
            is_pkg = rel[-1] == "__init__"
            name = ".".join((dotted, *(rel[:-1] if is_pkg else rel)))
            mods[name] = (path, is_pkg)
    return mods


MODULES = _modules()


def _imports(name: str, path: Path, is_pkg: bool):
    """(target module, imported name or None, line, inside a function) for each mergebench import."""
    tree = ast.parse(path.read_text())
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    stack = [(node, False) for node in tree.body]
    while stack:
        node, in_func = stack.pop()
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("mergebench"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    yield (sub, None, node.lineno, in_func) if sub in MODULES else (target, alias.name, node.lineno,
                                                                                   in_func)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mergebench"):
                    yield alias.name, None, node.lineno, in_func
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            continue  # annotations only: never imported at run time
        func = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        stack.extend((child, in_func or func) for child in ast.iter_child_nodes(node))


def test_every_package_is_installed():
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {name for name, (_, is_pkg) in MODULES.items() if is_pkg}
    assert found == packages, f"pyproject.toml [tool.setuptools] packages: missing {found - packages}, " \
                              f"stale {packages - found}"


def test_builtins_and_leaderboard_live_under_the_mergebench_namespace(tmp_path):
    code = ("import importlib.util as u, json; "
            "print(json.dumps([u.find_spec(m) is not None for m in "
            "('baselines', 'leaderboard', 'mergebench.baselines.linear', 'mergebench.leaderboard.queries')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[false, false, true, true]"


def test_no_module_imports_another_modules_private_names():
    reach_ins = [f"{path.relative_to(ROOT)}:{line}: {target}.{imported}"
                 for name, (path, is_pkg) in MODULES.items()
                 for target, imported, line, _ in _imports(name, path, is_pkg)
                 if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
    assert reach_ins == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                out.append(sorted([v, *comp]))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("with_function_imports", [False, True], ids=["module-level", "including-functions"])
def test_no_import_cycles(with_function_imports):
    edges: dict[str, set[str]] = {}
    for name, (path, is_pkg) in MODULES.items():
        if name == "mergebench":  # its PEP 562 __getattr__ loads the method API on first use, by design
            continue
        for target, _, _, in_func in _imports(name, path, is_pkg):
            if in_func and not with_function_imports:
                continue
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                dst = ".".join(parts[:i])
                if dst in MODULES and dst != name and not name.startswith(dst + "."):
                    edges.setdefault(name, set()).add(dst)
    assert _cycles(edges) == []


def test_package_code_never_edits_sys_path():
    edits = [f"{path.relative_to(ROOT)}" for path, _ in MODULES.values() if "sys.path.insert" in path.read_text()
             or "sys.path.append" in path.read_text()]
    assert edits == []
