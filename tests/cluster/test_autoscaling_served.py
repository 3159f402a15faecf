"""Autoscaling on a real local Ray cluster: the CPU profile's diffusion deployment goes 1 -> 2 -> 1.

The app is ``graphs.build_app`` on the ``local-cpu`` profile (tiny checkpoint, Redis job store, shorter delays),
with the diffusion stage reporting its load (``reporting_stages.ReportingDiffusionStage``: the stage with
``cluster.load.DiffusionLoad`` wired in, and an event log). The scenario, driven by what the events show:

1. a long job A takes the only replica; a short job B waits behind it: the policy scales to 2;
2. B runs on the new replica and ends while A still runs; a long job D is sent at once and takes the new
   replica (the old one is full);
3. A ends: one replica holds work, so the count drops to 1 after the down delay, and Serve stops the newest
   replica -- the one running D. D completes (the replica drains), and only then does that replica stop.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import yaml

from serving.proto import video_pb2, video_pb2_grpc
from tests.cluster.reporting_stages import EVENTS_ENV
from tests.helpers import free_port

APP = "reelserve"
REPO = Path(__file__).resolve().parents[2]
STEPS = 40
# A must outlast the scale-up (a metrics push, <= 10 s, the up delay and a replica start) and B; D, which starts
# after B, must outlast A by the down delay plus a metrics push. Measured on a busy 2-core machine: A 154 s,
# B 6 s, the second replica up 43 s after A started, D 297 s; on an idle one each job takes about a third.
LONG_A = dict(seconds=6.0, size="512x512")  # 4,864 latent tokens
LONG_D = dict(seconds=10.0, size="512x512")  # 7,936 latent tokens (the tiny model's budget is 8,192)
SHORT = dict(seconds=1.0, size="64x64")  # 16 latent tokens
DOWN_DELAY_S = 15


@pytest.fixture(scope="module")
def served(tiny_checkpoint, redis_url, tmp_path_factory, monkeypatch_module):
    import os

    import ray
    from ray import serve

    import serving.stages.diffusion
    from cluster.local import GRPC_SERVICER
    from graphs import build_app
    from tests.cluster.reporting_stages import ReportingDiffusionStage

    events = tmp_path_factory.mktemp("events") / "diffusion.log"
    os.environ[EVENTS_ENV] = str(events)  # Ray's workers inherit it
    http_port, grpc_port = free_port(), free_port()
    config = yaml.safe_load((REPO / "cluster" / "profiles" / "local-cpu.yaml").read_text())
    assert config["stages"]["diffusion"]["num_replicas"] is None and config["stages"]["diffusion"]["max_replicas"] == 2
    config["model"].update(path=str(tiny_checkpoint), num_inference_steps=STEPS, stg_blocks=[1])
    config["jobs"] = {"backend": "redis", "redis_url": redis_url, "max_active_jobs": 4,
                      "results_dir": str(tmp_path_factory.mktemp("results"))}
    config["ingress"].update(http_port=http_port, grpc_port=grpc_port)
    config["rewriter"] = {"enabled": False}
    config["stages"]["diffusion"].update(max_ongoing_requests=1)  # a second job must wait, not share a replica
    config["scaling"].update(target_queue_wait_s=3, replica_start_s=5, upscale_delay_s=1,
                             downscale_delay_s=DOWN_DELAY_S, metrics_window_s=11)

    monkeypatch_module.setattr(serving.stages.diffusion, "DiffusionStage", ReportingDiffusionStage)
    # address "local": a new cluster of our own, never one another process started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    serve.run(build_app(config), name=APP, route_prefix="/")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield video_pb2_grpc.VideoServiceStub(channel), events
    channel.close()
    serve.shutdown()
    ray.shutdown()
    os.environ.pop(EVENTS_ENV, None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def _events(path: Path) -> list[tuple[float, str, str, str]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(float(t), what, replica, job) for t, what, replica, job in rows]


def _running_replicas() -> tuple[int, dict]:
    from ray import serve

    states = serve.status().applications[APP].deployments["diffusion"].replica_states
    return states.get("RUNNING", 0), dict(states)


def _wait(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _status(stub, job_id: str) -> video_pb2.Video:
    return stub.GetVideo(video_pb2.GetVideoRequest(id=job_id))


def test_a_burst_scales_diffusion_to_max_and_back_and_the_removed_replica_finishes_its_job(served):
    stub, events_path = served
    started = time.time()
    assert _running_replicas()[0] == 1
    first = _events(events_path)[0][2]  # the replica that was up from the start

    long_a = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a long take A", seed=1, **LONG_A)).id
    _wait("A to start denoising", lambda: any(e[1] == "start" and e[3].startswith(long_a) for e in _events(events_path)), 120)
    short_b = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a short one B", seed=2, **SHORT)).id

    # 1 -> 2: B waits behind A (whose remaining GPU-seconds the replica reports), so a second replica comes
    _wait("a second diffusion replica", lambda: _running_replicas()[0] == 2, 120)
    scaled_up = time.time() - started
    second = _wait("the second replica's start", lambda: next(
        (e[2] for e in _events(events_path) if e[1] == "up" and e[2] != first), None), 30)

    # B runs on the new replica (A holds the first); once B ends, D goes there too
    b_end = _wait("B to end", lambda: next(
        (e for e in _events(events_path) if e[1] == "end" and e[3].startswith(short_b)), None), 120)
    assert b_end[2] == second, _events(events_path)
    a_running = [e for e in _events(events_path) if e[3].startswith(long_a) and e[1] in ("start", "end")]
    assert [e[1] for e in a_running] == ["start"], "A ended before B: the scenario needs A still running"
    long_d = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a long take D", seed=4, **LONG_D)).id
    d_start = _wait("D to start", lambda: next(
        (e for e in _events(events_path) if e[1] == "start" and e[3].startswith(long_d)), None), 60)
    assert d_start[2] == second, "D must run on the newest replica, the one Serve stops first"

    # A ends; one replica holds work; after the down delay the count drops to 1 while D still runs
    a_end = _wait("A to end", lambda: next(
        (e for e in _events(events_path) if e[1] == "end" and e[3].startswith(long_a)), None), 300)
    stopping = _wait("the downscale", lambda: _running_replicas()[0] == 1 and _running_replicas()[1], 120)
    downscaled_at = time.time()
    d_state = _status(stub, long_d)
    assert d_state.status == video_pb2.IN_PROGRESS, "D finished before the downscale: no drain was exercised"
    assert downscaled_at - a_end[0] >= DOWN_DELAY_S - 1  # not before the down delay

    # the replica chosen for removal is the one running D: D completes, and only then does it stop
    done = _wait("D to complete", lambda: _status(stub, long_d).status in (
        video_pb2.COMPLETED, video_pb2.FAILED, video_pb2.CANCELLED) and _status(stub, long_d), 300)
    assert done.status == video_pb2.COMPLETED, done.error.message
    stop = _wait("the removed replica to stop", lambda: next(
        (e for e in _events(events_path) if e[1] == "stop" and e[2] == second), None), 60)
    d_end = next(e for e in _events(events_path) if e[1] == "end" and e[3].startswith(long_d))
    assert d_end[2] == second and d_end[0] <= stop[0]
    assert _running_replicas()[0] == 1
    for job in (long_a, short_b):
        assert _status(stub, job).status == video_pb2.COMPLETED
    print(f"scaled up after {scaled_up:.0f} s, down {downscaled_at - a_end[0]:.0f} s after A ended; "
          f"states at downscale {stopping}; D drained {stop[0] - downscaled_at:.0f} s")
