"""``segformer-edge bench``: options parsed, :func:`segformer_edge.api.bench` called, its records printed and written
(JSON, Markdown, a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import api_options, console, step_progress

HELP = """Measure latency of artifacts where they will run: cold load, first inference, p50/p90/p99,
mean and std, throughput, peak RSS and file size, per thread count.

Each measurement runs in a fresh process (cold load is cold, peak RSS is the artifact's own).
With --compare-torch, torch eager fp32 is timed right after each artifact, and the speedup is the median
of those adjacent ratios over --rounds: a shared machine drifts too much for one torch number taken
minutes earlier.
--profile lists the ops that take the most time (ExecuTorch: ETDump and the devtools Inspector; ONNX:
ONNX Runtime's profiler; LiteRT has no per-op profiler in its Python API). .tflite and .onnx artifacts bench
without torch (pip install 'segformer-edge\\[runtime]'). An artifact whose runtime cannot run on this machine
(Core ML and the ExecuTorch Core ML delegate off macOS) gets a row that says so.
load ms is the runtime's load of the model file after its pages were dropped from the page cache; the
runtime's import is reported apart (import_ms in the JSON).
--floor probes this machine's fp32 and int8 GEMM rates as XNNPACK runs them (four chained 4096x1024x1024
linears, in the same run, per thread count) and adds "x floor": each artifact's p50 over its network's MACs at the rate of
its precision (what the graph edges, the non-GEMM ops and the runtime cost on top of the GEMMs).
--device ssh://[user@]host[:port] benches on a Linux board through your ssh (its ~/.ssh/config, keys and jump hosts):
the artifact is copied once into the board's cache (hash-checked there), the board runs this same bench with its
'segformer-edge[runtime]' install, and the records come back with the board's CPU, cores, memory, OS and runtime
versions. --device adb[:SERIAL] benches on an Android phone with the runtime's own benchmark binary (LiteRT
benchmark_model, ExecuTorch executor_runner, onnxruntime_perf_test; --device-tool PATH), pinned to the big cores.

