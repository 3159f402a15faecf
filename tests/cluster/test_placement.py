"""Config -> Ray Serve deployment options (what Ray actually places is checked in test_placement_served.py)."""

from __future__ import annotations

import pytest

from cluster.config import ReelserveConfig
from cluster.placement import (
    drain_seconds,
    ingress_options,
    longest_denoise_seconds,
    orchestrator_options,
    stage_options,
)


def _options(name: str, **stage) -> dict:
    return stage_options(name, ReelserveConfig(stages={name: stage}, jobs={"max_active_jobs": 8}))


def test_fixed_replicas():
    options = _options("diffusion", num_replicas=3)
    assert options["name"] == "diffusion"
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options


def test_autoscaling_when_num_replicas_is_none():
    options = _options("text_encoder", num_replicas=None, min_replicas=0, max_replicas=4, target_ongoing_requests=1.5)
    assert "num_replicas" not in options
    autoscaling = options["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 4)  # one warm replica: loads take minutes
    assert autoscaling["policy"]["policy_function"] == "cluster.autoscaling:FollowerPolicy"
    default = stage_options("text_encoder", ReelserveConfig(
        stages={"text_encoder": dict(num_replicas=None, min_replicas=0, max_replicas=4, target_ongoing_requests=1.5)},
        jobs={"max_active_jobs": 8}, scaling={"enabled": False},
    ))
    assert default["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 1.5}


def test_actor_resources_without_memory():
    options = _options("muxer", num_cpus=2.0, num_gpus=0.5)
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}


@pytest.mark.parametrize(("memory_gb", "expected"), [(1.0, 1024**3), (1.5, 1610612736), (0.25, 268435456)])
def test_actor_memory_in_bytes(memory_gb, expected):
    options = _options("video_decoder", num_cpus=1.0, num_gpus=1.0, memory_gb=memory_gb)
    actor = options["ray_actor_options"]
    assert actor["memory"] == expected and isinstance(actor["memory"], int)
    assert actor["num_cpus"] == 1.0 and actor["num_gpus"] == 1.0


def test_queue_bounds_pass_through():
    options = _options("diffusion", max_ongoing_requests=2, max_queued_requests=7)
    assert options["max_ongoing_requests"] == 2
    assert options["max_queued_requests"] == 7
    assert options["health_check_period_s"] > 0 and options["graceful_shutdown_timeout_s"] > 0


def test_defaults():
    options = _options("audio_decoder")
    assert options["num_replicas"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 0.1, "num_gpus": 0.0}
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (4, 64)


def test_a_gpu_memory_budget_becomes_a_fraction_of_the_named_accelerator():
    options = _options("text_encoder", accelerator_type="H100", gpu_memory_gb=28.5)
    actor = options["ray_actor_options"]
    assert actor["num_gpus"] == pytest.approx(28.5 / 80, abs=1e-4)
    assert actor["accelerator_type"] == "H100"
    l4 = _options("video_decoder", accelerator_type="L4", gpu_memory_gb=6)["ray_actor_options"]
    assert l4["num_gpus"] == pytest.approx(0.25)


def test_spreading_and_multi_gpu_replicas():
    assert _options("diffusion", max_replicas_per_node=2)["max_replicas_per_node"] == 2
    options = _options("diffusion", num_gpus=4, accelerator_type="H100")
    # The replica holds the first GPU; its three workers hold the rest, all on one node.
    assert options["ray_actor_options"]["num_gpus"] == 1.0
    assert options["placement_group_strategy"] == "STRICT_PACK"
    bundles = options["placement_group_bundles"]
    assert len(bundles) == 4 and all(b["GPU"] == 1.0 for b in bundles)
    assert all(b["accelerator_type:H100"] > 0 for b in bundles)
    with_memory = _options("diffusion", num_gpus=2, memory_gb=64)
    assert with_memory["placement_group_bundles"][0]["memory"] == with_memory["ray_actor_options"]["memory"]


def test_drain_fits_the_longest_job_and_never_exceeds_the_deadline():
    config = ReelserveConfig(
        model={"path": "/m", "max_latent_tokens": 14080, "num_inference_steps": 30, "seconds_per_token_step": 3.5e-4},
        stages={"diffusion": {"max_ongoing_requests": 2}},
    )
    longest = longest_denoise_seconds(config)
    assert longest == pytest.approx(14080 * 30 * 3.5e-4)  # ~148 s: 720p x 5 s on one H100
    assert drain_seconds("diffusion", config) >= 2 * longest
    assert stage_options("diffusion", config)["graceful_shutdown_timeout_s"] == drain_seconds("diffusion", config)
    short = ReelserveConfig(model=config.model.model_dump(), jobs={"job_timeout_s": 60})
    assert drain_seconds("diffusion", short) == 60
    assert all(drain_seconds(name, short) <= 60 for name in short.stages)


def test_ingress_and_orchestrator_options():
    config = ReelserveConfig(
        ingress={"num_replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 64},
        orchestrator={"num_replicas": 3, "num_cpus": 0.2},
    )
    options = ingress_options(config)
    assert options["name"] == "ingress"
    assert options["num_replicas"] == 2
    assert options["ray_actor_options"] == {"num_cpus": 0.5}
    assert options["max_ongoing_requests"] == 64
    assert "autoscaling_config" not in options
    assert options["health_check_period_s"] > 0 and options["graceful_shutdown_timeout_s"] > 0
    orchestrator = orchestrator_options(config)
    assert orchestrator["name"] == "orchestrator" and orchestrator["num_replicas"] == 3
    assert orchestrator["ray_actor_options"] == {"num_cpus": 0.2}


class _Dummy:
    def __call__(self):
        return "ok"


@pytest.mark.parametrize(
    "stage",
    [{}, {"num_replicas": None, "min_replicas": 0, "max_replicas": 3}, {"memory_gb": 2.0, "num_gpus": 1},
     {"num_gpus": 2, "accelerator_type": "H100"}, {"gpu_memory_gb": 20, "accelerator_type": "H100", "max_replicas_per_node": 1}],
    ids=["fixed", "autoscaling", "memory", "two-gpus", "gpu-budget"],
)
def test_serve_accepts_stage_options(stage):
    """Ray Serve itself takes the options (no cluster is started to check this)."""
    import ray  # noqa: PLC0415 - keeps collection of `make check` fast
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    config = ReelserveConfig(stages={"diffusion": stage})
    options = stage_options("diffusion", config)
    deployment = serve.deployment(_Dummy).options(**options)
    assert deployment.name == "diffusion"
    assert deployment.max_ongoing_requests == config.stages["diffusion"].max_ongoing_requests
    assert deployment.ray_actor_options["num_gpus"] == options["ray_actor_options"]["num_gpus"]
    ingress = serve.deployment(_Dummy).options(**ingress_options(config))
    assert ingress.name == "ingress"
    assert not ray.is_initialized()
