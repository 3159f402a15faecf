"""The load tester's parts without a cluster: flags, the mix file, the report's accounting, metrics parsing, plots.

The run against a real cluster is in tests/cluster/test_local.py (it reuses that module's cluster).
"""

from __future__ import annotations

import argparse

import pytest

from serving.loadtest.mix import MixError, load_mix
from serving.loadtest.plots import draw_plots
from serving.loadtest.report import JobTrace, build_report, percentiles
from serving.loadtest.runner import SettingsError, add_arguments, settings_from_args
from serving.loadtest.sampler import MetricsSample, StageSample, stage_load_from_text


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_closed_and_open_loop_settings():
    closed = settings_from_args(_args("--address", "10.0.0.5:9000", "--requests", "20", "--concurrency", "4"))
    assert (closed.mode, closed.requests, closed.concurrency) == ("closed", 20, 4)
    assert closed.metrics_urls == ["http://10.0.0.5:8080/metrics"]
    opened = settings_from_args(
        _args("--address", "h:8000", "--protocol", "http", "--rate", "0.5", "--duration", "60", "--slo-seconds", "90")
    )
    assert (opened.mode, opened.rate, opened.duration, opened.slo_seconds) == ("open", 0.5, 60.0, 90.0)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--requests", "5"], "--requests/--concurrency"),
        (["--requests", "5", "--concurrency", "2", "--rate", "1"], "--requests/--concurrency"),
        (["--rate", "1"], "--rate/--duration"),
        ([], "--requests/--concurrency"),
        (["--requests", "0", "--concurrency", "2"], "--requests"),
        (["--requests", "20000", "--concurrency", "2"], "--requests"),
        (["--requests", "x", "--concurrency", "2"], "--requests"),
        (["--rate", "1000", "--duration", "10"], "--rate"),
        (["--rate", "nan", "--duration", "10"], "--rate"),
        (["--rate", "1", "--duration", "99999"], "--duration"),
        (["--requests", "5", "--concurrency", "2", "--protocol", "quic"], "--protocol"),
        (["--requests", "5", "--concurrency", "2", "--mix", "/no/such/mix.yaml"], "--mix"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(argv, flag):
    with pytest.raises(SettingsError) as error:
        settings_from_args(_args("--address", "127.0.0.1:9000", *argv))
    assert str(error.value).startswith(flag)


def test_an_address_without_a_port_is_refused():
    with pytest.raises(SettingsError, match="^--address"):
        settings_from_args(_args("--address", "localhost", "--requests", "1", "--concurrency", "1"))


def test_mix_files_are_read_and_checked(tmp_path):
    good = tmp_path / "mix.yaml"
    good.write_text("- {name: a, weight: 3, size: 256x256, seconds: 2}\n- {name: b, photo: false, enhance_prompt: true}\n")
    shapes = load_mix(good)
    assert [(s.name, s.weight, s.photo) for s in shapes] == [("a", 3.0, True), ("b", 1.0, False)]
    assert shapes[0].photo_bytes()[:2] == b"\xff\xd8" and shapes[1].photo_bytes() is None
    for text, message in [
        ("- {name: a, size: 12}\n", "entry 0.size"),
        ("- {name: a, weight: 0}\n", "entry 0.weight"),
        ("- {name: a, colour: red}\n", "entry 0.colour"),
        ("- {name: a}\n- {name: a}\n", "unique"),
        ("- {name: a, photo: /nope.jpg}\n", "photo"),
        ("{}", "non-empty list"),
        ("[unclosed", "not YAML"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(MixError, match=message):
            load_mix(bad)


def test_percentiles_use_nearest_rank():
    stats = percentiles([float(v) for v in range(1, 101)])
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"], stats["count"]) == (50.0, 90.0, 99.0, 100.0, 100)
    assert percentiles([])["p50"] is None


def test_the_report_accounts_for_every_request_and_counts_goodput():
    traces = [
        JobTrace(0, "a", 0.0, "j0", "completed", None, 10.0, 0.5, {"diffusion": 8.0, "muxer": 1.0}),
        JobTrace(1, "a", 1.0, "j1", "completed", None, 41.0, 0.7, {"diffusion": 30.0}),
        JobTrace(2, "b", 2.0, "j2", "failed", "out_of_memory", 5.0, 0.4),
        JobTrace(3, "b", 3.0, None, "rejected", "resource_exhausted", 3.0),
        JobTrace(4, "b", 4.0, "j4", "failed", "unfinished", 60.0),
    ]
    samples = [MetricsSample(t=1.0, stages={"diffusion": StageSample(queued=2, in_flight=1, replicas=1)})]
    report = build_report(traces, {"mode": "closed"}, wall_seconds=60.0, slo_seconds=30.0, samples=samples,
                          metrics_info={"endpoints": []})
    assert report["jobs"] == {"submitted": 5, "completed": 2, "failed": 2, "rejected": 1, "all_accounted_for": True}
    assert report["throughput_jobs_per_min"] == 2.0
    assert report["goodput"] == {"slo_seconds": 30.0, "within_slo": 1, "share_of_submitted": 0.2, "jobs_per_min": 1.0}
    assert report["latency_seconds"]["max"] == 40.0 and report["latency_seconds"]["p50"] == 10.0
    assert report["errors_by_code"] == {"out_of_memory": 1, "unfinished": 1}
    assert report["rejections_by_code"] == {"resource_exhausted": 1}
    assert report["stage_seconds"]["diffusion"]["count"] == 2
    assert report["first_progress_seconds"]["count"] == 3
    assert report["metrics"]["samples"][0]["stages"]["diffusion"] == {"queued": 2, "in_flight": 1, "replicas": 1}


def test_pending_traces_break_the_accounting():
    report = build_report([JobTrace(0, "a", 0.0)], {}, 1.0, None, [], {})
    assert report["jobs"]["all_accounted_for"] is False and "goodput" not in report


RAY_TEXT = """\
# HELP ray_reelserve_stage_requests_queued Stage requests inside a replica waiting for its model now.
# TYPE ray_reelserve_stage_requests_queued gauge
ray_reelserve_stage_requests_queued{NodeAddress="10.0.0.1",WorkerId="w1",model="m",stage="diffusion"} 2.0
ray_reelserve_stage_requests_queued{NodeAddress="10.0.0.1",WorkerId="w2",model="m",stage="diffusion"} 1.0
# HELP ray_reelserve_stage_requests_in_flight Stage requests running on the model now.
# TYPE ray_reelserve_stage_requests_in_flight gauge
ray_reelserve_stage_requests_in_flight{NodeAddress="10.0.0.1",WorkerId="w1",model="m",stage="diffusion"} 1.0
ray_reelserve_stage_requests_in_flight{NodeAddress="10.0.0.1",WorkerId="w2",model="m",stage="diffusion"} 1.0
ray_reelserve_stage_requests_in_flight{NodeAddress="10.0.0.1",WorkerId="w3",model="m",stage="muxer"} 0.0
# HELP ray_serve_deployment_queued_queries Queries waiting for a replica.
# TYPE ray_serve_deployment_queued_queries gauge
ray_serve_deployment_queued_queries{application="reelserve",deployment="diffusion",handle="h"} 4.0
ray_serve_deployment_queued_queries{application="reelserve",deployment="ingress",handle="h"} 9.0
"""


def test_stage_load_is_read_from_ray_metrics_text():
    other_node = RAY_TEXT.replace("10.0.0.1", "10.0.0.2").split("# HELP ray_serve")[0]
    stages = stage_load_from_text([RAY_TEXT, other_node])
    assert stages["diffusion"] == StageSample(queued=2 + 1 + 4 + 2 + 1, in_flight=4, replicas=4)
    assert stages["muxer"] == StageSample(queued=0, in_flight=0, replicas=2)
    assert "ingress" not in stages


def test_the_plots_are_pngs(tmp_path):
    traces = [JobTrace(i, "a", float(i), f"j{i}", "completed", None, i + 3.0, 0.2, {"diffusion": 2.0, "muxer": 1.0})
              for i in range(4)]
    traces.append(JobTrace(4, "a", 4.0, None, "rejected", "resource_exhausted", 4.0))
    samples = [MetricsSample(t=float(t), stages={"diffusion": StageSample(queued=t % 3, in_flight=1, replicas=1 + t // 2)})
               for t in range(6)]
    report = build_report(traces, {}, 8.0, 5.0, samples, {})
    paths = draw_plots(report, tmp_path)
    assert [p.name for p in paths] == ["latency.png", "stage_time.png", "queue_replicas.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
