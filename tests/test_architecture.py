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
