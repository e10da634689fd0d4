"""The shape of the code, read from its source: the imports among the package's and the
benchmarks' modules form no circle, and no function outside kernels/ and csrc/ runs past 80
lines (a function that long is several phases that want names of their own)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 80


def _modules() -> dict:
    """Module name -> source path: ``vinf_engine.*`` by package path, ``bench/*.py`` by their
    bare names (they import each other as scripts beside each other)."""
    mods = {}
    for p in (ROOT / "vinf_engine").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    for p in (ROOT / "bench").glob("*.py"):
        mods[p.stem] = p
    return mods


def _imports(name: str, path: pathlib.Path, known: dict) -> set:
    """The known modules ``name`` imports anywhere in its source (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule; ``from pkg import name``, pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                out.add(t)
    return out


def test_no_import_circles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "vinf_engine.phases" in graph and "throughput" in graph      # the walk sees them
    state, circles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def _long_functions(paths) -> list:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{p}:{node.lineno} {node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("folder", ["vinf_engine", "bench", "tests"])
def test_no_function_past_80_lines(folder):
    paths = sorted((ROOT / folder).rglob("*.py"))
    assert paths
    assert not _long_functions(paths)


def test_the_checks_can_fail(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_LINES)
    assert _long_functions([long])
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("def g():\n    import pkg.a\n")
    known = {"pkg.a": a, "pkg.b": b, "pkg": tmp_path / "__init__.py"}
    assert _imports("pkg.a", a, known) == {"pkg.b"} and _imports("pkg.b", b, known) == {"pkg.a"}
