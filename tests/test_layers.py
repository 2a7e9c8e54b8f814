"""The import layers of ARCHITECTURE.md, checked on the source: data flows one way, and nothing cycles.

Every ``from uncnn_rt... import`` and ``import uncnn_rt...`` of every module is read with ``ast``,
including imports inside functions (a lazy import is still a dependency), and resolved to the module
it names. The rules:

- inside ``runtime``, a module imports only from its own layer or the layers below it
  (:data:`RUNTIME_LAYERS`), and ``cloak`` and ``jobs``, side by side, not from each other;
- ``converters`` use only runtime's base layer (the contract, errors, files, sessions, the catalog),
  except the zoo builder, which checks what it converted with the runtime's own detector;
- ``serve`` imports nothing from ``cli``; ``runtime`` nothing from ``cli``, ``serve`` or ``converters``;
- there is no cycle among the modules, lazy imports included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"runtime": "uncnn_rt.runtime", "cli": "uncnn_rt.cli", "converters": "uncnn_rt.converters",
           "serve": "uncnn_rt.serve", "src/uncnn_rt": "uncnn_rt"}  # fmt: skip

RUNTIME_LAYERS: tuple[tuple[str, ...], ...] = (
    # base: the contract, arrays and files, sessions, the shipped models, and linear maps with adjoints
    ("contract", "errors", "arrays", "fileio", "imageio", "image_ops", "lowering", "sessions", "catalog",
     "attacks.linear"),
    ("geometry",),  # where faces are: warps, alignment, detection, face sites
    ("visibility", "plotting"),  # how visible a change is (FLIP, CIEDE2000, SSIM); matplotlib, lazily
    ("attacks",),  # the loop, its rules, boosters, criteria, ensembles
    ("cloak", "jobs"),  # side by side: cloak a photo; batch jobs over data sets
    ("evaluate",),  # the evaluation protocol, its report and its figures
)  # fmt: skip
SIDE_BY_SIDE = ("cloak", "jobs")
CONVERTER_BASE = {f"uncnn_rt.runtime.{m}" for m in RUNTIME_LAYERS[0]}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join([package, *parts]).removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> Iterator[str]:
    """The uncnn_rt modules ``name`` imports (a name imported from a package that is a submodule counts
    as that submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("uncnn_rt"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("uncnn_rt"):
                continue
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


GRAPH = {name: {m for m in imports(name, path) if m != name} for name, path in MODULES.items()}


def layer(module: str) -> tuple[int, str] | None:
    """The runtime layer of ``module`` and the group that put it there, or None outside the runtime."""
    if not module.startswith("uncnn_rt.runtime."):
        return None
    rest = module.removeprefix("uncnn_rt.runtime.")
    for index, groups in enumerate(RUNTIME_LAYERS):
        for group in sorted(groups, key=len, reverse=True):
            if rest == group or rest.startswith(group + "."):
                return index, group
    raise AssertionError(f"{module} is in no layer of RUNTIME_LAYERS: add it where it belongs")


def test_every_runtime_module_has_a_layer() -> None:
    for name in MODULES:
        if name.startswith("uncnn_rt.runtime."):
            assert layer(name) is not None


def test_runtime_imports_only_down_and_not_across() -> None:
    wrong = []
    for name, deps in GRAPH.items():
        mine = layer(name)
        if mine is None:
            continue
        for dep in deps:
            if not dep.startswith("uncnn_rt.runtime"):
                wrong.append(f"{name} -> {dep} (runtime imports nothing above it)")
                continue
            theirs = layer(dep) if dep != "uncnn_rt.runtime" else (0, "")
            assert theirs is not None
            if theirs[0] > mine[0]:
                wrong.append(f"{name} (layer {mine[0]}) -> {dep} (layer {theirs[0]})")
            elif theirs[0] == mine[0] and {mine[1], theirs[1]} == set(SIDE_BY_SIDE):
                wrong.append(f"{name} -> {dep} ({' and '.join(SIDE_BY_SIDE)} sit side by side)")
    assert not wrong, "\n".join(wrong)


def test_converters_use_only_the_runtime_base() -> None:
    wrong = [
        f"{name} -> {dep}"
        for name, deps in GRAPH.items()
        if name.startswith("uncnn_rt.converters") and name != "uncnn_rt.converters.zoo"
        for dep in deps
        if dep.startswith(("uncnn_rt.runtime.", "uncnn_rt.cli", "uncnn_rt.serve"))
        and dep not in CONVERTER_BASE
    ]
    assert not wrong, "\n".join(wrong)


def test_serve_does_not_import_the_cli() -> None:
    wrong = [
        f"{name} -> {dep}"
        for name, deps in GRAPH.items()
        if name.startswith("uncnn_rt.serve")
        for dep in deps
        if dep.startswith("uncnn_rt.cli")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH.get(v, ())):
            if w not in GRAPH:
                continue
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("rule", ["down", "cycle"])
def test_the_checks_can_fail(rule: str) -> None:
    """The walker sees a violation when one is there: a cloak module importing evaluate, and a cycle."""
    name = "uncnn_rt.runtime.cloak.photo"
    saved = set(GRAPH[name])
    try:
        if rule == "down":
            GRAPH[name].add("uncnn_rt.runtime.evaluate")
            with pytest.raises(AssertionError, match=r"cloak\.photo"):
                test_runtime_imports_only_down_and_not_across()
        else:
            GRAPH["uncnn_rt.runtime.errors"].add(name)
            with pytest.raises(AssertionError, match="import cycles"):
                test_no_import_cycles()
    finally:
        GRAPH[name] = saved
        GRAPH["uncnn_rt.runtime.errors"].discard(name)
