"""Jobs that survive faults, scaling and rollouts, on the session's real cluster (Ray + Redis).

Each case asserts the terminal state, the error code and message, and that the
progress a client watched never went back. Faults are injected through the
config (``faults``), keyed by a marker in the prompt. The cases that redeploy
or scale the app run last; the app stays as they leave it (one diffusion replica).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import ray

from cluster.config import ReelserveConfig
from serving.families import get_family
from serving.proto import video_pb2
from serving.protocol import RenderPlan
from tests.serving.conftest import (
    LONG,
    SLOW,
    SLOWER,
    STEPS,
    app_of,
    bearer,
    bucket_keys,
    deploy,
    diffusion_autoscaling,
    stage_stats,
    wait_terminal,
    wait_until,
)

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

# Every call of these tests is the tenant "tests"'s (the session app requires API keys).
_http = httpx.Client(headers=bearer(), timeout=60)

SMALL = dict(seconds=1.0, size="64x64")


class Watcher:
    """Follows a job's WatchVideo stream in the background and keeps every event."""

    def __init__(self, stub, job_id: str):
        self.events: list[video_pb2.Video] = []
        self.heartbeats = 0
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._follow, args=(stub, job_id), daemon=True)
        self._thread.start()

    def _follow(self, stub, job_id: str) -> None:
        try:
            for event in stub.WatchVideo(video_pb2.WatchVideoRequest(id=job_id)):
                if event.heartbeat:
                    self.heartbeats += 1  # the job is alive, nothing rose: not a progress event
                    continue
                self.events.append(event.video)
        except grpc.RpcError as error:
            self.error = error

    def progress(self) -> list[int]:
        return [e.progress for e in self.events]

    def assert_never_went_back(self) -> None:
        """Each event rises, except the last (the job's end), which may repeat the progress it ended at."""
        progress = self.progress()
        rising = progress[:-1]
        assert progress and all(b > a for a, b in zip(rising, rising[1:])), progress
        assert progress[-1] >= progress[-2 if len(progress) > 1 else -1], progress
        assert self.events[-1].status in (video_pb2.COMPLETED, video_pb2.FAILED, video_pb2.CANCELLED)


def _create(stub, prompt: str, **fields) -> video_pb2.Video:
    return stub.CreateVideo(video_pb2.CreateVideoRequest(prompt=prompt, **{**SMALL, **fields}))


def _replica_actors(deployment: str) -> list:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]


def _live_diffusion(job_store) -> list:
    return job_store.live_replicas("diffusion")


def _kill(actor: dict) -> None:
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)


def _kill_orchestrator_holding(job_id: str, job_store) -> str:
    """Kill the orchestrator replica that runs ``job_id`` (Serve starts a new one); return the dead owner's name.

    An orchestrator records itself as ``orchestrator-<replica id>``, and Serve names the replica's actor after
    the same id.
    """
    owner = wait_until(lambda: job_store.get(job_id).owner, what="an orchestrator claiming the job")
    replica_id = owner.removeprefix("orchestrator-")
    victims = [a for a in _replica_actors("orchestrator") if a["name"].endswith(f"#{replica_id}")]
    assert len(victims) == 1, (owner, _replica_actors("orchestrator"))
    _kill(victims[0])
    return owner


# ---------------------------------------------------------------------------- failures name their stage


def test_a_diffusion_oom_fails_the_job_naming_diffusion_and_the_replica_serves_on(stub):
    failed = _create(stub, "a fox in the snow [oom]", seed=4)
    watcher = Watcher(stub, failed.id)
    final = wait_terminal(stub, failed.id)
    assert final.status == video_pb2.FAILED
    assert final.error.code == "resource_exhausted"
    assert "diffusion stage ran out of memory" in final.error.message and "64x64" in final.error.message
    assert "Traceback" not in final.error.message and "\n" not in final.error.message
    watcher._thread.join(10)
    watcher.assert_never_went_back()

    after = [_create(stub, f"a fox in the snow, take {i}", seed=4) for i in range(2)]  # one per diffusion replica
    assert all(wait_terminal(stub, job.id).status == video_pb2.COMPLETED for job in after)


