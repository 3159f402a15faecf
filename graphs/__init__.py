"""``build_app(args) -> Application``: the import path of every Serve config.

The graph, one deployment per box::

       HTTP :8000 (OpenAI Videos API)    gRPC :9000 (reelserve.v1.VideoService)
                          \\                   /
                        ingress (stateless: validate, record, answer) --+
                                    |  wake                              |
                                    v                                    v
                      orchestrator (pulls jobs under leases) <---- job store (SQLite / Redis)
                                    |                                    ^
                   prompt_rewriter (vLLM; optional, per request)         |  fenced progress,
                                    |                                    |  cancel flag
          +-------------------------+--------------------+               |
          v                                              v               |
     text_encoder (+ text connectors)           image_conditioner (photo)|
          \\                                             /                |
           +-----------------> diffusion <--------------+ ---------------+
                        (engine: step batching, checkpoints)
                                    |
                      +-------------+-------------+
                      v                           v
                video_decoder (-> H.264)     audio_decoder
                      \\                           /
                       +--------> muxer <---------+  -> MP4 in the results store (directory, S3, GCS)

Stage outputs travel between stages as Ray objects, named in small hand-off
receipts; a copy of each waits in the job's artifacts until the job ends, so
a takeover redoes nothing. Only receipts reach the orchestrator.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from cluster.admission import AdmissionLimits
from cluster.config import REWRITER_STAGE, ReelserveConfig
from cluster.placement import ingress_options, orchestrator_options, stage_options
from serving.families import get_family
from serving.ingress.deployment import VideoIngress
from serving.jobs.deployment import JobRunnerDeployment, RunnerTenancy
from serving.stages.diffusion import DiffusionStage
from serving.stages.model import ModelStage
from serving.stages.muxer import MuxerStage
from serving.stages.prompt_rewriter import PromptRewriterStage

__all__ = ["build_app"]

# Which deployment class runs a stage of each kind a family declares.
_STAGE_CLASSES = {"model": ModelStage, "diffusion": DiffusionStage, "muxer": MuxerStage}


def build_app(args: dict[str, Any] | ReelserveConfig | None = None):
    """Validate ``args`` against ``ReelserveConfig``, check it fits, and bind the deployment graph.

    One deployment per stage the model's family declares, bound by name; the
    runner gets their handles in a dict keyed by the same names.
    """
    config = args if isinstance(args, ReelserveConfig) else ReelserveConfig.model_validate(args or {})
    _refuse_what_cannot_fit(config)
    family = get_family(config.model.family)
    handles = {spec.name: _bind_stage(spec.name, spec.kind, config) for spec in family.stages}
    if config.rewriter.enabled:
        handles[REWRITER_STAGE] = _deployment(PromptRewriterStage, REWRITER_STAGE, config).bind(
            config.rewriter, config.model
        )
    tenancy = RunnerTenancy(config.auth, config.callbacks, config.stages["diffusion"].max_ongoing_requests)
    runner = serve.deployment(JobRunnerDeployment).options(**orchestrator_options(config)).bind(
        config.orchestrator, config.model, config.jobs, config.rewriter, handles, tenancy, config.storage
    )
    return serve.deployment(VideoIngress).options(**ingress_options(config)).bind(
        config.model, config.jobs, config.rewriter, runner, AdmissionLimits.of(config), config.ingress, config.auth,
        config.callbacks, config.storage,
    )


def _deployment(cls, name: str, config: ReelserveConfig):
    return serve.deployment(cls).options(**stage_options(name, config))


def _bind_stage(name: str, kind: str, config: ReelserveConfig):
    """A stage gets only what it uses: its own model settings (device, dtype), the jobs section, its faults, the
    storage section."""
    jobs, faults = config.jobs, [f for f in config.faults if f.stage == name]
    if kind == "muxer":
        return _deployment(MuxerStage, name, config).bind(jobs, faults, config.model.name, config.storage)
    return _deployment(_STAGE_CLASSES[kind], name, config).bind(name, config.stage_model(name), jobs, faults,
                                                                config.storage)


def _refuse_what_cannot_fit(config: ReelserveConfig) -> None:
    """GPU and sized deployments are checked as `reelserve plan` checks them, before anything starts."""
    for name, settings in config.stages.items():
        if settings.gpus_per_replica > 1:
            # Placement would reserve the GPUs and nothing would use them but the first: refuse, do not waste.
            raise ValueError(
                f"stages.{name}.num_gpus: {settings.gpus_per_replica:g} GPUs per replica is not served yet (the "
                "sequence-parallel worker group is built and benchmarked, not wired into the stage); use num_gpus: 1 "
                "and more replicas"
            )
    sized = config.nodes or any(s.gpus_per_replica > 0 or s.memory_gb for s in config.stages.values())
    if not sized:
        return
    from cluster.plan import make_plan

    problems = make_plan(config).problems
    if problems:
        listed = "; ".join(str(p) for p in problems)
        raise ValueError(f"the config cannot fit ({listed}); `reelserve plan --config ...` shows the budget")
