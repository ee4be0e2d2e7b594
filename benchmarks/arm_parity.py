"""ARM parity: the reference model's LiteRT fp32, fp16 and int8 artifacts verified on arm64 kernels, beside x86's.

The "board" is this machine's loopback sshd (tests/sshd.py) whose Python is an arm64 python3.11 run by
qemu-aarch64-static from a Debian arm64 sysroot, with the aarch64 wheels of ai-edge-litert 1.4.0, numpy, flatbuffers
and pillow (build it with ``benchmarks/arm_sysroot.sh /work/arm``; it stays outside the repository). Each artifact
runs through ``verify --device ssh://`` (:class:`RemoteRunner`: XNNPACK's ARM NEON paths) and locally (x86 AVX
paths) on the same verify images, and once more on x86 over ssh with the board's LiteRT version (its x86_64 wheel in
``SYSROOT/x86-site``); the figures against the float model, and the artifact's outputs on ARM against x86, go to
arm_parity.json, then ARM_PARITY.md is written from that JSON alone. Timing under emulation means
nothing (it is recorded only so that a reader sees how slow the run was).

    python benchmarks/arm_parity.py [--sysroot /work/arm] [--images 8] [--work exports/arm-parity] [--render]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KEYS = (
    "max_abs_diff",
    "cosine",
    "psnr_db",
    "pixel_agreement",
    "agreement_miou",
    "miou_float",
    "miou_artifact",
    "passed",
)


class Capture:
    """A runner that keeps every output it returns."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.executor = runner.executor
        self.outputs: list[np.ndarray] = []
        self.seconds: list[float] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        y = np.asarray(self.runner(x))
        self.seconds.append(time.perf_counter() - start)
        self.outputs.append(y)
        return y


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from segformer_edge.calibration.calibset import select_calibration_set
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters import get_target
    from segformer_edge.converters.base import ExportOptions, read_manifest, tool_versions
    from segformer_edge.converters.bench import machine_info
    from segformer_edge.converters.parity import verify_artifact
    from segformer_edge.converters.pipeline import export_artifact
    from segformer_edge.converters.reference import checkpoint_digest
    from segformer_edge.converters.remote import RemoteRunner, SshDevice
    from sshd import loopback_sshd, wrapper

    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    sysroot = Path(args.sysroot)
    if not (sysroot / "python").is_file():
        raise SystemExit(
            f"{sysroot}/python is missing: build the emulated board with benchmarks/arm_sysroot.sh {sysroot}"
        )
    work = Path(args.work)
    ckpt = builtin_checkpoint()
    model = load_pretrained(ckpt)
    size = (int(model.meta.input_size[0]), int(model.meta.input_size[1]))
    calib = select_calibration_set(
        "synthetic", 32, size, model.config.num_classes, checkpoint_sha256=checkpoint_digest(ckpt)
    )
    folders = {}
    for precision in ("fp32", "fp16", "int8"):
        quant = QuantSpec(calibration=calib) if precision == "int8" else None
        artifact, _ = export_artifact(model, "tflite", ExportOptions(size=size, precision=precision), work / "art",
                                      checkpoint=ckpt, quant=quant, verify=False)  # fmt: skip
        folders[precision] = artifact.folder
    qemu = subprocess.run(
        ["qemu-aarch64-static", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    rows = []
    boards: dict[str, dict[str, Any]] = {}
    with loopback_sshd(work / "sshd") as port:
        # The arm64 board, and an x86 "board" with the same ai-edge-litert as the arm64 one (its x86_64 wheel first on
        # PYTHONPATH): what differs between those two is the architecture's kernels alone, not the LiteRT version.
        inherited = os.environ.get("PYTHONPATH", "")  # the checkout measured, wherever this process found it
        env = f"export PYTHONPATH={{site}}{REPO}{':' + inherited if inherited else ''} SEGFORMER_EDGE_CACHE={work / 'board-cache'}"
        pythons = {"arm64": wrapper(work / "arm64-python", env.format(site="") + f'\nexec {sysroot / "python"} "$@"'),
                   "x86 (board's LiteRT)": wrapper(work / "x86-python", env.format(site=f"{sysroot / 'x86-site'}:")
                                                   + f'\nexec {sys.executable} "$@"')}  # fmt: skip
        for precision, folder in folders.items():
            host = Capture(get_target("tflite").load(read_manifest(folder)))
            runs = {"x86": (verify_artifact(folder, model=model, num_images=args.images, runner=host), host)}
            for where, python in pythons.items():
                with RemoteRunner(
                    SshDevice.parse(f"ssh://board:{port}", python=python, timeout=3600), folder
                ) as remote_runner:
                    remote = Capture(remote_runner)
                    runs[where] = (verify_artifact(folder, model=model, num_images=args.images, runner=remote), remote)
                    boards[where] = remote_runner.facts
            arm = runs["arm64"][1]
            row: dict[str, Any] = {"precision": precision, "artifact": folder.name, "images": runs["x86"][0]["images"],
                                   "data": runs["x86"][0]["data"],
                                   "verify": {w: {k: r.get(k) for k in KEYS} | {"executor": c.executor} for w, (r, c) in runs.items()},
                                   "s_per_image": {w: float(np.median(c.seconds)) for w, (_, c) in runs.items()}}  # fmt: skip
            for other in ("x86 (board's LiteRT)", "x86"):
                ref = runs[other][1]
                diffs = [
                    float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(arm.outputs, ref.outputs, strict=True)
                ]
                agree = [
                    float((a.argmax(1) == b.argmax(1)).mean()) for a, b in zip(arm.outputs, ref.outputs, strict=True)
                ]
                row[f"arm64 vs {other}"] = {"max_abs_diff": max(diffs), "argmax_agreement": float(np.mean(agree)),
                                            "bit_identical": all(d == 0 for d in diffs)}  # fmt: skip
            rows.append(row)
            print(precision, json.dumps(row, default=str)[:300], flush=True)
    return {"date": time.strftime("%Y-%m-%d"), "host": machine_info(), "host_versions": tool_versions("ai-edge-litert"),
            "boards": boards, "qemu": qemu, "sysroot": "Debian 12 arm64 python3.11 (dpkg -x), aarch64 wheels: see board versions",
            "model": {"checkpoint": ckpt.name, "size": list(size), "classes": model.config.num_classes},
            "calibration": calib.reference(), "rows": rows}  # fmt: skip


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render(data: dict[str, Any]) -> None:
    arm, x86b, host = data["boards"]["arm64"], data["boards"]["x86 (board's LiteRT)"], data["host"]
    first = data["rows"][0]
    lines = [
        "# ARM parity: LiteRT artifacts of the reference model on arm64 kernels",
        "",
        (
            "Written by `benchmarks/arm_parity.py` from `arm_parity.json`. Each artifact was verified three times on the same "
            f"{first['images']} verify images against the float model (torch, here): on x86 with this machine's ai-edge-litert; "
            "on an emulated arm64 board reached with `verify --device ssh://` (a loopback sshd whose Python is Debian's arm64 "
            f"python{arm.get('python', '')} under {data['qemu']}, with aarch64 wheels; `benchmarks/arm_sysroot.sh` builds it); "
            "and, through the same ssh path, on x86 with the board's ai-edge-litert version (its x86_64 wheel), so that "
            "arm64 against that run differs in the architecture's kernels alone. qemu-user executes the instructions "
            "XNNPACK picks from the CPU features the emulated CPU reports (below); timings under emulation mean nothing."
        ),
        "",
        (
            f"- host: {host.get('cpu')}, {host.get('cpus')} cores, {host.get('machine')}, Python {host.get('python')}; "
            f"ai-edge-litert {data['host_versions'].get('ai-edge-litert')}, numpy {data['host_versions'].get('numpy')}"
        ),
        f"- arm64 board (emulated): {arm.get('os')}, Python {arm.get('python')}; "
        + ", ".join(f"{k} {v}" for k, v in arm.get("versions", {}).items())
        + f"; CPU features seen: {', '.join(arm.get('arm_features') or ['-'])}",
        f"- x86 with the board's LiteRT: Python {x86b.get('python')}; "
        + ", ".join(f"{k} {v}" for k, v in x86b.get("versions", {}).items()),
        (
            f"- model: {data['model']['checkpoint']} ({data['model']['classes']} classes, {data['model']['size'][0]}x"
            f"{data['model']['size'][1]}); int8 calibrated on {data['calibration'].get('images', '?')} images; "
            f"verify data: {first['data'].get('spec')} ({first['data'].get('usage')})"
        ),
        "",
        "| precision | where | executor | max abs diff | cosine | PSNR dB | pixel agreement | agreement mIoU | mIoU float | mIoU artifact | passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        for where, r in row["verify"].items():
            lines.append(f"| {row['precision']} | {where} | {r['executor']} | {_fmt(r['max_abs_diff'])} | {_fmt(r['cosine'], 8)} | "
                         f"{_fmt(r['psnr_db'], 5)} | {_fmt(r['pixel_agreement'])} | {_fmt(r['agreement_miou'])} | "
                         f"{_fmt(r['miou_float'])} | {_fmt(r['miou_artifact'])} | {_fmt(r['passed'])} |")  # fmt: skip
    lines += ["", "The artifact's own outputs on arm64 against x86 (same inputs; argmax over the classes at 1/4 resolution):", "",
              "| precision | against | max abs diff | argmax agreement | bit-identical | s per image (arm64 emulated / x86) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in data["rows"]:
        t = row["s_per_image"]
        for other in ("x86 (board's LiteRT)", "x86"):
            d = row[f"arm64 vs {other}"]
            lines.append(f"| {row['precision']} | {other} | {_fmt(d['max_abs_diff'])} | {_fmt(d['argmax_agreement'])} | "
                         f"{_fmt(d['bit_identical'])} | {t['arm64']:.2f} / {t[other]:.4f} |")  # fmt: skip
    lines += ["", (f"Measured {data['date']}. Not run here: a physical arm64 board (the same command, `verify ARTIFACT --device "
              "ssh://user@board`, runs there), and ONNX Runtime on arm64 (its aarch64 wheel crashes at import under qemu-user).")]  # fmt: skip
    (HERE / "ARM_PARITY.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sysroot", default="/work/arm", help="what benchmarks/arm_sysroot.sh built")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--work", default="exports/arm-parity")
    parser.add_argument("--render", action="store_true", help="only write ARM_PARITY.md from arm_parity.json")
    args = parser.parse_args()
    path = HERE / "arm_parity.json"
    if not args.render:
        path.write_text(json.dumps(measure(args), indent=2, default=str) + "\n")
    render(json.loads(path.read_text()))
    print(platform.node(), "->", HERE / "ARM_PARITY.md")


if __name__ == "__main__":
    main()
