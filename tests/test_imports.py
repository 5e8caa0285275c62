"""The library's imports go one way: read with `ast` (module-level and function-level imports alike), the
modules of fusedops/ form no import cycle, no module imports another's private name, every use of PyTorch's
private API sits in one file, and only the *_triton modules import triton."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fusedops"
PRIVATE_TORCH_FILE = "fusedops._autograd"  # every private-PyTorch name the library uses


def module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(ROOT.rglob("*.py"))}


def imported(name, tree, known):
    """(module, names) for each import anywhere in `tree` of a module in `known`, relative ones resolved."""
    package = name if name in known and (ROOT.parent / name.replace(".", "/") / "__init__.py").exists() else None
    package = package or name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from . import x`: the module x
                    yield f"{base}.{alias.name}", []
                elif base in known:
                    yield base, [alias.name]


def graph():
    trees = modules()
    return {name: {target for target, _ in imported(name, tree, trees)} - {name} for name, tree in trees.items()}


def cycles(edges):
    """Every module that lies on an import cycle, found by depth-first search."""
    on_cycle, state = set(), {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                on_cycle.update(path[path.index(target) :])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return on_cycle


def test_the_search_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {"a", "b", "c"}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_the_graph_sees_function_level_imports():
    edges = graph()
    assert "fusedops.cross_entropy_triton" in edges["fusedops.cross_entropy"]  # imported inside functions
    assert "fusedops.batch_norm" in edges["fusedops"]


def test_no_import_cycle():
    assert cycles(graph()) == set()


def test_no_private_name_crosses_modules():
    trees = modules()
    crossings = [
        (name, target, alias)
        for name, tree in trees.items()
        for target, names in imported(name, tree, trees)
        for alias in names
        if alias.startswith("_")
    ]
    assert crossings == []


def private_torch_names(tree):
    """torch.X._y attribute chains and `from torch... import _y` in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            if "._" in f".{node.module}" or any(alias.name.startswith("_") for alias in node.names):
                yield node.module
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id == "torch":
                yield ast.unparse(node)


def test_private_torch_api_in_one_file():
    users = {name for name, tree in modules().items() if any(private_torch_names(tree))}
    demo = {name for name in users if name.startswith("fusedops.makemore")}  # the demo, not the library
    assert users - demo == {PRIVATE_TORCH_FILE}, users


@pytest.mark.parametrize("name", sorted(modules()))
def test_only_triton_modules_import_triton(name):
    tree = modules()[name]
    imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imports |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert any(module.split(".")[0] == "triton" for module in imports) == name.endswith("_triton")
