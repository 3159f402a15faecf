"""The Serve applications of one config: the front (ingress + runner) and one per stage.

Serve rebuilds an application, and restarts every replica in it, when the
application's ``args`` change (its code version is a hash of import path and
args), and applies a deployment's options (replicas, autoscaling, queue
bounds, drain time) in place. So:

- the front application ``<app_name>`` (``graphs:build_app``) gets the whole
  config: any change restarts the ingress and the runners, which hand their
  jobs over;
- each stage gets an application ``<app_name>-<stage>`` (``graphs:build_stage_app``)
  whose ``args`` are its ``StageSection``: exactly what its constructor uses
  (its model settings, where artifacts and inputs live, its faults, how it
  starts), never admission limits or another stage's settings;
- a stage's Serve options (``cluster.placement``) go in that application's
  deployment overrides, so scaling or a new drain time restarts nothing.

A change to ``jobs.max_active_jobs`` therefore restarts the front only, and
every model replica keeps its process (and its loaded, warmed-up weights).
The same list is what ``reelserve up`` deploys, what KubeRay's
``serveConfigV2`` holds, and what the served tests deploy.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.config import (
    REWRITER_STAGE,
    AnyModelConfig,
    FaultConfig,
    JobsConfig,
    ReelserveConfig,
    RewriterConfig,
)
from cluster.placement import stage_options
from cluster.startup_config import StageRuntime
from cluster.storage_config import StorageConfig
from serving.families import get_family
from serving.jobs.handles import stage_app_name

__all__ = [
    "RUNNER_ONLY_JOBS_FIELDS",
    "StageSection",
    "deploy",
    "memory_share",
    "serve_applications",
    "stage_app_name",
    "stage_section",
    "wait_until_running",
]

# JobsConfig fields only the ingress and the runner read: stages get their defaults, so changing them restarts none.
RUNNER_ONLY_JOBS_FIELDS = (
    "max_active_jobs", "retry_after_s", "job_timeout_s", "lease_s", "max_attempts", "stage_retries", "keep_artifacts",
)


class StageSection(BaseModel):
    """Everything one stage deployment is built from (its application's ``args``), and nothing else."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field(description="The front application's name (the stage's own is <app_name>-<stage>).")
    stage: str = Field(description="The stage's name, as its family declares it (or prompt_rewriter).")
    kind: Literal["model", "diffusion", "muxer", "rewriter"] = Field(description="Which deployment class runs it.")
    model: AnyModelConfig = Field(description="The model settings the stage loads with, device and dtype resolved.")  # type: ignore[valid-type]
    jobs: JobsConfig = Field(description="Where job records, inputs, results and artifacts live (admission limits at their defaults).")
    faults: list[FaultConfig] = Field(default_factory=list, description="This stage's injected faults.")
    rewriter: RewriterConfig | None = Field(None, description="The rewriter's settings (prompt_rewriter only).")
    runtime: StageRuntime = Field(default_factory=StageRuntime, description="How the replica starts: weights, share, ranks.")
    storage: StorageConfig = Field(default_factory=StorageConfig,
                                   description="Where the stage reads inputs and writes results and artifacts.")


def memory_share(config: ReelserveConfig, stage: str) -> float | None:
    """The share of its GPU a model or diffusion replica may allocate when it shares the GPU; else None.

    The rewriter is capped by vLLM itself (``rewriter.gpu_memory_utilization``); the muxer computes nothing.
    """
    if stage == REWRITER_STAGE or get_family(config.model.family).stage(stage).kind == "muxer":
        return None
    share = config.stages[stage].gpus_per_replica
    if not 0 < share < 1 or config.stage_model(stage).device == "cpu":
        return None
    return round(share, 4)


def stage_section(config: ReelserveConfig, stage: str) -> StageSection:
    """What the stage's constructor gets: its own model settings, the storage half of ``jobs``, its faults."""
    if stage == REWRITER_STAGE:
        kind, model = "rewriter", config.model
    else:
        kind = get_family(config.model.family).stage(stage).kind
        model = config.model if kind == "muxer" else config.stage_model(stage)
    defaults = JobsConfig()
    jobs = config.jobs.model_copy(update={name: getattr(defaults, name) for name in RUNNER_ONLY_JOBS_FIELDS})
    settings = config.stages[stage]
    return StageSection(
        app_name=config.app_name,
        stage=stage,
        kind=kind,
        model=model,
        jobs=jobs,
        faults=[fault for fault in config.faults if fault.stage == stage],
        rewriter=config.rewriter if stage == REWRITER_STAGE else None,
        storage=config.storage,
        runtime=StageRuntime(
            startup=config.startup,
            memory_fraction=memory_share(config, stage),
            ranks=max(1, int(settings.gpus_per_replica)) if kind == "diffusion" else 1,
        ),
    )


def serve_applications(args: dict | ReelserveConfig, overrides: dict[str, dict] | None = None) -> list[dict]:
    """The ``applications`` of a Serve config (``ServeDeploySchema``) for ``args``.

    ``overrides``: extra options by deployment name (e.g. ``{"diffusion": {"autoscaling_config": ...}}``), laid
    over what the config gives, in the application that holds the deployment.
    """
    if isinstance(args, ReelserveConfig):
        config, front_args = args, args.model_dump(mode="json")
    else:
        config, front_args = ReelserveConfig.model_validate(copy.deepcopy(args)), copy.deepcopy(args)
    overrides = copy.deepcopy(overrides or {})
    front: dict[str, Any] = {
        "name": config.app_name, "route_prefix": config.ingress.route_prefix, "import_path": "graphs:build_app", "args": front_args,
    }
    front_overrides = [{"name": name, **options} for name, options in overrides.items()
                       if name in ("ingress", "orchestrator")]
    if front_overrides:
        front["deployments"] = front_overrides
    applications = [front]
    for stage in config.stage_names:
        options = stage_options(stage, config)
        options.update(overrides.get(stage, {}))
        if "autoscaling_config" in overrides.get(stage, {}):
            options.pop("num_replicas", None)
        if "num_replicas" in overrides.get(stage, {}):
            options.pop("autoscaling_config", None)
        applications.append({
            "name": stage_app_name(config.app_name, stage),
            "route_prefix": None,
            "import_path": "graphs:build_stage_app",
            "args": stage_section(config, stage).model_dump(mode="json"),
            "deployments": [options],
        })
    return applications


def deploy(applications: list[dict], timeout_s: float = 600, wait: bool = True) -> None:
    """Deploy ``applications`` declaratively, as KubeRay does with ``serveConfigV2``, and wait until all run.

    Applications whose ``args`` did not change keep their replicas (only their options are applied); those no
    longer listed are removed. Needs a connected Ray with Serve started. ``wait`` False: return at once.
    """
    from ray.serve.context import _get_global_client  # noqa: PLC0415 - Ray only where a cluster is reached; the Python side of Serve's declarative API (no dashboard)
    from ray.serve.schema import ServeDeploySchema  # noqa: PLC0415 - Ray only where a cluster is reached

    client = _get_global_client()
    assert client is not None  # it raises instead when no controller runs
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": applications}))
    if wait:
        wait_until_running([application["name"] for application in applications], timeout_s)


def wait_until_running(names: list[str], timeout_s: float = 600) -> None:
    """Every application named is RUNNING with every deployment HEALTHY; raises naming the one that failed."""
    from ray import serve  # noqa: PLC0415 - Ray only where a cluster is reached

    deadline = time.time() + timeout_s
    time.sleep(1)  # the controller has taken the new config; statuses now describe it
    while True:
        applications = serve.status().applications
        waiting = []
        for name in names:
            app = applications.get(name)
            status = str(getattr(app.status, "value", app.status)) if app is not None else "MISSING"
            if status == "DEPLOY_FAILED" and app is not None:
                first = (str(app.message).strip().splitlines() or ["no details"])[0]
                raise RuntimeError(f"deploying {name} failed: {first}")
            healthy = app is not None and all(
                str(getattr(d.status, "value", d.status)) == "HEALTHY" for d in app.deployments.values()
            )
            if status != "RUNNING" or not healthy:
                waiting.append(f"{name} ({status})")
        if not waiting:
            return
        if time.time() > deadline:
            raise TimeoutError(f"not running within {timeout_s:g} s: {', '.join(waiting)}")
        time.sleep(0.5)

