"""Training smoke test (CPU, tiny model), exact resume, evaluation metrics, predict and erf."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import is_heat_map, run_cli
from PIL import Image

from segformer_edge import load_pretrained, save_checkpoint
from segformer_edge.data import open_source
from segformer_edge.evaluate import ConfusionMatrix, evaluate, infer
from segformer_edge.model import SegFormer, SegFormerConfig
from segformer_edge.train import TrainConfig, Trainer, lr_factor


def _tiny_run(tmp_path: Path, tiny_config: SegFormerConfig, name: str, **overrides) -> TrainConfig:
    init = tmp_path / "init.safetensors"
    if not init.exists():
        torch.manual_seed(0)
        save_checkpoint(SegFormer(SegFormerConfig(**{**tiny_config.__dict__, "num_classes": 8})), init)
    base = dict(
        data="synthetic:48", out=str(tmp_path / name), crop=(64, 64), scale=(256, 64), batch_size=4, iters=40,
        lr=2e-3, warmup_iters=5, eval_interval=20, ckpt_interval=10, log_interval=5, workers=0, init=str(init),
        eval_images=4,
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_training_smoke_loss_falls_and_checkpoint_reloads(tmp_path: Path, tiny_config: SegFormerConfig) -> None:
    config = _tiny_run(tmp_path, tiny_config, "run")
    trainer = Trainer(config)
    metrics = trainer.train(progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    assert all(r["img_per_s"] > 0 for r in records if "loss" in r)
    # The reported mIoU is the final model's on the first eval_images validation scenes, and training raised it.
    val = open_source("synthetic:48", "val")
    final = load_pretrained(tmp_path / "run" / "final.safetensors")
    init = load_pretrained(tmp_path / "init.safetensors")
    assert metrics["miou"] == pytest.approx(evaluate(final, val, final.meta, size=(64, 64), limit=4)["miou"], abs=1e-9)
    assert metrics["miou"] > evaluate(init, val, init.meta, size=(64, 64), limit=4)["miou"] + 0.05, metrics
    for name in ("last.pt", "best.safetensors", "final.safetensors", "curves.png", "config.json"):
        assert (tmp_path / "run" / name).is_file(), name
    reloaded = load_pretrained(tmp_path / "run" / "final.safetensors")
    assert reloaded.meta.input_size == (64, 64) and reloaded.meta.class_names[0] == "sky"
    x = torch.randn(1, 3, 64, 64)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), trainer.model(x))


def test_resume_continues_exactly(tmp_path: Path, tiny_config: SegFormerConfig) -> None:
    straight = Trainer(_tiny_run(tmp_path, tiny_config, "straight", iters=20, eval_interval=100))
    straight.train(progress=False)
    first = Trainer(_tiny_run(tmp_path, tiny_config, "paused", iters=20, eval_interval=100))
    first.train(progress=False, stop_after=10)
    resumed = Trainer(_tiny_run(tmp_path, tiny_config, "paused", iters=20, eval_interval=100), resume=tmp_path / "paused" / "last.pt")
    assert resumed.start_iter == 10
    resumed.train(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    log_a = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "paused" / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "img_per_s"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def test_lr_schedule_is_warmup_then_poly() -> None:
    config = TrainConfig(iters=1000, warmup_iters=100, lr=6e-5)
    assert lr_factor(0, config) == pytest.approx(1e-6, rel=1e-3)
    assert lr_factor(50, config) == pytest.approx(0.5 * (1 - 50 / 1000), rel=1e-3)
    assert lr_factor(100, config) == pytest.approx(0.9)
    assert lr_factor(999, config) == pytest.approx(0.001)


def test_optimizer_groups_follow_the_recipe(tmp_path: Path, tiny_config: SegFormerConfig) -> None:
    trainer = Trainer(_tiny_run(tmp_path, tiny_config, "groups"))
    groups = trainer.optimizer.param_groups
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0, 10.0, 10.0]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]
    norm = trainer.model.encoder.stages[0].blocks[0].norm1.weight
    assert any(p is norm for p in groups[1]["params"])


def _independent_miou(pred: np.ndarray, target: np.ndarray, k: int) -> tuple[float, float]:
    valid = target != 255
    ious = []
    for c in range(k):
        inter = np.logical_and(pred == c, target == c)[valid].sum()
        union = np.logical_or(pred == c, target == c)[valid].sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), float((pred == target)[valid].mean())


def test_miou_matches_an_independent_computation() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, (4, 50, 60))
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.7, np.clip(target, 0, 5), rng.integers(0, 6, target.shape))
    pred[pred == 255] = 0
    cm = ConfusionMatrix(7)  # class 6 never appears: excluded from the mean
    cm.update(pred, target)
    ours = cm.metrics()
    miou, acc = _independent_miou(pred, target, 7)
    assert abs(ours["miou"] - miou) <= 1e-6 and abs(ours["pixel_accuracy"] - acc) <= 1e-6


def test_evaluate_whole_and_slide_match_independent(tiny_config: SegFormerConfig) -> None:
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**{**tiny_config.__dict__, "num_classes": 8})).eval()
    source = open_source("synthetic:30", "val")
    result = evaluate(model, source, model.meta, size=(64, 64), limit=3)
    preds, targets = [], []
    for i in range(3):
        from segformer_edge.data.transforms import EvalTransform

        image, mask = source.load(i)
        x = torch.from_numpy(EvalTransform(model.meta.mean, model.meta.std, (64, 64))(image))[None]
        logits = torch.nn.functional.interpolate(infer(model, x, 8), size=mask.shape, mode="bilinear")
        preds.append(logits.argmax(1)[0].numpy())
        targets.append(mask)
    miou, acc = _independent_miou(np.stack(preds), np.stack(targets).astype(np.int64), 8)
    assert abs(result["miou"] - miou) <= 1e-6 and abs(result["pixel_accuracy"] - acc) <= 1e-6
    x = torch.randn(1, 3, 100, 130)
    slide = infer(model, x, 8, mode="slide", crop=(64, 64))
    assert slide.shape == (1, 8, 100, 130) and torch.isfinite(slide).all()
    whole = infer(model, x[:, :, :64, :64], 8, mode="slide", crop=(64, 64))
    torch.testing.assert_close(whole, infer(model, x[:, :, :64, :64], 8))


def test_eval_predict_erf_cli(tmp_path: Path, tiny_config: SegFormerConfig, capsys) -> None:
    torch.manual_seed(0)
    model = SegFormer(SegFormerConfig(**{**tiny_config.__dict__, "num_classes": 8}))
    model.meta.input_size = (64, 64)
    from segformer_edge.data import synthetic_labels

    model.meta.class_names, model.meta.palette = synthetic_labels().classes, synthetic_labels().palette
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    code, out, err = run_cli(["eval", ckpt, "--data", "synthetic:40", "--num-images", "2", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result["per_class_iou"]) == set(synthetic_labels().classes)
    expected = evaluate(model.eval(), open_source("synthetic:40", "val"), model.meta, size=(64, 64), limit=2)
    assert result["miou"] == pytest.approx(expected["miou"], abs=1e-9) and result["miou"] > 0
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-9)

    image = tmp_path / "scene.png"
    Image.fromarray(open_source("synthetic:10", "val").load(0)[0]).resize((90, 70)).save(image)
    code, _, err = run_cli(["predict", ckpt, image, "--out", tmp_path / "pred"], capsys)
    assert code == 0, err
    mask = np.asarray(Image.open(tmp_path / "pred" / "scene_mask.png"))
    assert mask.shape == (70, 90, 3)
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in synthetic_labels().palette}
    assert len(colours) > 1, colours  # a segmentation, not one flat class
    # The overlay is the photo blended half and half with those colours.
    photo = np.asarray(Image.open(image).convert("RGB")).astype(np.float32)
    blend = np.round(0.5 * photo + 0.5 * mask.astype(np.float32)).astype(np.uint8)
    overlay = np.asarray(Image.open(tmp_path / "pred" / "scene_overlay.png").convert("RGB"))
    assert np.abs(overlay.astype(int) - blend.astype(int)).max() <= 1

    code, _, err = run_cli(["erf", ckpt, "--out", tmp_path / "erf", "--num-images", "2"], capsys)
    assert code == 0, err
    panels = {name: np.asarray(Image.open(tmp_path / "erf" / f"erf_{name}.png").convert("RGB")).astype(int)
              for name in ("stage1", "stage2", "stage3", "stage4", "head")}  # fmt: skip
    for name, pixels in panels.items():
        assert is_heat_map(pixels), name
    assert np.abs(panels["stage1"] - panels["stage4"]).mean() > 1  # each panel is its own stage's field
    from segformer_edge.erf import effective_receptive_fields

    maps = effective_receptive_fields(model, torch.randn(2, 3, 64, 64))
    # Deeper stages see further: the area above 1% of the peak grows from stage 1 to stage 4.
    areas = [(maps[f"stage{i}"] > 0.01).mean() for i in range(1, 5)]
    assert areas[0] < areas[3]

