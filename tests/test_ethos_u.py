"""The Arm Ethos-U target on tiny configurations: export through the CLI for one U55 and one U85 configuration,
parity in the TOSA reference model (verify), the delegation report and Vela's estimate read back, option and
configuration refusals, bench's estimated row.

One export per configuration is shared by the module (the Arm lowering costs 1-2 CPU minutes per tiny model).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from conftest import run_cli
from segformer_edge.calibration.spec import QuantSpec
from segformer_edge.converters import get_target
from segformer_edge.converters.base import ExportOptions, read_manifest
from segformer_edge.converters.parity import DEFAULT_THRESHOLDS

from segformer_edge.errors import ExportError

pytest.importorskip("tosa_reference_model", reason="install the Ethos-U compilers (see README)")
pytest.importorskip("ethosu.vela", reason="install the Ethos-U compilers (see README)")


ROOT = Path(__file__).resolve().parents[1]
SIZE = ("--size", "64", "64")
INT8 = DEFAULT_THRESHOLDS["int8"]


def _export(trained, out: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[Path, str, str]:
    _, ckpt = trained
    args = ["export", ckpt, "--target", "ethos-u", "--precision", "int8", *SIZE, "--data", "synthetic:96",
            "--calibration-images", "16", "--verify-images", "4", "--out", out, *options]  # fmt: skip
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err[-3000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder, stdout, err


@pytest.fixture(scope="module")
def u55(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """ethos-u55-128 with its family's defaults (Ethos_U55_High_End_Embedded, Shared_Sram): the module's one U55 export."""
    capsys = _ModuleCapsys()
    with capsys:
        return _export(trained, tmp_path_factory.mktemp("u55"), capsys, "-O", "npu=ethos-u55-128")


@pytest.fixture(scope="module")
def u85(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """ethos-u85-256 with a memory mode other than its default (Dedicated_Sram_384KB: DRAM arena, SRAM cache)."""
    capsys = _ModuleCapsys()
    with capsys:
        return _export(trained, tmp_path_factory.mktemp("u85"), capsys, "-O", "npu=ethos-u85-256",
                       "-O", "memory_mode=Dedicated_Sram_384KB")  # fmt: skip


class _ModuleCapsys:
    """capsys for module-scoped fixtures (pytest's is function-scoped): what reaches the process's fds 1 and 2 and
    sys.stdout/sys.stderr (the terminal of a real run), read back."""

    def __enter__(self) -> _ModuleCapsys:
        import os
        import sys
        import tempfile

        sys.stdout.flush()
        sys.stderr.flush()
        self._fd, name = tempfile.mkstemp(suffix=".terminal")
        self._file = Path(name)
        self._saved = (os.dup(1), os.dup(2), sys.stdout, sys.stderr)
        os.dup2(self._fd, 1)
        os.dup2(self._fd, 2)
        sys.stdout = sys.stderr = open(self._fd, "w", closefd=False, buffering=1)
        return self

    def __exit__(self, *exc: object) -> None:
        import os
        import sys

        sys.stdout.flush()
        sys.stdout.close()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        sys.stdout, sys.stderr = self._saved[2], self._saved[3]
        for fd in (self._saved[0], self._saved[1], self._fd):
            os.close(fd)

    def readouterr(self) -> tuple[str, str]:
        sys_stdout = __import__("sys").stdout
        sys_stdout.flush()
        text = self._file.read_text()
        return text, text


def _summary_rows(folder: Path) -> list[dict[str, str]]:
    """Vela's own summary CSVs in the artifact, read here independently of the target's reader."""
    rows = []
    for path in sorted((folder / "model.ethos-u" / "vela").glob("*_summary.csv")):
        with open(path, newline="") as fh:
            rows.append(next(csv.DictReader(fh)))
    return rows


def _check_common(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder).manifest  # the sha256 covers the .pte, Vela's reports and the TOSA graphs
    parity = manifest["parity"]
    assert parity["status"] == "passed", parity
    # int8 is held to its mIoU drop: against the synthetic scenes' labels here (the built-in model's label space)
    assert parity["verdict_basis"] == "labels" and parity["miou_drop_points"] <= INT8.miou_drop, parity
    assert parity["pixel_agreement"] >= 0.98, parity
    assert parity["executor"].startswith("TOSA reference model") and parity["images"] == 4
    assert manifest["quantization"]["applied"]["quantizer"] == "EthosUQuantizer"
    files = {p.relative_to(folder / "model.ethos-u").as_posix() for p in (folder / "model.ethos-u").rglob("*") if p.is_file()}
    assert "model.pte" in files and "reference/program.pt2" in files
    delegation, estimate = manifest["delegation"], manifest["estimate"]
    assert {f"reference/lowered_module_{i}.tosa" for i in range(delegation["delegates"])} <= files
    # The estimate is Vela's own CSV, summed over delegates: the same numbers read back here with csv.
    rows = _summary_rows(folder)
    assert len(rows) == len(estimate["per_delegate"]) == delegation["delegates"]
    total = estimate["total"]
    assert total["cycles"] == sum(float(r["cycles_total"]) for r in rows) > 0
    assert total["sram_traffic_bytes"] == sum(float(r["sram_total_bytes"]) for r in rows) > 0
    assert total["dram_traffic_bytes"] == sum(float(r["dram_total_bytes"]) for r in rows)
    assert total["clock_hz"] == float(rows[0]["core_clock"])
    assert total["inference_ms"] == pytest.approx(1e3 * sum(float(r["inference_time"]) for r in rows))
    assert total["inference_ms"] == pytest.approx(1e3 * total["cycles"] / total["clock_hz"], rel=1e-6)
    assert "not a measurement" in estimate["source"]
    assert all(p["top_ops_by_cycles"] for p in estimate["per_delegate"])
    assert manifest["io"] == {"inputs": ["float32"], "outputs": ["float32"]}  # quantize/dequantize on the CPU edges
    log = (folder / "export.log").read_text()
    assert "Network summary for" in log  # Vela's own report went to export.log ...
    assert (folder / "export.log").stat().st_size < 2_000_000  # ... without --verbose-all's debug dump
    return manifest


def test_u55_export_verify_delegation_and_estimate(u55) -> None:
    folder, stdout, err = u55
    assert folder.name == "segformer-custom_ethos-u_int8_npu-ethos-u55-128"
    manifest = _check_common(folder)
    assert manifest["target_options"] == {"npu": "ethos-u55-128", "system_config": "Ethos_U55_High_End_Embedded",
                                          "memory_mode": "Shared_Sram"}  # fmt: skip
    assert manifest["ethos_u"]["tosa_spec"].endswith("+u55")
    assert "--accelerator-config=ethos-u55-128" in manifest["ethos_u"]["compiler_flags"]
    delegation = manifest["delegation"]
    # U55 takes strides 1 and 2 only and has no bilinear resize: the stage-1 patch embedding (7x7, stride 4) and
    # the decoder's three upsamplings stay on the Cortex-M, which cuts the graph into two delegates.
    assert delegation["delegates"] == 2 and delegation["npu_compute_ops"] > 500
    assert delegation["cpu_ops"] == {"aten_convolution_default": 1, "aten_upsample_bilinear2d_vec": 3}
    reasons = {f["op"]: f for f in delegation["cpu_fallbacks"]}
    assert reasons["aten.upsample_bilinear2d.vec"]["nodes"] == 3
    assert "U55" in reasons["aten.upsample_bilinear2d.vec"]["reason"]
    assert "stride" in reasons["aten.convolution.default"]["reason"]
    assert manifest["estimate"]["total"]["clock_hz"] == 500e6
    assert "4 op(s) on the CPU are not estimated" in manifest["estimate"]["covers"]
    # The terminal got the result table, not the converters' chatter.
    assert "Network summary" not in stdout + err and "Vela" not in err


def test_u85_export_with_a_memory_mode(u85) -> None:
    folder, _, _ = u85
    manifest = _check_common(folder)
    assert manifest["target_options"] == {"npu": "ethos-u85-256", "system_config": "Ethos_U85_SYS_DRAM_Mid",
                                          "memory_mode": "Dedicated_Sram_384KB"}  # fmt: skip
    assert "--memory-mode=Dedicated_Sram_384KB" in manifest["ethos_u"]["compiler_flags"]
    assert manifest["ethos_u"]["tosa_spec"].endswith("+cf")
    delegation = manifest["delegation"]
    assert delegation["delegates"] == 1 and delegation["cpu_compute_ops"] == 0 and not delegation["cpu_fallbacks"]
    assert delegation["cpu_quantize_dequantize"] == 2  # the input quantize and the output dequantize
    total = manifest["estimate"]["total"]
    assert total["clock_hz"] == 1e9 and total["accelerator"] == "Ethos_U85_256"
    assert total["dram_traffic_bytes"] > 0  # the arena lives in DRAM in this memory mode: Vela was given the option


def test_verify_runs_each_delegate_in_the_reference_model(u55, trained, capsys) -> None:
    folder, _, _ = u55
    _, ckpt = trained
    args = ["verify", folder, "--checkpoint", ckpt, "--data", "synthetic:96", "--num-images", "2", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["executor"].startswith("TOSA reference model")
    runner = get_target("ethos-u").load(read_manifest(folder))
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    first = runner(x)
    assert first.shape == (1, 8, 16, 16) and first.dtype == np.float32
    assert runner.delegate_calls == 2  # both NPU delegates ran in the reference model, not in torch
    assert np.array_equal(first, runner(x))  # integer-exact: the same bits every time
    # The delegates' outputs are the reference model's: three int8 steps added to every delegate input change them.
    reference = runner.reference
    shifted = type("Shifted", (), {"GraphStatus": reference.GraphStatus, "run": staticmethod(
        lambda graph, xs: reference.run(graph, [np.clip(i.astype(np.int16) + 3, -128, 127).astype(np.int8) for i in xs]))})
    runner.reference = shifted
    assert not np.array_equal(first, runner(x))


def test_bench_shows_vela_estimate_as_an_estimate(u85, tmp_path: Path, capsys) -> None:
    folder, _, _ = u85
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", folder, "--runs", "1", "--warmup", "0", "--threads", "1", "--json", out], capsys)
    assert code == 0, err
    (record,) = json.loads(out.read_text())
    manifest = read_manifest(folder).manifest
    assert record["status"].startswith("estimate (Vela, not measured): ")
    assert f"{manifest['estimate']['total']['inference_ms']:.3f} ms NPU on ethos-u85-256 at 1000 MHz" in record["status"]
    assert record["estimate"]["cycles"] == manifest["estimate"]["total"]["cycles"]
    assert "p50_ms" not in record and "load_ms" not in record  # nothing pretends to be a measurement
    row = next(line for line in stdout.splitlines() if line.startswith("| ethos-u"))
    assert "estimate (Vela, not measured)" in row


def test_options_and_configurations_are_checked_before_lowering(capsys, tmp_path: Path) -> None:
    target = get_target("ethos-u")
    quant = QuantSpec(method="mse")  # what plan_export resolves --method auto to
    int8: dict[str, Any] = {"size": (64, 64), "precision": "int8"}
    refusals = [
        (ExportOptions(size=(64, 64)), "--precision fp32 is not supported: Ethos-U NPUs compute in integers only"),
        (ExportOptions(**int8, target_options={"npu": "ethos-u99-1"}), "npu=ethos-u99-1: choose one of ethos-u55-128"),
        (ExportOptions(**int8, target_options={"system_config": "Nope"}), "system_config=Nope: choose one of auto, Ethos_U55"),
        (ExportOptions(**int8, target_options={"memory_mode": "Dedicated_Sram"}),  # u55's arena cannot live in flash
         ("Vela refuses npu=ethos-u55-128 system_config=Ethos_U55_High_End_Embedded memory_mode=Dedicated_Sram: "
          "Invalid configuration of arena_mem_area=OffChipFlash")),
        (ExportOptions(**int8, target_options={"npu": "ethos-u55-64", "system_config": "Ethos_U85_SYS_DRAM_Mid"}),
         "system_config=Ethos_U85_SYS_DRAM_Mid is not a system of ethos-u55"),
        (ExportOptions(**int8, output="mask"), "--output mask is not supported by this target"),
    ]  # fmt: skip
    for options, message in refusals:
        with pytest.raises(ExportError, match=re.escape(message)):
            target.plan(options, quant)
    # The defaults, resolved as EthosUCompileSpec resolves them, and every system config / memory mode of vela.ini.
    assert target.plan(ExportOptions(**int8), quant) == {"npu": "ethos-u55-128", "system_config": "Ethos_U55_High_End_Embedded",
                                                         "memory_mode": "Shared_Sram"}  # fmt: skip
    assert {"Ethos_U65_High_End", "Ethos_U85_SYS_Flash_Low"} <= set(target.options["system_config"])
    assert {"Sram_Only", "Dedicated_Sram_512KB"} <= set(target.options["memory_mode"])
    assert not target.in_all
    # Through the CLI: one line, exit 2, nothing written.
    code, _, err = run_cli(["export", "--target", "ethos-u", "--precision", "int8", *SIZE, "-O", "npu=ethos-u65-256",
                            "-O", "system_config=Ethos_U55_Deep_Embedded", "--out", tmp_path / "no"], capsys)  # fmt: skip
    assert code == 2 and "is not a system of ethos-u65" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())


def test_the_pins_agree_and_are_what_runs() -> None:
    """The README's --no-deps step, CI's copy of it, the pyproject extra and the target's own install hint name the
    same versions, and those are the versions installed."""
    from importlib import metadata

    from segformer_edge.converters.ethos_u import INSTALL, PACKAGES

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ethos-u"]
    assert {f"{k}=={v}" for k, v in PACKAGES.items()} <= set(extra)
    assert {k: metadata.version(k) for k in PACKAGES} == PACKAGES
    assert INSTALL == "python -m pip install --no-deps ethos-u-vela==5.1.0 tosa-tools==2026.5.0"
    assert INSTALL in (ROOT / "README.md").read_text() and INSTALL in (ROOT / ".ci" / "run").read_text()


def test_vela_sweep_on_the_exported_graphs(u55) -> None:
    """Other configurations of the same TOSA family are estimated by Vela alone from the artifact's TOSA graphs; the
    artifact's own configuration gives back the manifest's numbers."""
    from segformer_edge.converters.ethos_u import estimate_for

    folder, _, _ = u55
    artifact = read_manifest(folder)
    same = estimate_for(artifact, "ethos-u55-128")["total"]
    assert same["cycles"] == artifact.manifest["estimate"]["total"]["cycles"]
    more_macs = estimate_for(artifact, "ethos-u55-256")["total"]
    u65 = estimate_for(artifact, "ethos-u65-256")["total"]  # U65 compiles the same +u55 TOSA profile
    assert more_macs["cycles"] < same["cycles"] and more_macs["clock_hz"] == same["clock_hz"] == 500e6
    assert u65["accelerator"] == "Ethos_U65_256" and u65["memory_mode"] == "Dedicated_Sram_384KB"
    with pytest.raises(ExportError, match=r"ethos-u85-256 compiles TOSA-1\.0\+INT.*\+cf, the artifact holds .*\+u55 graphs"):
        estimate_for(artifact, "ethos-u85-256")
