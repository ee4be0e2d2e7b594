"""The public Python API: export, verify, calibrate, bench and predict from a notebook, a training script or a CI job.

```python
import segformer_edge as se

artifacts = se.export(model, target=["tflite", "onnx"], precision="int8", data="photos/", out="exports")
report = se.verify(artifacts["tflite"], model=model, data="photos/")   # a ParityReport
masks = se.predict(artifacts["onnx"], "photos/").masks                 # (H, W) labels at each photo's size
logits = se.open_artifact(artifacts["onnx"].folder).run(images)        # the runtime's own output
```

``model`` is a checkpoint (.safetensors, a Hugging Face folder, an NVlabs/mmseg .pth), a Hugging Face Hub id, a
SegFormer in memory (one just trained: it has no checkpoint file, so its manifest records the digest of its parameters,
``checkpoint.state_sha256``, and :func:`verify` takes the model itself), or None for the built-in reference model.
A model in memory is never changed: where it is in training mode or on a GPU, the work runs on a CPU copy in eval mode.
Results are dataclasses with the figures as attributes and ``to_dict()`` for the JSON the CLI prints; errors are the
project's exception types (:mod:`segformer_edge.errors`; a parity failure is ``converters.parity.ParityFailed``) with
the messages the CLI shows. Importing this module imports no torch: each function imports what it runs.

Where each piece lives: this module and the CLI (:mod:`segformer_edge.cli`, a thin layer over it: parse options, call
these functions, print) are the top layer, the only code that drives converters/ and calibration/ from above.
Beneath: converters/pipeline.py (``export_artifact``: build, verify, the atomic landing), converters/build.py (plan ->
capture -> quantize -> lower -> manifest), converters/parity.py (``verify_artifact`` and its judge),
converters/reference.py (the float model as the reference), converters/int8.py (calibration for an export, the budget
search), converters/bench.py (latency in fresh processes), calibration/ (calibration sets, sensitivity) and
segformer_edge/predict.py (labels from a runner's outputs, the pictures).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from .converters import base
from .errors import CheckpointError, DataError, ExportFailed, OptionError, SegformerEdgeError

if TYPE_CHECKING:
    from .calibration.calibset import CalibrationSet
    from .calibration.spec import QuantSpec
    from .model import SegFormer

__all__ = [
    "Artifact",
    "BenchRecord",
    "ParityReport",
    "Predictions",
    "StepCallback",
    "bench",
    "calibrate",
    "checkpoint_path",
    "export",
    "failure_record",
    "open_artifact",
    "predict",
    "resolve_model",
    "target_list",
    "verify",
]

logger = logging.getLogger(__name__)

ModelLike: TypeAlias = "str | Path | SegFormer | None"
ArtifactLike: TypeAlias = "str | Path | base.Artifact"
# One image (H, W, 3) uint8, a batch (N, H, W, 3), an image file, a folder or glob of images, or a list of these.
ImagesLike: TypeAlias = "np.ndarray | str | Path | Sequence[np.ndarray | str | Path]"
# (task, step, done): what is being worked on ("tflite int8", "calibration", "bench"), its current step, and whether
# that was its last word. The CLI shows one progress line per task.
StepCallback = Callable[[str, str, bool], None]
# Parity images by default: what the data has, up to this many (converters.parity.VERIFY_IMAGES; importing this module
# imports no torch).
VERIFY_IMAGES = 32


def _no_step(task: str, step: str, done: bool = False) -> None:
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class ParityReport:
    """An artifact against the float model on the same images (:func:`verify`; the parity block of a manifest).

    The figures every report has are attributes; :meth:`to_dict` is the whole report as verify_artifact made it
    (per-class IoU, NaN/inf counts, the data record, ``layers``...), keys added later included.
    """

    passed: bool
    failure: str | None
    target: str
    precision: str
    images: int
    pixel_agreement: float
    agreement_miou: float | None
    max_abs_diff: float | None  # logits artifacts; None where either output holds NaN or inf
    cosine: float | None
    psnr_db: float | None
    miou_float: float | None  # against the labels, where the data has them
    miou_artifact: float | None
    miou_drop_points: float | None
    thresholds: dict[str, float]
    checks: dict[str, bool]
    executor: str | None = None
    # The no-label verdict: the mIoU drop estimated from the float model's confidence where there are no labels.
    estimated_miou_drop_points: float | None = None
    estimated_miou_drop_stderr: float | None = None
    estimated_pixel_accuracy_drop_points: float | None = None
    verdict_basis: str | None = None  # "labels" or "estimate"
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, report: dict[str, Any]) -> ParityReport:
        report = {k: v for k, v in report.items() if k != "status"}  # a manifest's parity block adds its status
        names = [f.name for f in cls.__dataclass_fields__.values() if f.name != "report"]
        values = {name: report.get(name) for name in names}
        values["thresholds"] = dict(report.get("thresholds") or {})
        values["checks"] = dict(report.get("checks") or {})
        return cls(**values, report=report)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.report)


def _figures(report: ParityReport | None) -> dict[str, Any]:
    """The parity figures of an export's row (the CLI's table and JSON)."""
    if report is None:
        return {}
    whole = report.report
    return {key: whole.get(key) for key in ("max_abs_diff", "pixel_agreement", "agreement_miou", "miou_drop_points",
                                            "estimated_miou_drop_points", "estimated_miou_drop_stderr", "verdict_basis",
                                            "images", "executor", "nonfinite", "nonfinite_float", "data")}  # fmt: skip


def _outliers_summary(record: dict[str, Any]) -> str:
    """One phrase for what the outlier handling applied: ``smoothquant (a=0.6)``, ``none``."""
    applied = record.get("applied") or []
    parts = [f"smoothquant (a={record['smoothquant']['alpha']:g})" if name == "smoothquant" else name for name in applied]
    reused = " (decision reused)" if (record.get("decision") or {}).get("reused") else ""
    return (" + ".join(parts) or "none") + reused


@dataclass
class Artifact(base.Artifact):
    """An exported model (its folder, model file and manifest) that can run itself in its target's runtime.

    ``parity`` is its parity report (None where it was not verified or cannot run on the exporting machine).
    :meth:`run` gives the runtime's own output, :meth:`predict` labels at each image's size.
    """

    parity: ParityReport | None = None
    _runners: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, artifact: base.Artifact, report: dict[str, Any] | None = None) -> Artifact:
        """This API's view of a converters artifact; ``report`` (else the manifest's parity block) its parity."""
        if report is None:
            recorded = artifact.manifest.get("parity") or {}
            report = recorded if recorded.get("passed") is not None else None
        return cls(artifact.folder, artifact.file, artifact.manifest, ParityReport.from_dict(report) if report else None)

    @property
    def status(self) -> str:
        """``passed``, ``not verified`` or ``not run: <why>`` (an artifact that failed parity never lands)."""
        return str((self.manifest.get("parity") or {}).get("status", "not verified"))

    @property
    def size_mb(self) -> float:
        return self.manifest["size_bytes"] / 1e6

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self.manifest["palette"]]

    def runner(self, threads: int | None = None, quiet: bool = True) -> base.Runner:
        """The target's runner (cached per thread count); ``quiet`` sends the runtime's greetings to /dev/null."""
        if threads not in self._runners:
            from .converters import get_target
            from .logs import OutputCapture

            target = get_target(self.target)
            if not target.runs_here():
                raise base.ArtifactError(f"{self.folder}: {target.name} artifacts cannot run on this machine ({target.not_here}); "
                                         "predict with it there, or with an artifact of another target here")  # fmt: skip
            target.check_runtime()
            with OutputCapture(os.devnull, enabled=quiet):  # runtimes greet on stderr (XNNPACK, absl)
                self._runners[threads] = target.load(self, threads=threads)
        return self._runners[threads]

    def run(self, images: ImagesLike, threads: int | None = None) -> np.ndarray:
        """The artifact's output for each image, resized to its input size and prepared as its manifest says.

        Returns (N, K, H/4, W/4) logits (or probabilities), or (N, H, W) labels for a mask artifact (N, H/4, W/4 for
        ``mask_size="quarter"``), stacked in the order of the images.
        """
        runner, spec = self.runner(threads), self.input_spec
        outputs = []
        for _, image in _load_images(images):
            resized, _ = spec.resize(image)  # (H, W, 3) at the artifact's size
            outputs.append(np.asarray(runner(spec(resized[None]))))  # (1, ...): the artifacts take one image at a time
        return np.concatenate(outputs)

    def predict(self, images: ImagesLike, threads: int | None = None) -> list[np.ndarray]:
        """(H, W) int64 labels for each image, at its own size (logits upsampled bilinearly, then argmax)."""
        predictor = self._predictor(self.input_spec, threads)
        return [predictor(image) for _, image in _load_images(images)]

    def _predictor(self, spec: Any, threads: int | None, quiet: bool = True) -> Callable[[np.ndarray], np.ndarray]:
        from .predict import ArtifactPredictor

        return ArtifactPredictor(self.runner(threads, quiet), spec, self.manifest["output"]["kind"], self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        """The export's row, as ``segformer-edge export --json`` prints it."""
        row = {"target": self.target, "precision": self.precision, "status": self.status, "artifact": str(self.folder),
               "size_mb": self.size_mb, **_figures(self.parity)}  # fmt: skip
        quantization = self.manifest.get("quantization")
        if quantization is not None:
            row["float_groups"] = quantization["float_groups"]
            row["outliers"] = _outliers_summary(quantization["applied"].get("outliers") or {})
        return row


