"""MiniMax-H3's real-dims GPU benchmark: every section runs on the CPU with its tiny profile (the real code path at
tiny widths), and ``reelserve bench --profile minimax-h3-random`` reaches it."""

from __future__ import annotations

import argparse
import json

import pytest

from serving.bench import gpu, gpu_h3
from serving.bench.runner import BenchError, add_arguments, run_bench


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench-h3")
    assert gpu_h3.main(["--profile", "minimax-h3-tiny", "--out", str(out)]) == 0
    return out, json.loads((out / "gpu-bench-h3.json").read_text())


def test_every_section_reports_without_error(tiny_report):
    out, report = tiny_report
    assert list(report["sections"]) == list(gpu_h3.SECTIONS)
    assert all("error" not in section for section in report["sections"].values()), report["sections"]
    step = report["sections"]["step"]
    assert step["t2va"]["video_rows"] == 37 * 1 * 2 and step["ref2va"]["packed_rows"] > step["t2va"]["packed_rows"]
    assert step["t2va"]["denoise_seconds_4_steps"] == pytest.approx(3 * step["t2va"]["pass_seconds"], abs=0.01)
    assert [row["requests"] for row in report["sections"]["batching"]["rows"]] == [1, 2, 4]
    assert "## decoders" in (out / "gpu-bench-h3.md").read_text()


def test_the_real_dims_profile_is_one_command_and_each_bench_keeps_to_its_family(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--profile", "minimax-h3-random", "--out", str(tmp_path), "--section", "warp"])
    with pytest.raises(BenchError, match="--section: warp is not a section of minimax-h3-random"):
        run_bench(args, "reelserve bench --profile minimax-h3-random")
    with pytest.raises(ValueError, match="minimax_h3 profile; run it with serving.bench.gpu_h3"):
        gpu.run("minimax-h3-tiny", tmp_path)
    with pytest.raises(ValueError, match="not a MiniMax-H3 profile"):
        gpu_h3.run("tiny", tmp_path)
