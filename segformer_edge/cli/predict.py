"""``segformer-edge predict``: a checkpoint or an exported artifact on photos.

For LiteRT and ONNX artifacts this command imports no torch (unless --compare asks for the float model):
the artifact path goes through the manifest, the target's torch-free runner and numpy post-processing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import STATE, JsonFlag, SizeOption, StrictFlag, check_size, console, progress_bar

if TYPE_CHECKING:
    import numpy as np

HELP = """Segment photos with a checkpoint or an exported artifact: writes NAME_mask.png (palette colours) and NAME_overlay.png for each image.

MODEL is an artifact folder from segformer-edge export (or its model file), a checkpoint (.safetensors, Hugging Face folder, NVlabs/mmseg .pth), a Hub id (org/name\\[@revision]) or "reference" for the built-in model. IMAGES are image files, folders (searched recursively; subfolders stay in the output names) or quoted glob patterns such as "photos/*.jpg".

An artifact runs in its own runtime with the preprocessing its manifest records (size, normalization, layout, dtype); its logits are upsampled to each photo's own size before the argmax (a mask output is resized with nearest neighbour), and the colours are the manifest's palette. With --compare CHECKPOINT the float model runs on the same inputs: NAME_diff.png shows the pixels where the two disagree in magenta, and the pixel agreement is printed for each image. LiteRT and ONNX artifacts predict without torch (pip install 'segformer-edge\\[runtime]') unless --compare is given.

Examples:

  segformer-edge predict reference street.jpg park.png --out predictions/

  segformer-edge predict exports/segformer-b0_tflite_int8 photos/ --compare runs/ade/best.safetensors

  segformer-edge predict nvidia/segformer-b0-finetuned-ade-512-512 "photos/*.jpg" --size 512 512
