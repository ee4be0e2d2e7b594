"""The flow of one export, as a straight line of small steps.

plan -> capture -> quantize -> lower -> write (:mod:`.build`) -> verify (:mod:`.parity`, the target's runner against
the float model) -> record (parity into the manifest, then the atomic swap). Nothing edits the manifest after the
swap. An artifact that fails parity never replaces what was there: it is kept beside it as ``NAME.failed/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segformer_edge.errors import SegformerEdgeError

from .base import Artifact, ExportOptions
from .build import build_artifact, plan_export, shared_provenance
from .parity import VERIFY_IMAGES, ParityFailed, Thresholds, verify_artifact

if TYPE_CHECKING:
    from segformer_edge.calibration.spec import QuantSpec

__all__ = ["EXPORT_LOG", "export_artifact"]

logger = logging.getLogger(__name__)


EXPORT_LOG = "export.log"


def _keep_failed(tmp: Path, folder: Path) -> Path:
    """Move a built artifact that failed parity to ``NAME.failed/`` beside the real one (replacing an older one)."""
    failed = folder.with_name(folder.name + ".failed")
    if failed.exists():
        shutil.rmtree(failed)
    os.chmod(tmp, 0o755)
    os.replace(tmp, failed)
    return failed


def export_artifact(
    model: Any,
    target_name: str,
    options: ExportOptions,
    out_dir: str | Path,
    *,
    checkpoint: Path | None = None,
    quant: QuantSpec | None = None,
    verify: bool = True,
    verify_data: str | None = None,
    verify_images: int = VERIFY_IMAGES,
    thresholds: Thresholds | None = None,
    on_step: Callable[[str], None] | None = None,
    capture_output: bool = True,
    layers: bool = False,
    prior_log: Path | None = None,
) -> tuple[Artifact, dict[str, Any] | None]:
    """Convert ``model`` for one target into ``out_dir/<name>/`` and verify parity before it lands.

    The folder is built under a temporary name with its complete manifest (parity included) and swapped in
    only when every step succeeded; a failed step or parity check leaves any earlier artifact as it was and
    keeps what was built as ``<name>.failed/`` (with its ``export.log``). ``on_step`` hears each step's
    name. With ``capture_output`` the converters' and runtimes' output goes to ``export.log`` in the
    artifact folder, not to the terminal; ``prior_log`` (what was captured while preparing this export, such as
    the budget search) opens it. ``layers`` adds the per-tap comparison (verify --layers) to the manifest's
    parity block.
    """
    from segformer_edge.io import atomic_path
    from segformer_edge.logs import OutputCapture

    (on_step or _no_step)("plan")
    model = model.eval()
    plan = plan_export(model, target_name, options, out_dir, quant)
    started = time.perf_counter()
    with atomic_path(plan.folder, directory=True) as tmp:
        if prior_log is not None and prior_log.is_file():
            shutil.copyfile(prior_log, tmp / EXPORT_LOG)  # the capture below appends to it
        output = OutputCapture(tmp / EXPORT_LOG, enabled=capture_output)

        def step(name: str) -> None:
            with output.paused():
                (on_step or _no_step)(name)

        try:
            with output, shared_provenance():
                artifact = build_artifact(model, plan, tmp, checkpoint, step, started)
                manifest, file = artifact.manifest, artifact.file
                report = None
                if not verify:
                    manifest["parity"] = {"status": "not verified", "passed": None}
                elif not plan.target.runs_here():
                    manifest["parity"] = {"status": f"not run: {plan.target.not_here}", "passed": None}
                else:
                    step("verify")
                    artifact.write_manifest()  # verify reads the artifact back from disk, as a user would
                    report = verify_artifact(tmp, model=model, checkpoint=checkpoint, data=verify_data, num_images=verify_images,
                                             thresholds=thresholds, layers=layers)  # fmt: skip
                    manifest["parity"] = {"status": "passed" if report["passed"] else "failed", **report}
                step("record")
                artifact.write_manifest()
        except SegformerEdgeError as exc:
            failed = _keep_failed(tmp, plan.folder)
            raise type(exc)(f"{exc} (log: {failed / EXPORT_LOG})") from exc
        if report is not None and not report["passed"]:
            failed = _keep_failed(tmp, plan.folder)
            raise ParityFailed(f"{target_name}: parity failed: {report['failure']}; the artifact was kept at {failed}, "
                               f"and {plan.folder} was left as it was", report, failed)  # fmt: skip
    logger.info("%s: wrote %s", target_name, plan.folder)
    return Artifact(plan.folder, plan.folder / file.name, manifest), report


def _no_step(name: str) -> None:
    return None
