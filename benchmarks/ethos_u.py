"""Arm Ethos-U configurations for the built-in SegFormer-B0: delegation, Vela's estimate, parity.

For each input size, the reference model (the built-in B0 checkpoint) is exported at INT8 once per TOSA family
through the CLI's own pipeline (``export_artifact``: calibration on the synthetic scenes, outlier handling
``auto``, EthosUQuantizer, EthosUPartitioner, Vela) and verified in the TOSA reference model against the float
model. U55 and U65 compile the same TOSA profile (+u55), U85 another (+cf), and the TOSA graphs and the
partition depend on nothing else, so every other configuration of a family is estimated by Vela alone from the
exported graphs (``estimate_for``): its delegation and parity are the family's. Vela's numbers are its
performance estimate (cycles at the configured clock; SRAM/DRAM/flash traffic), of the NPU delegates only: not
measurements, and the ops left on the Cortex-M are not in them.

Writes benchmarks/ethos_u.json, then benchmarks/ETHOS_U.md from that JSON.

    python benchmarks/ethos_u.py                      # 128x128 and 256x256
    python benchmarks/ethos_u.py --sizes 128          # one size
    python benchmarks/ethos_u.py --resume             # measure only what the JSON lacks
    python benchmarks/ethos_u.py --markdown-only      # rewrite ETHOS_U.md from ethos_u.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent

# family -> (the configuration exported, the configurations Vela estimates from its TOSA graphs).
# Each entry: (npu, system_config, memory_mode); "auto" is the family's default, as ExecuTorch picks it.
FAMILIES: dict[str, tuple[tuple[str, str, str], list[tuple[str, str, str]]]] = {
    "u55/u65": (("ethos-u55-128", "auto", "auto"), [
        ("ethos-u55-32", "auto", "auto"), ("ethos-u55-64", "auto", "auto"), ("ethos-u55-256", "auto", "auto"),
        ("ethos-u55-128", "Ethos_U55_Deep_Embedded", "auto"), ("ethos-u55-128", "auto", "Sram_Only"),
        ("ethos-u65-256", "auto", "auto"), ("ethos-u65-512", "auto", "auto"),
    ]),
    "u85": (("ethos-u85-256", "auto", "auto"), [
        ("ethos-u85-128", "auto", "auto"), ("ethos-u85-512", "auto", "auto"), ("ethos-u85-1024", "auto", "auto"),
        ("ethos-u85-2048", "auto", "auto"), ("ethos-u85-256", "auto", "Shared_Sram"),
        ("ethos-u85-256", "auto", "Dedicated_Sram_384KB"), ("ethos-u85-256", "Ethos_U85_SYS_Flash_Low", "Shared_Sram"),
    ]),
}  # fmt: skip
PARITY_KEYS = ("pixel_agreement", "agreement_miou", "miou_float", "miou_artifact", "miou_drop_points", "max_abs_diff",
               "psnr_db", "cosine", "passed", "images", "executor")  # fmt: skip
ESTIMATE_KEYS = ("accelerator", "system_config", "memory_mode", "clock_hz", "cycles", "inference_ms", "sram_traffic_bytes",
                 "dram_traffic_bytes", "off_chip_flash_traffic_bytes", "on_chip_flash_traffic_bytes", "peak_sram_used_kib",
                 "macs", "encoded_weights_bytes")  # fmt: skip

logger = logging.getLogger("benchmarks.ethos_u")


def measure_family(size: int, family: str, calibration_images: int, verify_images: int, workdir: Path) -> dict[str, Any]:
    """Export the family's configuration at ``size``, verify it, and estimate the family's other configurations."""
    from segformer_edge.calibration.spec import QuantSpec
    from segformer_edge.converters.base import ExportOptions, read_manifest
    from segformer_edge.converters.ethos_u import estimate_for
    from segformer_edge.converters.int8 import calibration_for
    from segformer_edge.converters.parity import ParityFailed
    from segformer_edge.converters.pipeline import export_artifact

    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    ckpt = builtin_checkpoint()
    model = load_pretrained(ckpt)
    (npu, system_config, memory_mode), sweep = FAMILIES[family]
    calib = calibration_for(model, ckpt, (size, size), num_images=calibration_images)
    asked = {"npu": npu, "system_config": system_config, "memory_mode": memory_mode}
    options = ExportOptions(size=(size, size), precision="int8", target_options={k: v for k, v in asked.items() if v != "auto"})
    started, cpu = time.perf_counter(), time.process_time()
    try:
        artifact, report = export_artifact(model, "ethos-u", options, workdir, checkpoint=ckpt, quant=QuantSpec(calibration=calib),
                                           verify_images=verify_images)  # fmt: skip
        folder = artifact.folder
    except ParityFailed as failed:  # the numbers are the point: keep them, say it failed
        report, folder = failed.report, failed.failed
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    manifest = read_manifest(folder).manifest
    delegation = manifest["delegation"]
    rows = [{"config": list(FAMILIES[family][0]), "how": "exported", **_estimate(manifest["estimate"])}]
    for config in sweep:
        rows.append({"config": list(config), "how": "Vela on the exported TOSA graphs",
                     **_estimate(estimate_for(read_manifest(folder), *config))})  # fmt: skip
    logger.info("%dx%d %s: %d delegate(s), NPU %d / CPU %d ops, parity %.4f, %.0f s", size, size, family, delegation["delegates"],
                delegation["npu_compute_ops"], delegation["cpu_compute_ops"], report["pixel_agreement"], seconds)  # fmt: skip
    return {
        "size": size,
        "family": family,
        "tosa_spec": manifest["ethos_u"]["tosa_spec"],
        "delegation": {k: delegation[k] for k in ("delegates", "npu_compute_ops", "cpu_compute_ops", "cpu_quantize_dequantize",
                                                  "cpu_ops", "cpu_fallbacks")},  # fmt: skip
        "parity": {k: report.get(k) for k in PARITY_KEYS},
        "thresholds": report.get("thresholds"),
        "quantization": {"method": manifest["quantization"]["method"], "calibration_images": calib.images.shape[0],
                         "outliers": manifest["quantization"]["applied"].get("outliers", {}).get("applied")},  # fmt: skip
        "export_seconds": round(seconds, 1),
        "export_cpu_seconds": round(cpu_seconds, 1),
        "pte_bytes": (folder / "model.ethos-u" / "model.pte").stat().st_size,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rows": rows,
    }


def _estimate(block: dict[str, Any]) -> dict[str, Any]:
    total = block["total"]
    return {"estimate": {k: total.get(k) for k in ESTIMATE_KEYS}, "per_delegate_ms": [p["inference_s"] * 1e3 for p in block["per_delegate"]]}


# -------------------------------------------------------------------------------------------------
# ETHOS_U.md, from the JSON


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _config(row: dict[str, Any]) -> str:
    e = row["estimate"]
    return f"{row['config'][0]} ({e['system_config']}, {e['memory_mode']})"


def _cpu_ops(d: dict[str, Any]) -> str:
    if not d["cpu_ops"]:
        return "0"
    ops = ", ".join(f"{n}x {op.removeprefix('aten_').removesuffix('_default')}" for op, n in d["cpu_ops"].items())
    return f"{d['cpu_compute_ops']} ({ops})"


def markdown(data: dict[str, Any]) -> str:
    """ETHOS_U.md from the JSON that :func:`measure_family` rows make up."""
    lines = [
        "# Arm Ethos-U: SegFormer-B0 (reference model) per NPU configuration",
        "",
        f"Written by `benchmarks/ethos_u.py` from `ethos_u.json` ({data['date']}; {data['tools']}).",
        "",
        ("One INT8 export per TOSA family and size through `segformer-edge`'s own pipeline (calibration on "
        f"{data['calibration_images']} synthetic scenes, `--outliers auto`, EthosUQuantizer, EthosUPartitioner, Vela), "
        "verified in the TOSA reference model against the float model; the family's other configurations are "
        "estimated by Vela from the same TOSA graphs (the partition, and so the ops and the parity, are the family's)."),
        "",
        ("**Estimated, not measured**: the times and traffic are Vela's performance estimate of the NPU delegates "
        "(cycles at the system config's clock); the ops left on the Cortex-M are not in them, and nothing here ran on "
        "an NPU. Parity is the lowered program with each delegate's TOSA graph in the TOSA reference model "
        "(`tosa-tools`), against the float model on the synthetic val scenes; Vela's compilation of those graphs is "
        "only executed by an FVP or hardware."),
        "",
        ("`peak SRAM KiB` is Vela's `sram_memory_used` of the largest delegate: Vela plans the arena into that much SRAM "
         "without knowing the board's, so a configuration whose peak exceeds the board's SRAM needs another memory mode "
         "(the Dedicated_Sram modes put the arena in DRAM behind an SRAM cache, at the DRAM traffic shown). Traffic is "
         "bytes moved per inference, in MB (10^6 bytes)."),
        "",
    ]
    for family in data["families"]:
        lines += [f"## {family['size']}x{family['size']}, {family['family']} ({family['tosa_spec']})", ""]
        d, p = family["delegation"], family["parity"]
        why = "; ".join(f"{f['op']} x{f['nodes']}: {f['reason'].rstrip('.')}" for f in d["cpu_fallbacks"]) or "none"
        miou = "" if p.get("miou_float") is None else f", mIoU float {100 * p['miou_float']:.2f} / artifact {100 * p['miou_artifact']:.2f}"
        lines += [
            (f"- Delegation: {d['delegates']} NPU delegate(s), {d['npu_compute_ops']} compute ops on the NPU, "
            f"{_cpu_ops(d)} on the CPU (+{d['cpu_quantize_dequantize']} quantize/dequantize). Fallback reasons: {why}."),
            (f"- Parity ({p['images']} images, {p['executor']}): pixel agreement {100 * p['pixel_agreement']:.2f}%, "
            f"mIoU drop {p['miou_drop_points']:.2f} points{miou}, max |diff| {p['max_abs_diff']:.3f}, PSNR {p['psnr_db']:.1f} dB "
            f"-> {'passed' if p['passed'] else 'FAILED'} (int8 thresholds: {family['thresholds']})."),
            (f"- Export: {family['export_seconds']:.0f} s wall, {family['export_cpu_seconds']:.0f} CPU s (2 shared cores), "
            f"peak RSS {family['peak_rss_mib']} MiB, .pte {family['pte_bytes'] / 1e6:.2f} MB."),
            "",
            "| configuration | how | clock MHz | est. NPU ms | cycles | SRAM traffic MB | DRAM traffic MB | flash traffic MB | peak SRAM KiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in family["rows"]:
            e = row["estimate"]
            flash = (e["off_chip_flash_traffic_bytes"] or 0) + (e["on_chip_flash_traffic_bytes"] or 0)
            lines.append(f"| {_config(row)} | {row['how']} | {e['clock_hz'] / 1e6:.0f} | {e['inference_ms']:.2f} | "
                         f"{e['cycles']:,.0f} | {_mb(e['sram_traffic_bytes'])} | {_mb(e['dram_traffic_bytes'])} | {_mb(flash)} | "
                         f"{e['peak_sram_used_kib']:.0f} |")  # fmt: skip
        lines.append("")
    missing = [f"{s}x{s} {f}" for s in data["sizes"] for f in FAMILIES if not any(x["size"] == s and x["family"] == f for x in data["families"])]
    if missing:
        lines += [f"Not measured: {', '.join(missing)} ({data.get('missing_note', 'not run')}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--verify-images", type=int, default=8)
    parser.add_argument("--json", type=Path, default=HERE / "ethos_u.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "ETHOS_U.md")
    parser.add_argument("--resume", action="store_true", help="keep what the JSON has; measure the rest")
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--missing-note", default=None, help="why a size/family in --sizes is not in the JSON (for the .md)")
    args = parser.parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root logger at INFO would turn on Vela's --verbose-all

    if args.markdown_only:
        data = json.loads(args.json.read_text())
    else:
        from segformer_edge.converters.base import tool_versions

        versions = tool_versions("executorch", "ethos-u-vela", "tosa-tools")
        data = json.loads(args.json.read_text()) if args.resume and args.json.exists() else {"families": []}
        data.update({"date": datetime.date.today().isoformat(), "sizes": sorted(set(data.get("sizes", [])) | set(args.sizes)),
                     "calibration_images": args.calibration_images,
                     "tools": ", ".join(f"{k} {versions[k]}" for k in ("torch", "executorch", "ethos-u-vela", "tosa-tools"))})  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="ethos-u-bench-") as tmp:
            for size in args.sizes:
                for family in args.families:
                    if any(f["size"] == size and f["family"] == family for f in data["families"]):
                        continue
                    logger.info("%dx%d %s: export, verify, Vela sweep ...", size, size, family)
                    data["families"].append(measure_family(size, family, args.calibration_images, args.verify_images, Path(tmp)))
                    data["families"].sort(key=lambda f: (f["size"], f["family"]))
                    args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.missing_note:
        data["missing_note"] = args.missing_note
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    args.markdown.write_text(markdown(data))
    logger.info("wrote %s", args.markdown if args.markdown_only and not args.missing_note else f"{args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