"""


def predict(
    model: Annotated[str, typer.Argument(help="An artifact folder, a checkpoint, a Hub id, or 'reference'.")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders of images, or quoted glob patterns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("predictions"),
    size: SizeOption = None,
    mode: Annotated[str, typer.Option(help="Checkpoints: whole (resize to --size) or slide.")] = "whole",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Overlay opacity.")] = 0.5,
    compare: Annotated[str | None, typer.Option("--compare", help="Artifacts: the float checkpoint (or Hub id) it was exported from; writes NAME_diff.png and prints the pixel agreement.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Artifacts: the runtime's thread count (default: its own).")] = None,
    strict: StrictFlag = False,
    as_json: JsonFlag = False,
) -> None:
    from segformer_edge.predict import image_items

    if mode not in ("whole", "slide"):
        raise typer.BadParameter(f"{mode!r}: choose whole or slide", param_hint="--mode")
    items = image_items(images, strict=strict)  # every photo decoded once: a bad file is named before any work
    folder = _artifact_folder(model)
    if folder is not None:
        run, palette, reference = _artifact(folder, size, mode, compare, threads)
    else:
        if compare is not None:
            raise typer.BadParameter(f"{model} is a checkpoint: --compare compares an exported artifact with its checkpoint",
                                     param_hint="--compare")  # fmt: skip
        run, palette = _checkpoint(model, size, mode)
        reference = None
    records = _predict_all(items, run, reference, palette, out, alpha)
    _report(records, out, reference is not None, as_json)


def _artifact_folder(model: str) -> Path | None:
    """The artifact folder MODEL names (a folder with a manifest, or a model file beside one), else None."""
    from segformer_edge.converters.base import MANIFEST

    path = Path(model)
    if not path.exists():
        return None
    folder = path if path.is_dir() and path.suffix != ".mlpackage" else path.parent
    return folder if (folder / MANIFEST).is_file() else None


def _artifact(folder: Path, size: tuple[int, int] | None, mode: str, compare: str | None,
              threads: int | None) -> tuple[Callable[[np.ndarray], np.ndarray], list[Any], Callable[[np.ndarray], np.ndarray] | None]:  # fmt: skip
    """The artifact's predictor (in its own runtime), its palette and, with --compare, the float model's."""
    from segformer_edge.converters import get_target
    from segformer_edge.converters.base import ArtifactError, read_manifest
    from segformer_edge.logs import OutputCapture
    from segformer_edge.predict import ArtifactPredictor

    artifact = read_manifest(folder)
    manifest = artifact.manifest
    if mode != "whole":
        raise typer.BadParameter("an artifact runs at its exported size: --mode slide applies to checkpoints", param_hint="--mode")
    spec = artifact.input_spec
    if size is not None and tuple(size) != spec.size:
        if not spec.dynamic:
            raise typer.BadParameter(f"{folder.name} takes {spec.size[0]}x{spec.size[1]} images (a static graph); "
                                     "leave --size out", param_hint="--size")  # fmt: skip
        spec = spec.with_(size=check_size(size, spec.size))
    target = get_target(artifact.target)
    if not target.runs_here():
        raise ArtifactError(f"{folder}: {target.name} artifacts cannot run on this machine ({target.not_here}); "
                            "predict with it there, or with an artifact of another target here")  # fmt: skip
    target.check_runtime()
    with OutputCapture(os.devnull, enabled=not STATE["verbose"]):  # runtimes greet on stderr (XNNPACK, absl)
        runner = target.load(artifact, threads=threads)
    predictor = ArtifactPredictor(runner, spec, manifest["output"]["kind"], int(manifest["num_classes"]))
    reference = None
    if compare is not None:
        from segformer_edge.converters.reference import load_reference
        from segformer_edge.errors import CheckpointError
        from segformer_edge.predict import float_predictor

        from .common import resolve_checkpoint

        float_model = load_reference(artifact, resolve_checkpoint(compare), option="--compare").eval()
        if float_model.config.num_classes != manifest["num_classes"]:
            raise CheckpointError(f"{compare}: the model has {float_model.config.num_classes} classes but "
                                  f"{folder.name} has {manifest['num_classes']}")  # fmt: skip
        reference = float_predictor(float_model, spec)
    return predictor, manifest["palette"], reference


def _checkpoint(model: str, size: tuple[int, int] | None, mode: str) -> tuple[Callable[[np.ndarray], np.ndarray], list[Any]]:
    from segformer_edge.predict import predict_mask
    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    from .common import resolve_checkpoint

    net = load_pretrained(builtin_checkpoint() if model == "reference" else resolve_checkpoint(model))
    target = check_size(size, net.meta.input_size)
    return (lambda image: predict_mask(net, image, size=target, mode=mode)), list(net.meta.palette)


def _predict_all(items: list[Any], run: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray] | None,
                 palette: list[Any], out: Path, alpha: float) -> list[dict[str, Any]]:  # fmt: skip
    from segformer_edge.data.folders import read_image
    from segformer_edge.predict import agreement, colorize, disagreement_image, overlay

    records = []
    with progress_bar("predict") as bar:
        task = bar.add_task("predict", total=len(items))
        for item in items:
            image = read_image(item.path)
            labels = run(image)
            colours = colorize(labels, palette)
            pictures = {"mask": colours, "overlay": overlay(image, colours, alpha)}
            record: dict[str, Any] = {"name": item.name + item.path.suffix, "image": str(item.path), "size": list(image.shape[:2])}
            if reference is not None:
                float_labels = reference(image)
                pictures["diff"] = disagreement_image(image, labels, float_labels)
                record["pixel_agreement"] = agreement(labels, float_labels)
            for suffix, picture in pictures.items():
                record[suffix] = str(_write_png(out / f"{item.name}_{suffix}.png", picture))
            records.append(record)
            bar.advance(task)
    return records


def _write_png(path: Path, picture: np.ndarray) -> Path:
    from PIL import Image

    from segformer_edge.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return path


def _report(records: list[dict[str, Any]], out: Path, compared: bool, as_json: bool) -> None:
    import numpy as np

    files = sum(3 if compared else 2 for _ in records)
    mean = float(np.mean([r["pixel_agreement"] for r in records])) if compared else None
    if as_json:
        console.print_json(json.dumps({"out": str(out), "images": records, "mean_pixel_agreement": mean}))
        return
    if compared:
        for r in records:
            console.print(f"{r['name']}: {100 * r['pixel_agreement']:.2f}% of pixels agree with the float model",
                          markup=False)  # fmt: skip
        console.print(f"mean pixel agreement {100 * mean:.2f}% over {len(records)} images", markup=False)  # type: ignore[operator]
    console.print(f"wrote {files} files to {out}", markup=False)