def failure_record(target: str, precision: str, error: SegformerEdgeError) -> dict[str, Any]:
    """The export row of a target that failed: ``FAILED`` (parity; the artifact kept aside) or ``error``."""
    from .converters.parity import ParityFailed

    if isinstance(error, ParityFailed):
        return {"target": target, "precision": precision, "status": "FAILED", "error": str(error), "exit_code": 1,
                "artifact": str(error.failed), **_figures(ParityReport.from_dict(error.report))}  # fmt: skip
    return {"target": target, "precision": precision, "status": "error", "error": str(error), "exit_code": error.exit_code}


@dataclass
class BenchRecord:
    """One latency measurement (an artifact, or torch eager, at one thread count); :meth:`to_dict` is the whole record.

    Timing fields are None where the artifact cannot be timed here (``status`` says why; an estimate says so).
    """

    target: str
    precision: str
    threads: int
    status: str
    artifact: str
    executor: str | None = None
    load_ms: float | None = None
    first_ms: float | None = None
    import_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    throughput_ips: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    speedup_vs_torch: float | None = None
    x_floor: float | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> BenchRecord:
        names = [f.name for f in cls.__dataclass_fields__.values() if f.name != "record"]
        return cls(**{name: record.get(name) for name in names}, record=record)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.record)


@dataclass
class Predictions:
    """What :func:`predict` made: per image, its record (name, size, pixel agreement with ``compare``, files written)
    and, with ``keep_masks``, its (H, W) labels at the image's own size."""

    records: list[dict[str, Any]]
    masks: list[np.ndarray] | None
    out: Path | None
    mean_pixel_agreement: float | None  # with ``compare``: the artifact's labels against the float model's

    def to_dict(self) -> dict[str, Any]:
        """As ``segformer-edge predict --json`` prints it."""
        return {"out": str(self.out) if self.out is not None else None, "images": self.records,
                "mean_pixel_agreement": self.mean_pixel_agreement}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Models, artifacts, images


def checkpoint_path(model: str | Path | None) -> Path:
    """A local path for a checkpoint: a path, a Hub id (through the Hugging Face cache) or None (the built-in model).

    Raises:
        CheckpointError: no such path, or a Hub id that cannot be resolved (see ``segformer_edge.hub``).
    """
    if model is not None:
        from .hub import resolve_model_path

        return resolve_model_path(model)
    from .weights import builtin_checkpoint

    return builtin_checkpoint()


def _in_memory(model: Any) -> bool:
    return model is not None and not isinstance(model, (str, Path))


