"""Latency measurement of artifacts (and of torch eager, for ratios), one fresh process per measurement.

Each (artifact, thread count) runs in its own interpreter, so that the peak RSS belongs to that artifact
alone. ``import_ms`` is the runtime's import; ``load_ms`` the runtime's load of the model file after the
file's pages were dropped from the page cache (posix_fadvise DONTNEED; where the OS has no such call the
file may still be cached, and the record says ``"cold": false``). The worker needs torch only for ExecuTorch artifacts and for the
eager reference: benching .tflite and .onnx works on a device with the light ``[runtime]`` install.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from segformer_edge.errors import SegformerEdgeError

from .base import ArtifactError, read_manifest

__all__ = ["FLOOR_GEMM", "add_floor", "bench_artifact", "bench_paired", "bench_torch", "gemm_floor", "machine_info", "merge_rounds",
           "summarize"]

logger = logging.getLogger(__name__)


def summarize(times_ms: list[float], batch: int = 1) -> dict[str, float]:
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "std_ms": float(t.std()),
        "min_ms": float(t.min()),
        "throughput_ips": float(1000.0 * batch / t.mean()),
    }


def _peak_rss_mb() -> float:
    """This process's own peak resident set.

    On Linux, ``ru_maxrss`` survives fork and exec: a worker started by a parent that once held 4 GB reports
    at least 4 GB. The high-water mark of the process's own address space (VmHWM) starts afresh at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _time_runs(fn: Any, x: Any, warmup: int, runs: int) -> dict[str, Any]:
    start = time.perf_counter()
    fn(x)
    first_ms = 1000 * (time.perf_counter() - start)
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(1000 * (time.perf_counter() - start))
    return {"first_ms": first_ms, **summarize(times), "runs": runs, "warmup": warmup, "times_ms": times}


def _input_images(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, h, w, 3), dtype=np.uint8)