Examples:

  segformer-edge bench exports/* --threads 1,2,4 --compare-torch --json bench.json

  segformer-edge bench exports/segformer-b0_tflite_fp32 --runs 100 --markdown bench.md --plot bench.png

  segformer-edge bench exports/segformer-b0_tflite_int8 --device ssh://pi@raspberrypi --threads 1,4

  segformer-edge bench exports/segformer-b0_tflite_int8 --device adb --device-tool ./benchmark_model
"""


def _threads(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{text!r}: give positive integers separated by commas, such as 1,2,4", param_hint="--threads")
    return values


def bench(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact folders (or their model files).")],
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs after the first inference.")] = 5,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs.")] = 30,
    threads: Annotated[str, typer.Option(help="Thread counts, comma separated.")] = "2",
    compare_torch: Annotated[bool, typer.Option("--compare-torch", help="Also time torch eager fp32; add speedup ratios.")] = False,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint or Hub id for --compare-torch (default: built-in).")] = None,
    compute_units: Annotated[str, typer.Option(help="Core ML on macOS: all, cpu, gpu or ane.")] = "all",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the records as JSON.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown table.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG bar chart of p50 latency.")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Top ops by time: ETDump + Inspector (ExecuTorch), ORT profiler (ONNX).")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="Measure everything this many times; records pool the runs.")] = 1,
    floor: Annotated[bool, typer.Option("--floor", help="Probe the GEMM rates; add each artifact's distance from its floor.")] = False,
    device: Annotated[str | None, typer.Option(help="Bench on a device: ssh://[user@]host[:port] or adb[:SERIAL].")] = None,
    device_python: Annotated[str, typer.Option(help="--device ssh: the board's Python that has segformer-edge[runtime].")] = "python3",
    device_tool: Annotated[Path | None, typer.Option(help="--device adb: the runtime's benchmark binary for Android (arm64).")] = None,
    device_timeout: Annotated[float, typer.Option(min=1, help="--device: seconds one step on the device may take.")] = 1800,
) -> None:
    from segformer_edge import api
    from segformer_edge.io import atomic_write_json, atomic_write_text

    counts = _threads(threads)
    with api_options(), step_progress() as progress:
        records = [r.to_dict() for r in api.bench(list(artifacts), threads=counts, warmup=warmup, runs=runs, rounds=rounds,
                                                  compare_torch=compare_torch, model=checkpoint, compute_units=compute_units,
                                                  profile=profile, floor=floor, device=device, device_python=device_python,
                                                  device_tool=device_tool, device_timeout=device_timeout,
                                                  on_step=progress.step)]  # fmt: skip
    table = _markdown(records)
    console.print(table, markup=False, soft_wrap=True)
    for line in _board_lines(records):
        console.print(line, markup=False, soft_wrap=True)
    for r in records:
        if r.get("note"):
            console.print(f"note: {r['target']} {r['precision']} {r['threads']} thread(s): {r['note']}", markup=False, soft_wrap=True)
    probes = {(r["threads"], r["floor_gemm"]["precision"]): r["floor_gemm"] for r in records if "floor_gemm" in r}
    for (t, precision), probe in sorted(probes.items()):
        m, k, n = probe["shape"]
        console.print(f"floor: {precision} GEMM {probe['gmac_per_s']:.0f} GMAC/s at {t} thread(s) (XNNPACK, {m}x{k}x{n})", markup=False)
    for r in records:
        if r.get("profile"):
            console.print(f"\ntop ops: {r['target']} {r['precision']} {r['threads']} thread(s)", markup=False)
            for item in r["profile"]:
                console.print(f"  {item['ms']:8.3f} ms  {100 * item['share']:5.1f}%  {item['op']}", markup=False)
    if json_out:
        atomic_write_json(json_out, records)
    if markdown:
        atomic_write_text(markdown, table + "\n")
    if plot:
        _plot(records, plot)


def _board_lines(records: list[dict]) -> list[str]:  # type: ignore[type-arg]
    """One line per device the records were measured on: what the board or phone said about itself."""
    seen: dict[str, str] = {}
    for r in records:
        facts = r.get("board")
        if not facts or r["device"] in seen:
            continue
        if "abi" in facts:  # a phone, from getprop
            text = ", ".join(str(facts[k]) for k in ("model", "soc", "abi", "android") if facts.get(k))
            text += f", {facts['cores']} cores, big cores {facts['big_cores']}" if facts.get("cores") else ""
        else:
            memory = f"{facts['memory_mb'] / 1024:.1f} GB" if facts.get("memory_mb") else "memory unknown"
            runtimes = ", ".join(f"{k} {v}" for k, v in facts.get("versions", {}).items())
            text = (f"{facts.get('cpu', 'cpu unknown')}, {facts.get('cpus')} cores, {facts.get('machine')}, {memory}, "
                    f"{facts.get('os', facts.get('system'))}, Python {facts.get('python')}; {runtimes}")  # fmt: skip
        seen[r["device"]] = f"board: {r['device']}: {text}"
    return list(seen.values())


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(records: list[dict]) -> str:  # type: ignore[type-arg]
    floor = any("x_floor" in r for r in records)
    head = "| target | precision | threads | load ms | first ms | p50 ms | p90 ms | p99 ms | mean ± std ms | img/s | peak RSS MB | size MB | vs torch |"
    head += " x floor |" if floor else ""
    lines = [head, "|" + "|".join(["---"] * (14 if floor else 13)) + "|"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['target']} | {r['precision']} | {r['threads']} | {r.get('status')} |" + " |" * (10 if floor else 9))
            continue
        size = "-" if r.get("size_mb") is None else f"{r['size_mb']:.2f}"
        speed = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
        lines.append(  # a device's benchmark binary may not print every figure (p50..p99, peak memory): "-"
            f"| {r['target']} | {r['precision']} | {r['threads']} | {_ms(r['load_ms'], 0)} | {_ms(r['first_ms'])} | "
            f"{_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | {_ms(r['p99_ms'])} | {_ms(r['mean_ms'])} ± {_ms(r['std_ms'])} | "
            f"{_ms(r['throughput_ips'])} | {_ms(r['peak_rss_mb'], 0)} | {size} | {speed} |"
            + ((f" {r['x_floor']:.2f}x |" if "x_floor" in r else " - |") if floor else "")
        )
    return "\n".join(lines)


def _plot(records: list[dict], path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segformer_edge.io import atomic_path

    ok = [r for r in records if r.get("status") == "ok" and r.get("p50_ms") is not None]
    labels = [f"{r['target']} {r['precision']}\n{r['threads']}t" for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ok)), 4))
    ax.bar(labels, [r["p50_ms"] for r in ok], yerr=[[r["p50_ms"] - r["min_ms"] for r in ok], [r["p90_ms"] - r["p50_ms"] for r in ok]])
    ax.set_ylabel("latency p50 (ms); bars: min..p90")
    ax.set_title("segformer-edge bench")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