def resolve_model(model: ModelLike) -> tuple[SegFormer, Path | None]:
    """(the float model, its checkpoint file or None for a model in memory), in eval mode on the CPU.

    A model in memory in training mode or on another device is copied, never changed.
    """
    if not _in_memory(model):
        from .weights import load_pretrained

        path = checkpoint_path(model)  # type: ignore[arg-type]
        return load_pretrained(path), path
    if not all(hasattr(model, name) for name in ("meta", "config", "state_dict")):
        raise CheckpointError(f"{type(model).__name__}: not a SegFormer; pass one (create_model, load_pretrained, or one trained "
                              "with segformer_edge.train), a checkpoint path or a Hub id")  # fmt: skip
    return _float_copy(model), None


def _float_copy(model: Any) -> Any:
    """``model`` where it is on the CPU in eval mode already, else an eval-mode CPU copy (the caller's model is kept)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not model.training:
        return model
    return copy.deepcopy(model).cpu().eval()


def _artifact_path(artifact: ArtifactLike) -> Path:
    return artifact.folder if isinstance(artifact, base.Artifact) else Path(artifact)


def open_artifact(path: ArtifactLike) -> Artifact:
    """An artifact from its folder (or its model file): manifest read, model file's sha256 checked; it can run itself.

    Raises:
        ArtifactError: no such artifact, no manifest, a damaged manifest, or a model file that does not match it.
    """
    if isinstance(path, Artifact):
        return path
    return Artifact.of(base.read_manifest(_artifact_path(path)))


def _artifact_folder(source: Any) -> Path | None:
    """The artifact folder ``source`` names (a folder with a manifest, or a model file beside one), else None."""
    if isinstance(source, base.Artifact):
        return source.folder
    if _in_memory(source):
        return None
    path = Path(source)  # type: ignore[arg-type]
    if not path.exists():
        return None
    folder = path if path.is_dir() and path.suffix != ".mlpackage" else path.parent
    return folder if (folder / base.MANIFEST).is_file() else None


def _image_entries(images: ImagesLike, strict: bool = False) -> list[tuple[str, Path | None, np.ndarray | None]]:
    """(output name, file, array) per image: files, folders and globs through ``image_items`` (names keep
    subfolders; a photo that does not read is left out with a warning, or with ``strict`` raises DataError), arrays
    named ``image_000``...; a batch (N, H, W, 3) gives N images."""
    from .predict import image_items

    if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]  # type: ignore[list-item]
    elif isinstance(images, np.ndarray):
        images = list(images)
    entries: list[tuple[str, Path | None, np.ndarray | None]] = []
    paths: list[str] = []  # a run of path specs: one image_items call (it finds the same photo or name twice)

    def flush() -> None:
        entries.extend((found.name, found.path, None) for found in image_items(paths, strict=strict))
        paths.clear()

    arrays = 0
    for item in images:
        if not isinstance(item, np.ndarray):
            paths.append(str(item))
            continue
        if paths:
            flush()
        if item.ndim != 3 or item.shape[-1] != 3 or item.dtype != np.uint8:
            raise DataError(f"image {len(entries)}: give (H, W, 3) uint8 RGB arrays, got {item.shape} {item.dtype}")
        entries.append((f"image_{arrays:03d}", None, item))
        arrays += 1
    if paths:
        flush()
    if not entries:
        raise DataError("no images given")
    return entries


def _load_images(images: ImagesLike) -> list[tuple[str, np.ndarray]]:
    from .data.folders import read_image

    entries = _image_entries(images)
    return [(name, array if array is not None else read_image(path)) for name, path, array in entries]  # type: ignore[arg-type]


def _size(size: Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    h, w = size or default
    if not (32 <= h <= 8192 and 32 <= w <= 8192):
        raise OptionError(f"{h}x{w} is out of range: height and width must be within 32..8192", "--size")
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------------------------------
# export


def target_list(target: str | Sequence[str]) -> list[str]:
    """The targets ``target`` names: one name, several, or ``all`` (every target ``--target all`` exports).

    Raises:
        ExportError: an unknown name, listing the registered targets.
    """
    from .converters import get_target, target_names

    if isinstance(target, str):
        if target == "all":
            return target_names(in_all=True)
        target = [target]
    names = list(dict.fromkeys(target))
    if not names:
        raise OptionError("no target: name one or more, or all", "--target")
    for name in names:
        get_target(name)  # an unknown name is one clear error listing the registered targets
    return names


def export(
    model: ModelLike = None,
    target: str | Sequence[str] = "all",
    precision: str = "fp32",
    data: str | Path | None = None,
    out: str | Path = "exports",
    *,
    size: Sequence[int] | None = None,
    output: str = "logits",
    mask_size: str = "full",
    input_kind: str = "normalized",
    layout: str = "nchw",
    dynamic: bool = False,
    image_input: bool = False,
    decoder: str = "auto",
    jobs: int | None = None,
    verify: bool = True,
    verify_images: int = VERIFY_IMAGES,
    calibration: str | Path | CalibrationSet | None = None,
    calibration_images: int = 32,
    method: str = "auto",
    scheme: str = "static",
    budget: float | None = None,
    budget_granularity: str = "layer",
    layers: bool = False,
    outliers: str = "auto",
    strict: bool = False,
    capture_output: bool = True,
    on_step: StepCallback | None = None,
    **options: Any,
) -> Artifact | dict[str, Artifact]:
    """Convert ``model`` for edge runtimes and prove each artifact agrees with the float model before it lands.

    ``target`` is one registered target (returns its :class:`Artifact`), a list of them or ``"all"`` (returns a dict
    target -> Artifact, in order). ``**options`` are the target's own options (``-O KEY=VALUE`` of the CLI, such as
    ``io="uint8"`` for tflite); every other keyword is the CLI option of the same name (``segformer-edge export
    --help``). ``data`` is what int8 calibrates on and what parity is checked on (a photo folder or glob, a dataset
    folder, ``synthetic[:N]``); ``calibration`` a folder from :func:`calibrate` or the set it returned. A photo of
    ``data`` that does not read is left out with one warning naming it (``strict``: a DataError). With
    ``capture_output`` the converters' and runtimes' own output goes to each artifact's export.log.

    Raises:
        ParityFailed: one target whose artifact does not agree with the float model (kept as ``NAME.failed/``).
        ExportFailed: some of several targets failed (``.artifacts`` holds those that landed, ``.errors`` the rest).
        OptionError, ExportError, CheckpointError, DataError: bad options, model or data, before anything is written.
    """
    from .converters.base import ExportOptions
    from .converters.side_by_side import default_jobs, shared_float_logits

    if jobs is not None and jobs < 1:  # checked whatever the number of targets: never accepted and then ignored
        raise OptionError(f"--jobs {jobs}: at least 1", "--jobs")
    if budget_granularity not in ("layer", "group"):
        raise OptionError(f"{budget_granularity}: choose layer or group", "--budget-granularity")
    if budget_granularity != "layer" and budget is None:
        raise OptionError("--budget-granularity applies to --budget", "--budget-granularity")
    names = target_list(target)
    net, path = resolve_model(model)
    step = on_step or _no_step
    h, w = _size(size, net.meta.input_size)
    export_options = ExportOptions(precision=precision, size=(h, w), input_kind=input_kind, output=output, mask_size=mask_size,
                                   layout=layout, dynamic=dynamic, image_input=image_input, decoder=decoder,
                                   target_options={key: str(value) for key, value in options.items()})  # fmt: skip
    _plan_all(net, names, export_options, Path(out), method, outliers, scheme)  # every target refuses what it cannot honour first
    data = str(data) if data is not None else None
    _check_data(data, "val", strict)
    workers = min(jobs or default_jobs(len(names)), len(names))  # targets exported at once
    side_by_side = workers > 1
    with shared_float_logits() if side_by_side else contextlib.nullcontext():  # what picking computes, the workers read
        quant = _quant_spec(net, path, export_options, data, calibration, calibration_images, method, budget, outliers, scheme, step)
        search = None if budget is None else (budget, budget_granularity)
        calls = {name: {"model": net, "path": path, "name": name, "options": export_options, "quant": quant, "budget": search,
                        "out": Path(out), "data": data, "verify": verify, "verify_images": verify_images, "layers": layers,
                        "capture_output": capture_output} for name in names}  # fmt: skip
        outcomes = _export_side_by_side(calls, workers, step) if side_by_side else None
    single = isinstance(target, str) and target != "all"
    artifacts: dict[str, Artifact] = {}
    errors: dict[str, SegformerEdgeError] = {}
    for name in names:
        if outcomes is not None:
            status, value = outcomes[name]
            if status == "ok":
                artifacts[name] = value
            else:
                errors[name] = value
            continue
        try:
            artifacts[name] = _export_one(**calls[name], step=step)
        except SegformerEdgeError as exc:
            if single or len(names) == 1:
                raise
            errors[name] = exc
    if single:
        return artifacts[names[0]]
    if errors:
        raise ExportFailed(names, artifacts, errors)
    return artifacts


def _export_side_by_side(calls: dict[str, dict[str, Any]], jobs: int, step: StepCallback) -> dict[str, tuple[str, Any]] | None:
    """Several targets ``jobs`` (two or more) at a time in worker processes (:mod:`.converters.side_by_side`), after
    the outlier decision they share was made here once; None where they run one after the other in this process (a
    model or target class that does not pickle: a module holding a lambda or a hook, a class defined in a function)."""
    import pickle

    from .converters import registry_entry
    from .converters.side_by_side import run_side_by_side

    first = next(iter(calls.values()))
    targets = {name: registry_entry(name) for name in calls}
    try:
        pickle.dumps((first["model"], targets), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - whatever keeps them from pickling, the targets still run, serially
        logger.info("the targets run one after the other: the model or a target class does not pickle (%s)", exc)
        return None
    _decide_outliers_once(first, step)
    return run_side_by_side(_export_one, {name: calls[name] for name in side_by_side_order(list(calls))}, jobs, step, targets)


def side_by_side_order(names: list[str]) -> list[str]:
    """The order targets start in side by side: those that only a reference executor runs here first (Core ML off
    macOS, Ethos-U: ``times_here`` is False), then the others as given: their verify in a numpy or reference executor
    is the longest step of a run, and started last it keeps one worker busy while the other has nothing left (b2 int8
    ``--target all``, benchmarks/EXPORT_SCALE.md: 482 s in the order given, 416 s with coreml first)."""
    from .converters import get_target

    return sorted(names, key=lambda name: get_target(name).times_here())


def _decide_outliers_once(call: dict[str, Any], step: StepCallback) -> None:
    """Make (or read) the int8 outlier decision every target shares before the targets start, so that no two workers
    make it at once: each reads it back from where it was recorded (its manifest says so)."""
    quant = call["quant"]
    if quant is None or quant.calibration is None or quant.outliers == "none" or call["budget"] is not None:
        return
    from .converters.build import float_model, plan_export
    from .logs import OutputCapture

    step("outliers", "deciding", False)
    try:
        plan = plan_export(call["model"].eval(), call["name"], call["options"], call["out"], quant)
        with tempfile.TemporaryDirectory() as tmp, OutputCapture(Path(tmp) / "decision.log", enabled=call["capture_output"]):
            _, record = float_model(call["model"], plan)
    except SegformerEdgeError as exc:  # each target meets it again and reports it as its own error
        step("outliers", f"not decided: {exc}", True)
        return
    applied = record.get("applied") or []
    step("outliers", f"{len(applied)} rewrite(s) applied" if applied else "nothing applied", True)


def _check_data(data: str | None, split: str, strict: bool) -> None:
    """Open ``data`` before any work: a photo folder is decoded once here, so that a file that does not read is named
    once (or, with ``strict``, is the one DataError) before the converters' output is captured. Later passes over the
    same folder reuse the verdicts."""
    if data is None:
        return
    from .data import open_source

    open_source(data, split, strict=strict)


def _plan_all(model: Any, names: list[str], options: Any, out: Path, method: str, outliers: str, scheme: str) -> None:
    """Check the options against every chosen target first: one clear error, nothing converted or written."""
    from .calibration.spec import QuantSpec
    from .converters.build import plan_export

    quant = QuantSpec(scheme=scheme, method=method, outliers=outliers) if options.precision == "int8" else None
    for name in names:
        plan_export(model, name, options, out, quant, check_calibration=False)


def _quant_spec(model: Any, path: Path | None, options: Any, data: str | None, calibration: Any, images: int, method: str,
                budget: float | None, outliers: str, scheme: str, step: StepCallback) -> QuantSpec | None:  # fmt: skip
    """The int8 recipe with its calibration set (loaded and checked, or picked now), or None for float exports."""
    if options.precision != "int8":
        if calibration is not None or budget is not None or outliers != "auto" or scheme != "static":
            raise OptionError("--calibration, --budget, --outliers and --scheme apply to --precision int8", "--precision")
        return None
    from .calibration.calibset import CalibrationSet
    from .calibration.spec import QuantSpec
    from .converters.int8 import calibration_for
    from .converters.reference import checkpoint_digest

    quant = QuantSpec(scheme=scheme, method=method, outliers=outliers)  # validates the scheme, method and outlier mode before any work
    if scheme != "static" and data is None and calibration is None:
        return quant  # dynamic and weight-only int8 need no calibration images (only --outliers measures on them)
    step("calibration", "calibrating", False)
    if isinstance(calibration, CalibrationSet):
        calib = calibration
        calib.check_for(checkpoint_digest(path) if path is not None else None, options.size, f"the calibration set of {calib.data}")
    else:
        folder = Path(calibration) if calibration is not None else None
        calib = calibration_for(model, path, options.size, data=data, calibration=folder, num_images=images, method=method)
    step("calibration", f"{len(calib.images)} images", True)
    if method == "auto" and calibration is not None:
        quant = quant.with_(method=calib.method)  # what `calibrate --method` recorded
    return quant.with_(calibration=calib)


def _export_one(model: Any, path: Path | None, name: str, options: Any, quant: Any, budget: tuple[float, str] | None, out: Path,
                data: str | None, verify: bool, verify_images: int, layers: bool, capture_output: bool,
                step: StepCallback) -> Artifact:  # fmt: skip
    """Export one target (with ``budget``: after the search for the fewest float layers within it)."""
    from .converters.parity import ParityFailed
    from .converters.pipeline import export_artifact

    task = f"{name} {options.precision}"

    def line(what: str, done: bool = False) -> None:
        step(task, what, done)

    with tempfile.TemporaryDirectory() as tmp:
        budget_log = Path(tmp) / "budget.log"  # the head of the artifact's export.log
        try:
            if quant is not None and budget is not None:
                quant = _budget_search(model, name, options, quant, budget, Path(tmp), line, budget_log, capture_output)
            artifact, report = export_artifact(model, name, replace(options), out, checkpoint=path, quant=quant, verify=verify,
                                               verify_data=data, verify_images=verify_images, on_step=line,
                                               capture_output=capture_output, layers=layers, prior_log=budget_log)  # fmt: skip
        except ParityFailed:
            line("parity FAILED", done=True)
            raise
        except SegformerEdgeError:
            line("error", done=True)
            raise
    result = Artifact.of(artifact, report)
    line(result.status, done=True)
    return result


def _budget_search(model: Any, name: str, options: Any, quant: Any, budget: tuple[float, str], workdir: Path,
                   line: Callable[..., None], log: Path, capture_output: bool) -> Any:  # fmt: skip
    """``quant`` with the float layers ``budget`` allows; the quantizers' and runtimes' output goes to ``log``, the count
    of models measured to the target's step line (with the capture paused)."""
    from .converters.int8 import budget_spec
    from .logs import OutputCapture

    measured = [0]
    with OutputCapture(log, enabled=capture_output) as output:

        def count(k: int) -> None:
            measured[0] += k
            with output.paused():
                line(f"budget search: {measured[0]} quantized models measured")

        count(0)
        return budget_spec(model, name, options, quant, budget[0], workdir, progress=count, granularity=budget[1])


