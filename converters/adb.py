"""``bench --device adb[:SERIAL]``: latency on an Android phone, measured by each runtime's own benchmark binary.

An Android phone has no Python to run the bench worker, so the runtime's native tool measures there:

============  ==========================  ===========================================================================
target        binary                      what its output gives (formats taken from the tools' source)
============  ==========================  ===========================================================================
tflite        LiteRT ``benchmark_model``  init, first inference, warmup avg, count/min/max/avg/std of the timed runs,
                                          peak memory (``--report_peak_memory_footprint``); no percentiles
executorch    ``executor_runner``         load, each iteration's time (``Iteration i of N: x ms``): first, warmup and
                                          p50/p90/p99 from them; no memory figure
onnx          ``onnxruntime_perf_test``   session creation, first inference, average, P50/P90/P99 (``-s``), peak
                                          working set; exactly one warm-up run (its first inference)
============  ==========================  ===========================================================================

The binary (``--device-tool PATH`` or its environment variable) and the model are pushed to ``/data/local/tmp``
(skipped where a file of the same sha256 is there; a push lands under a temporary name and is renamed), run with the
thread count and pinned with ``taskset`` to the big cores (the cores whose ``cpuinfo_max_freq`` is highest; more,
fastest first, when the thread count asks for more). The record carries the phone's model, SoC and ABI (``getprop``).
The command lines are built in :func:`command_line` alone; the parsers are :func:`parse_output`.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segformer_edge.errors import DeviceError

from .base import Artifact, file_sha256, read_manifest

__all__ = ["TOOLS", "bench_over_adb", "big_cores", "command_line", "find_tool", "parse_getprop", "parse_output"]

logger = logging.getLogger(__name__)

REMOTE_DIR = "/data/local/tmp/segformer-edge"


@dataclass(frozen=True)
class Tool:
    binary: str
    env: str  # the environment variable that names it
    runtime: str
    where: str  # how to get it, for the error that says it is missing


TOOLS: dict[str, Tool] = {
    "tflite": Tool("benchmark_model", "SEGFORMER_EDGE_BENCHMARK_MODEL", "LiteRT",
                   "download the android_aarch64 benchmark_model linked from LiteRT's performance measurement page "
                   "(ai.google.dev/edge/litert/models/measurement), or build //tflite/tools/benchmark:benchmark_model "
                   "with --config=android_arm64 in google-ai-edge/LiteRT"),
    "executorch": Tool("executor_runner", "SEGFORMER_EDGE_EXECUTOR_RUNNER", "ExecuTorch",
                       "build examples/portable/executor_runner of pytorch/executorch for Android arm64-v8a with the NDK's "
                       "CMake toolchain, -DEXECUTORCH_BUILD_XNNPACK=ON and the threadpool (for --cpu_threads)"),
    "onnx": Tool("onnxruntime_perf_test", "SEGFORMER_EDGE_ONNXRUNTIME_PERF_TEST", "ONNX Runtime",
                 "build it in microsoft/onnxruntime with ./build.sh --android --android_abi arm64-v8a (with "
                 "--android_sdk_path and --android_ndk_path); it lands beside the build's libonnxruntime"),
}  # fmt: skip


def find_tool(target: str, explicit: Path | None = None) -> Path:
    """The benchmark binary for ``target``: ``explicit`` (--device-tool), else its environment variable."""
    tool = TOOLS.get(target)
    if tool is None:
        raise DeviceError(f"{target} artifacts cannot be benched over adb: there is a benchmark binary for "
                          f"{', '.join(TOOLS)} artifacts only")  # fmt: skip
    path = explicit if explicit is not None else (Path(os.environ[tool.env]) if os.environ.get(tool.env) else None)
    if path is None:
        raise DeviceError(f"{target} artifacts are benched on Android by {tool.runtime}'s {tool.binary}: give it with "
                          f"--device-tool PATH or ${tool.env}; to get one, {tool.where}")  # fmt: skip
    if not path.is_file():
        raise DeviceError(f"{path}: no such file ({tool.runtime}'s {tool.binary} for Android arm64 was expected)")
    return path


def big_cores(max_freqs: dict[int, int], threads: int) -> list[int]:
    """The cores to pin ``threads`` threads to: those of the highest ``cpuinfo_max_freq``, or the ``threads`` fastest."""
    if not max_freqs:
        return []
    top = max(max_freqs.values())
    big = sorted(c for c, f in max_freqs.items() if f == top)
    if len(big) >= threads:
        return big
    return sorted(sorted(max_freqs, key=lambda c: (-max_freqs[c], c))[:threads])


def cpu_mask(cores: list[int]) -> str:
    """taskset's hexadecimal mask of ``cores``."""
    return format(sum(1 << c for c in cores), "x")


