"""Config -> Ray Serve deployment options."""

from __future__ import annotations

import pytest

from cluster.config import IngressConfig, StageConfig
from cluster.placement import ingress_options, stage_options


def test_fixed_replicas():
    options = stage_options("diffusion", StageConfig(num_replicas=3))
    assert options["name"] == "diffusion"
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options


def test_autoscaling_when_num_replicas_is_none():
    stage = StageConfig(num_replicas=None, min_replicas=0, max_replicas=4, target_ongoing_requests=1.5)
    options = stage_options("text_encoder", stage)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 1.5}


def test_actor_resources_without_memory():
    options = stage_options("muxer", StageConfig(num_cpus=2.0, num_gpus=0.5))
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}


@pytest.mark.parametrize(("memory_gb", "expected"), [(1.0, 1024**3), (1.5, 1610612736), (0.25, 268435456)])
def test_actor_memory_in_bytes(memory_gb, expected):
    options = stage_options("video_decoder", StageConfig(num_cpus=1.0, num_gpus=1.0, memory_gb=memory_gb))
    actor = options["ray_actor_options"]
    assert actor["memory"] == expected and isinstance(actor["memory"], int)
    assert actor["num_cpus"] == 1.0 and actor["num_gpus"] == 1.0


def test_queue_bounds_pass_through():
    options = stage_options("diffusion", StageConfig(max_ongoing_requests=2, max_queued_requests=7))
    assert options["max_ongoing_requests"] == 2
    assert options["max_queued_requests"] == 7
    assert options["health_check_period_s"] > 0 and options["graceful_shutdown_timeout_s"] > 0


def test_defaults():
    options = stage_options("audio_decoder", StageConfig())
    assert options["num_replicas"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 0.1, "num_gpus": 0.0}
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (4, 64)


def test_ingress_options():
    options = ingress_options(IngressConfig(num_replicas=2, num_cpus=0.5, max_ongoing_requests=64))
    assert options["name"] == "ingress"
    assert options["num_replicas"] == 2
    assert options["ray_actor_options"] == {"num_cpus": 0.5}
    assert options["max_ongoing_requests"] == 64
    assert "autoscaling_config" not in options
    assert options["health_check_period_s"] > 0 and options["graceful_shutdown_timeout_s"] > 0


class _Dummy:
    def __call__(self):
        return "ok"


@pytest.mark.parametrize(
    "stage",
    [StageConfig(), StageConfig(num_replicas=None, min_replicas=0, max_replicas=3), StageConfig(memory_gb=2.0, num_gpus=1)],
    ids=["fixed", "autoscaling", "memory"],
)
def test_serve_accepts_stage_options(stage):
    """Ray Serve itself takes the options (no cluster is started to check this)."""
    import ray
    from ray import serve

    options = stage_options("diffusion", stage)
    deployment = serve.deployment(_Dummy).options(**options)
    assert deployment.name == "diffusion"
    assert deployment.max_ongoing_requests == stage.max_ongoing_requests
    assert deployment.max_queued_requests == stage.max_queued_requests
    assert deployment.ray_actor_options["num_gpus"] == stage.num_gpus
    ingress = serve.deployment(_Dummy).options(**ingress_options(IngressConfig()))
    assert ingress.name == "ingress"
    assert not ray.is_initialized()
