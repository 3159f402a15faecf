"""The metric definitions and the recording API, without Ray: a recording exporter sees every measurement."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from cluster.config import JobsConfig
from serving import metrics
from serving.metrics import METRICS, SECONDS_BUCKETS, MetricSpec, RecordingExporter
from serving.protocol import ImageCondition, JobTicket
from serving.stages._base import LoadTimer, StageRunner


@pytest.fixture
def recorded():
    exporter = RecordingExporter()
    previous = metrics.set_exporter(exporter)
    yield exporter
    metrics.set_exporter(previous)


def test_every_metric_follows_the_naming_and_label_rules():
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names)), "a metric is defined twice"
    allowed = {"stage", "model", "status", "code", "resolution", "tenant", "part"}  # tenant: names from the config only; part: one of a family's few components
    for spec in METRICS:
        assert spec.name.startswith("reelserve_")
        assert set(spec.labels) <= allowed, spec.name
        assert "job" not in " ".join(spec.labels)
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and spec.buckets == SECONDS_BUCKETS
    assert SECONDS_BUCKETS[0] == 0.01 and SECONDS_BUCKETS[-1] == 1800.0
    assert list(SECONDS_BUCKETS) == sorted(SECONDS_BUCKETS)


@pytest.mark.parametrize(
    "spec",
    [
        dict(name="other_seconds", kind="gauge", description="", labels=()),
        dict(name="reelserve_things", kind="counter", description="", labels=()),
        dict(name="reelserve_things_total", kind="gauge", description="", labels=()),
        dict(name="reelserve_wait_seconds", kind="histogram", description="", labels=()),
    ],
)
def test_a_badly_named_or_shaped_metric_is_refused(spec):
    with pytest.raises(ValueError):
        MetricSpec(**spec)


def test_the_exporter_refuses_unknown_metrics_and_wrong_labels(recorded):
    with pytest.raises(KeyError):
        recorded.export([metrics.Measurement("reelserve_nope_total", {}, 1)])
    with pytest.raises(ValueError, match="labels"):
        recorded.export([metrics.Measurement("reelserve_denoise_steps_total", {"model": "m", "job": "x"}, 1)])


def test_each_recording_call_emits_its_metrics_with_their_labels(recorded):
    metrics.stage_request("text_encoder", "m", 0.5, 1.5, ok=False)
    metrics.stage_load("text_encoder", "m", 1, 3)
    metrics.bytes_handed("text_encoder", "m", 1024)
    metrics.model_loaded("text_encoder", "m", 2.0)
    metrics.component_loaded("text_encoder", "m", "connectors", 0.5)
    metrics.model_warmed_up("text_encoder", "m", 0.7)
    metrics.replica_lost("diffusion", "m", "device")
    metrics.gpu_memory("diffusion", "m", 10, 20)
    metrics.denoise_step("m", "720p", 1.2)
    metrics.job_finished("m", "failed", "timeout", 31.0)
    metrics.job_finished("m", "completed", None, 30.0)
    metrics.first_progress("m", 0.4)
    metrics.job_progressed("m")
    metrics.jobs_active("m", queued=2, in_progress=1)
    metrics.admission_refused("m", "max_active_jobs")
    metrics.rewrite_fallback("m", "timeout")

    assert {m.metric for m in recorded.measurements} == {spec.name for spec in METRICS}
    (requests,) = recorded.named("reelserve_stage_requests_total")
    assert requests.labels == {"stage": "text_encoder", "model": "m", "status": "error"}
    assert [m.value for m in recorded.named("reelserve_stage_queue_wait_seconds")] == [0.5]
    assert [m.labels["code"] for m in recorded.named("reelserve_jobs_total")] == ["timeout", "none"]
    (step,) = recorded.named("reelserve_denoise_step_seconds")
    assert step.labels == {"model": "m", "resolution": "720p"} and step.value == 1.2
    active = {m.labels["status"]: m.value for m in recorded.named("reelserve_jobs_active")}
    assert active == {"queued": 2, "in_progress": 1}


@pytest.mark.parametrize(
    "size, bucket",
    [((64, 64), "360p"), ((768, 512), "480p"), ((1024, 576), "576p"), ((1280, 704), "720p"), ((704, 1280), "720p"),
     ((1920, 1088), "1080p"), ((2560, 1440), "1440p"), ((3840, 2160), "2160p")],
)
def test_resolution_buckets_follow_the_short_side(size, bucket):
    assert metrics.resolution_bucket(*size) == bucket


def test_handoff_bytes_count_tensors_arrays_and_bytes_inside_outputs():
    condition = ImageCondition(latents=torch.zeros(1, 8, 1, 2, 2), width=64, height=64)
    assert metrics.handoff_nbytes(condition) == 8 * 4 * 4
    assert metrics.handoff_nbytes({"a": np.zeros(10, dtype=np.uint8), "b": [b"xyz", None]}) == 13
    assert metrics.handoff_nbytes("a path") == 0


def _runner(stage: str, tmp_path, model: str = "unknown") -> StageRunner:
    return StageRunner(stage, JobsConfig(results_dir=str(tmp_path)), (), model)


TICKET = JobTicket("video_x", "orchestrator-x", 1, "a prompt")


def test_the_stage_runner_measures_queue_wait_load_and_failures(recorded, tmp_path):
    release = threading.Event()

    def slow(value):
        release.wait(5)
        return np.zeros(value, dtype=np.uint8)

    def broken():
        raise RuntimeError("model failed")

    async def scenario():
        runner = _runner("video_decoder", tmp_path, "m")
        first = asyncio.ensure_future(runner.run(TICKET, slow, 16))
        second = asyncio.ensure_future(runner.run(TICKET, slow, 8))
        await asyncio.sleep(0.2)
        load_while_busy = (runner.stats.in_flight, runner.stats.queued)
        release.set()
        await asyncio.gather(first, second)
        with pytest.raises(RuntimeError):
            await runner.run(TICKET, broken)
        return runner, load_while_busy

    runner, load_while_busy = asyncio.run(scenario())
    assert load_while_busy == (1, 1), "one request on the model, one waiting for it"
    assert (runner.stats.in_flight, runner.stats.queued) == (0, 0)
    assert runner.stats.requests_total == 3 and runner.stats.failures_total == 1
    assert runner.load.report()["reelserve_service_seconds"] > 0  # what the autoscaling policy reads

    waits = [m.value for m in recorded.named("reelserve_stage_queue_wait_seconds")]
    assert len(waits) == 3 and max(waits) >= 0.15, "the second request waited for the first"
    outcomes = [m.labels["status"] for m in recorded.named("reelserve_stage_requests_total")]
    assert sorted(outcomes) == ["error", "ok", "ok"]
    loads = [(m.value) for m in recorded.named("reelserve_stage_requests_queued")]
    assert max(loads) == 1 and loads[-1] == 0


def test_a_request_cancelled_while_waiting_leaves_no_queue_behind(recorded, tmp_path):
    release = threading.Event()

    async def scenario():
        runner = _runner("muxer", tmp_path)
        first = asyncio.ensure_future(runner.run(TICKET, release.wait, 5))
        waiting = asyncio.ensure_future(runner.run(TICKET, release.wait, 5))
        await asyncio.sleep(0.1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        release.set()
        await first
        return runner

    runner = asyncio.run(scenario())
    assert (runner.stats.in_flight, runner.stats.queued) == (0, 0)
    assert runner.stats.requests_total == 1


def test_load_timer_records_the_load_time(recorded):
    with LoadTimer("text_encoder", "m") as timer:
        time.sleep(0.02)
    (load,) = recorded.named("reelserve_model_load_seconds")
    assert load.value == timer.seconds and timer.seconds >= 0.02
