"""ExecuTorch with the Core ML delegate: a .pte whose graph is lowered to Core ML (CoreMLPartitioner).

The Core ML delegate runs only on Apple platforms. Elsewhere the artifact is compiled (and its delegation
recorded) but not run: the runner says so instead of failing.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

from .base import Artifact, ArtifactError, ExportPlan, Target
from .executorch import ExecuTorchRunner, delegation_report

logger = logging.getLogger(__name__)


class ExecuTorchCoreMLTarget(Target):
    name = "executorch-coreml"
    suffix = ".pte"
    summary = "ExecuTorch .pte with the Core ML delegate (iOS, macOS)"
    precisions = ("fp32", "fp16")
    tools = ("executorch", "coremltools")
    runtime_modules = ("executorch.runtime",)
    in_all = False
    not_here = "needs macOS"

    def runs_here(self) -> bool:
        return platform.system() == "Darwin"

    def convert(self, module, example, path: Path, plan: ExportPlan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        import coremltools as ct
        import torch
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
        from executorch.exir import to_edge_transform_and_lower

        precision = ct.precision.FLOAT16 if plan.options.precision == "fp16" else ct.precision.FLOAT32
        specs = CoreMLBackend.generate_compile_specs(compute_precision=precision, minimum_deployment_target=ct.target.iOS16)
        program = torch.export.export(module, (example,))
        edge = to_edge_transform_and_lower(program, partitioner=[CoreMLPartitioner(compile_specs=specs)])
        report = delegation_report(edge.exported_program().graph_module)
        report["backend"] = "CoreMLBackend"
        path.write_bytes(edge.to_executorch().buffer)
        if not self.runs_here():
            logger.info("executorch-coreml: compiled only; the Core ML delegate runs on macOS/iOS, not here")
        return {"delegation": report, "runs_on": "macOS / iOS (Core ML delegate)"}

    def load(self, artifact: Artifact, threads: int | None = None) -> ExecuTorchRunner:
        if not self.runs_here():
            raise ArtifactError(f"{artifact.file}: the Core ML delegate runs only on macOS/iOS; this artifact was compiled, not run")
        return ExecuTorchRunner(artifact)