# ---------------------------------------------------------------------------------------------------------------------
# verify


def verify(
    artifact: ArtifactLike,
    model: ModelLike = None,
    data: str | Path | None = None,
    *,
    num_images: int = VERIFY_IMAGES,
    max_abs_diff: float | None = None,
    min_pixel_agreement: float | None = None,
    max_miou_drop: float | None = None,
    layers: bool = False,
    report_dir: str | Path | None = None,
    calibration: str | Path | None = None,
    strict: bool = False,
    device: str | None = None,
    device_python: str = "python3",
    device_timeout: float = 1800,
    capture_output: bool = True,
) -> ParityReport:
    """Run an artifact and the float model on the same images and report parity (it does not raise on a failure:
    ``report.passed`` and ``report.failure`` say it).

    ``model`` is the float model the artifact was exported from: a checkpoint or Hub id (default: the built-in model;
    refused when its sha256 is not the one the manifest records) or the model in memory it was exported from
    (refused when its parameters differ from those recorded). The thresholds are those of the precision the artifact
    computes in, with the given overrides. ``layers``, ``report_dir`` and ``calibration`` are verify's --layers,
    --report and --calibration. Without labels in ``data`` the mIoU drop is estimated from the float model's confidence
    (``estimated_miou_drop_points``; ``verdict_basis`` says which judged). ``device``: run the artifact on a board,
    ``ssh://[user@]host[:port]`` (its ``device_python`` with segformer-edge[runtime], through your ssh) while the float
    model runs here; the report then names it (``report["device"]``). With ``capture_output`` the runtimes' own output
    goes to ``report_dir``/verify.log (nowhere without ``report_dir``). ``strict``: a photo that does not read is a
    DataError (by default it is left out with one warning naming it).
    """
    from .converters.parity import default_thresholds, verify_artifact
    from .converters.reference import check_reference
    from .logs import OutputCapture

    path = _artifact_path(artifact)
    opened = base.read_manifest(path)
    data = str(data) if data is not None else None
    _check_data(data, "val", strict)
    remote: Any = None
    if device is None and device_python != "python3":
        raise OptionError("--device-python needs --device", "--device-python")
    if device is not None:
        from .converters.remote import RemoteRunner, SshDevice

        if not device.startswith("ssh://"):
            raise OptionError(f"{device}: verify runs artifacts on ssh://[user@]host[:port] boards only (adb has no Python "
                              "to return outputs; bench --device adb measures latency there)", "--device")  # fmt: skip
        if layers:
            raise OptionError("--layers runs a debug graph here, not on the board: drop --layers or --device", "--layers")
        remote = RemoteRunner(SshDevice.parse(device, python=device_python, timeout=device_timeout), path)
    limits = default_thresholds(opened.manifest)  # the precision it computes in (a runtime hint may lower it)
    overrides = {"max_abs_diff": max_abs_diff, "pixel_agreement": min_pixel_agreement, "miou_drop": max_miou_drop}
    limits = replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    folder = Path(report_dir) if report_dir is not None else None
    kwargs: dict[str, Any] = {"data": data, "num_images": num_images, "thresholds": limits, "layers": layers,
                              "report_dir": folder, "calibration": Path(calibration) if calibration is not None else None,
                              "runner": remote}  # fmt: skip
    if _in_memory(model):
        check_reference(opened, model, "the model", "model")
        net, _ = resolve_model(model)
        kwargs["model"] = net
    else:
        kwargs["checkpoint"] = checkpoint_path(model) if model is not None else None  # type: ignore[arg-type]
    # The runtimes and quantizers talk on stderr (XNNPACK, absl, deprecations): to REPORT/verify.log, else nowhere.
    log = Path(os.devnull) if folder is None else folder / "verify.log"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with OutputCapture(log, enabled=capture_output), remote if remote is not None else contextlib.nullcontext():
        report = verify_artifact(path, **kwargs)
    if remote is not None:
        report["device"] = {"url": device, "board": remote.facts}
    return ParityReport.from_dict(report)


