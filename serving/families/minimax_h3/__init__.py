"""MiniMax-H3: one packed audio+video transformer with a Qwen3-VL conditioner, through diffusers' modular blocks.

Three workflows share one repository: t2va (text only) and fl2va (first and/or
last keyframe) run on the ``transformer/`` partition, ref2va (up to 9 images, 3
videos and 3 audio clips) on ``transformer_ref/``. The stages cut diffusers'
``MiniMaxH3Blocks`` where their components change: Qwen3-VL (it also reads the
keyframes and references as vision blocks), the VAEs' encoders, the transformer
in reelserve's engine, and each VAE's decoder.

Importing this declaration imports neither torch nor diffusers.
"""

from __future__ import annotations

from serving.families.base import Family, LazyCallable, StageSpec
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig

__all__ = ["FAMILY"]


def _lazy(attribute: str) -> LazyCallable:
    return LazyCallable(f"serving.families.minimax_h3.{attribute}")


FAMILY = Family(
    name="minimax_h3",
    config_class=MiniMaxH3ModelConfig,
    stages=(
        StageSpec("text_encoder", "model", {"encode": ("text_conditioning",)},
                  component=_lazy("stages:MiniMaxH3TextEncoder"), progress_share=2.0,
                  summary="Qwen3-VL over the prompt and the keyframes or references: hidden_states[50] and row tags"),
        StageSpec("reference_encoder", "model", {"encode": ("reference_conditioning",)},
                  component=_lazy("stages:MiniMaxH3ReferenceEncoder"), progress_share=2.0,
                  summary="the video and audio VAEs' encoders: keyframes (fl2va) or references (ref2va) -> latents"),
        StageSpec("diffusion", "diffusion", {"denoise": ("video_latents", "audio_latents")},
                  progress_share=88.0, summary="the packed audio+video transformer in reelserve's engine"),
        StageSpec("video_decoder", "model", {"decode": ("encoded_video",)},
                  component=_lazy("stages:MiniMaxH3VideoDecoder"), progress_share=4.0,
                  summary="the video VAE's ViT decoder, then H.264: latents -> compressed video track"),
        StageSpec("audio_decoder", "model", {"decode": ("waveform",)},
                  component=_lazy("stages:MiniMaxH3AudioDecoder"), progress_share=2.0,
                  summary="the audio VAE's BigVGAN decoder: latents -> 32 kHz stereo waveform"),
        StageSpec("muxer", "muxer", {"mux": ()}, gpu=False, progress_share=2.0,
                  summary="AAC + MP4 into the results store"),
    ),
    pipeline=_lazy("pipeline:generate"),
    read_limits=_lazy("checkpoint:read_limits"),
    token_counter=_lazy("checkpoint:token_counter"),
    diffusion_model=_lazy("diffusion:MiniMaxH3Diffusion"),
    stage_memory=_lazy("sizing:stage_memory"),
    handoff_sizes=_lazy("sizing:handoff_sizes"),
    build_tiny_checkpoint=_lazy("tiny:build_tiny_minimax_h3"),
    ensure_tiny_checkpoint=_lazy("tiny:ensure_tiny_minimax_h3"),
    pipeline_classes=("MiniMaxH3ModularPipeline",),
    stored_types=_lazy("diffusion:stored_types"),
    admit_inputs=_lazy("admission:admit_inputs"),
    describe=_lazy("admission:describe"),
)