def command_line(
    target: str, tool: str, model: str, threads: int, warmup: int, runs: int, cores: list[int]
) -> list[str]:
    """The shell command, as argv, that benches ``model`` on the phone with the runtime's own binary.

    ``warmup`` counts untimed runs after the first inference (as the local bench does): benchmark_model's warm-up
    phase includes its first inference (``--warmup_runs=warmup + 1``); executor_runner has no warm-up, so it runs
    ``1 + warmup + runs`` times and the parser splits the iterations; onnxruntime_perf_test always runs one."""
    if target == "tflite":
        argv = [tool, f"--graph={model}", f"--num_threads={threads}", f"--warmup_runs={warmup + 1}", "--warmup_min_secs=0",
                f"--num_runs={runs}", "--min_secs=0", "--use_xnnpack=true", "--report_peak_memory_footprint=true"]  # fmt: skip
    elif target == "executorch":
        argv = [tool, f"--model_path={model}", f"--num_executions={1 + warmup + runs}", f"--cpu_threads={threads}"]
    elif target == "onnx":
        argv = [tool, "-e", "cpu", "-m", "times", "-r", str(runs), "-x", str(threads), "-I", "-s", model]
    else:
        find_tool(target)  # raises: no binary for this target
        raise AssertionError(target)
    return (["taskset", cpu_mask(cores)] if cores else []) + argv


_NUMBER = r"([-+0-9.eE]+|nan|inf)"


def _first(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def _percentiles(times: list[float]) -> dict[str, float]:
    t = np.asarray(times, dtype=np.float64)
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()), "std_ms": float(t.std()), "min_ms": float(t.min()), "max_ms": float(t.max())}  # fmt: skip


def _benchmark_model(text: str, warmup: int) -> dict[str, Any]:
    timings = re.search(rf"Inference timings in us: Init: {_NUMBER}, First inference: {_NUMBER}, Warmup \(avg\): {_NUMBER}, "
                        rf"Inference \(avg\): {_NUMBER}", text)  # fmt: skip
    if timings is None:
        raise ValueError("no 'Inference timings in us' line")
    init, first, warm, avg = (float(g) for g in timings.groups())
    # The last "count=..." line is the timed phase's Stat (the first is the warm-up's); all-same runs print no min/std.
    stats = [dict(re.findall(rf"(\w+)={_NUMBER}", line)) for line in re.findall(r"count=\d+[^\n]*", text)]
    timed = stats[-1] if stats else {}
    record: dict[str, Any] = {"load_ms": init / 1000, "first_ms": first / 1000, "warmup_ms": warm / 1000, "mean_ms": avg / 1000,
                              "p50_ms": None, "p90_ms": None, "p99_ms": None, "runs": int(float(timed.get("count", 0))) or None,
                              "warmup": warmup}  # fmt: skip
    same = "min" not in timed and "curr" in timed  # "count=N curr=X(all same)": every run took X
    for key in ("min", "max"):
        value = timed.get(key, timed.get("curr"))
        record[f"{key}_ms"] = float(value) / 1000 if value is not None else None
    record["std_ms"] = 0.0 if same else (float(timed["std"]) / 1000 if "std" in timed else None)
    for key in ("median", "p5", "p95"):  # printed only by a StatWithPercentiles build
        if key in timed:
            record["p50_ms" if key == "median" else f"{key}_ms"] = float(timed[key]) / 1000
    peak = _first(rf"Overall peak memory footprint \(MB\) via periodic monitoring: {_NUMBER}", text)
    record["peak_rss_mb"] = peak
    record["memory_delta_mb"] = _first(
        rf"Memory footprint delta from the start of the tool \(MB\): init=\S+ overall={_NUMBER}", text
    )
    return record


