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
"""

from __future__ import annotations

from typing import Any

from cluster.config import ReelserveConfig

__all__ = ["build_app"]


def build_app(args: dict[str, Any] | ReelserveConfig | None = None):
    """Validate ``args`` against ``ReelserveConfig``, check it fits, and bind the deployment graph."""
    from ray import serve

    from cluster.admission import AdmissionLimits
    from cluster.placement import ingress_options, orchestrator_options, stage_options
    from serving.ingress.deployment import VideoIngress
    from serving.stages.audio_decoder import AudioDecoderStage
    from serving.stages.diffusion import DiffusionStage
    from serving.stages.image_conditioner import ImageConditionerStage
    from serving.stages.muxer import MuxerStage
    from serving.stages.orchestrator import OrchestratorDeployment
    from serving.stages.prompt_rewriter import PromptRewriterStage
    from serving.stages.text_encoder import TextEncoderStage
    from serving.stages.video_decoder import VideoDecoderStage

    config = args if isinstance(args, ReelserveConfig) else ReelserveConfig.model_validate(args or {})
    _refuse_what_cannot_fit(config)
    jobs, faults = config.jobs, config.faults

    def stage(cls, name: str, *init_args):
        return serve.deployment(cls).options(**stage_options(name, config)).bind(*init_args)

    def model_stage(cls, name: str):
        return stage(cls, name, config.stage_model(name), jobs, faults)

    rewriter = None
    if config.rewriter.enabled:
        rewriter = stage(PromptRewriterStage, "prompt_rewriter", config.rewriter, config.model)
    orchestrator = serve.deployment(OrchestratorDeployment).options(**orchestrator_options(config)).bind(
        config.orchestrator, config.model, jobs, config.rewriter,
        model_stage(TextEncoderStage, "text_encoder"),
        model_stage(ImageConditionerStage, "image_conditioner"),
        model_stage(DiffusionStage, "diffusion"),
        model_stage(VideoDecoderStage, "video_decoder"),
        model_stage(AudioDecoderStage, "audio_decoder"),
        stage(MuxerStage, "muxer", jobs, faults, config.model.name),
        rewriter,
    )
    return serve.deployment(VideoIngress).options(**ingress_options(config)).bind(
        config.model, jobs, config.rewriter, orchestrator, AdmissionLimits.of(config)
    )


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
