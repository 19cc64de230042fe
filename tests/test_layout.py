"""The package's layout: no import cycles, engines plug in as one module each.

    pytest tests/test_layout.py

Imports are read with `ast`, not run: module-level and function-level ones alike count (a
function-level import that closes a cycle is still a cycle, only deferred to the call); imports
under `if TYPE_CHECKING:` (annotations only, never run) do not. A package's `__init__` is not an
implicit dependency of its submodules (Python runs it first, whatever the submodule imports), so
re-exports from a package's `__init__` are not cycles.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import puzzlenas

ROOT = Path(puzzlenas.__file__).parent


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports, anywhere in its body}."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from .pkg import mod` imports the submodule pkg.mod; `from .mod import f` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import puzzlenas.x.y` where y is a name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component of more than one module."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:  # a shortest path from the component's first module back to itself
        start = min(scc)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in scc]
            if start in nxt:
                cycles.append([*path, start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    # function-level imports are edges (library.space imports the engines inside target_alternatives);
    # annotation-only ones under TYPE_CHECKING are not (library.space -> config)
    graph = import_graph()
    assert "puzzlenas.engines" in graph["puzzlenas.library.space"]
    assert "puzzlenas.config" not in graph["puzzlenas.library.space"]


def test_every_engine_is_one_module_implementing_the_interface():
    """A new engine is one module under puzzlenas/engines/ plus its line in ENGINES."""
    from puzzlenas.engines import ENGINES
    from puzzlenas.engines.base import Engine

    modules = set()
    for name, cls in ENGINES.items():
        assert issubclass(cls, Engine) and cls is not Engine
        assert cls.name == name
        module = importlib.import_module(cls.__module__)
        assert Path(module.__file__).parent == ROOT / "engines", f"{name}: {cls.__module__} is not in puzzlenas/engines/"
        assert cls.__module__ not in modules, f"{name} shares its module with another engine"
        modules.add(cls.__module__)
        # the interface: the block kinds it runs and a timer for whole models, in the engine's own class
        assert "time_models" in vars(cls), f"{name} does not implement time_models"
        assert set(cls.kinds) == {"attention", "ffn"}
        assert inspect.signature(cls.time_models).parameters.keys() == inspect.signature(Engine.time_models).parameters.keys()
    graph = import_graph()
    assert modules <= graph["puzzlenas.engines"], "the registry imports every engine's module"
    for module in modules:  # engines serve models; they know nothing of the stages above them
        above = {m for m in graph[module] if m.split(".")[1] in {"costs", "search", "pipeline", "report", "cli"}}
        assert not above, f"{module} imports {above}"
    # vLLM and llama.cpp plug in through the registry alone: no other module imports theirs, and the
    # cost stage names no engine (how an engine is timed, and how its profiles are named, is the engine's)
    for module in modules - {"puzzlenas.engines.torch_engine"}:
        users = {m for m, deps in graph.items() if module in deps and not m.startswith("puzzlenas.engines")}
        assert not users, f"{users} import {module} directly instead of through puzzlenas.engines.get_engine"
    for path in (ROOT / "costs").glob("*.py"):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not strings & set(ENGINES), f"{path.name} names an engine: {strings & set(ENGINES)}"


def test_alternative_alone_formats_and_parses_names():
    from puzzlenas.library.space import Alternative, CoupledPair

    for alt in [Alternative(7, "ffn", "mlp", 768), Alternative(0, "attention", "gqa", 2),
                Alternative(12, "attention", "linear"), Alternative(3, "ffn", "no_op")]:
        assert Alternative.from_name(alt.name) == alt
    assert Alternative(7, "ffn", "mlp", 768).name == "layer007.ffn.mlp768"
    assert CoupledPair(Alternative(1, "attention", "no_op"), Alternative(1, "ffn", "mlp", 96)).name == "layer001.pair.no_op+mlp96"
    # no other module writes a name's `layer007.` prefix itself
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "library" / "space.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and len(node.values) > 1:
                first, second = node.values[0], node.values[1]
                assert not (isinstance(first, ast.Constant) and str(first.value).endswith("layer")
                            and isinstance(second, ast.FormattedValue) and second.format_spec is not None), \
                    f"{path.relative_to(ROOT)}:{node.lineno} formats an alternative's name; use Alternative"
