"""The package's shape: layers that import only downward, no import cycles, no deferred imports of the
package's own modules, and modules and functions short enough to read (issue: restructure).

Read statically from the source with `ast`, so a violation fails here before anyone has to find it.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llama3_raw"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60
LONG_FUNCTION_MARK = "reads better as one function"  # a comment in a longer function that says why

# Lower layers never import higher ones. A module's layer is its first matching prefix.
LAYERS = [
    ("errors", "files", "locks", "events", "params", "version", "compiled"),
    ("int4_layouts", "quantize", "kernels", "tokenizer", "threads", "parallel"),
    ("gguf_vocab",),
    ("model",),
    ("linking", "fast_forward", "generate", "checkpoints"),
    ("chat", "prompts_file", "training"),
    ("tools", "lab"),
    ("cli", "train", "train_tokenizer", "__main__", "__init__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(name: str) -> int:
    for index, names in enumerate(LAYERS):
        if name.split(".")[0] in names and (name.split(".")[0] != "train" or name == "train"):
            return index
    raise AssertionError(f"module {name} is in no layer; add it to LAYERS")


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Names of package modules that `from ... import ...` in `module` refers to (relative or absolute)."""
    if node.level == 0:
        if not (node.module or "").startswith("llama3_raw"):
            return []
        base = node.module.split(".")[1:]
    else:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[:len(here) - (node.level - 1)] if node.level > 1 else here
        base = here + (node.module.split(".") if node.module else [])
    targets = []
    for alias in node.names:
        candidate = ".".join(base + [alias.name])
        targets.append(candidate if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists()
                       or (PACKAGE / Path(*candidate.split("."))).is_dir() else ".".join(base))
    return [t for t in targets if t]


def package_imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported package module, imported at module level?)]."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                edges += [(t, id(node) in top_level) for t in resolve(name, path.name == "__init__.py", node)]
            elif isinstance(node, ast.Import):
                edges += [(a.name.split(".", 1)[1], id(node) in top_level) for a in node.names
                          if a.name.startswith("llama3_raw.")]
        graph[name] = edges
    return graph


def test_every_import_of_the_package_goes_down_the_layers_at_module_level():
    problems = []
    for module, edges in package_imports().items():
        for target, at_top in edges:
            if not at_top:
                problems.append(f"{module} imports {target} inside a function")
            if layer_of(target) > layer_of(module):
                problems.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    assert problems == []


def test_no_import_cycle():
    graph = {m: {t for t, _ in edges} for m, edges in package_imports().items()}
    done, on_path = set(), []

    def visit(node):
        if node in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(node):] + [node]))
        if node in done:
            return
        on_path.append(node)
        for target in graph.get(node, ()):
            if target != node and not node.startswith(target + "."):  # a submodule importing its package's face
                visit(target)
        on_path.pop()
        done.add(node)

    for module in graph:
        visit(module)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_are_short(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            body = "\n".join(source.splitlines()[node.lineno - 1:node.end_lineno])
            assert length <= MAX_FUNCTION_LINES or LONG_FUNCTION_MARK in body, f"{node.name} has {length} lines"
