"""The package's import graph, read from the source (imports inside functions included): the model layers import downward only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moewm"

# The model-loading layers, bottom first: a module may import moewm modules of a lower layer only
# (besides the engine modules below all of them: config, routing, capture, ...).
MODEL_LAYERS = [
    {"footprint", "placement"},
    {"quantize", "architecture"},
    {"memory", "models"},
]
MODEL_MODULES = set().union(*MODEL_LAYERS)


def import_graph() -> dict[str, set[str]]:
    """moewm module -> the moewm modules it imports anywhere in its source (top level or inside functions)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] != "moewm":
                    continue
                if len(parts) > 1:
                    deps.add(parts[1])
                else:  # from moewm import scoring
                    deps.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("moewm."))
        graph[name] = (deps & modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan): every import circle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "testing" in graph["models"]  # only imported inside a function
    assert MODEL_MODULES <= set(graph)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_circle_anywhere_in_the_package():
    assert not cycles(import_graph())


def test_model_layers_import_only_downward():
    graph = import_graph()
    for height, layer in enumerate(MODEL_LAYERS):
        allowed_model_deps = set().union(*MODEL_LAYERS[:height])
        for module in layer:
            upward = (graph[module] & MODEL_MODULES) - allowed_model_deps
            assert not upward, f"moewm.{module} imports {sorted(upward)} of its own or a higher layer"


def test_quantization_never_imports_the_watermark():
    """signature_flip_rate builds watermarkers: it is evaluation and lives in moewm.signature_agreement."""
    graph = import_graph()
    assert "watermark" not in graph["quantize"]
    assert "quantize" not in graph["signature_agreement"] and "watermark" in graph["signature_agreement"]
