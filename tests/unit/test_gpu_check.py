"""scripts/gpu_check.py: its tiny path on the CPU (the real one needs a GPU), peaks, projections, BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_bf16_peaks_by_device_name(gpu_check) -> None:
    assert gpu_check.dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.dense_bf16_peak("NVIDIA H100 PCIe") == 756e12  # the longer, more specific name wins
    assert gpu_check.dense_bf16_peak("NVIDIA H200") == 989e12
    assert gpu_check.dense_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.dense_bf16_peak("Some Accelerator") is None


def test_projection_scales_a_measured_rate_to_h100s(gpu_check) -> None:
    # 20 pairs/s on an A100 (312 TFLOP/s) is 20 x 989 / 312 = 63.4 pairs/s on an H100.
    projected = gpu_check.projections(20.0, 312e12, 800_000)
    assert projected["pairs_per_second_per_h100"] == pytest.approx(20 * 989 / 312)
    assert projected["epoch_seconds"]["8"] == pytest.approx(800_000 / (8 * 20 * 989 / 312))
    assert projected["epoch_seconds"]["16"] == pytest.approx(projected["epoch_seconds"]["8"] / 2)
    assert projected["scaled_from_measured_gpu"]
    assert not gpu_check.projections(20.0, 989e12, 800_000)["scaled_from_measured_gpu"]
    assert gpu_check.projections(20.0, None, 800_000) is None  # a CPU rate projects nothing


def test_tiny_path_measures_writes_json_and_replaces_its_benchmarks_section(gpu_check, tmp_path) -> None:
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(f"# Benchmarks\n\nbefore\n\n{gpu_check.BEGIN}\nGPU run pending\n{gpu_check.END}\n\nafter\n")
    argv = ["--tiny", "--out", str(tmp_path / "out"), "--benchmarks", str(benchmarks)]
    argv += ["--steps", "2", "--warmup", "1", "--users", "2", "--micro-batch", "2"]
    assert gpu_check.main(argv) == 0
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["path"] == "tiny" and result["architecture"] == "tiny"
    training = result["training"]
    assert training["pairs_per_second"] > 0 and training["seconds_per_step"] > 0 and training["steps"] == 2
    assert training["micro_batch"] == 2 and training["pairs_per_second"] == 2 / training["seconds_per_step"]
    assert training["flops_per_pair"] > 0 and training["mfu"] is None  # no known peak on a CPU
    generation = result["generation"]
    assert generation["users"] == 2 and generation["seconds_per_batch"] > 0 and len(generation["image_shape"]) == 3
    assert result["projection"] is None
    text = benchmarks.read_text()
    assert text.count(gpu_check.BEGIN) == 1 and "GPU run pending" not in text
    assert "before" in text and "after" in text and "tiny path" in text
    gpu_check.write_benchmarks(benchmarks, gpu_check.benchmarks_section(result))  # what a second run writes
    assert benchmarks.read_text() == text
    fresh = tmp_path / "NEW.md"
    gpu_check.write_benchmarks(fresh, gpu_check.benchmarks_section(result))  # no markers yet: appended
    assert fresh.read_text().count(gpu_check.BEGIN) == 1 and "## GPU check" in fresh.read_text()