def test_cancel_during_decode_ends_cancelled(stub):
    created = _create(stub, "waves at night [stall-decoder]")
    watcher = Watcher(stub, created.id)
    wait_until(lambda: stub.GetVideo(video_pb2.GetVideoRequest(id=created.id)).stage == "decoders",
               what="the job reaching the decoders")
    started = time.time()
    stub.CancelVideo(video_pb2.CancelVideoRequest(id=created.id))
    final = wait_terminal(stub, created.id, timeout_s=20)
    assert final.status == video_pb2.CANCELLED
    assert time.time() - started < 10, "the stalled decoder call was not cancelled"
    assert final.step == STEPS  # diffusion had finished: only decode was cut
    watcher._thread.join(10)
    watcher.assert_never_went_back()


# ---------------------------------------------------------------------------- work is resumed, never redone


def test_a_diffusion_replica_killed_mid_denoise_resumes_from_its_checkpoint(served, served_storage, stub,
                                                                             tiny_checkpoint, figures):
    """The replica dies after step 7; the retried call resumes at the last checkpoint (in the bucket) and the output
    is the same."""
    prompt = "a heron takes off from a lake [kill-diffusion]"
    created = _create(stub, prompt, seed=11)
    watcher = Watcher(stub, created.id)
    final = wait_terminal(stub, created.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert final.HasField("resumed_from_step")
    assert 0 < final.resumed_from_step <= 7  # checkpoints every 2 steps: step 6, not 0
    assert final.attempts == 1  # the same orchestrator retried the stage; no takeover
    figures["diffusion_kill_step"], figures["diffusion_resumed_from_step"] = 7, final.resumed_from_step
    watcher._thread.join(10)
    watcher.assert_never_went_back()

    kept_keys = bucket_keys(served, created.id)["artifacts-store"]
    assert any(key.startswith(f"artifacts/{created.id}/1/checkpoint-") for key in kept_keys)
    assert f"results/{created.id}/1/video.mp4" in bucket_keys(served, created.id)["results-store"]
    kept = served_storage.load_output(created.id, 1, "video_latents")
    expected = _uninterrupted_latents(served, tiny_checkpoint, prompt, seed=11)
    assert float(np.abs(kept.latents.to().numpy() - expected).max()) <= 1e-4


def _uninterrupted_latents(served, tiny_checkpoint, prompt: str, seed: int) -> np.ndarray:
    """The same job run in this process from start to end, with the served model settings."""
    config = ReelserveConfig.model_validate(served["config"])
    model = config.stage_model("diffusion")
    family = get_family(model.family)
    embeddings = family.stage("text_encoder").component(model).encode(prompt, model.negative_prompt)
    plan = RenderPlan.build(width=64, height=64, fps=24, seconds=1.0, seed=seed,
                            num_inference_steps=model.num_inference_steps, frame_step=8)
    return family.diffusion_model(model).denoise(embeddings, None, plan).video.latents.to().numpy()


def test_a_cuda_error_other_than_oom_replaces_the_replica_and_the_job_completes_elsewhere(served, stub, job_store,
                                                                                         figures):
    """An illegal memory access (injected) in the job's pass at step 4: the replica is lost and ends, Serve starts
    another, and the job goes on at once on the other replica from its checkpoint of step 2 (no takeover)."""
    # Two replicas (an earlier test's killed replica may still be coming back).
    before = wait_until(lambda: len(now := {a["name"] for a in _replica_actors("diffusion")}) == 2 and now,
                        timeout_s=120, what="two diffusion replicas")
    wait_until(lambda: len(_live_diffusion(job_store)) == 2, timeout_s=120, what="both replicas taking jobs")
    created = _create(stub, "a lighthouse in fog [gpu-error]", seed=13)
    watcher = Watcher(stub, created.id)
    final = wait_terminal(stub, created.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert final.resumed_from_step == 2  # the last checkpoint before the broken pass; nothing else redone
    record = job_store.get(created.id)
    assert (record.attempts, record.takeovers) == (1, 0)  # the stage call was handed on, the job never failed
    lost = wait_until(lambda: (gone := before - {a["name"] for a in _replica_actors("diffusion")}) and gone,
                      timeout_s=30, what="the broken replica ending")
    assert len(lost) == 1
    assert _ran_on(created.id) != lost.pop().rsplit("#", 1)[-1]  # denoised elsewhere
    replaced = wait_until(lambda: len(now := {a["name"] for a in _replica_actors("diffusion")}) == 2 and now,
                          timeout_s=120, what="Serve replacing the lost replica")
    assert len(replaced - before) == 1
    figures["device_error_resumed_from_step"] = final.resumed_from_step
    watcher._thread.join(10)
    watcher.assert_never_went_back()


def test_an_orchestrator_replica_killed_mid_job_is_taken_over(served, served_storage, stub, job_store, figures):
    """The successor resumes denoising from the bucket's checkpoints. The kept prompt embeddings it would skip
    the text encoder with are unreadable by then: it runs the text encoder again instead of failing."""
    created = _create(stub, f"a train crosses a bridge {SLOW}", seed=5)
    watcher = Watcher(stub, created.id)
    wait_until(lambda: job_store.get(created.id).step >= 3, what="three denoising steps")
    dead = _kill_orchestrator_holding(created.id, job_store)
    killed_at = time.time()
    encoded = stage_stats("text_encoder")["requests_total"]
    spoiled = f"artifacts/{created.id}/1/prompt_embeddings.safetensors"
    served_storage.artifacts.put(spoiled, served_storage.artifacts.get(spoiled)[:-100])  # truncated
    wait_until(lambda: (r := job_store.get(created.id)).owner not in (None, dead) and r, timeout_s=30,
               what="another orchestrator taking the job over")
    figures["takeover_delay_s"] = round(time.time() - killed_at, 2)

    final = wait_terminal(stub, created.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    record = job_store.get(created.id)
    assert record.takeovers == 1 and record.attempts == 2
    assert record.resumed_from_step is not None and record.resumed_from_step >= 2  # denoising was not redone
    assert "text_encoder" in record.done_stages
    watcher._thread.join(10)
    watcher.assert_never_went_back()
    # In the bucket: the first attempt's checkpoints the second resumed from, and only the second's MP4.
    stored = bucket_keys(served, created.id)
    assert any(key.startswith(f"artifacts/{created.id}/1/checkpoint-") for key in stored["artifacts-store"])
    assert any(key.startswith(f"artifacts/{created.id}/2/") for key in stored["artifacts-store"])
    assert record.result_attempt == 2
    assert {k for k in stored["results-store"] if k.startswith("results/")} == {f"results/{created.id}/2/video.mp4"}
    assert stage_stats("text_encoder")["requests_total"] == encoded + 1  # redone once, not failed
    assert f"{spoiled} is unreadable" in _replica_logs("diffusion")


def test_a_takeover_after_the_decoders_redoes_neither_decoder_and_leaves_one_mp4(served, stub, job_store, probe_mp4,
                                                                                  tmp_path):
    """Two overlapping attempts: the first owner dies while its muxer call stalls; the call runs on after the
    second attempt completed. Exactly one MP4 is left, the accepted attempt's."""
    created = _create(stub, "a windmill turning [stall-muxer]", seed=12)
    wait_until(lambda: job_store.get(created.id).stage == "muxer", timeout_s=60, what="the job reaching the muxer")
    decoded = stage_stats("video_decoder")["requests_total"]
    refused = stage_stats("muxer")["extra"].get("stale_results_refused_total", 0)
    _kill_orchestrator_holding(created.id, job_store)
    final = wait_terminal(stub, created.id, timeout_s=90)
    record = job_store.get(created.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert record.takeovers == 1 and {"video_decoder", "audio_decoder", "diffusion"} <= set(record.done_stages)
    assert stage_stats("video_decoder")["requests_total"] == decoded  # the successor read the kept H.264

    # The first attempt's muxer call wakes 20 s after it began, after the second attempt completed.
    wait_until(lambda: stage_stats("muxer")["extra"].get("stale_results_refused_total", 0) > refused, timeout_s=40,
               interval_s=0.5, what="the replaced attempt's muxer call ending")
    assert record.result_attempt == 2
    results = {k for k in bucket_keys(served, created.id)["results-store"] if k.startswith("results/")}
    assert results == {f"results/{created.id}/2/video.mp4"}
    path = tmp_path / "one.mp4"
    path.write_bytes(_http.get(f"{served['http']}/v1/videos/{created.id}/content", follow_redirects=True).content)
    assert probe_mp4(path)["video_streams"] == 1


def test_the_deadline_counts_from_the_first_start_across_attempts(served, stub, job_store):
    """A stalled job whose orchestrator dies fails at its first start + job_timeout_s, not a timeout later."""
    timeout = served["config"]["jobs"]["job_timeout_s"]
    created = _create(stub, "a clock tower [stall-diffusion]")
    watcher = Watcher(stub, created.id)
    wait_until(lambda: job_store.get(created.id).stage == "diffusion", what="the job reaching diffusion")
    _kill_orchestrator_holding(created.id, job_store)
    wait_until(lambda: job_store.get(created.id).attempts == 2, timeout_s=30, what="a second attempt")

    final = wait_terminal(stub, created.id, timeout_s=timeout + 30)
    record = job_store.get(created.id)
    assert final.status == video_pb2.FAILED
    assert final.error.code == "deadline_exceeded" and "job_timeout_s" in final.error.message
    assert record.attempts == 2 and record.deadline_at == pytest.approx(record.started_at + timeout)
    assert timeout <= record.completed_at - record.started_at <= timeout + 5
    watcher._thread.join(10)
    watcher.assert_never_went_back()


def test_redis_stopped_for_20_s_mid_job_and_restarted(served, stub, job_store):
    redis = served["redis"]
    created = _create(stub, f"a kite over a beach {SLOW}", seed=8)
    watcher = Watcher(stub, created.id)
    wait_until(lambda: job_store.get(created.id).step >= 2, what="two denoising steps")
    step_before = job_store.get(created.id).step
    redis.stop()
    try:
        refusals = []
        for _ in range(3):
            response = _http.post(served["http"] + "/v1/videos", json={"prompt": "in between", **{"size": "64x64"}})
            refusals.append(response)
            with pytest.raises(grpc.RpcError) as raised:
                _create(stub, "in between too")
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(5)
        assert all(r.status_code == 503 for r in refusals), [r.text for r in refusals]
        assert all("unreachable" in r.json()["error"]["message"] and r.headers["retry-after"] for r in refusals)
        assert "Traceback" not in refusals[0].text
    finally:
        redis.start()

    final = wait_terminal(stub, created.id, timeout_s=120)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert final.step == STEPS > step_before
    record = job_store.get(created.id)
    assert (record.attempts, record.takeovers) == (1, 0)  # the outage was no crash: its owner kept it
    assert _http.post(served["http"] + "/v1/videos", json={"prompt": "after", "size": "64x64"}).status_code == 200
    watcher._thread.join(30)
    assert watcher.events[-1].status == video_pb2.COMPLETED  # the stream rode out the outage
    watcher.assert_never_went_back()


# ---------------------------------------------------------------------------- storage faults


class _Exploit:
    """Pickled, it runs a shell command when unpickled: stored bytes must never be."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _replica_logs(stage: str) -> str:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return "".join(f.read_text(errors="ignore") for f in logs.glob(f"replica_*_{stage}_*.log"))


def test_unreadable_checkpoints_are_redone_never_executed(served_storage, stub, tmp_path):
    """The diffusion replica dies after step 5; while the retried call waits, its checkpoints become a truncated
    file and a pickle. The job completes: denoising starts over, and the log names each unreadable checkpoint."""
    created = _create(stub, f"a lantern in the fog [corrupt] {SLOW}", seed=13)
    watcher = Watcher(stub, created.id)
    wait_until(lambda: served_storage.newest_checkpoint_step(created.id, 1) == 4, timeout_s=60, interval_s=0.1,
               what="the checkpoint of step 4")
    time.sleep(1.0)  # the replica died after step 5; the retried call waits 4 s before it reads a checkpoint
    keys = sorted(info.key for info in served_storage.artifacts.list(f"artifacts/{created.id}/1/")
                  if "/checkpoint-" in info.key)
    assert len(keys) == 2, keys
    marker = tmp_path / "unpickled"
    truncated = served_storage.artifacts.get(keys[0])[:1000]
    served_storage.artifacts.put(keys[0], truncated)
    served_storage.artifacts.put(keys[1], pickle.dumps(_Exploit(marker)))

    final = wait_terminal(stub, created.id, timeout_s=120)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert not final.HasField("resumed_from_step")  # nothing readable to resume from: the steps were redone
    assert not marker.exists(), "stored bytes were unpickled"
    logs = _replica_logs("diffusion")
    for key in keys:
        assert f"{key} is unreadable" in logs, key
    watcher._thread.join(10)
    watcher.assert_never_went_back()


def test_s3_stopped_for_10_s_mid_job(served, stub, job_store, photos):
    """The muxer's put meets the outage and waits it out; submissions in between get 503 / UNAVAILABLE."""
    s3, base = served["s3"], served["http"] + "/v1/videos"
    created = _create(stub, "a paper boat on a stream [mux-later]", seed=10)
    watcher = Watcher(stub, created.id)
    wait_until(lambda: job_store.get(created.id).stage == "muxer", timeout_s=60, what="the job reaching the muxer")
    s3.stop()  # its objects come back with it; the muxer's put comes within its 10 s down
    stopped = time.time()
    try:
        refusals, codes = [], []
        while time.time() - stopped < 6:
            refusals.append(_http.post(base, json={"prompt": "in between", "size": "64x64"}, timeout=30))
            refusals.append(_http.post(base, data={"prompt": "with a photo", "size": "64x64"}, timeout=30,
                                       files={"input_reference": ("p.jpg", photos.jpeg, "image/jpeg")}))
            with pytest.raises(grpc.RpcError) as raised:
                _create(stub, "in between too")
            codes.append(raised.value.code())
        assert all(r.status_code == 503 for r in refusals), [r.text for r in refusals]
        assert all("storage" in r.json()["error"]["message"] and r.headers["retry-after"] for r in refusals)
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
        time.sleep(max(0.0, 10 - (time.time() - stopped)))
    finally:
        s3.start()

    final = wait_terminal(stub, created.id, timeout_s=120)
    assert final.status == video_pb2.COMPLETED, final.error.message
    record = job_store.get(created.id)
    assert (record.attempts, record.takeovers) == (1, 0)
    assert f"results/{created.id}/1/video.mp4" in bucket_keys(served, created.id)["results-store"]
    assert f"job {created.id}: storing its MP4: storage is unreachable" in _replica_logs("muxer")  # it retried
    assert _http.post(base, json={"prompt": "after", "size": "64x64"}).status_code == 200
    watcher._thread.join(30)
    watcher.assert_never_went_back()


# ---------------------------------------------------------------------------- rollouts and scaling (keep last)


def _override(served, deployment: str, **options) -> None:
    """Change one deployment's options the way an operator edits serveConfigV2: only that deployment updates.

    The session keeps the override, so a later change adds to it.
    """
    overrides = served.setdefault("overrides", {})
    overrides.setdefault(deployment, {}).update(options)
    deploy(served["config"], overrides)


def test_the_ingress_redeployed_mid_job(served, stub, job_store):
    created = _create(stub, f"a harbour at dawn {SLOW}", seed=3)
    watcher = Watcher(stub, created.id)
    wait_until(lambda: job_store.get(created.id).step >= 3, what="three denoising steps")
    old = {a["name"] for a in _replica_actors("ingress")}
    _override(served, "ingress", ray_actor_options={"num_cpus": 0.11})
    wait_until(lambda: old.isdisjoint(a["name"] for a in _replica_actors("ingress")), timeout_s=60,
               what="the old ingress replica stopping")
    final = wait_terminal(stub, created.id)
    record = job_store.get(created.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert (record.attempts, record.takeovers) == (1, 0)  # the job never noticed
    watcher._thread.join(10)
    assert watcher.events[-1].status == video_pb2.COMPLETED or watcher.error is not None


def test_the_orchestrators_redeployed_mid_job_hand_the_job_over(served, stub, job_store, figures):
    created = _create(stub, f"a market at noon {SLOWER}", seed=6)
    wait_until(lambda: job_store.get(created.id).step >= 1, what="denoising under way")
    step_at_rollout = job_store.get(created.id).step
    _override(served, "orchestrator", ray_actor_options={"num_cpus": 0.11})
    final = wait_terminal(stub, created.id)
    record = job_store.get(created.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert record.takeovers == 0 and record.attempts >= 2  # handed over, not crashed
    # The successor resumed from the step denoising stopped at, not from an older periodic checkpoint.
    assert record.resumed_from_step is not None and record.resumed_from_step >= step_at_rollout
    figures["rollout_resumed_from_step"] = record.resumed_from_step


def test_scaling_diffusion_down_while_both_replicas_run_jobs(served, stub, job_store):
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    jobs = [_create(stub, f"a field of sunflowers {SLOW}", seed=seed) for seed in (1, 2)]
    wait_until(lambda: all(job_store.get(j.id).step >= 1 for j in jobs), what="both jobs denoising")
    before = {a["name"] for a in _replica_actors("diffusion")}
    assert len(before) == 2
    _override(served, "diffusion", autoscaling_config=diffusion_autoscaling(served["config"], min_replicas=1,
                                                                             max_replicas=1))
    finals = [wait_terminal(stub, job.id) for job in jobs]
    assert all(f.status == video_pb2.COMPLETED for f in finals), [f.error.message for f in finals]
    assert all(job_store.get(j.id).attempts == 1 for j in jobs)  # drained, not killed: nothing resumed
    assert all(not f.HasField("resumed_from_step") for f in finals)
    remaining = wait_until(lambda: len(r := {a["name"] for a in _replica_actors("diffusion")}) == 1 and r,
                           timeout_s=60, what="the drained replica stopping")
    assert remaining < before  # one of the two was kept: a scale change restarts nothing
    diffusion = serve.status().applications[app_of("diffusion")].deployments["diffusion"]
    assert sum(diffusion.replica_states.values()) == 1


def test_a_burst_scales_diffusion_up_and_back_and_the_removed_replica_finishes_its_job(served, stub, job_store):
    """Diffusion autoscaled 1..2 on its backlog in GPU-seconds (cluster.autoscaling), as local-cpu runs it.

    A long job A holds the only replica and a medium job B waits behind it, so a second replica comes. A long
    job D starts on that replica (B is done, A still runs). When A ends, the count drops back to 1 after the
    down delay; Serve stops the newest replica, the one running D, which drains: D completes there. B lasts
    long enough that D, started after it, still runs a down delay after A ends.
    """
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    _override(served, "diffusion", autoscaling_config=diffusion_autoscaling(served["config"], min_replicas=1,
                                                                             max_replicas=2))

    def replicas() -> int:
        return serve.status().applications[app_of("diffusion")].deployments["diffusion"].replica_states.get("RUNNING", 0)

    wait_until(lambda: replicas() == 1, timeout_s=120, what="one diffusion replica")
    first = {a["name"] for a in _replica_actors("diffusion")}
    a = _create(stub, f"a long take A {LONG}", seed=1)
    wait_until(lambda: job_store.get(a.id).step >= 1, timeout_s=120, what="A denoising")
    b = _create(stub, f"a medium one B {SLOWER}", seed=2)
    wait_until(lambda: replicas() == 2, timeout_s=120, what="a second diffusion replica")
    second = {x["name"] for x in _replica_actors("diffusion")} - first
    assert len(second) == 1
    assert wait_terminal(stub, b.id).status == video_pb2.COMPLETED
    assert not job_store.get(a.id).status.is_terminal, "A ended before B: the scenario needs A still running"

    d = _create(stub, f"a long take D {LONG}", seed=4)
    wait_until(lambda: job_store.get(d.id).step >= 1, timeout_s=120, what="D denoising")
    assert wait_terminal(stub, a.id, timeout_s=300).status == video_pb2.COMPLETED
    a_ended = time.time()
    wait_until(lambda: replicas() == 1, timeout_s=120, what="the scale-down")
    assert time.time() - a_ended >= 10  # not before the down delay (15 s, less the metrics push lag)
    assert not job_store.get(d.id).status.is_terminal, "D finished before the scale-down: nothing drained"

    final = wait_terminal(stub, d.id, timeout_s=300)
    record = job_store.get(d.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert record.attempts == 1 and record.resumed_from_step is None  # drained where it ran, not resumed
    removed = second.pop().rsplit("#", 1)[-1]
    assert _ran_on(d.id) == removed, "D did not run on the replica Serve removed"
    wait_until(lambda: all(not x["name"].endswith(removed) for x in _replica_actors("diffusion")), timeout_s=60,
               what="the removed replica stopping once D was done")


def _ran_on(job_id: str) -> str:
    """The diffusion replica that denoised the job, from the replicas' own logs (Serve names them by replica)."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    hosts = [f.stem.rsplit("_", 1)[-1] for f in logs.glob("replica_*_diffusion_*.log")
             if f"job {job_id} denoised" in f.read_text(errors="ignore")]
    assert len(hosts) == 1, hosts
    return hosts[0]