def _evict(path: Path) -> bool:
    """Drop a file's (or a folder's files') pages from the page cache, where the OS offers posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for item in [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just exported) are not dropped: write them back first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _measure_artifact(path: str, threads: int, warmup: int, runs: int, compute_units: str, profile: bool = False) -> dict[str, Any]:
    from . import get_target

    artifact = read_manifest(path, check_hash=False)  # the parent checked the hash: keep the file out of the page cache
    manifest = artifact.manifest
    target = get_target(artifact.target)
    record: dict[str, Any] = {
        "artifact": str(artifact.folder), "target": artifact.target, "precision": artifact.precision,
        "threads": threads, "size_mb": manifest["size_bytes"] / 1e6,
    }  # fmt: skip
    if not target.times_here():
        return {**record, "status": target.not_here, **(target.estimate(artifact) or {})}  # an estimate says so in its status
    spec = artifact.input_spec
    h, w = spec.size
    x = spec(_input_images(h, w))
    start = time.perf_counter()
    make_runner = target.runner_factory(artifact, threads, compute_units)  # imports the runtime: reported apart
    import_ms = 1000 * (time.perf_counter() - start)
    cold = _evict(artifact.file)  # cold load: the model file is read from disk, not from the page cache
    start = time.perf_counter()
    runner = make_runner()
    load_ms = 1000 * (time.perf_counter() - start)
    timing = _time_runs(runner, x, warmup, runs)
    result = {**record, "status": "ok", "executor": runner.executor, "input": [h, w], "import_ms": import_ms, "load_ms": load_ms, "cold": cold,
              **timing,
              "peak_rss_mb": _peak_rss_mb()}  # fmt: skip
    if profile:  # after the timed runs, so that profiling never slows what is reported
        ops = target.profile(artifact, x, min(runs, 10), threads)
        if ops is not None:
            result["profile"] = ops
    return result


def _measure_torch(checkpoint: str | None, size: list[int], threads: int, warmup: int, runs: int) -> dict[str, Any]:
    import torch

    from segformer_edge.inputs import InputSpec
    from segformer_edge.weights import builtin_checkpoint, load_pretrained

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_pretrained(checkpoint or builtin_checkpoint())
    load_ms = 1000 * (time.perf_counter() - start)
    h, w = size
    x = torch.from_numpy(InputSpec.for_model(model.meta, (h, w))(_input_images(h, w)))
    with torch.inference_mode():
        timing = _time_runs(model, x, warmup, runs)
    return {"artifact": "torch eager", "target": "torch", "precision": "fp32", "threads": threads, "status": "ok",
            "executor": f"torch {torch.__version__}", "input": [h, w], "load_ms": load_ms, **timing,
            "peak_rss_mb": _peak_rss_mb(), "size_mb": None}  # fmt: skip


# The floor probe: FLOOR_DEPTH chained linears of FLOOR_GEMM (M tokens x K -> N), int8 between them in the int8
# probe, so that the GEMMs, not the edges' quantize/dequantize, set the rate (as inside a network).
FLOOR_GEMM = (4096, 1024, 1024)
FLOOR_DEPTH = 4


def _measure_gemm(precision: str, threads: int, warmup: int, runs: int) -> dict[str, Any]:
    """This machine's GEMM rate as XNNPACK runs it (ExecuTorch and LiteRT's CPU delegate): a chain of
    :data:`FLOOR_DEPTH` linears of :data:`FLOOR_GEMM`, fp32 or static int8 (per-channel weights)."""
    import tempfile

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from .executorch import set_threads

    m, k, n = FLOOR_GEMM
    torch.manual_seed(0)
    module: Any = torch.nn.Sequential(*[torch.nn.Linear(k if i == 0 else n, n, bias=False) for i in range(FLOOR_DEPTH)]).eval()
    x = torch.randn(m, k)
    if precision == "int8":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        module = prepare_pt2e(torch.export.export(module, (x,)).module(), quantizer)
        module(x)  # calibration
        module = convert_pt2e(module)
    program = to_edge_transform_and_lower(torch.export.export(module, (x,)), partitioner=[XnnpackPartitioner()]).to_executorch()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.pte"
        path.write_bytes(program.buffer)
        set_threads(threads)
        method = Runtime.get().load_program(path).load_method("forward")
        timing = _time_runs(lambda a: method.execute([a]), x, warmup, runs)
    gmac = FLOOR_DEPTH * m * k * n / 1e9
    return {"precision": precision, "threads": threads, "shape": [m, k, n], "depth": FLOOR_DEPTH, "executor": "XNNPACK (executorch.runtime)",
            "p50_ms": timing["p50_ms"], "gmac_per_s": gmac / (timing["p50_ms"] / 1000)}  # fmt: skip


def gemm_floor(threads: int, precisions: tuple[str, ...] = ("fp32", "int8"), warmup: int = 5, runs: int = 30) -> dict[str, dict[str, Any]]:
    """The GEMM rates (``fp32``, ``int8``) at ``threads``, each measured in a fresh process."""
    return {p: _run_worker({"kind": "gemm", "precision": p, "threads": threads, "warmup": warmup, "runs": runs})
            for p in precisions}  # fmt: skip


def _floor_precision(precision: str) -> str:
    return "int8" if precision == "int8" else "fp32"


def add_floor(record: dict[str, Any], floor: dict[str, dict[str, Any]], macs: int | None) -> None:
    """``record``'s distance from the floor: its network's MACs at the GEMM rate of its precision (int8 at the
    int8 rate, fp32 and fp16 at the fp32 rate), against its p50. Graph edges (a mask, probabilities) and the
    non-GEMM ops (softmax, LayerNorm, resizes) count as nothing in the floor: the ratio says what they cost."""
    if record.get("status") != "ok" or not macs:
        return
    probe = floor[_floor_precision(record["precision"])]
    floor_ms = 1000 * macs / 1e9 / probe["gmac_per_s"]
    record.update({"network_gmacs": macs / 1e9, "floor_ms": floor_ms, "x_floor": record["p50_ms"] / floor_ms,
                   "floor_gemm": {"precision": probe["precision"], "gmac_per_s": probe["gmac_per_s"], "shape": probe["shape"],
                                  "depth": probe["depth"]}})  # fmt: skip


def _run_worker(job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    env = dict(os.environ)
    threads = str(job["threads"])
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TF_CPP_MIN_LOG_LEVEL": "3"})
    result = subprocess.run(
        [sys.executable, "-m", "segformer_edge.converters.bench", json.dumps(job)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        if result.returncode == 2 and tail.startswith("error: "):
            raise ArtifactError(tail.removeprefix("error: "))
        raise ArtifactError(f"{job.get('path', 'torch')}: benchmark worker failed: {tail}")
    return json.loads(lines[-1])


def bench_artifact(
    path: str | Path, threads: int, warmup: int = 5, runs: int = 30, compute_units: str = "all", profile: bool = False
) -> dict[str, Any]:
    """Measure one artifact at one thread count in a fresh process (``profile``: add the top ops)."""
    read_manifest(path)  # fail fast, in this process, on a missing or tampered artifact
    return _run_worker({"kind": "artifact", "path": str(path), "threads": threads, "warmup": warmup, "runs": runs,
                        "compute_units": compute_units, "profile": profile})  # fmt: skip


def bench_torch(checkpoint: str | Path | None, size: tuple[int, int], threads: int, warmup: int = 5, runs: int = 30) -> dict[str, Any]:
    """Measure torch eager fp32 of a checkpoint at ``size`` in a fresh process."""
    return _run_worker({"kind": "torch", "checkpoint": str(checkpoint) if checkpoint else None, "size": list(size),
                        "threads": threads, "warmup": warmup, "runs": runs})  # fmt: skip


def merge_rounds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from several measurements of the same thing: pooled timed runs, median load and first run."""
    if len(records) == 1 or records[0].get("status") != "ok":
        return records[0]
    times = [t for r in records for t in r["times_ms"]]
    merged = {**records[0], **summarize(times), "times_ms": times, "runs": len(times), "rounds": len(records)}
    merged["load_ms"] = float(np.median([r["load_ms"] for r in records]))
    merged["first_ms"] = float(np.median([r["first_ms"] for r in records]))
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in records)
    return merged


