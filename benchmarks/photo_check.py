"""What it costs to check a photo folder once as it opens (every file decoded, so that a truncated JPEG is found).

A folder of phone-sized JPEGs (crops of scikit-learn's two sample photos, upscaled, with sensor-like noise so that
they compress as real photos do; 8 distinct photos under 500 names) is made in a temporary folder, and three passes over it are timed, interleaved,
in one process (the best of ``--rounds`` each):

- ``listing only``: open each file's header (what the data source did before the check: it found truncated files
  only when a pass reached them);
- ``check (as built)``: :func:`segformer_edge.data.folders.check_photos`: JPEGs decoded at 1/8 scale (libjpeg's
  DCT scaling still reads all the entropy-coded data, so truncation is found), other formats decoded whole, on
  ``CHECK_THREADS`` threads;
- ``check, 1 thread``: the same on one thread;
- ``full decode``: every photo read as the commands read it (:func:`open_photo`), for comparison.

The check's verdicts are cached for the process, so one command pays for it once. The photo count, size and
mean file size are in the table.

Writes benchmarks/photo_check.json and benchmarks/PHOTO_CHECK.md (from the JSON alone).

    python benchmarks/photo_check.py [--photos 500] [--size 3024 4032] [--rounds 2]
    python benchmarks/photo_check.py --render
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "photo_check.json"
MD_PATH = HERE / "PHOTO_CHECK.md"


def make_folder(folder: Path, n: int, size: tuple[int, int], seed: int = 0, distinct: int = 8) -> dict[str, Any]:
    """``n`` JPEGs of ``size`` (H, W) at quality 90: ``distinct`` different photos, each encoded once and written
    under several names (decoding costs the same; making 500 distinct 12 MP JPEGs here would take longer than
    the measurement). Returns what was made."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    encoded = []
    for i in range(distinct):
        crop = photos[i % 2][(11 * i) % 100 :][:320, (23 * i) % 200 :][:, :427]  # 4:3, a different crop each
        base = np.asarray(Image.fromarray(crop).resize((w, h), Image.BICUBIC), np.float32)
        noisy = np.clip(base + rng.normal(0, 6, (h, w, 3)).astype(np.float32), 0, 255).astype(np.uint8)  # sensor noise
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    for i in range(n):
        (folder / f"IMG_{i:04d}.jpg").write_bytes(encoded[i % distinct])
    sizes = [len(encoded[i % distinct]) for i in range(n)]
    return {"photos": n, "distinct": distinct, "height": h, "width": w, "format": "JPEG q90",
            "mean_file_mb": float(np.mean(sizes)) / 1e6}  # fmt: skip


def _listing(paths: list[Path]) -> None:
    from PIL import Image

    for path in paths:
        with Image.open(path) as im:
            _ = im.size


def _check(paths: list[Path]) -> None:
    from segformer_edge.data.folders import _CHECKED, Sample, check_photos

    _CHECKED.clear()  # time the decode, not the process cache
    check_photos([Sample(p, None) for p in paths], "bench")


def _check_one_thread(paths: list[Path]) -> None:
    from segformer_edge.data import folders

    threads = folders.CHECK_THREADS
    folders.CHECK_THREADS = 1
    try:
        _check(paths)
    finally:
        folders.CHECK_THREADS = threads


def _full(paths: list[Path]) -> None:
    from segformer_edge.data.folders import open_photo

    for path in paths:
        open_photo(path)


PASSES = {
    "listing only": _listing,
    "check (as built)": _check,
    "check, 1 thread": _check_one_thread,
    "full decode": _full,
}


def measure(n: int, size: tuple[int, int], rounds: int) -> dict[str, Any]:
    import PIL

    from segformer_edge.data.folders import CHECK_THREADS

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        made = make_folder(folder, n, size)
        paths = sorted(folder.iterdir())
        times: dict[str, list[float]] = {name: [] for name in PASSES}
        for run in PASSES.values():
            run(paths[:1])  # imports and first-call costs out of the timings
        for _ in range(rounds):
            for name, run in PASSES.items():  # interleaved: each round runs every pass once
                start = time.perf_counter()
                run(paths)
                times[name].append(time.perf_counter() - start)
    rows = [
        {"pass": name, "seconds": min(t), "ms_per_photo": 1000 * min(t) / n, "all_seconds": t}
        for name, t in times.items()
    ]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"Pillow": PIL.__version__, "numpy": np.__version__},
        "folder": made, "rounds": rounds, "check_threads": CHECK_THREADS, "rows": rows,
    }  # fmt: skip


def render(record: dict[str, Any]) -> str:
    f = record["folder"]
    by = {r["pass"]: r for r in record["rows"]}
    check, full = by["check (as built)"], by["full decode"]
    lines = [
        "# Checking a photo folder once as it opens",
        "",
        f"{f['photos']} JPEGs of {f['width']}x{f['height']} ({f['distinct']} distinct photos; {f['format']}, mean "
        f"{f['mean_file_mb']:.2f} MB a file), "
        f"best of {record['rounds']} interleaved round(s), one process, the check on {record['check_threads']} "
        f"threads; {record['date']}; "
        f"{record['machine']['cpu']}, {record['machine']['cores']} cores (shared with other work: compare the rows, "
        f"not the absolute times); Python {record['machine']['python']}, "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        + ".",
        "",
        "| pass | seconds for the folder | ms a photo |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['pass']} | {r['seconds']:.2f} | {r['ms_per_photo']:.1f} |" for r in record["rows"]]
    lines += [
        "",
        (
            f"The check as built costs {check['seconds'] / full['seconds']:.2f}x a full decode of the folder "
            f"({check['ms_per_photo']:.1f} against {full['ms_per_photo']:.1f} ms a photo), once per command: the "
            "calibration and verify passes of one export reuse its verdicts. Listing only is what opening the folder "
            "cost before: it cannot find a truncated JPEG."
        ),
        "",
        "Written by benchmarks/photo_check.py from photo_check.json.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--size", type=int, nargs=2, default=(3024, 4032), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="Rewrite the .md from the JSON only.")
    args = parser.parse_args()
    if not args.render:
        record = measure(args.photos, tuple(args.size), args.rounds)
        JSON_PATH.write_text(json.dumps(record, indent=2) + "\n")
    MD_PATH.write_text(render(json.loads(JSON_PATH.read_text())))
    print(MD_PATH.read_text())


if __name__ == "__main__":
    main()
