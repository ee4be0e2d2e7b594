"""Import contracts: dependencies flow one way (an import-linter equivalent that sees through the package-dir
remap, which hides converters/ and calibration/ from import-linter's file walk)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package lives in the source tree.
PACKAGES = {"segformer_edge": ROOT / "segformer_edge", "segformer_edge.converters": ROOT / "converters",
            "segformer_edge.calibration": ROOT / "calibration"}  # fmt: skip


def _module_name(path: Path) -> str:
    for package, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise ValueError(path)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


# The top layer: the CLI and the Python API (segformer_edge/api.py, which the CLI is a thin layer over) drive converters/
# and calibration/ from above, as a user's script does; nothing beneath imports them. The package's __init__ names the
# API's functions lazily (strings, not imports) and __main__ starts the CLI.
TOP = [p for p in _files(ROOT / "segformer_edge") if "cli" in p.parts or p.name == "api.py"]
CORE = [p for p in _files(ROOT / "segformer_edge") if p not in TOP]
BENEATH = [p for p in CORE + _files(ROOT / "converters") + _files(ROOT / "calibration") if p.name not in ("__init__.py", "__main__.py")
           or p.parent.name not in ("segformer_edge",)]  # fmt: skip

CONTRACTS = [
    # (name, source files, forbidden module prefix)
    ("calibration never imports converters", _files(ROOT / "calibration"), "segformer_edge.converters"),
    ("the core never imports converters", CORE, "segformer_edge.converters"),
    ("the core never imports calibration", CORE, "segformer_edge.calibration"),
    ("nothing beneath the top layer imports the API", BENEATH, "segformer_edge.api"),
    ("nothing beneath the top layer imports the CLI", BENEATH, "segformer_edge.cli"),
    ("the API never imports the CLI", [ROOT / "segformer_edge" / "api.py"], "segformer_edge.cli"),
]


@pytest.mark.parametrize(("name", "files", "forbidden"), CONTRACTS, ids=[c[0] for c in CONTRACTS])
def test_import_contract(name: str, files: list[Path], forbidden: str) -> None:
    broken = [f"{p.relative_to(ROOT)} imports {m}" for p in files for m in sorted(imports_of(p))
              if m == forbidden or m.startswith(forbidden + ".")]  # fmt: skip
    assert files and not broken, "\n".join(broken)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    """The contract can fail: a lazy relative import of the converters from calibration is caught."""
    probe = ROOT / "calibration" / "_probe_contract.py"
    probe.write_text("def f():\n    from ..converters import pipeline\n")
    try:
        assert "segformer_edge.converters.pipeline" in imports_of(probe)
    finally:
        probe.unlink()


SOURCE_TREE_RUN = """
import runpy, sys
root = sys.argv[1]
# Only Python's own finders: no install's mapping, as on a GPU machine that runs the trainer from a checkout.
sys.meta_path = [f for f in sys.meta_path if getattr(f, "__module__", "") in ("_frozen_importlib", "_frozen_importlib_external")]
sys.path.insert(0, root)
import segformer_edge.calibration.spec
import segformer_edge.converters
print(segformer_edge.converters.__file__, segformer_edge.calibration.spec.__file__)
sys.argv = ["segformer-edge", "train", "--help"]
try:
    runpy.run_module("segformer_edge", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print(sorted(m for m in ("executorch", "coremltools", "litert_torch", "tensorflow", "openvino") if m in sys.modules))
"""


def test_the_cli_runs_from_a_checkout_without_an_install() -> None:
    """`PYTHONPATH=. python -m segformer_edge train` from the source tree: converters/ and calibration/ resolve to
    the root's folders (an install maps them; a checkout has only segformer_edge/__init__'s finder), and building
    the CLI imports none of the edge stack."""
    import subprocess
    import sys

    command = [sys.executable, "-c", SOURCE_TREE_RUN, str(ROOT)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    files, _, rest = done.stdout.partition("\n")
    assert files.split() == [str(ROOT / "converters" / "__init__.py"), str(ROOT / "calibration" / "spec.py")]
    assert "Usage" in rest and "--iters" in rest
    assert rest.strip().splitlines()[-1] == "[]", "building the CLI imported the edge stack"


PACKAGE_FILES = [p for folder in PACKAGES.values() for p in _files(folder)]


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module an imported name lives in (``a.b.func`` -> ``a.b``), or None for a third-party one."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (lazy imports included). A submodule's import of its own parent
    packages is left out: Python imports a package before any of its submodules, so that edge is always there."""
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {_resolve(imported, set(modules)) for imported in imports_of(path)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None: a depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def private_imports(path: Path, modules: set[str]) -> list[str]:
    """``from <another of the package's modules> import _name``: a private name used across modules."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            if _resolve(module, modules) and module != own:
                found += [f"{own} imports {module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_import_cycle_among_the_package_modules() -> None:
    cycle = find_cycle(import_graph(PACKAGE_FILES))
    assert cycle is None, " -> ".join(cycle or [])


def test_no_module_imports_a_private_name_of_another() -> None:
    modules = {_module_name(p) for p in PACKAGE_FILES}
    found = [line for p in PACKAGE_FILES for line in private_imports(p, modules)]
    assert not found, "\n".join(found)


def test_the_cycle_and_private_name_checks_can_fail() -> None:
    """The checks see a lazy two-module circle and a private name imported across modules."""
    graph = {"segformer_edge.converters.a": {"segformer_edge.converters.b"}, "segformer_edge.converters.b": {"segformer_edge.converters.a"}}
    assert find_cycle(graph) == ["segformer_edge.converters.a", "segformer_edge.converters.b", "segformer_edge.converters.a"]
    probe = ROOT / "converters" / "_probe_private.py"
    probe.write_text("def f():\n    from .pipeline import _keep_failed\n    from .build import import_graph as _ok\n")
    try:
        modules = {_module_name(p) for p in PACKAGE_FILES} | {"segformer_edge.converters._probe_private"}
        assert private_imports(probe, modules) == ["segformer_edge.converters._probe_private imports segformer_edge.converters.pipeline._keep_failed"]
        graph = import_graph([*PACKAGE_FILES, probe])
        assert "segformer_edge.converters.pipeline" in graph["segformer_edge.converters._probe_private"]
    finally:
        probe.unlink()
