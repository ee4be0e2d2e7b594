"""A target from outside the project: one plugin module, registered through the entry point group, works
through every command (export, verify, bench, info, --help) with no change to any project file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''
"""A TorchScript target: the smallest real target, written as a third party would."""
from pathlib import Path

import numpy as np

from segformer_edge.converters.base import Target


class TorchScriptRunner:
    executor = "torch.jit"

    def __init__(self, artifact):
        import torch

        self.module = torch.jit.load(str(artifact.file))

    def __call__(self, x):
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(x))).numpy()


class TorchScriptTarget(Target):
    name = "torchscript"
    suffix = ".pt"
    summary = "TorchScript, run by torch.jit (a test plugin)"
    precisions = ("fp32",)
    options = {"optimize": ("none", "freeze")}
    tools = ("torch",)
    runtime_modules = ("torch",)
    in_all = False

    def convert(self, module, example, path, plan):
        import torch

        traced = torch.jit.trace(module, example)
        if plan.target_options["optimize"] == "freeze":
            traced = torch.jit.freeze(traced.eval())
        traced.save(str(path))
        graph = torch.jit.load(str(path)).inlined_graph
        return {"torchscript": {"nodes": sum(1 for _ in graph.nodes()), "optimize": plan.target_options["optimize"]}}

    def load(self, artifact, threads=None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchScriptRunner(artifact)
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A site folder holding the plugin module and a dist-info that declares its entry point."""
    site = tmp_path_factory.mktemp("site")
    (site / "fake_torchscript_target.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "fake_torchscript_target-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-torchscript-target\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[segformer_edge.targets]\ntorchscript = fake_torchscript_target:TorchScriptTarget\n")
    paths = [str(site), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "200"}


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "segformer_edge", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)  # fmt: skip


def test_plugin_target_through_every_command(plugin_env: dict[str, str], tmp_path: Path) -> None:
    help_text = _cli(["export", "--help"], plugin_env, tmp_path)
    assert help_text.returncode == 0 and "torchscript" in help_text.stdout
    listed = _cli(["info", "--targets", "--json"], plugin_env, tmp_path)
    assert listed.returncode == 0, listed.stderr
    plugin = next(t for t in json.loads(listed.stdout) if t["name"] == "torchscript")
    assert plugin["options"] == {"optimize": ["none", "freeze"]} and not plugin["in_all"]

    out = tmp_path / "exports"
    exported = _cli(["export", "--target", "torchscript", "-O", "optimize=freeze", "--size", "64", "64", "--out", out,
                     "--json"], plugin_env, tmp_path)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    (row,) = json.loads(exported.stdout)
    assert row["status"] == "passed" and row["max_abs_diff"] < 1e-4 and row["pixel_agreement"] == 1.0
    folder = Path(row["artifact"])
    assert folder.name == "segformer-b0_torchscript_fp32_optimize-freeze"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["torchscript"]["optimize"] == "freeze" and manifest["target_options"] == {"optimize": "freeze"}
    assert manifest["tool_versions"]["torch"] and manifest["parity"]["executor"] == "torch.jit"

    verified = _cli(["verify", folder, "--num-images", "2", "--json"], plugin_env, tmp_path)
    assert verified.returncode == 0 and json.loads(verified.stdout)["passed"], verified.stderr

    benched = _cli(["bench", folder, "--runs", "3", "--warmup", "1", "--json", tmp_path / "b.json"], plugin_env, tmp_path)
    assert benched.returncode == 0, benched.stderr
    (record,) = json.loads((tmp_path / "b.json").read_text())
    assert record["status"] == "ok" and record["target"] == "torchscript" and record["p50_ms"] > 0

    info = _cli(["info", folder], plugin_env, tmp_path)
    assert info.returncode == 0 and "torchscript fp32" in info.stdout and "passed" in info.stdout

    # What the plugin cannot honour is a clear error naming it, before any work.
    for args, message in ((["--precision", "int8"], "--precision int8 is not supported"),
                          (["--dynamic"], "--dynamic is not supported by this target; targets that support it: onnx"),
                          (["-O", "optimize=fast"], "optimize=fast: choose one of none, freeze"),
                          (["-O", "threads=2"], "unknown --target-option threads")):  # fmt: skip
        refused = _cli(["export", "--target", "torchscript", "--size", "64", "64", "--out", tmp_path / "no", *args],
                       plugin_env, tmp_path)  # fmt: skip
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()


def test_registry_is_the_only_list_of_targets() -> None:
    """Target names appear in their own module, the registry and tests only (documentation aside)."""
    root = Path(__file__).resolve().parents[1]
    from segformer_edge.converters import _BUILTIN

    own = {name: Path(path.split(":")[0].replace("segformer_edge.converters.", "converters/") + ".py") for name, path in _BUILTIN.items()}
    code = [p for p in (root / "segformer_edge").rglob("*.py")] + [p for p in (root / "converters").glob("*.py")]
    code += list((root / "calibration").glob("*.py"))
    # The device paths name the runtimes whose own on-device tools they drive (adb: benchmark_model, executor_runner,
    # onnxruntime_perf_test; the ssh worker: the runtime package each artifact needs); the API's docstring is documentation.
    exempt = {Path("converters/__init__.py"), Path("converters/adb.py"), Path("converters/remote_worker.py"), Path("segformer_edge/api.py")}
    offenders = []
    for path in code:
        rel = path.relative_to(root)
        if rel in exempt:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("#", "tools =", "runtime_modules =")) or not stripped:
                continue  # comments, and declared package names (the executorch package is not the target)
            for name, home in own.items():
                if rel != home and (f'"{name}"' in line or f"'{name}'" in line):
                    offenders.append(f"{rel}:{lineno}: {stripped}")
    assert not offenders, "\n".join(offenders)
