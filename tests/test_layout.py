"""The package layout DESIGN.md §3 describes, checked from the imports themselves."""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = REPO / "omg_ext"
HOST_PACKAGES = {"modules", "modules_forge", "backend", "ldm_patched", "launch"}


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of everything a module imports (relative imports resolved; also those under
    ``TYPE_CHECKING``, which are part of the design's dependencies even when they cost nothing at run time)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


def _modules(sub: str):
    return sorted((ROOT / sub).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [
    ("engine", ("omg_ext.masks", "omg_ext.hosts", "omg_ext.config", "omg_ext.ui")),
    ("masks", ("omg_ext.hosts", "omg_ext.ui")),
    ("merge", ("omg_ext.masks", "omg_ext.hosts", "omg_ext.config", "omg_ext.ui")),
])
def test_inner_packages_never_import_outer_ones_or_the_host(package, forbidden):
    for path in _modules(package):
        for name in _imports(path):
            assert not name.startswith(forbidden), f"{path.name} imports {name}"
            assert name.split(".")[0] not in HOST_PACKAGES, f"{path.name} imports the host ({name})"


def test_only_the_host_adapters_import_the_webui():
    for path in ROOT.rglob("*.py"):
        if "hosts" in path.relative_to(ROOT).parts:
            continue
        host = {n for n in _imports(path) if n.split(".")[0] in HOST_PACKAGES}
        assert not host, f"{path.relative_to(ROOT)} imports {host}"


def test_top_level_holds_the_packages_and_at_most_four_modules():
    modules = [p.name for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 4, modules
    for package in ("engine", "masks", "hosts", "merge"):
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"omg_ext/{package}/__init__.py must say what it may import"


@pytest.mark.parametrize("folder", ["omg_ext", "minisd", "toyworld", "benchmarks", "scripts"])
def test_product_benchmark_and_toy_world_code_never_imports_the_tests(folder):
    for path in sorted((REPO / folder).rglob("*.py")):
        names = {n for n in _imports(path) if n == "tests" or n.startswith("tests.")}
        assert not names, f"{path.relative_to(REPO)} imports {sorted(names)}"


def test_no_module_of_the_extension_passes_500_lines():
    long = {str(p.relative_to(REPO)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of the import graph, each once, as the modules along it (depth-first, three colours)."""
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_extension_has_no_import_cycle():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for imported in _imports(path):
            # "from .pkg import name" names either a module or an attribute: the longest module prefix counts
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                graph[name].add(imported)
    assert import_cycles(graph) == []
