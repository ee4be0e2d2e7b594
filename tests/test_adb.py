"""``bench --device adb``: the command lines, the big-core pinning, and the parsers of each benchmark binary's output.

No phone is attached here, so the runs themselves are not tested (README says so). The outputs below are written
line by line as each tool's source prints them: LiteRT's benchmark_model.cc (BenchmarkModel::Run, the Stat's
OutputToStream, BenchmarkLoggingListener::OnBenchmarkEnd; TFLITE_LOG prefixes "INFO: "), ExecuTorch's
examples/portable/executor_runner/executor_runner.cpp (ET_LOG lines "I 00:00:00.000000 executorch:file:line] ..."),
and ONNX Runtime's onnxruntime/test/perftest/performance_runner.cc (PerformanceRunner::Run and
PerformanceResult::DumpToFile with -s).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import flat, run_cli
from segformer_edge.converters.adb import (
    big_cores,
    command_line,
    cpu_mask,
    find_tool,
    parse_getprop,
    parse_max_freqs,
    parse_output,
    phone_facts,
)

from segformer_edge.errors import DeviceError

BENCHMARK_MODEL = """\
INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Min num runs: [30]
INFO: Min runs duration (seconds): [0]
INFO: Num threads: [4]
INFO: Min warmup runs: [6]
INFO: Min warmup runs duration (seconds): [0]
INFO: Graph: [/data/local/tmp/segformer-edge/5ee96cacde6739e4.tflite]
INFO: Report the peak memory footprint: [1]
INFO: Use xnnpack: [1]
INFO: Loaded model /data/local/tmp/segformer-edge/5ee96cacde6739e4.tflite
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
INFO: XNNPACK delegate created.
INFO: Explicitly applied XNNPACK delegate, and the model graph will be completely executed by the delegate.
INFO: The input model file size (MB): 3.81222
INFO: Initialized session in 41.234ms.
INFO: Running benchmark for at least 6 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=6 first=61234 curr=35120 min=34987 max=61234 avg=39562.3 std=9711

INFO: Running benchmark for at least 30 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=30 first=35302 curr=35011 min=34871 max=36920 avg=35398.5 std=412

