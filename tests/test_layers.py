"""The import graph shows the layers: no cycles, nothing imports a layer above its own, no method
imports another method, and the trainer, the CLI and the API reach methods only through the
registry. Every `thresher.*` import counts, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("pipeline", "scoring", "selectors", "flows")

# Lowest first. A module may import its own layer and the layers below it. A prefix covers the
# modules below it ("pipeline" alone is only the package's own __init__).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("files", ("pipeline", "pipeline.io", "pipeline.artifacts", "pipeline.budget", "pipeline.params",
               "pipeline.progress", "pipeline.logs")),
    ("models", ("pipeline.models",)),
    # ingest quarantines rows no chat template can render (models/chat.py)
    ("ingest", ("pipeline.io.ingest",)),
    ("core", ("pipeline.stage", "pipeline.method", "pipeline.plan", "pipeline.executors",
              "pipeline.filtering")),
    ("selectors", ("selectors",)),
    ("training", ("pipeline.training",)),
    ("stages", ("pipeline.stages",)),
    # training a quality classifier embeds its examples with the embedding stage
    ("classifier training", ("pipeline.training.classifier",)),
    ("methods", ("scoring",)),
    ("registry", ("pipeline.registry",)),
    ("select", ("pipeline.select", "pipeline.manifest", "pipeline.recipe")),
    ("report", ("pipeline.report",)),
    # where a recipe writes; its guard reads verify's and the report's file names
    ("run", ("pipeline.run", "pipeline.recipe_outputs")),
    ("interfaces", ("pipeline.cli", "pipeline.api", "flows")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every project module `path` imports (`from thresher.pipeline import registry` counts as
    thresher.pipeline.registry)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thresher."):
            base = node.module.removeprefix("thresher.")
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in MODULES else base)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("thresher.") for a in node.names
                       if a.name.startswith("thresher."))
    return {m for m in out if m in MODULES}


MODULES = {module_name(p): p for f in FOLDERS for p in (ROOT / f).rglob("*.py")}
GRAPH = {m: imports_of(p) - {m} for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            inside = module == pre or (module.startswith(pre + ".") and pre != "pipeline")
            if inside and (best is None or len(pre) > best[1]):
                best = (i, len(pre))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [m, d]) if d in stack
                              else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_method_imports_another_method():
    crossing = [f"{m} imports {d}" for m, deps in sorted(GRAPH.items()) if m.startswith("scoring.")
                for d in sorted(deps) if d.startswith("scoring.")]
    assert not crossing, "\n".join(crossing)


def test_interfaces_reach_methods_through_the_registry():
    direct = [f"{m} imports {d}" for m, deps in sorted(GRAPH.items())
              if m in ("pipeline.cli", "pipeline.api") or m.startswith(("flows", "pipeline.training"))
              for d in sorted(deps) if d.startswith("scoring.")]
    assert not direct, "\n".join(direct)
