"""The package's import graph, read from the source (imports inside functions included): layers import downward only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moewm"

# Bottom first. A module may import its own package and the layers below; packages on one layer never
# import each other (the schemes do not load models; the benchmark is not the app).
LAYERS = [
    {"config", "io", "data", "null_corpora"},  # what every layer reads: configs, files, shipped prompts and corpora
    {"engine"},
    {"models", "schemes"},
    {"evaluation"},
    {"app", "bench"},
]
ENTRY_POINTS = {"__init__", "__main__", "report"}  # the public API and `python -m` shims, above everything

# Inside moewm.models, bottom first.
MODEL_LAYERS = [
    {"models.footprint", "models.placement", "models.micro", "models.quantized_groups"},
    {"models.quantize_bnb"},
    {"models.quantize", "models.architecture"},
    {"models.memory", "models.loading"},
]


def module_names() -> dict[str, Path]:
    """Dotted module name under moewm (``engine.scoring``, ``config``) -> its file; packages by their ``__init__``."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """moewm module -> the moewm modules it imports anywhere in its source (top level or inside functions)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "moewm":
                base = node.module[len("moewm."):] if node.module != "moewm" else ""
                targets = [f"{base}.{a.name}".strip(".") for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name[len("moewm."):] for a in node.names if a.name.startswith("moewm.")]
            for t in targets:
                while t and t not in modules:  # `from moewm.engine.keys import WatermarkKey` -> engine.keys
                    t = t.rpartition(".")[0]
                if t:
                    deps.add(t)
        graph[name] = deps - {name}
    return graph


def top(name: str) -> str:
    return name.split(".")[0]


def layer_of(name: str) -> int:
    for height, layer in enumerate(LAYERS):
        if top(name) in layer:
            return height
    raise AssertionError(f"moewm.{name} lies in no layer: add its package to LAYERS")


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan): every import circle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
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


def test_the_graph_sees_imports_inside_functions_and_names_modules_by_package():
    graph = import_graph()
    assert "models.micro" in graph["models.loading"]  # only imported inside a function
    assert "engine.scoring" in graph["schemes.moe_lsh"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_circle_anywhere_in_the_package():
    assert not cycles(import_graph())


def test_every_module_imports_only_its_own_package_or_a_lower_layer():
    graph = import_graph()
    bad = []
    for module, deps in graph.items():
        if top(module) in ENTRY_POINTS:
            continue
        for dep in deps:
            if top(dep) in ENTRY_POINTS:
                bad.append(f"moewm.{module} imports the entry point moewm.{dep}")
            elif top(dep) != top(module) and layer_of(dep) >= max(layer_of(module), 1):  # the base layer is one unit
                bad.append(f"moewm.{module} imports moewm.{dep} (layer {layer_of(dep)} >= its own {layer_of(module)})")
    assert not bad, "\n".join(sorted(bad))


def test_the_layer_check_catches_an_upward_import():
    assert layer_of("engine.scoring") < layer_of("schemes.moe_lsh") < layer_of("evaluation.attacks") < layer_of("app.job")
    assert layer_of("models.loading") == layer_of("schemes.kgw")  # siblings: neither may import the other


def test_model_layers_import_only_downward():
    graph = import_graph()
    model_modules = set().union(*MODEL_LAYERS)
    assert model_modules | {"models"} == {m for m in graph if top(m) == "models"}
    for height, layer in enumerate(MODEL_LAYERS):
        allowed = set().union(*MODEL_LAYERS[:height])
        for module in layer:
            upward = (graph[module] & model_modules) - allowed
            assert not upward, f"moewm.{module} imports {sorted(upward)} of its own or a higher layer"


def test_quantization_never_imports_a_scheme():
    """signature_flip_rate builds watermarkers: it is evaluation and lives in moewm.evaluation.signature_agreement."""
    graph = import_graph()
    assert not any(top(d) == "schemes" for d in graph["models.quantize"])
    assert "models.quantize" not in graph["evaluation.signature_agreement"]
