"""`reelserve bench` without running a benchmark: sections, BENCHMARKS.md blocks, profiles, bad flags.

The benchmark itself runs by hand (minutes); its figures live in BENCHMARKS.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serving.bench.profiles import PROFILES, get_profile
from serving.bench.registry import SectionResult, markdown_table, register_section, sections
from serving.bench.runner import _block, update_benchmarks_file

REPO = Path(__file__).resolve().parents[3]
MACHINE = {"date": "2026-01-01 00:00 UTC", "cpu": "Test CPU", "cpus": 2, "memory_gib": 24.0, "python": "3.11",
           "torch": "2.13.0", "diffusers": "0.42.1", "ray": "2.60.0", "gpu": None}


def test_the_served_section_is_registered_and_others_plug_in():
    assert "served-vs-bare" in sections()

    @register_section("test-only", title="A plugged-in section")
    def _section(context):
        return SectionResult("test-only", "A plugged-in section", {}, "body")

    assert sections()["test-only"].title == "A plugged-in section"


def test_markdown_tables_render_numbers_and_gaps():
    table = markdown_table([{"a": 1.23456, "b": None}, {"a": 1234.5, "b": "x"}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "| --- | --- |", "| 1.23 | – |", "| 1234 | x |"]


def test_a_block_is_replaced_in_place_and_new_ones_are_appended(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    first = _block(SectionResult("served-vs-bare", "Served", {}, "old figures\n"), "cpu-small", MACHINE, "reelserve bench", 10)
    other = _block(SectionResult("engine", "Engine", {}, "engine figures\n"), "cpu-small", MACHINE, "reelserve bench", 10)
    update_benchmarks_file(path, [first, other])
    path.write_text(path.read_text() + "\nA hand-written note.\n")
    again = _block(SectionResult("served-vs-bare", "Served", {}, "new figures\n"), "cpu-small", MACHINE, "reelserve bench", 12)
    gpu = _block(SectionResult("served-vs-bare", "Served", {}, "gpu figures\n"), "gpu", MACHINE, "reelserve bench", 99)
    update_benchmarks_file(path, [again, gpu])
    text = path.read_text()
    assert "old figures" not in text and text.count("new figures") == 1
    assert text.index("new figures") < text.index("engine figures") < text.index("A hand-written note") < text.index("gpu figures")
    assert "Test CPU (2 CPUs)" in text and "2026-01-01" in text and "`reelserve bench`" in text


def test_the_cpu_profile_is_the_ltx2_architecture_at_real_widths():
    profile = get_profile("cpu-small")
    assert profile.widths.video_heads * profile.widths.video_head_dim >= 512
    assert profile.concurrencies == (1, 2, 4) and set(profile.jobs_per_level) == {1, 2, 4}
    assert set(PROFILES) >= {"cpu-small", "gpu"}


def test_bad_bench_flags_exit_2_naming_the_flag(tmp_path):
    for argv, flag in ((["--profile", "huge"], "--profile"), (["--model", str(tmp_path)], "--model"),
                       (["--section", "nope"], "--section")):
        result = subprocess.run(
            [sys.executable, "-m", "serving.cli", "bench", *argv, "--out", str(tmp_path), "--no-benchmarks"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"error: {flag}" in result.stderr and "Traceback" not in result.stderr