def _executor_runner(text: str, warmup: int) -> dict[str, Any]:
    iterations = [float(t) for t in re.findall(rf"Iteration \d+ of \d+: {_NUMBER} ms", text)]
    total = re.search(rf"Model executed successfully (\d+) time\(s\) in {_NUMBER} ms", text)
    if total is None:
        raise ValueError("no 'Model executed successfully' line")
    count, total_ms = int(total.group(1)), float(total.group(2))
    record: dict[str, Any] = {
        "load_ms": _first(rf"Model loaded in {_NUMBER} ms", text),
        "peak_rss_mb": None,
        "warmup": warmup,
    }
    if len(iterations) == count and count > warmup + 1:
        timed = iterations[1 + warmup :]
        record.update({"first_ms": iterations[0], "warmup_ms": float(np.mean(iterations[1 : 1 + warmup])) if warmup else None,
                       **_percentiles(timed), "runs": len(timed), "times_ms": timed})  # fmt: skip
    else:  # an older runner prints the total alone: its mean includes the first run
        record.update({"first_ms": None, "warmup_ms": None, "mean_ms": total_ms / count, "p50_ms": None, "p90_ms": None,
                       "p99_ms": None, "std_ms": None, "min_ms": None, "runs": count, "warmup": 0,
                       "note": "executor_runner printed no per-iteration times: mean over every run, the first included"})  # fmt: skip
    return record


def _perf_test(text: str, warmup: int) -> dict[str, Any]:
    average = _first(rf"Average inference time cost: {_NUMBER} ms", text)
    if average is None:
        raise ValueError("no 'Average inference time cost' line")
    session = _first(rf"Session creation time cost: {_NUMBER} s", text)
    peak = _first(r"Peak working set size: (\d+) bytes", text)
    record: dict[str, Any] = {
        "load_ms": session * 1000 if session is not None else None,
        "first_ms": _first(rf"First inference time cost: {_NUMBER} ms", text),
        "warmup_ms": None, "mean_ms": average, "std_ms": None,
        "runs": int(_first(r"Total inference requests: (\d+)", text) or 0) or None,
        "peak_rss_mb": peak / (1 << 20) if peak is not None else None, "warmup": 1,
    }  # fmt: skip
    for key, label in (("min_ms", "Min"), ("max_ms", "Max"), ("p50_ms", "P50"), ("p90_ms", "P90"), ("p99_ms", "P99")):
        value = _first(rf"{label} Latency: {_NUMBER} s", text)
        record[key] = value * 1000 if value is not None else None
    if warmup != 1:
        record["note"] = f"onnxruntime_perf_test runs exactly one warm-up inference (the first), not --warmup {warmup}"
    return record


_PARSERS: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "tflite": _benchmark_model, "executorch": _executor_runner, "onnx": _perf_test,
}  # fmt: skip


def parse_output(target: str, text: str, warmup: int) -> dict[str, Any]:
    """The bench record's timing fields from the benchmark binary's output (None where it prints no such figure)."""
    try:
        record = _PARSERS[target](text, warmup)
    except ValueError as exc:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "no output")
        raise DeviceError(f"{TOOLS[target].binary} did not finish a benchmark ({exc}): {last.strip()}") from exc
    mean = record.get("mean_ms")
    record["throughput_ips"] = 1000 / mean if mean else None
    return record


def parse_getprop(text: str) -> dict[str, str]:
    """``getprop``'s ``[key]: [value]`` lines as a dict."""
    return dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]\s*$", text, flags=re.MULTILINE))


def parse_max_freqs(text: str) -> dict[int, int]:
    """``cpuN max_freq`` lines (what :data:`_FREQS` prints) as {core: kHz}."""
    return {int(c): int(f) for c, f in re.findall(r"/cpu(\d+)/cpufreq/cpuinfo_max_freq (\d+)", text)}


_FREQS = 'for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; do echo "$f $(cat $f)"; done'


def phone_facts(props: dict[str, str], freqs: dict[int, int]) -> dict[str, Any]:
    soc = " ".join(p for p in (props.get("ro.soc.manufacturer"), props.get("ro.soc.model")) if p) or props.get(
        "ro.board.platform", ""
    )
    return {"model": " ".join(p for p in (props.get("ro.product.manufacturer"), props.get("ro.product.model")) if p),
            "soc": soc, "abi": props.get("ro.product.cpu.abi", ""), "android": props.get("ro.build.version.release", ""),
            "sdk": props.get("ro.build.version.sdk", ""), "cores": len(freqs),
            "max_freq_khz": {str(c): f for c, f in sorted(freqs.items())},
            "big_cores": big_cores(freqs, 1)}  # fmt: skip


