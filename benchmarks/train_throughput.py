"""Training throughput: segformer-edge SegFormer-B0 against transformers' SegformerForSemanticSegmentation-B0.

Both train on the same random batch in the same process (forward, cross-entropy on logits upsampled to the
input, backward, AdamW step), with bf16 autocast and channels_last on CUDA and fp32 on the CPU. Prints one
JSON line per model and the ratio.

    python benchmarks/train_throughput.py [--batch 16] [--size 512] [--steps 20] [--compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


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


def measure(name: str, model, head, x, y, steps: int, device, amp: bool) -> dict:  # type: ignore[no-untyped-def]
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, fused=device.type == "cuda" or None)
    step = _step_fn(model, head, opt, x, y, amp, device)
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"model": name, "img_per_s": steps * x.shape[0] / elapsed, "batch": x.shape[0], "size": x.shape[-1],
            "device": str(device), "amp_bf16": amp, "torch": torch.__version__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    import transformers

    from segformer_edge import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    fmt = torch.channels_last if amp else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    ours = create_model("b0", num_classes=args.classes).to(device).train().to(memory_format=fmt)
    step_model = torch.compile(ours) if args.compile else ours
    hf_config = transformers.SegformerConfig(num_labels=args.classes)
    hf = transformers.SegformerForSemanticSegmentation(hf_config).to(device).train().to(memory_format=fmt)
    records = [
        measure("transformers SegformerForSemanticSegmentation-B0", hf, lambda out: out.logits, x, y, args.steps, device, amp),
        measure("segformer-edge b0" + (" (compiled)" if args.compile else ""), step_model, lambda out: out, x, y, args.steps, device, amp),
    ]
    for r in records:
        print(json.dumps(r))
    print(json.dumps({"ratio_ours_over_transformers": records[1]["img_per_s"] / records[0]["img_per_s"]}))


if __name__ == "__main__":
    main()