# ---------------------------------------------------------------------------------------------------------------------
# calibrate


def calibrate(
    model: ModelLike = None,
    data: str | Path | None = None,
    *,
    num_images: int = 32,
    method: str = "auto",
    size: Sequence[int] | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    sensitivity: bool = False,
    target: str | None = None,
    outliers: str = "auto",
    granularity: str = "group",
    groups: str | Sequence[str] | None = None,
    strict: bool = False,
    capture_output: bool = True,
    on_step: StepCallback | None = None,
) -> CalibrationSet:
    """Pick a calibration set for INT8 (N images spread across the classes, hashed with the checkpoint), saved to
    ``out`` when given; with ``sensitivity`` also rank the layer groups (or, ``granularity="layer"``, the single
    layers of ``groups``) by the mIoU they cost under ``target``'s quantizer: ``calib.sensitivity``, and
    sensitivity.json/.md/.png in ``out``. Without ``data``, only the built-in model calibrates (on the synthetic
    scenes); a model of its own classes needs the user's images. A photo of ``data`` that does not read is left out
    with one warning naming it (``strict``: a DataError). With ``capture_output`` the quantizers' and runtimes' own
    output during the sensitivity analysis goes to ``out``/sensitivity.log (to /dev/null without ``out``).
    """
    from .calibration.sensitivity import GRANULARITIES, write_report
    from .calibration.spec import LAYER_GROUPS, QuantSpec
    from .converters.int8 import calibration_for

    quant = QuantSpec(method=method, outliers=outliers)  # validates the method and outlier mode before any work
    if outliers != "auto" and not sensitivity:
        raise OptionError("--outliers applies to --sensitivity (export takes its own --outliers)", "--outliers")
    if granularity not in GRANULARITIES:
        raise OptionError(f"{granularity}: choose {' or '.join(GRANULARITIES)}", "--granularity")
    if granularity != "group" and not sensitivity:
        raise OptionError("--granularity applies to --sensitivity", "--granularity")
    listed = groups.split(",") if isinstance(groups, str) else groups
    chosen = None if listed is None else [g.strip() for g in listed if g.strip()]
    if chosen is not None:
        if granularity != "layer":
            raise OptionError("--groups applies to --granularity layer", "--groups")
        unknown = [g for g in chosen if g not in LAYER_GROUPS]
        if unknown or not chosen:
            raise OptionError(f"{', '.join(unknown) or '(none)'}: choose from {', '.join(LAYER_GROUPS)}", "--groups")
    if data is not None:  # every photo decoded once before any work: a bad file is named once (later passes reuse it)
        from .data import open_source

        open_source(str(data), "train", strict=strict)
    net, path = resolve_model(model)
    h, w = _size(size, net.meta.input_size)
    if sensitivity:
        target = _int8_target(target)
    step = on_step or _no_step
    step("calibration", "picking calibration images", False)
    calib = calibration_for(net, path, (h, w), data=str(data) if data is not None else None, num_images=num_images, method=method,
                            seed=seed)  # fmt: skip
    step("calibration", f"{len(calib.images)} images", True)
    if out is not None:
        calib.save(out)
    if sensitivity:
        layer_groups = chosen if granularity == "layer" else None
        log = Path(out) / "sensitivity.log" if out is not None else Path(os.devnull)
        calib.sensitivity = _sensitivity(net, calib, target, quant, layer_groups, granularity, step, log,  # type: ignore[arg-type]
                                         capture_output)  # fmt: skip
        if out is not None:
            write_report(calib.sensitivity, Path(out))
    return calib


