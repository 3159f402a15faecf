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
                       +--------> muxer <---------+  -> MP4 in the results directory

Stage outputs travel between stages as Ray objects, named in small hand-off
receipts; a copy of each waits in the job's artifacts until the job ends, so
a takeover redoes nothing. Only receipts reach the orchestrator.

Two import paths, one per kind of Serve application (``cluster.apps`` lists
them for a config): ``graphs:build_app`` is the front (ingress + orchestrator,
the whole config as args), ``graphs:build_stage_app`` one stage (its
``StageSection`` as args). Each stage being an application of its own, a
config change that does not touch a stage never restarts it; the orchestrator
reaches the stages by name (``serving.jobs.handles``).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from cluster.admission import AdmissionLimits
from cluster.apps import StageSection
from cluster.config import ReelserveConfig
from cluster.placement import ingress_options, orchestrator_options
from cluster.plan import make_plan
from serving.families.base import LazyCallable
from serving.jobs.handles import StageHandles
from serving.jobs.runner_tenancy import RunnerTenancy

__all__ = ["build_app", "build_stage_app"]

# The deployment classes, by import path: building one application imports only its own classes (a stage's
# application never imports the ingress, vLLM or the other stages).
_INGRESS = LazyCallable("serving.ingress.deployment:VideoIngress")
_RUNNER = LazyCallable("serving.jobs.deployment:JobRunnerDeployment")
_STAGE_CLASSES = {
    "model": LazyCallable("serving.stages.model:ModelStage"),
    "diffusion": LazyCallable("serving.stages.diffusion:DiffusionStage"),
    "muxer": LazyCallable("serving.stages.muxer:MuxerStage"),
    "rewriter": LazyCallable("serving.stages.prompt_rewriter:PromptRewriterStage"),
}


def build_app(args: dict[str, Any] | ReelserveConfig | None = None):
    """The front application: validate ``args`` against ``ReelserveConfig``, check it fits, bind ingress + runner.

    The runner reaches each stage the config deploys by name, in the stage's own application
    (``build_stage_app``; ``cluster.apps.serve_applications`` lists them all).
    """
    config = args if isinstance(args, ReelserveConfig) else ReelserveConfig.model_validate(args or {})
    _refuse_what_cannot_fit(config)
    handles = StageHandles(config.app_name, config.stage_names)
    tenancy = RunnerTenancy(config.auth, config.callbacks, config.stages["diffusion"].max_ongoing_requests)
    # Ray annotates serve.deployment as the decorator form only; called on a class it returns the Deployment.
    runner = serve.deployment(_RUNNER.target).options(**orchestrator_options(config)).bind(  # type: ignore[attr-defined]
        config.orchestrator, config.model, config.jobs, config.rewriter, handles, tenancy, config.storage
    )
    return serve.deployment(_INGRESS.target).options(**ingress_options(config)).bind(  # type: ignore[attr-defined]
        config.model, config.jobs, config.rewriter, runner, AdmissionLimits.of(config), config.ingress, config.auth,
        config.callbacks, config.storage, config.references,
    )


def build_stage_app(args: dict[str, Any] | StageSection):
    """One stage's application: its deployment, bound with exactly its ``StageSection``.

    Its Serve options (replicas, resources, drain time) come as the application's deployment overrides
    (``cluster.apps``), so changing them restarts nothing that need not restart.
    """
    section = args if isinstance(args, StageSection) else StageSection.model_validate(args)
    deployment = serve.deployment(_STAGE_CLASSES[section.kind].target).options(name=section.stage)  # type: ignore[attr-defined]
    if section.kind == "rewriter":
        return deployment.bind(section.rewriter, section.model)
    if section.kind == "muxer":
        return deployment.bind(section.jobs, section.faults, section.model.name, section.storage)
    return deployment.bind(section.stage, section.model, section.jobs, section.faults, section.storage,
                           runtime=section.runtime)


def _refuse_what_cannot_fit(config: ReelserveConfig) -> None:
    """GPU and sized deployments are checked as `reelserve plan` checks them, before anything starts."""
    sized = config.nodes or any(s.gpus_per_replica > 0 or s.memory_gb for s in config.stages.values())
    if not sized:
        return

    problems = make_plan(config).problems
    if problems:
        listed = "; ".join(str(p) for p in problems)
        raise ValueError(f"the config cannot fit ({listed}); `reelserve plan --config ...` shows the budget")
