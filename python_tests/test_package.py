"""The package's shape: layers import only downwards, no import cycle, small modules, the public
names where users find them. Read from the source (every import, also inside functions)."""
import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flashback_ext"
# a layer may import the layers before it in this list, never one after it
LAYERS = [("flashback_ext.ops", "flashback_ext._C"),
          ("flashback_ext.layout", "flashback_ext.marking"),
          ("flashback_ext.engine",),
          ("flashback_ext.pipeline",),
          ("flashback_ext.serving",),
          ("flashback_ext.cli",)]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, [alias.name for alias in node.names])]
        else:
            continue
        for base, names in targets:
            if not base.startswith("flashback_ext"):
                continue
            # the compiled extension (_C) is a module too, though not a .py file
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules or n == "_C"]
            found.update(subs or [base])
    found.discard(name)
    return found


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return -1  # flashback_ext itself: the public face, on top of everything


def test_layers_import_only_downwards_and_nothing_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    upward = [(a, b) for a, deps in graph.items() for b in deps
              if _layer(a) >= 0 and _layer(b) > _layer(a)]
    assert not upward, f"imports against the layering: {upward}"
    assert graph["flashback_ext.pipeline.adapter_io"].isdisjoint(
        {"flashback_ext.pipeline.train", "flashback_ext.pipeline.distill"})
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, dep])}")
            if dep in graph and not state.get(dep):
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name, [])


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    # the reader must find relative, absolute and function-level imports, or the test above
    # would pass on anything
    modules = {"flashback_ext.engine.a": tmp_path / "a.py", "flashback_ext.pipeline.b": tmp_path / "b.py"}
    modules["flashback_ext.engine.a"].write_text("def f():\n    from ..pipeline import b\n")
    modules["flashback_ext.pipeline.b"].write_text("import flashback_ext.engine.a\n")
    assert _imports("flashback_ext.engine.a", modules["flashback_ext.engine.a"], modules) == \
        {"flashback_ext.pipeline.b"}
    assert _imports("flashback_ext.pipeline.b", modules["flashback_ext.pipeline.b"], modules) == \
        {"flashback_ext.engine.a"}
    assert _layer("flashback_ext.pipeline.b") > _layer("flashback_ext.engine.a")


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_stay_small(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (one idea per file)"


def test_public_names_stay_importable():
    import flashback_ext

    for name in flashback_ext.__all__:
        assert getattr(flashback_ext, name) is not None, name
    assert flashback_ext.ops.append_attention and flashback_ext.reference.append_attention
    assert importlib.import_module("flashback_ext.cli").main