def _int8_target(name: str | None) -> str:
    from .converters import get_target, target_names
    from .errors import ExportError

    if name is None:
        return next(n for n in target_names() if "int8" in get_target(n).precisions)
    if "int8" not in get_target(name).precisions:
        raise ExportError(f"{name}: this target has no int8; --sensitivity needs a target that quantizes")
    return name


def _sensitivity(model: Any, calib: CalibrationSet, target: str, quant: QuantSpec, groups: list[str] | None, granularity: str,
                 step: StepCallback, log: Path, capture_output: bool) -> Any:  # fmt: skip
    """Each layer group quantized alone (or each layer kept float alone) with ``target``'s quantizer, ranked; without
    labels the drop is also estimated from the float model's confidence (``float_logits``). The quantizers and
    runtimes talk on stderr (absl, XNNPACK, deprecations): into ``log``; the steps are reported with the capture
    paused."""
    from .calibration.recipes import reuse_exports
    from .calibration.sensitivity import analyse, quantizable_layers
    from .calibration.spec import LAYER_GROUPS, WRAPPER, group_of
    from .converters.base import ExportOptions
    from .converters.build import plan_export
    from .converters.int8 import quantized_predictor
    from .converters.reference import float_labeler, float_logits_of
    from .logs import OutputCapture

    options = ExportOptions(precision="int8", size=calib.size)
    task = f"sensitivity ({target})"
    if capture_output and log != Path(os.devnull):
        log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, OutputCapture(log, enabled=capture_output) as output:
        spec = plan_export(model, target, options, tmp, quant.with_(calibration=calib)).quant or quant
        labeler = float_labeler(model, calib.size)
        layers = quantizable_layers(model) if granularity == "layer" else None
        if layers is not None and groups is not None:
            layers = [name for name in layers if group_of(WRAPPER + name) in groups]
        total = len(LAYER_GROUPS) if layers is None else len(layers) + 1
        done = [0]

        def advance(k: int) -> None:
            done[0] += k
            with output.paused():
                step(task, f"{done[0]} of {total} measured", done[0] >= total)

        advance(0)
        with reuse_exports():
            return analyse(calib, spec, lambda q: quantized_predictor(model, target, options, q, Path(tmp)),
                           lambda images: np.stack([labeler(im) for im in images]), model.config.num_classes,
                           target=target, layers=layers, progress=advance,
                           float_logits=float_logits_of(model, calib.size))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# bench


