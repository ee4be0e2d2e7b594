"""Training throughput: segformer-edge SegFormer-B0 against transformers' SegformerForSemanticSegmentation-B0.

Both train on the same random batch in the same process (forward, cross-entropy on logits upsampled to the
input, backward, AdamW step), with bf16 autocast and channels_last on CUDA and fp32 on the CPU. Like with
like: with --compile both models are compiled, without it neither; the two are measured in interleaved
repeats (A B A B ...) so that a drifting machine affects both alike, and the ratio is the median of the
per-repeat ratios. Adds its record to benchmarks/train_throughput.json (one record per device, mode and configuration: a rerun
replaces the record of the same kind, a GPU run sits beside the CPU one) and writes the tables in
benchmarks/TRAIN_THROUGHPUT.md from it (the text from "## Distributed training" on survives a rerun).

    python benchmarks/train_throughput.py [--batch 16] [--size 512] [--steps 10] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent


def _step_fn(model, head, opt, x, y, amp, device):  # type: ignore[no-untyped-def]
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = head(model(x))
            logits = F.interpolate(logits, size=y.shape[1:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _timed(step: Any, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--tables", action="store_true", help="only rewrite TRAIN_THROUGHPUT.md from the stored JSON")
    args = parser.parse_args()
    if args.tables:
        write_markdown(_stored())
        return
    import transformers

    from segformer_edge import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    fmt = torch.channels_last if amp else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    ours = create_model("b0", num_classes=args.classes).to(device).train().to(memory_format=fmt)
    hf = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(num_labels=args.classes))
    hf = hf.to(device).train().to(memory_format=fmt)
    models = {"transformers SegformerForSemanticSegmentation-B0": (hf, lambda out: out.logits),
              "segformer-edge b0": (ours, lambda out: out)}  # fmt: skip
    steps = {}
    for name, (model, head) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=6e-5, fused=device.type == "cuda" or None)
        runnable = torch.compile(model) if args.compile else model
        steps[name] = _step_fn(runnable, head, opt, x, y, amp, device)
        for _ in range(3):  # warm-up (and compilation) outside the timed repeats
            steps[name]()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved: A B A B ...
        for name in models:
            rates[name].append(args.steps * args.batch / _timed(steps[name], args.steps, device))
    names = list(models)
    ratios = [o / t for t, o in zip(rates[names[0]], rates[names[1]])]
    record = {
        "date": str(datetime.date.today()), "device": torch.cuda.get_device_name() if amp else platform.processor() or "CPU",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "batch": args.batch, "size": args.size, "classes": args.classes, "steps": args.steps, "repeats": args.repeats,
        "compiled": args.compile, "amp_bf16": amp,
        "img_per_s": {name: statistics.median(r) for name, r in rates.items()}, "img_per_s_repeats": rates,
        "ratio_ours_over_transformers": statistics.median(ratios), "ratio_repeats": ratios,
    }  # fmt: skip
    print(json.dumps(record))
    records = [r for r in _stored() if _kind(r) != _kind(record)] + [record]
    (HERE / "train_throughput.json").write_text(json.dumps({"records": records}, indent=2) + "\n")
    write_markdown(records)


def _kind(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["device"], record["compiled"], record["batch"], record["size"], record["classes"]


def _stored() -> list[dict[str, Any]]:
    path = HERE / "train_throughput.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data["records"] if "records" in data else [data]  # a single record: the file's first layout


def write_markdown(records: list[dict[str, Any]]) -> None:
    """TRAIN_THROUGHPUT.md's tables, one per record, from the JSON; what follows "## Distributed training" is kept."""
    lines = [
        "# Training throughput against transformers' SegFormer-B0", "",
        "Both models train on the same batch in the same process (forward, cross-entropy on logits upsampled to the",
        "input, backward, AdamW step), in interleaved repeats; the ratio is the median of the per-repeat ratios.",
        "One table per machine and mode, each from its record in train_throughput.json.", "",
    ]  # fmt: skip
    for record in records:
        lines += _table(record)
    path = HERE / "TRAIN_THROUGHPUT.md"
    previous = path.read_text() if path.exists() else ""
    marker = "## Distributed training"
    path.write_text("\n".join(lines) + "\n" + (previous[previous.index(marker) :] if marker in previous else ""))


def _table(record: dict[str, Any]) -> list[str]:
    device = f"{record['device']} ({record['threads']} threads)"
    mode = ("bf16 autocast, channels_last" if record["amp_bf16"] else "fp32") + (", both compiled" if record["compiled"] else ", eager")
    command = (f"python benchmarks/train_throughput.py --batch {record['batch']} --size {record['size']} --steps {record['steps']} "
               f"--repeats {record['repeats']}" + (" --compile" if record["compiled"] else ""))  # fmt: skip
    lines = [
        f"## {record['device']}, {mode}", "",
        f"Measured {record['date']} with `{command}`: {record['classes']} classes, torch {record['torch']},",
        f"transformers {record['transformers']}, {device}, {mode}.", "",
        "| model | batch | size | img/s (median) | img/s per repeat |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for name, rate in record["img_per_s"].items():
        each = ", ".join(f"{v:.1f}" for v in record["img_per_s_repeats"][name])
        lines.append(f"| {name} | {record['batch']} | {record['size']} | {rate:.1f} | {each} |")
    lines += ["", f"Ratio segformer-edge / transformers: **{record['ratio_ours_over_transformers']:.2f}x** "
              f"(per repeat: {', '.join(f'{r:.2f}' for r in record['ratio_repeats'])}).", ""]  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
