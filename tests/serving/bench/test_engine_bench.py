"""The engine benchmark runs end to end (on its seconds-long smoke profile) and reports every section."""

from __future__ import annotations

import json

import pytest

from serving.bench.engine import run


def test_the_engine_benchmark_reports_every_section(tmp_path):
    results = run("smoke", tmp_path)

    written = json.loads((tmp_path / "engine.json").read_text())
    assert written["profile"] == "smoke" and written["batching"] == results["batching"]
    rows = {(row["concurrent_jobs"], row["batching"]): row for row in results["batching"]["rows"]}
    assert set(rows) == {(n, on) for n in (1, 2, 4) for on in (False, True)}
    assert rows[(4, True)]["transformer_passes"] < rows[(4, False)]["transformer_passes"]  # batched
    assert set(results["recipes"]["rows"]) == {"dev", "distilled", "two_stage", "two_stage (distilled first stage)"}
    assert results["recipes"]["rows"]["distilled"]["transformer_rows"] == 8  # one row a step, 8 steps
    assert results["checkpoint"]["stored_bytes"] > 0
    assert "none" in results["step_caches"]["rows"] and len(results["step_caches"]["rows"]) == 5
    table = (tmp_path / "engine.md").read_text()
    assert "| 4 | on |" in table and "| distilled |" in table and "taylorseer" in table


def test_unknown_profiles_are_refused(tmp_path):
    with pytest.raises(ValueError, match="profile 'huge' is not known; profiles: cpu, smoke"):
        run("huge", tmp_path)