def bench(
    artifacts: ArtifactLike | Sequence[ArtifactLike],
    *,
    threads: int | Sequence[int] = 2,
    warmup: int = 5,
    runs: int = 30,
    rounds: int = 1,
    compare_torch: bool = False,
    model: ModelLike = None,
    compute_units: str = "all",
    profile: bool = False,
    floor: bool = False,
    device: str | None = None,
    device_python: str = "python3",
    device_tool: str | Path | None = None,
    device_timeout: float = 1800,
    on_step: StepCallback | None = None,
) -> list[BenchRecord]:
    """Latency of artifacts where they run, each measurement in a fresh process (``segformer-edge bench``).

    ``threads``: one count or several; ``compare_torch``: torch eager fp32 of ``model`` (default: the built-in model;
    a model in memory is saved to a temporary checkpoint for the worker) right after each artifact, with the speedup
    the median of those adjacent ratios over ``rounds``; ``floor``: each artifact's distance from this machine's GEMM
    floor. Records come torch's first (one per thread count), then each artifact's.
    ``device``: bench there instead of here, ``ssh://[user@]host[:port]`` (a Linux board through your ssh: the
    artifact is copied into the board's cache and its ``device_python``, which has segformer-edge[runtime], runs this
    same bench) or ``adb[:SERIAL]`` (an Android phone: the runtime's own benchmark binary ``device_tool``, once per
    artifact and thread count); ``device_timeout``: seconds one step on the device may take. The records then carry
    the board's facts (``board``, ``device``).
    """
    from .converters.bench import bench_paired

    counts = [threads] if isinstance(threads, int) else list(threads)
    if not counts or any(int(t) < 1 for t in counts):
        raise OptionError(f"{threads!r}: give positive integers separated by commas, such as 1,2,4", "--threads")
    adb = device is not None and device.split(":", 1)[0] == "adb"
    if adb:
        refused = {"--compare-torch": compare_torch, "--profile": profile, "--floor": floor, "--checkpoint": model is not None,
                   "--compute-units": compute_units != "all", "--rounds": rounds != 1,
                   "--device-python": device_python != "python3"}  # fmt: skip
        for flag, given in refused.items():
            if given:
                raise OptionError(f"{flag} cannot be honoured with --device adb (the runtime's own benchmark binary runs "
                                  "there, once per artifact and thread count)", "--device")  # fmt: skip
    elif device is not None:
        if device_tool is not None:
            raise OptionError("--device-tool is for --device adb; over ssh the board's own runtime runs", "--device-tool")
    elif device_tool is not None or device_python != "python3":
        flag = "--device-tool" if device_tool is not None else "--device-python"
        raise OptionError(f"{flag} needs --device", flag)
    paths = [_artifact_path(a) for a in ([artifacts] if isinstance(artifacts, (str, Path, base.Artifact)) else artifacts)]
    with contextlib.ExitStack() as stack:
        checkpoint = None
        if _in_memory(model):
            from .weights import save_checkpoint

            net, _ = resolve_model(model)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            checkpoint = str(save_checkpoint(net, folder / "model.safetensors"))
        elif model is not None:
            checkpoint = str(checkpoint_path(model))  # type: ignore[arg-type]
        manifests = [base.read_manifest(p) for p in paths]  # every artifact is checked before anything runs
        size = None
        if compare_torch:
            sizes = {m.input_spec.size for m in manifests}
            size = sizes.pop() if len(sizes) == 1 else None
            if size is None:
                raise OptionError("--compare-torch needs artifacts of one static input size", "--compare-torch")
        steps = rounds * len(paths) * len(counts) * (2 if compare_torch else 1)
        old = next((m for m in manifests if m.manifest.get("network_macs") is None), None) if floor else None
        if old is not None:
            raise base.ArtifactError(
                f"{old.folder}: its manifest has no network_macs (exported before --floor existed): export it again"
            )
        step, done = on_step or _no_step, [0]

        def advance() -> None:
            done[0] += 1
            step("bench", f"{done[0]} of {steps} measurements", done[0] >= steps)

        if adb:
            from .converters.adb import bench_over_adb

            tool = Path(device_tool) if device_tool is not None else None
            records = bench_over_adb(device, list(paths), counts, tool=tool, warmup=warmup, runs=runs, rounds=rounds,  # type: ignore[arg-type]
                                     timeout=device_timeout, on_step=advance)  # fmt: skip
        elif device is not None:
            from .converters.remote import SshDevice, bench_over_ssh

            board = SshDevice.parse(device, python=device_python, timeout=device_timeout)
            records, _ = bench_over_ssh(board, list(paths), counts, warmup=warmup, runs=runs, rounds=rounds,  # type: ignore[arg-type]
                                        compare_torch=compare_torch, checkpoint=checkpoint, size=size,
                                        compute_units=compute_units, profile=profile, floor=floor, on_step=advance)  # fmt: skip
        else:
            records = bench_paired(list(paths), counts, warmup=warmup, runs=runs, rounds=rounds, compare_torch=compare_torch,  # type: ignore[arg-type]
                                   checkpoint=checkpoint, size=size, compute_units=compute_units, profile=profile, floor=floor,
                                   on_step=advance)  # fmt: skip
    return [BenchRecord.from_dict(r) for r in records]


