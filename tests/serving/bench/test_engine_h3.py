"""MiniMax-H3's engine benchmark runs end to end on its seconds-long smoke profile and reports every section."""

from __future__ import annotations

import json

import pytest

from serving.bench.engine_h3 import run


def test_the_h3_engine_benchmark_reports_every_section(tmp_path):
    results = run("smoke", tmp_path)
    written = json.loads((tmp_path / "engine-h3.json").read_text())
    assert written["profile"] == "smoke" and written["batching"] == results["batching"]
    workflows = results["workflows"]["rows"]
    assert list(workflows) == ["t2va", "fl2va", "ref2va"]
    assert workflows["t2va"]["condition_rows"] == 0 < workflows["fl2va"]["condition_rows"] < workflows["ref2va"]["condition_rows"]
    assert workflows["t2va"]["packed_rows"] == results["batching"]["packed_rows"]
    rows = {(row["concurrent_jobs"], row["batching"]): row for row in results["batching"]["rows"]}
    assert set(rows) == {(n, on) for n in (1, 2, 4) for on in ("off", "on")}
    assert rows[(4, "on")]["transformer_passes"] == results["batching"]["steps_per_job"]  # one pass a step for all
    assert rows[(4, "off")]["transformer_passes"] == 4 * results["batching"]["steps_per_job"]
    assert results["checkpoint"]["checkpoint_bytes"] > 0
    table = (tmp_path / "engine-h3.md").read_text()
    assert "| 4 | on |" in table and "| ref2va |" in table


def test_unknown_profiles_are_refused(tmp_path):
    with pytest.raises(ValueError, match="profile 'huge' is not known; profiles: cpu, smoke"):
        run("huge", tmp_path)
