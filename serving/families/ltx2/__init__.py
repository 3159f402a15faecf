"""LTX-2 (Lightricks): one joint audio+video transformer, through diffusers' LTX-2 classes.

Stages follow diffusers' offload order, text_encoder -> connectors +
transformer -> vae -> audio_vae + vocoder, with the photo encoded by the video
VAE in a stage of its own. The text connectors run in the text encoder stage,
so the 49-layer Gemma states (385 MB a prompt) never leave it.
"""

from __future__ import annotations

from serving.families.base import Family, LazyCallable, StageSpec
from serving.families.ltx2.config import LTX2ModelConfig

__all__ = ["FAMILY"]


def _lazy(attribute: str) -> LazyCallable:
    return LazyCallable(f"serving.families.ltx2.{attribute}")


FAMILY = Family(
    name="ltx2",
    config_class=LTX2ModelConfig,
    stages=(
        StageSpec("text_encoder", "model", {"encode": ("prompt_embeddings",)},
                  component=_lazy("stages:LTX2TextEncoder"), progress_share=1.0, weights=("text_encoder", "connectors"),
                  summary="Gemma 3 + LTX-2's text connectors: prompt (+ negative prompt) -> connector outputs"),
        StageSpec("image_conditioner", "model", {"condition": ("image_condition",)},
                  component=_lazy("stages:LTX2ImageConditioner"), progress_share=1.5, weights=("vae",),
                  summary="the video VAE's encoder: photo -> first-frame latents"),
        StageSpec("diffusion", "diffusion", {"denoise": ("video_latents", "audio_latents")},
                  progress_share=85.0, weights=("transformer", "latent_upsampler"),
                  summary="the joint audio+video transformer in reelserve's engine"),
        StageSpec("video_decoder", "model", {"decode": ("encoded_video",)},
                  component=_lazy("stages:LTX2VideoDecoder"), progress_share=3.0, weights=("vae",),
                  summary="the video VAE's decoder, then H.264: latents -> compressed video track"),
        StageSpec("audio_decoder", "model", {"decode": ("waveform",)},
                  component=_lazy("stages:LTX2AudioDecoder"), progress_share=2.0, weights=("audio_vae", "vocoder"),
                  summary="the audio VAE's decoder + vocoder: latents -> waveform"),
        StageSpec("muxer", "muxer", {"mux": ()}, gpu=False, progress_share=5.0,
                  summary="AAC + MP4 into the results store"),
    ),
    pipeline=_lazy("pipeline:generate"),
    read_limits=_lazy("checkpoint:read_limits"),
    token_counter=_lazy("checkpoint:token_counter"),
    diffusion_model=_lazy("diffusion:LTX2Diffusion"),
    stage_memory=_lazy("sizing:stage_memory"),
    handoff_sizes=_lazy("sizing:handoff_sizes"),
    build_tiny_checkpoint=_lazy("tiny:build_tiny_ltx2"),
    ensure_tiny_checkpoint=_lazy("tiny:ensure_tiny_ltx2"),
    pipeline_classes=("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline"),
    stored_types=_lazy("diffusion:stored_types"),
    sequence_parallel=_lazy("passes:LTX2RankPasses"),
)
