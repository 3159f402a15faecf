"""The GPU benchmark's every section runs on the CPU with the tiny profile (real code path, tiny widths)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving.bench import gpu


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    assert gpu.main(["--profile", "tiny", "--out", str(out)]) == 0
    return out, json.loads((out / "gpu-bench.json").read_text())


def test_every_section_reports_without_error(tiny_report):
    out, report = tiny_report
    assert list(report["sections"]) == ["machine", "step", "recipes", "throughput", "diffusers", "multi_gpu", "kernels"]
    assert all("error" not in section for section in report["sections"].values()), report["sections"]
    assert report["command"] == f"python -m serving.bench.gpu --profile tiny --out {out}"
    markdown = (out / "gpu-bench.md").read_text()
    assert "## throughput" in markdown and "| rows[2].concurrent_jobs | 4 |" in markdown


def test_figures_are_consistent(tiny_report):
    sections = tiny_report[1]["sections"]
    step = sections["step"]
    assert step["video_tokens"] == 3 * 2 * 4 and step["pass_seconds"] > 0
    assert step["guided_step_seconds"] == pytest.approx(sum(step["guided_step_passes"].values()), abs=1e-3)
    recipes = sections["recipes"]
    assert recipes["distilled_seconds"] < recipes["dev_seconds"]  # 8 plain passes against 30 guided steps
    rows = sections["throughput"]["rows"]
    assert [row["concurrent_jobs"] for row in rows] == [1, 2, 4]
    assert rows[0]["batching_on_jobs_per_hour"] == rows[0]["batching_off_jobs_per_hour"]
    assert sections["diffusers"]["diffusers_seconds_per_job"] > 0
    multi = sections["multi_gpu"]
    assert multi["ranks"] == 2 and multi["backend"] == "gloo" and multi["sharded_pass_seconds"] > 0


def test_kernel_switches_the_cpu_cannot_use_are_reported_as_refused(tiny_report):
    variants = tiny_report[1]["sections"]["kernels"]["variants"]
    assert variants["attention_auto"]["attention"]["unmasked"] == "native"
    assert variants["fp8_compile"]["refused"].startswith("model.speed.fp8")
    assert variants["compile_cuda_graphs"]["refused"].startswith("model.speed.cuda_graphs")


def test_bad_profile_and_sections_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--profile: unknown profile 'h100'"):
        gpu.run("h100", tmp_path)
    with pytest.raises(ValueError, match="--sections: unknown"):
        gpu.run("tiny", tmp_path, sections=["warp"])

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            gpu.run("ltx2-19b-random", tmp_path)


@pytest.mark.slow
def test_reelserve_bench_runs_the_real_dims_profiles(tmp_path):
    """``reelserve bench --profile tiny|ltx2-19b-random`` runs this benchmark and writes its BENCHMARKS.md block."""
    repo = Path(__file__).resolve().parents[3]
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n")

    def bench(*argv):
        return subprocess.run([sys.executable, "-m", "serving.cli", "bench", *argv, "--out", str(tmp_path / "out"),
                               "--benchmarks", str(benchmarks)], cwd=repo, capture_output=True, text=True, timeout=300)

    ran = bench("--profile", "tiny", "--section", "step")
    assert ran.returncode == 0, ran.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu-bench.json").read_text())
    assert list(report["sections"]) == ["machine", "step"] and report["sections"]["step"]["pass_seconds"] > 0
    text = benchmarks.read_text()
    assert "<!-- bench:gpu:tiny -->" in text and "bench --profile tiny --section step" in text

    refused = bench("--profile", "tiny", "--section", "warp")
    assert refused.returncode == 2 and "error: --section: warp" in refused.stderr

    if not torch.cuda.is_available():
        no_gpu = bench("--profile", "ltx2-19b-random")
        assert no_gpu.returncode == 2 and "needs a CUDA GPU" in no_gpu.stderr and "Traceback" not in no_gpu.stderr