class Adb:
    """``adb`` for one phone (``serial`` None: the only one attached)."""

    def __init__(self, serial: str | None, timeout: float) -> None:
        self.serial = serial
        self.timeout = timeout
        self.name = f"adb:{serial}" if serial else "adb"
        self.adb = shutil.which("adb")
        if self.adb is None:
            raise DeviceError(
                "adb is not on PATH: install Android's platform-tools (developer.android.com/tools/releases/platform-tools)"
            )

    def run(self, *args: str, timeout: float | None = None) -> str:
        argv = [self.adb, *(["-s", self.serial] if self.serial else []), *args]  # type: ignore[list-item]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(
                f"{self.name}: no answer within {timeout or self.timeout:.0f} s (--device-timeout): {shlex.join(args)[:80]}"
            ) from exc
        text = done.stdout + done.stderr
        if done.returncode != 0:
            last = next((line for line in reversed(text.splitlines()) if line.strip()), f"exit code {done.returncode}")
            if "No space left" in text:
                raise DeviceError(f"{self.name}: the phone's storage is full ({REMOTE_DIR}): free space there")
            if any(s in text for s in ("no devices", "not found", "offline", "unauthorized", "more than one device")):
                raise DeviceError(
                    f"{self.name}: {last.removeprefix('adb: ').removeprefix('error: ')} (adb devices lists the phones)"
                )
            raise DeviceError(f"{self.name}: {shlex.join(args)[:60]} failed: {last}")
        return text

    def shell(self, command: str, timeout: float | None = None) -> str:
        return self.run("shell", command, timeout=timeout)

    def push(self, local: Path, name: str, sha: str, mode: str = "644") -> str:
        """``local`` at ``REMOTE_DIR/name`` (pushed only when the phone's copy has another sha256; renamed when whole)."""
        remote = f"{REMOTE_DIR}/{name}"
        have = self.shell(f"sha256sum {shlex.quote(remote)} 2>/dev/null || true").split()
        if have and have[0] == sha:
            return remote
        self.shell(f"mkdir -p {REMOTE_DIR}")
        self.run("push", str(local), f"{remote}.part")
        self.shell(f"chmod {mode} {shlex.quote(remote)}.part && mv {shlex.quote(remote)}.part {shlex.quote(remote)}")
        return remote


def bench_over_adb(
    device: str,
    paths: list[str | Path],
    threads: list[int],
    *,
    tool: Path | None = None,
    warmup: int = 5,
    runs: int = 30,
    rounds: int = 1,
    timeout: float = 1800,
    on_step: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Bench each artifact at each thread count on the phone; the records of :func:`.bench.bench_paired`'s shape."""
    if rounds != 1:
        raise DeviceError("--rounds cannot be honoured with --device adb: run the command again for another round")
    kind, _, serial = device.partition(":")
    if kind != "adb":
        raise DeviceError(f"{device}: not an adb device; write adb or adb:SERIAL")
    artifacts: list[Artifact] = [read_manifest(p) for p in paths]
    tools = {
        a.target: find_tool(a.target, tool) for a in artifacts
    }  # every binary is found before the phone is touched
    if tool is not None and len(tools) > 1:
        raise DeviceError(f"--device-tool names one binary, but the artifacts need {len(tools)} ({', '.join(sorted(tools))}): "
                          "give each through its environment variable")  # fmt: skip
    phone = Adb(serial or None, timeout)
    props = parse_getprop(phone.shell("getprop"))
    freqs = parse_max_freqs(phone.shell(_FREQS))
    facts = phone_facts(props, freqs)
    binaries = {t: phone.push(p, TOOLS[t].binary, file_sha256(p), mode="755") for t, p in tools.items()}
    records = []
    for artifact in artifacts:
        sha = artifact.manifest["sha256"]
        model = phone.push(artifact.file, f"{sha[:16]}{artifact.file.suffix}", sha)
        for t in threads:
            cores = big_cores(freqs, t)
            argv = command_line(artifact.target, binaries[artifact.target], model, t, warmup, runs, cores)
            output = phone.shell(shlex.join(argv))
            record = {"artifact": str(artifact.folder), "target": artifact.target, "precision": artifact.precision, "threads": t,
                      "size_mb": artifact.manifest["size_bytes"] / 1e6, "status": "ok",
                      "executor": f"{TOOLS[artifact.target].binary} ({TOOLS[artifact.target].runtime}) over adb",
                      "input": list(artifact.input_spec.size), **parse_output(artifact.target, output, warmup),
                      "device": phone.name, "board": facts, "pinned_cores": cores, "command": shlex.join(argv)}  # fmt: skip
            records.append(record)
            if on_step is not None:
                on_step()
    return records
