"""The package layout DESIGN.md §3 describes, checked from the imports themselves."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "omg_ext"
HOST_PACKAGES = {"modules", "modules_forge", "backend", "ldm_patched", "launch"}


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of everything a module imports (relative imports resolved)."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
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
    for package in ("engine", "masks", "hosts"):
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"omg_ext/{package}/__init__.py must say what it may import"
