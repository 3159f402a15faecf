"""A diffusion replica over two GPUs, served: two gloo ranks in the replica's STRICT_PACK group (the session's
logical GPUs, computing on the CPU).

Runs last on the session's cluster: it redeploys the diffusion application with ``stages.diffusion.num_gpus: 2``
(nothing else restarts). Then a job completes with the output one rank gives, and a worker rank
killed mid-job makes the replica fail its health check: Serve replaces it and the job resumes from its
checkpoint on the new one.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import ray

from cluster.apps import deploy as deploy_applications
from cluster.apps import serve_applications
from serving.proto import video_pb2
from tests.serving.conftest import SLOW, app_of, stage_stats, wait_terminal, wait_until
from tests.serving.test_served_faults import SMALL, Watcher, _replica_actors, _uninterrupted_latents

pytestmark = pytest.mark.cluster  # runs on the session's Ray cluster: not in `make check`


def _create(stub, prompt: str, **fields) -> video_pb2.Video:
    return stub.CreateVideo(video_pb2.CreateVideoRequest(prompt=prompt, **{**SMALL, **fields}))


def _where() -> dict:
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    return serve.get_deployment_handle("diffusion", app_of("diffusion")).placement.remote().result()


@pytest.fixture(scope="module")
def two_ranks(served):
    """The diffusion application redeployed with 2 GPUs per replica (one replica, one job at a time).

    Only that application: the front keeps the session's config (a config edit would rebuild it too, and its
    rolling restart is what the other modules test), so this costs one diffusion start."""
    others = {name: [a["name"] for a in _replica_actors(name)] for name in ("text_encoder", "video_decoder", "ingress")}
    config = copy.deepcopy(served["config"])
    config["stages"]["diffusion"] = {"num_gpus": 2, "device": "cpu", "num_replicas": 1, "max_ongoing_requests": 1,
                                     "max_queued_requests": 16}
    overrides = {name: options for name, options in served["overrides"].items() if name != "diffusion"}
    running = serve_applications(served["config"], served["overrides"])
    wanted = serve_applications(config, overrides)
    deploy_applications([running[0], *wanted[1:]])
    served["config"], served["overrides"] = config, overrides  # what the tests below compare against
    assert {name: [a["name"] for a in _replica_actors(name)] for name in others} == others  # only diffusion restarted
    return config


def test_a_two_rank_replica_serves_a_job_equal_to_one_ranks_output(served, served_storage, two_ranks, stub, job_store,
                                                                   tiny_checkpoint, figures):
    where = _where()
    assert where["ranks"] == 2
    (worker,) = where["workers"]
    # What Ray did: a GPU for each rank, both on one node (STRICT_PACK); gloo on the CPU (no CUDA here).
    assert where["resources"]["GPU"] == 1 and worker["resources"]["GPU"] == 1
    assert len(where["gpu_ids"]) == 1 and len(worker["gpu_ids"]) == 1 and where["gpu_ids"] != worker["gpu_ids"]
    assert worker["node_id"] == where["node_id"]
    assert (worker["rank"], worker["device"], worker["backend"]) == (1, "cpu", "gloo")

    prompt = "a red kite over dunes"
    created = _create(stub, prompt, seed=17)
    final = wait_terminal(stub, created.id)
    assert final.status == video_pb2.COMPLETED, final.error.message
    kept = served_storage.load_output(created.id, job_store.get(created.id).attempts, "video_latents")
    expected = _uninterrupted_latents(served, tiny_checkpoint, prompt, seed=17)  # one rank, in this process
    difference = float(np.abs(kept.latents.to().numpy() - expected).max())
    assert difference <= 1e-4
    figures["two_rank_vs_one_rank_max_abs_difference"] = difference


def test_losing_a_worker_rank_replaces_the_replica_and_the_job_resumes_from_its_checkpoint(
    served, two_ranks, stub, job_store, figures
):
    before = {a["name"] for a in _replica_actors("diffusion")}
    (worker,) = stage_stats("diffusion")["rank_workers"]
    created = _create(stub, f"a slow tide {SLOW}", seed=18)
    watcher = Watcher(stub, created.id)
    wait_until(lambda: job_store.get(created.id).step >= 5, timeout_s=60, what="five denoising steps")
    (found,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == worker]
    ray.kill(ray.get_actor(worker, namespace=found["namespace"]), no_restart=True)
    final = wait_terminal(stub, created.id, timeout_s=240)
    assert final.status == video_pb2.COMPLETED, final.error.message
    assert final.HasField("resumed_from_step") and final.resumed_from_step >= 4  # checkpoints every 2 steps
    assert job_store.get(created.id).attempts == 1  # the stage call went to the new replica; no takeover
    after = {a["name"] for a in _replica_actors("diffusion")}
    assert after.isdisjoint(before) and len(after) == 1  # the replica that lost its rank is gone
    assert _where()["ranks"] == 2
    figures["worker_loss_resumed_from_step"] = final.resumed_from_step
    watcher._thread.join(10)
    watcher.assert_never_went_back()
