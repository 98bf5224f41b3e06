"""The package's import graph: no circles, and runtime entry points load no
test-only (``mlx_moe.testing``) or benchmark (``mlx_moe.bench``) code."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import mlx_moe
from mlx_moe import loading, offload

PACKAGE = mlx_moe.__name__


def _modules():
    """``{module name: source path}`` for every module of the package."""
    root = Path(mlx_moe.__file__).parent
    mods = {PACKAGE: root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix=PACKAGE + "."):
        base = root.joinpath(*info.name.split(".")[1:])
        mods[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return mods


def _ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _edges(name, path, mods):
    """Intra-package modules ``name`` imports anywhere in its file (module level
    and inside functions). Importing ``a.b.c`` also runs package ``a.b``, unless
    ``name`` is inside it (then it is already running)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            targets.add(base)
            # ``from pkg import sub`` imports the submodule ``pkg.sub``.
            targets |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
    out = set()
    for t in targets:
        if t == PACKAGE or not t.startswith(PACKAGE + "."):
            continue
        for m in _ancestors(t) | {t}:
            if m in mods and m != name and m not in _ancestors(name):
                out.add(m)
    return out


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack = []

    def visit(n):
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph[n]):
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _edges(name, path, mods) for name, path in mods.items()}
    assert "mlx_moe.loading" in graph and "mlx_moe.offload.loader" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_runtime_imports_no_test_or_bench_code():
    code = (
        "import json, sys\n"
        "import mlx_moe, mlx_moe.generate, mlx_moe.convert\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mlx_moe'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "mlx_moe.loading" in loaded and "mlx_moe.offload" in loaded
    bad = [m for m in loaded if m.startswith(("mlx_moe.testing", "mlx_moe.bench"))]
    assert not bad, f"runtime imports test/bench modules: {bad}"


def test_offload_joins_load_model_through_the_folder_loader_hook():
    """``loading`` never imports ``offload``; the package registers offload's loader."""
    assert loading.FOLDER_LOADERS["expert_files"] is offload.FOLDER_LOADER
