"""The package's boundaries: no two library modules import each other (directly or through
others, top-level or inside functions), the library never imports its command-line apps, and
no top-level ``triton_kernels`` module is installed while the Triton backend stays reachable."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import kfac_kernels

PACKAGE = Path(kfac_kernels.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every kfac_kernels module a file imports, at any depth of its code."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # "from . import x" imports the submodule x
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m == "kfac_kernels" or m.startswith("kfac_kernels.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_library_never_imports_the_apps():
    graph = _graph()
    offenders = {m: sorted(d for d in deps if d.startswith("kfac_kernels.apps"))
                 for m, deps in graph.items() if not m.startswith("kfac_kernels.apps")}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_import_cycles_between_library_modules():
    """Strongly connected components of the import graph (packages import their own
    submodules, which is not a cycle of two modules: package -> child edges are dropped)."""
    graph = {m: {d for d in deps if not d.startswith(m + ".") and not m.startswith(d + ".")}
             for m, deps in _graph().items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles


def test_no_top_level_triton_kernels_module(tmp_path):
    """The Triton kernels install as kfac_kernels._triton: outside the repository (whose root
    is not on sys.path there) ``import triton_kernels`` fails while the package's own name
    works."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util, kfac_kernels._triton as t; "
            "print(importlib.util.find_spec('triton_kernels') is None, t.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "kfac_kernels._triton"]
