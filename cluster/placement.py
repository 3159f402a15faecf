"""Config -> Ray Serve deployment options, in one place.

Stage classes stay undecorated; everything Serve needs (replicas or
autoscaling, resources, queue bounds, health checks) is derived here from
``StageConfig``. Hand-written ``ray_actor_options`` are not accepted: set the
config fields instead.
"""

from __future__ import annotations

from cluster.config import IngressConfig, StageConfig

__all__ = ["stage_options", "ingress_options"]

_HEALTH_CHECK_PERIOD_S = 5.0
_GRACEFUL_SHUTDOWN_S = 2.0


def stage_options(name: str, stage: StageConfig) -> dict:
    """Options for ``serve.deployment(cls).options(**...)`` of the stage ``name``."""
    actor_options: dict = {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus}
    if stage.memory_gb is not None:
        actor_options["memory"] = int(stage.memory_gb * 1024**3)
    options = dict(
        name=name,
        ray_actor_options=actor_options,
        max_ongoing_requests=stage.max_ongoing_requests,
        max_queued_requests=stage.max_queued_requests,
        health_check_period_s=_HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S,
    )
    if stage.num_replicas is not None:
        options["num_replicas"] = stage.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": stage.min_replicas,
            "max_replicas": stage.max_replicas,
            "target_ongoing_requests": stage.target_ongoing_requests,
        }
    return options


def ingress_options(ingress: IngressConfig) -> dict:
    return dict(
        name="ingress",
        num_replicas=ingress.num_replicas,
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_ongoing_requests=ingress.max_ongoing_requests,
        health_check_period_s=_HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S,
    )