INFO: Inference timings in us: Init: 41234, First inference: 61234, Warmup (avg): 39562.3, Inference (avg): 35398.5
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=9.35938 overall=21.8281
INFO: Overall peak memory footprint (MB) via periodic monitoring: 27.3164
INFO: Memory status at the end of exeution:
INFO: - VmRSS              : 26 MB
INFO: + RssAnnon           : 14 MB
INFO: + RssFile + RssShmem : 12 MB
"""

EXECUTOR_RUNNER = """\
I 00:00:00.000612 executorch:executor_runner.cpp:287] Resetting threadpool with num threads = 4
I 00:00:00.004113 executorch:executor_runner.cpp:403] Model file /data/local/tmp/segformer-edge/a1b2c3d4e5f60718.pte is loaded.
I 00:00:00.004160 executorch:executor_runner.cpp:412] Using method forward
I 00:00:00.004190 executorch:executor_runner.cpp:459] Setting up CPU planned buffer 0, size 1843200.
I 00:00:00.031802 executorch:executor_runner.cpp:520] Model loaded in 27.689000 ms.
I 00:00:00.092190 executorch:executor_runner.cpp:672] Iteration 1 of 6: 60.101000 ms
I 00:00:00.128403 executorch:executor_runner.cpp:672] Iteration 2 of 6: 36.110000 ms
I 00:00:00.164800 executorch:executor_runner.cpp:672] Iteration 3 of 6: 36.300000 ms
I 00:00:00.200500 executorch:executor_runner.cpp:672] Iteration 4 of 6: 35.600000 ms
I 00:00:00.236900 executorch:executor_runner.cpp:672] Iteration 5 of 6: 36.400000 ms
I 00:00:00.273000 executorch:executor_runner.cpp:672] Iteration 6 of 6: 36.000000 ms
I 00:00:00.273050 executorch:executor_runner.cpp:680] Model executed successfully 6 time(s) in 240.511000 ms.
I 00:00:00.273060 executorch:executor_runner.cpp:683] 1 outputs:
OutputX 0: tensor(sizes=[1, 8, 16, 16], [0.1, 0.2, ..., 0.3])
"""

# An executor_runner from before the per-iteration log line: the total alone.
EXECUTOR_RUNNER_OLD = """\
I 00:00:00.004113 executorch:executor_runner.cpp:140] Model file model.pte is loaded.
I 00:00:00.273050 executorch:executor_runner.cpp:233] Model executed successfully 6 time(s) in 240.511000 ms.
"""

PERF_TEST = """\
Session creation time cost: 0.0512 s
First inference time cost: 48 ms
Total inference time cost: 1.0734 s
Total inference requests: 30
Average inference time cost: 35.78 ms
Total inference run time: 1.07512 s
Number of inferences per second: 27.9039
Avg CPU usage: 96 %
Peak working set size: 58720256 bytes
Avg CPU usage:96
Peak working set size:58720256
Runs:30
Min Latency: 0.034511 s
Max Latency: 0.039801 s
P50 Latency: 0.035602 s
P90 Latency: 0.036903 s
P95 Latency: 0.037322 s
P99 Latency: 0.039801 s
P999 Latency: 0.039801 s
"""

GETPROP = """\
[ro.board.platform]: [gs201]
[ro.build.version.release]: [14]
[ro.build.version.sdk]: [34]
[ro.product.cpu.abi]: [arm64-v8a]
[ro.product.manufacturer]: [Google]
[ro.product.model]: [Pixel 7]
[ro.soc.manufacturer]: [Google]
[ro.soc.model]: [GS201]
"""

FREQS = "\n".join(
    f"/sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq {f}"
    for c, f in enumerate([1803000, 1803000, 1803000, 1803000, 2348000, 2348000, 2850000, 2850000])
)


def test_benchmark_model_output_gives_init_first_warmup_mean_and_peak_memory() -> None:
    r = parse_output("tflite", BENCHMARK_MODEL, warmup=5)
    assert r["load_ms"] == pytest.approx(41.234) and r["first_ms"] == pytest.approx(61.234)
    assert r["warmup_ms"] == pytest.approx(39.5623) and r["mean_ms"] == pytest.approx(35.3985)
    assert (
        r["min_ms"] == pytest.approx(34.871)
        and r["max_ms"] == pytest.approx(36.920)
        and r["std_ms"] == pytest.approx(0.412)
    )
    assert r["runs"] == 30  # the timed phase's Stat, not the warm-up's
    assert r["peak_rss_mb"] == pytest.approx(27.3164) and r["memory_delta_mb"] == pytest.approx(21.8281)
    assert r["p50_ms"] is None and r["p90_ms"] is None and r["p99_ms"] is None  # benchmark_model prints no percentiles
    assert r["throughput_ips"] == pytest.approx(1000 / 35.3985)


def test_benchmark_model_all_same_runs_and_percentile_builds() -> None:
    same = BENCHMARK_MODEL.replace(
        "count=30 first=35302 curr=35011 min=34871 max=36920 avg=35398.5 std=412", "count=30 curr=35000(all same)"
    )
    r = parse_output("tflite", same, warmup=5)
    assert r["min_ms"] == r["max_ms"] == pytest.approx(35.0) and r["std_ms"] == 0.0 and r["runs"] == 30
    # tsl's StatWithPercentiles appends " p5=... median=... p95=..." to the same line.
    pct = BENCHMARK_MODEL.replace("avg=35398.5 std=412", "avg=35398.5 std=412 p5=34901 median=35350 p95=36011")
    assert parse_output("tflite", pct, warmup=5)["p50_ms"] == pytest.approx(35.35)


def test_executor_runner_iterations_split_into_first_warmup_and_timed() -> None:
    r = parse_output("executorch", EXECUTOR_RUNNER, warmup=1)  # 1 first + 1 warmup + 4 timed = 6 executions
    assert (
        r["load_ms"] == pytest.approx(27.689)
        and r["first_ms"] == pytest.approx(60.101)
        and r["warmup_ms"] == pytest.approx(36.11)
    )
    assert r["runs"] == 4 and r["times_ms"] == pytest.approx([36.3, 35.6, 36.4, 36.0])
    assert r["p50_ms"] == pytest.approx(36.15) and r["min_ms"] == pytest.approx(35.6) and r["peak_rss_mb"] is None
    old = parse_output("executorch", EXECUTOR_RUNNER_OLD, warmup=1)
    assert old["mean_ms"] == pytest.approx(240.511 / 6) and old["p50_ms"] is None and "first included" in old["note"]


def test_perf_test_gives_percentiles_and_the_working_set() -> None:
    r = parse_output("onnx", PERF_TEST, warmup=5)
    assert r["load_ms"] == pytest.approx(51.2) and r["first_ms"] == 48 and r["mean_ms"] == pytest.approx(35.78)
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"]) == pytest.approx((35.602, 36.903, 39.801))
    assert r["min_ms"] == pytest.approx(34.511) and r["runs"] == 30 and r["peak_rss_mb"] == pytest.approx(56.0)
    assert r["warmup"] == 1 and "exactly one warm-up" in r["note"]  # what ran, said: not the --warmup asked for
    assert "note" not in parse_output("onnx", PERF_TEST, warmup=1)


def test_an_unfinished_run_is_one_line_naming_the_binary() -> None:
    crash = "INFO: Loaded model m.tflite\nERROR: Failed to apply XNNPACK delegate.\nAborted\n"
    with pytest.raises(DeviceError, match=r"benchmark_model did not finish a benchmark .*: Aborted"):
        parse_output("tflite", crash, warmup=5)
    with pytest.raises(DeviceError, match="executor_runner did not finish"):
        parse_output(
            "executorch", "E 00:00:00.1 executorch:executor_runner.cpp:99] Failed to parse model file m.pte\n", warmup=0
        )


def test_big_cores_and_the_taskset_mask() -> None:
    freqs = parse_max_freqs(FREQS)
    assert freqs[7] == 2850000 and len(freqs) == 8
    assert big_cores(freqs, 1) == [6, 7] and big_cores(freqs, 2) == [6, 7]  # the prime cores
    assert big_cores(freqs, 4) == [4, 5, 6, 7] and big_cores(freqs, 8) == list(range(8))  # then the next fastest
    assert cpu_mask([6, 7]) == "c0" and cpu_mask([4, 5, 6, 7]) == "f0" and cpu_mask([0]) == "1"
    assert big_cores({}, 2) == []


def test_command_lines_of_each_binary() -> None:
    assert command_line("tflite", "/d/benchmark_model", "/d/m.tflite", 2, 5, 30, [6, 7]) == [
        "taskset", "c0", "/d/benchmark_model", "--graph=/d/m.tflite", "--num_threads=2", "--warmup_runs=6", "--warmup_min_secs=0",
        "--num_runs=30", "--min_secs=0", "--use_xnnpack=true", "--report_peak_memory_footprint=true",
    ]  # fmt: skip
    assert command_line("executorch", "/d/executor_runner", "/d/m.pte", 4, 5, 30, [4, 5, 6, 7]) == [
        "taskset", "f0", "/d/executor_runner", "--model_path=/d/m.pte", "--num_executions=36", "--cpu_threads=4",
    ]  # fmt: skip
    assert command_line("onnx", "/d/onnxruntime_perf_test", "/d/m.onnx", 1, 5, 30, []) == [
        "/d/onnxruntime_perf_test", "-e", "cpu", "-m", "times", "-r", "30", "-x", "1", "-I", "-s", "/d/m.onnx",
    ]  # fmt: skip
    with pytest.raises(DeviceError, match="benchmark binary for tflite, executorch, onnx artifacts only"):
        command_line("coreml", "x", "m", 1, 0, 1, [])


def test_phone_facts_from_getprop() -> None:
    facts = phone_facts(parse_getprop(GETPROP), parse_max_freqs(FREQS))
    assert facts["model"] == "Google Pixel 7" and facts["soc"] == "Google GS201" and facts["abi"] == "arm64-v8a"
    assert facts["android"] == "14" and facts["cores"] == 8 and facts["big_cores"] == [6, 7]
    assert phone_facts({"ro.board.platform": "taro"}, {})["soc"] == "taro"  # before Android 12 there is no ro.soc.*


def test_the_benchmark_binary_is_found_or_the_error_says_where_to_get_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SEGFORMER_EDGE_BENCHMARK_MODEL", raising=False)
    with pytest.raises(
        DeviceError, match=r"--device-tool PATH or \$SEGFORMER_EDGE_BENCHMARK_MODEL; to get one, download"
    ):
        find_tool("tflite")
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"\x7fELF")
    monkeypatch.setenv("SEGFORMER_EDGE_BENCHMARK_MODEL", str(binary))
    assert find_tool("tflite") == binary
    with pytest.raises(DeviceError, match="no such file"):
        find_tool("tflite", tmp_path / "missing")
    # The CLI: options adb cannot honour are refused before anything runs.
    code, _, err = run_cli(["bench", tmp_path, "--device", "adb", "--compare-torch"], capsys)
    assert code == 2 and "Traceback" not in err and "--compare-torch cannot be honoured with --device adb" in flat(err)
