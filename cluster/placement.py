"""Config -> Ray Serve deployment options, in one place.

Stage classes stay undecorated; everything Serve needs (replicas or
autoscaling, resources, accelerator, spreading, queue bounds, health checks,
drain time) is derived here from the one ``ReelserveConfig``. Hand-written
``ray_actor_options`` are not accepted: set the config fields instead.
"""

from __future__ import annotations

from cluster.autoscaling import autoscaling_config
from cluster.config import ReelserveConfig, StageConfig

__all__ = ["stage_options", "ingress_options", "orchestrator_options", "drain_seconds", "longest_denoise_seconds"]

_HEALTH_CHECK_PERIOD_S = 5.0
_API_DRAIN_S = 10.0  # ingress calls are short: validate, record, answer
_DRAIN_MARGIN_S = 30.0  # loading inputs, writing the result, the last checkpoint


def longest_denoise_seconds(config: ReelserveConfig) -> float:
    """The longest denoising the limits allow, at the expected step time (one request alone on a replica)."""
    model = config.model
    return model.max_latent_tokens * model.num_inference_steps * model.seconds_per_token_step


def drain_seconds(name: str, config: ReelserveConfig) -> float:
    """How long Serve lets a stopping replica finish the requests it holds before it is killed.

    Long enough to finish everything a replica can hold, so scaling down and
    redeploying never cut work; capped by the job deadline, after which no
    request is still wanted. Work cut anyway resumes from its checkpoint.
    """
    stage = config.stages[name]
    deadline = config.jobs.job_timeout_s
    if name == "diffusion":
        held = stage.max_ongoing_requests * longest_denoise_seconds(config)
        return round(min(deadline, held + _DRAIN_MARGIN_S), 1)
    return round(min(deadline, 300.0), 1)  # encoders and decoders take seconds per request


def stage_options(name: str, config: ReelserveConfig) -> dict:
    """Options for ``serve.deployment(cls).options(**...)`` of the stage ``name``."""
    stage = config.stages[name]
    options = dict(
        name=name,
        max_ongoing_requests=stage.max_ongoing_requests,
        max_queued_requests=stage.max_queued_requests,
        health_check_period_s=_HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=drain_seconds(name, config),
        **_resources(stage),
    )
    if stage.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = stage.max_replicas_per_node
    options.update(_scaling(name, config))
    return options


def _resources(stage: StageConfig) -> dict:
    """Actor resources; a replica spanning several GPUs gets one bundle per GPU, packed on one node."""
    gpus = stage.gpus_per_replica
    actor: dict = {"num_cpus": stage.num_cpus, "num_gpus": min(gpus, 1.0)}
    if stage.memory_gb is not None:
        actor["memory"] = int(stage.memory_gb * 1024**3)
    if stage.accelerator_type is not None:
        actor["accelerator_type"] = stage.accelerator_type
    if gpus <= 1:
        return {"ray_actor_options": actor}
    # The replica takes the first bundle; its N-1 GPU workers take the rest (STRICT_PACK: one node, NVLink).
    # Whatever the replica's actor asks for must be in its bundle, host memory included.
    first = {"CPU": stage.num_cpus, "GPU": 1.0}
    if "memory" in actor:
        first["memory"] = actor["memory"]
    bundles = [first] + [{"CPU": 0.0, "GPU": 1.0} for _ in range(int(gpus) - 1)]
    if stage.accelerator_type is not None:
        for bundle in bundles:
            bundle[f"accelerator_type:{stage.accelerator_type}"] = 0.001
    return {
        "ray_actor_options": actor,
        "placement_group_bundles": bundles,
        "placement_group_strategy": "STRICT_PACK",
    }


def _scaling(name: str, config: ReelserveConfig) -> dict:
    stage = config.stages[name]
    if stage.num_replicas is not None:
        return {"num_replicas": stage.num_replicas}
    return {"autoscaling_config": autoscaling_config(name, config)}


def ingress_options(config: ReelserveConfig) -> dict:
    ingress = config.ingress
    return dict(
        name="ingress",
        num_replicas=ingress.num_replicas,
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_ongoing_requests=ingress.max_ongoing_requests,
        health_check_period_s=_HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=_API_DRAIN_S,
    )


def orchestrator_options(config: ReelserveConfig) -> dict:
    """The orchestrator hands its jobs over on shutdown (leases released, checkpoints kept): a short drain."""
    orchestrator = config.orchestrator
    return dict(
        name="orchestrator",
        num_replicas=orchestrator.num_replicas,
        ray_actor_options={"num_cpus": orchestrator.num_cpus},
        max_ongoing_requests=16,  # only status and drain calls; the jobs run in the background
        health_check_period_s=_HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=_API_DRAIN_S + _DRAIN_MARGIN_S,
    )