def bench_paired(
    paths: list[str | Path],
    threads: list[int],
    *,
    warmup: int = 5,
    runs: int = 30,
    rounds: int = 1,
    compare_torch: bool = False,
    checkpoint: str | Path | None = None,
    size: tuple[int, int] | None = None,
    compute_units: str = "all",
    profile: bool = False,
    floor: bool = False,
    on_step: Any = None,
) -> list[dict[str, Any]]:
    """Bench every artifact at every thread count, ``rounds`` times; with ``compare_torch``, pair each one.

    A shared machine drifts by tens of percent over minutes, so a torch number taken once at the start
    does not belong to an artifact measured ten minutes later. Each artifact measurement is therefore
    followed at once by a torch eager measurement at the same thread count, and ``speedup_vs_torch`` is
    the median over rounds of those adjacent ratios. Records pool the timed runs of all rounds; the torch
    record (one per thread count) pools all of its measurements. With ``floor`` each round also probes the
    GEMM rates (:func:`gemm_floor`) at each thread count, and each record gets its distance from the floor
    (:func:`add_floor`; median rates over rounds; the MACs come from the manifest).
    """
    if compare_torch and size is None:
        raise ValueError("compare_torch needs the input size")
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    eager: dict[int, list[dict[str, Any]]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    probes: dict[int, list[dict[str, dict[str, Any]]]] = {}
    needed = tuple(sorted({_floor_precision(read_manifest(p, check_hash=False).precision) for p in paths})) if floor else ()
    for round_index in range(rounds):
        for t in threads:
            if floor:
                probes.setdefault(t, []).append(gemm_floor(t, needed, warmup, runs))
            for path in paths:
                record = bench_artifact(path, t, warmup, runs, compute_units, profile and round_index == 0)
                measured.setdefault((str(path), t), []).append(record)
                if on_step is not None:
                    on_step()
                if compare_torch and record.get("status") == "ok":
                    reference = bench_torch(checkpoint, size, t, warmup, runs)  # type: ignore[arg-type]
                    eager.setdefault(t, []).append(reference)
                    ratios.setdefault((str(path), t), []).append(reference["p50_ms"] / record["p50_ms"])
                if on_step is not None and compare_torch:
                    on_step()
    records = [merge_rounds(eager[t]) for t in threads if t in eager]
    for (path, t), group in measured.items():
        record = merge_rounds(group)
        if (path, t) in ratios:
            record["speedup_vs_torch"] = float(np.median(ratios[path, t]))
            record["speedup_vs_torch_rounds"] = ratios[path, t]
        if floor:
            rates = {p: {**probes[t][0][p], "gmac_per_s": float(np.median([r[p]["gmac_per_s"] for r in probes[t]]))}
                     for p in needed}  # fmt: skip
            add_floor(record, rates, read_manifest(path, check_hash=False).manifest.get("network_macs"))
        records.append(record)
    return records


def machine_info() -> dict[str, Any]:
    info = {"machine": platform.machine(), "system": platform.system(), "release": platform.release(),
            "python": platform.python_version(), "cpus": os.cpu_count()}  # fmt: skip
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _worker_main(raw: str) -> int:
    job = json.loads(raw)
    try:
        if job["kind"] == "torch":
            record = _measure_torch(job["checkpoint"], job["size"], job["threads"], job["warmup"], job["runs"])
        elif job["kind"] == "gemm":
            record = _measure_gemm(job["precision"], job["threads"], job["warmup"], job["runs"])
        else:
            record = _measure_artifact(job["path"], job["threads"], job["warmup"], job["runs"], job.get("compute_units", "all"),
                                       job.get("profile", False))  # fmt: skip
    except SegformerEdgeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except ModuleNotFoundError as exc:
        root = (exc.name or "?").split(".")[0]
        extra = "runtime" if root in ("onnxruntime", "ai_edge_litert", "tflite_runtime", "coremltools") else "export"
        sys.stderr.write(f"error: {job.get('path', 'torch eager')}: needs {root}, which is not installed; "
                         f"pip install 'segformer-edge[{extra}]'\n")  # fmt: skip
        return 2
    sys.stdout.write(json.dumps(record) + "\n")  # the worker protocol: one JSON line for the parent
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
