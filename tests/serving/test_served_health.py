"""Replica lifecycle on the session's cluster: a jobs-only change restarts no stage, readiness gates traffic,
a poisoned input is set aside.

Runs after ``test_served_faults.py`` (diffusion is down to one replica there); it holds diffusion at one
replica taking two jobs at once, so two jobs share its batches.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.jobs.quarantine import STRIKES
from serving.proto import video_pb2
from tests.serving.conftest import (
    SLOWER,
    WARMUP_STALL_S,
    app_of,
    deploy,
    diffusion_autoscaling,
    stage_stats,
    wait_terminal,
    wait_until,
)
from tests.serving.test_served_faults import SMALL, Watcher, _replica_actors, _uninterrupted_latents

pytestmark = pytest.mark.cluster  # runs on the session's Ray cluster: not in `make check`


def _create(stub, prompt: str, **fields) -> video_pb2.Video:
    return stub.CreateVideo(video_pb2.CreateVideoRequest(prompt=prompt, **{**SMALL, **fields}))


def _override(served, deployment: str, wait: bool = True, **options) -> None:
    overrides = served.setdefault("overrides", {})
    overrides.setdefault(deployment, {}).update(options)
    deploy(served["config"], overrides, wait=wait)


def _replica_states(deployment: str) -> dict:
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    return dict(serve.status().applications[app_of(deployment)].deployments[deployment].replica_states)


def _stage_replicas() -> dict[str, set[str]]:
    """Every stage's replica actors (the rewriter and the muxer included), by stage."""
    stages = ("prompt_rewriter", "text_encoder", "image_conditioner", "diffusion", "video_decoder", "audio_decoder",
              "muxer")
    return {stage: {a["name"] for a in _replica_actors(stage)} for stage in stages}


def test_a_jobs_only_config_change_restarts_no_stage(served, stub, figures):
    """``jobs.max_active_jobs`` changed on the running cluster: only the front application (ingress and
    orchestrators) is rebuilt; every stage replica keeps its process, and its loaded, warmed-up weights."""
    stages = _stage_replicas()
    front = {a["name"] for a in _replica_actors("orchestrator") + _replica_actors("ingress")}
    served["config"]["jobs"]["max_active_jobs"] += 1
    deploy(served["config"], served["overrides"])
    assert _stage_replicas() == stages
    assert front.isdisjoint(a["name"] for a in _replica_actors("orchestrator") + _replica_actors("ingress"))
    assert wait_terminal(stub, _create(stub, "after the change", seed=3).id).status == video_pb2.COMPLETED
    figures["jobs_only_change_restarted_stage_replicas"] = 0
    for stage in ("text_encoder", "image_conditioner", "diffusion", "video_decoder", "audio_decoder"):
        stats = stage_stats(stage)
        figures.setdefault("warmup_seconds", {})[stage] = round(stats["warmup_seconds"], 3)
        figures.setdefault("component_load_seconds", {})[stage] = {
            component: round(seconds, 3) for component, seconds in stats["component_load_seconds"].items()}


def test_no_job_goes_to_a_replica_that_is_still_warming_up(served, stub, figures):
    """A second video decoder warms up for 45 s (slow_warmup; its constructor has not returned). Meanwhile Serve
    reports it STARTING, and three jobs all decode on the warm one: none waits for the warming one."""
    served_before = stage_stats("video_decoder")["requests_total"]
    _override(served, "video_decoder", wait=False, num_replicas=2)
    started = time.monotonic()
    wait_until(lambda: _replica_states("video_decoder").get("STARTING") == 1, timeout_s=30,
               what="a second video decoder starting")
    jobs = [_create(stub, f"a paper boat, take {index}", seed=30 + index) for index in range(3)]
    finals = [wait_terminal(stub, job.id, timeout_s=60) for job in jobs]
    assert all(f.status == video_pb2.COMPLETED for f in finals), [f.error.message for f in finals]
    assert time.monotonic() - started < WARMUP_STALL_S  # all done while the new replica still warms up
    figures["jobs_done_while_a_replica_warmed_up_s"] = round(time.monotonic() - started, 1)
    assert _replica_states("video_decoder") == {"RUNNING": 1, "STARTING": 1}  # its health: starting
    assert stage_stats("video_decoder")["requests_total"] == served_before + 3  # the warm replica decoded all
    _override(served, "video_decoder", num_replicas=1)  # Serve stops the replica that is still starting
    assert _replica_states("video_decoder") == {"RUNNING": 1}


def test_a_poison_input_is_set_aside_after_two_lost_replicas_and_its_batch_mate_completes(
    served, served_storage, stub, job_store, tiny_checkpoint, figures
):
    """A poisoned job shares a pass with a healthy one and breaks the replica (an illegal memory access, every
    time it runs). Both are suspects then and run apart; the poisoned one breaks the next replica alone and is
    quarantined (poison_input); its batch-mate resumes from its checkpoint on a third replica and completes with
    the output of an uninterrupted run."""
    held = diffusion_autoscaling(served["config"], min_replicas=1, max_replicas=1)
    # Two jobs on the one replica: Serve's option (no restart) and the runners' count of diffusion's slots (they
    # start a queued job only into a free slot; the front application restarts to learn it).
    served["config"]["stages"]["diffusion"]["max_ongoing_requests"] = 2
    _override(served, "diffusion", autoscaling_config=held, max_ongoing_requests=2)
    first = {a["name"] for a in _replica_actors("diffusion")}
    assert len(first) == 1
    mate_prompt = f"a quiet meadow {SLOWER}"  # still denoising when the poisoned job joins, even on a busy machine
    mate = _create(stub, mate_prompt, seed=21)
    watcher = Watcher(stub, mate.id)
    wait_until(lambda: job_store.get(mate.id).step >= 1, timeout_s=60, what="the batch-mate denoising")
    poison = _create(stub, "a glitch in the sky [poison]", seed=22)
    try:
        final = wait_terminal(stub, poison.id, timeout_s=240)
        assert final.status == video_pb2.FAILED
        assert final.error.code == "poison_input", final.error.message
        assert "broke 2 diffusion replicas" in final.error.message and "\n" not in final.error.message
        mate_final = wait_terminal(stub, mate.id, timeout_s=240)
        assert mate_final.status == video_pb2.COMPLETED, mate_final.error.message
        assert mate_final.HasField("resumed_from_step")  # resumed from a checkpoint, not redone

        def kept(job_id: str, name: str):
            return served_storage.load_output(job_id, job_store.get(job_id).attempts, name)

        assert kept(poison.id, STRIKES).strikes == 2
        assert kept(mate.id, STRIKES).strikes == 1  # blamed once, as a batch-mate; never again once apart
        assert job_store.get(mate.id).attempts == 1  # the stage calls were handed on; the job never failed
        latents = kept(mate.id, "video_latents")
        expected = _uninterrupted_latents(served, tiny_checkpoint, mate_prompt, seed=21)
        assert float(np.abs(latents.latents.to().numpy() - expected).max()) <= 1e-4
        replicas = wait_until(lambda: len(now := {a["name"] for a in _replica_actors("diffusion")}) == 1 and now,
                              timeout_s=120, what="one diffusion replica again")
        assert replicas.isdisjoint(first)  # the replica that ran both was replaced
        figures["poison_replicas_lost"] = 2
        watcher._thread.join(10)
        watcher.assert_never_went_back()
    finally:
        served["config"]["stages"]["diffusion"]["max_ongoing_requests"] = 1
        _override(served, "diffusion", max_ongoing_requests=1)
