"""``build_app(args) -> Application``: the import path of every Serve config.

The graph, one deployment per box::

                    HTTP :8000 (OpenAI Videos API)    gRPC :9000 (reelserve.v1.VideoService)
                                  \\                   /
                                   ingress (+ orchestrator) ---- job store (SQLite / Redis)
                                        |
                              prompt_rewriter (vLLM; optional, per request)
                                        |
                 +----------------------+----------------------+
                 v                                             v
           text_encoder                                image_conditioner (photo)
                 \\                                             /
                  +------------------> diffusion <-------------+      (progress + cancel via job store)
                                           |
                             +-------------+-------------+
                             v                           v
                       video_decoder               audio_decoder
                             \\                           /
                              +--------> muxer <----------+  -> MP4 in the results directory

Stage outputs travel between stages as Ray object references; only the
muxer's small receipt returns to the ingress.
"""

from __future__ import annotations

from typing import Any

from cluster.config import ReelserveConfig

__all__ = ["build_app"]


def build_app(args: dict[str, Any] | ReelserveConfig | None = None):
    """Validate ``args`` against ``ReelserveConfig`` and bind the deployment graph."""
    from ray import serve

    from cluster.placement import ingress_options, stage_options
    from serving.ingress.deployment import VideoIngress
    from serving.stages.audio_decoder import AudioDecoderStage
    from serving.stages.diffusion import DiffusionStage
    from serving.stages.image_conditioner import ImageConditionerStage
    from serving.stages.muxer import MuxerStage
    from serving.stages.prompt_rewriter import PromptRewriterStage
    from serving.stages.text_encoder import TextEncoderStage
    from serving.stages.video_decoder import VideoDecoderStage

    config = args if isinstance(args, ReelserveConfig) else ReelserveConfig.model_validate(args or {})
    jobs = config.jobs

    def stage(cls, name: str, *init_args):
        return serve.deployment(cls).options(**stage_options(name, config)).bind(*init_args)

    def model(name: str):
        return config.stage_model(name)

    return serve.deployment(VideoIngress).options(**ingress_options(config)).bind(
        config.model_dump(),
        stage(TextEncoderStage, "text_encoder", model("text_encoder")),
        stage(ImageConditionerStage, "image_conditioner", model("image_conditioner")),
        stage(DiffusionStage, "diffusion", model("diffusion"), jobs),
        stage(VideoDecoderStage, "video_decoder", model("video_decoder")),
        stage(AudioDecoderStage, "audio_decoder", model("audio_decoder")),
        stage(MuxerStage, "muxer", jobs),
        stage(PromptRewriterStage, "prompt_rewriter", config.rewriter, config.model) if config.rewriter.enabled else None,
    )
