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


CONTRACTS = [
    # (name, source files, forbidden module prefix)
    ("calibration never imports converters", _files(ROOT / "calibration"), "segformer_edge.converters"),
    ("the core never imports converters", [p for p in _files(ROOT / "segformer_edge") if "cli" not in p.parts], "segformer_edge.converters"),
    ("the core never imports calibration", [p for p in _files(ROOT / "segformer_edge") if "cli" not in p.parts], "segformer_edge.calibration"),
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