# ---------------------------------------------------------------------------------------------------------------------
# predict


def predict(
    source: ModelLike | ArtifactLike,
    images: ImagesLike,
    *,
    size: Sequence[int] | None = None,
    mode: str = "whole",
    threads: int | None = None,
    compare: ModelLike = None,
    out: str | Path | None = None,
    alpha: float = 0.5,
    keep_masks: bool = True,
    quiet: bool = True,
    strict: bool = False,
    on_step: StepCallback | None = None,
) -> Predictions:
    """Segment images with an artifact (in its own runtime) or a model: labels at each image's own size.

    ``source`` is an artifact (an :class:`Artifact`, or its folder or model file), a checkpoint, a Hub id, a model in
    memory, or ``"reference"``/None for the built-in model. ``images`` are (H, W, 3) uint8 arrays, image files,
    folders or glob patterns. ``compare`` (artifacts only) is the float model it was exported from: each record gets
    the pixel agreement. ``out``: write NAME_mask.png (palette colours) and NAME_overlay.png (and NAME_diff.png with
    ``compare``) there. ``keep_masks=False`` keeps no labels in memory (the CLI: the PNGs hold them); ``quiet`` sends the
    runtime's own greetings to /dev/null. A photo that does not read is left out with one warning naming it
    (``strict``: it is a DataError instead); every photo is decoded once before any work, so a bad file fails before
    anything is written.
    LiteRT and ONNX artifacts predict without torch unless ``compare`` is given.
    """
    if mode not in ("whole", "slide"):
        raise OptionError(f"{mode!r}: choose whole or slide", "--mode")
    entries = _image_entries(images, strict=strict)  # every photo decoded once: a bad file is named before any work
    folder = _artifact_folder(source)
    if folder is not None:
        artifact = source if isinstance(source, Artifact) else open_artifact(folder)
        run, palette, reference = _artifact_predictor(artifact, size, mode, compare, threads, quiet)
    else:
        if compare is not None:
            raise OptionError(
                f"{_name(source)} is a checkpoint: --compare compares an exported artifact with its checkpoint", "--compare"
            )
        run, palette = _model_predictor(source, size, mode)  # type: ignore[arg-type]
        reference = None
    return _predict_all(entries, run, reference, palette, Path(out) if out is not None else None, alpha, keep_masks,
                        on_step or _no_step)  # fmt: skip


def _name(model: Any) -> str:
    return "the model" if _in_memory(model) else str(model)


Predictor = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 image -> (H, W) labels at its size


def _artifact_predictor(artifact: Artifact, size: Sequence[int] | None, mode: str, compare: ModelLike, threads: int | None,
                        quiet: bool) -> tuple[Predictor, list[Any], Predictor | None]:  # fmt: skip
    """The artifact's predictor (in its own runtime), its palette and, with ``compare``, the float model's."""
    if mode != "whole":
        raise OptionError("an artifact runs at its exported size: --mode slide applies to checkpoints", "--mode")
    spec = artifact.input_spec
    if size is not None and tuple(size) != spec.size:
        if not spec.dynamic:
            raise OptionError(f"{artifact.folder.name} takes {spec.size[0]}x{spec.size[1]} images (a static graph); leave --size out",
                              "--size")  # fmt: skip
        spec = spec.with_(size=_size(size, spec.size))
    predictor = artifact._predictor(spec, threads, quiet)
    reference = None
    if compare is not None:
        from .converters.reference import check_reference, load_reference
        from .predict import float_predictor

        if _in_memory(compare):
            check_reference(artifact, compare, "the model", "compare")
            float_model, _ = resolve_model(compare)
        else:
            float_model = load_reference(artifact, checkpoint_path(compare), option="--compare").eval()  # type: ignore[arg-type]
        if float_model.config.num_classes != artifact.num_classes:
            raise CheckpointError(f"{_name(compare)}: the model has {float_model.config.num_classes} classes but "
                                  f"{artifact.folder.name} has {artifact.num_classes}")  # fmt: skip
        reference = float_predictor(float_model, spec)
    return predictor, artifact.manifest["palette"], reference


def _model_predictor(model: ModelLike, size: Sequence[int] | None, mode: str) -> tuple[Predictor, list[Any]]:
    from .predict import predict_mask

    net, _ = resolve_model(None if model == "reference" else model)
    target = _size(size, net.meta.input_size)
    return (lambda image: predict_mask(net, image, size=target, mode=mode)), list(net.meta.palette)


def _predict_all(entries: list[tuple[str, Path | None, np.ndarray | None]], run: Callable[[np.ndarray], np.ndarray],
                 reference: Callable[[np.ndarray], np.ndarray] | None, palette: list[Any], out: Path | None, alpha: float,
                 keep_masks: bool, step: StepCallback) -> Predictions:  # fmt: skip
    from .data.folders import read_image
    from .predict import agreement, colorize, disagreement_image, overlay

    records, masks = [], []
    for i, (name, path, array) in enumerate(entries):
        image = array if array is not None else read_image(path)  # type: ignore[arg-type]
        labels = run(image)
        record: dict[str, Any] = {"name": name + (path.suffix if path is not None else ""), "image": str(path) if path else None,
                                  "size": list(image.shape[:2])}  # fmt: skip
        pictures = {}
        if out is not None:
            colours = colorize(labels, palette)
            pictures = {"mask": colours, "overlay": overlay(image, colours, alpha)}
        if reference is not None:
            float_labels = reference(image)
            record["pixel_agreement"] = agreement(labels, float_labels)
            if out is not None:
                pictures["diff"] = disagreement_image(image, labels, float_labels)
        for suffix, picture in pictures.items():
            record[suffix] = str(_write_png(out / f"{name}_{suffix}.png", picture))  # type: ignore[operator]
        records.append(record)
        if keep_masks:
            masks.append(labels)
        step("predict", f"{i + 1} of {len(entries)} images", i + 1 == len(entries))
    mean = float(np.mean([r["pixel_agreement"] for r in records])) if reference is not None else None
    return Predictions(records, masks if keep_masks else None, out, mean)


def _write_png(path: Path, picture: np.ndarray) -> Path:
    from PIL import Image

    from .io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return path
