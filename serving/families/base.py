"""The small interface every model family implements.

A stage deployment only ever talks to these protocols, so it does not know
which family it runs. Each stage loads only its own components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from PIL import Image

from cluster.config import ModelConfig
from serving.protocol import (
    AudioLatents,
    DenoisedLatents,
    EncodedVideo,
    ImageCondition,
    PromptEmbeddings,
    RenderPlan,
    VideoLatents,
    Waveform,
)

__all__ = [
    "ModelLimits",
    "TextEncoder",
    "ImageConditioner",
    "Denoiser",
    "VideoDecoder",
    "AudioDecoder",
    "Family",
    "resolve_device",
    "resolve_dtype",
]


@dataclass(frozen=True)
class ModelLimits:
    """Shape rules of a loaded checkpoint, read from its component configs (no weights)."""

    size_multiple: int  # width and height must be multiples of this
    temporal_compression: int  # generated frame counts are k * this + 1
    audio_sample_rate: int
    max_prompt_tokens: int


class TextEncoder(Protocol):
    def count_tokens(self, text: str) -> int: ...

    def encode(self, prompt: str, negative_prompt: str | None) -> PromptEmbeddings: ...


class ImageConditioner(Protocol):
    def condition(self, image: Image.Image, width: int, height: int) -> ImageCondition: ...


class Denoiser(Protocol):
    def denoise(
        self,
        embeddings: PromptEmbeddings,
        condition: ImageCondition | None,
        plan: RenderPlan,
        on_step: Callable[[int, int], None] | None = None,
    ) -> DenoisedLatents: ...


class VideoDecoder(Protocol):
    def decode(self, latents: VideoLatents, plan: RenderPlan) -> EncodedVideo: ...


class AudioDecoder(Protocol):
    def decode(self, latents: AudioLatents) -> Waveform: ...


@dataclass(frozen=True)
class Family:
    """Constructors for one family's stages; each takes the model config and loads its part."""

    name: str
    read_limits: Callable[[ModelConfig], ModelLimits]
    token_counter: Callable[[ModelConfig], Callable[[str], int]]  # tokenizer only, for request validation
    text_encoder: Callable[[ModelConfig], TextEncoder]
    image_conditioner: Callable[[ModelConfig], ImageConditioner]
    denoiser: Callable[[ModelConfig], Denoiser]
    video_decoder: Callable[[ModelConfig], VideoDecoder]
    audio_decoder: Callable[[ModelConfig], AudioDecoder]
    # The denoising loop a diffusion replica runs (step batching, checkpoints): (config) -> engine.
    diffusion_engine: Callable | None = None
    # (config, plan) -> (width, height) the photo is encoded at (a recipe may start below the plan's size).
    condition_size: Callable | None = None
    # Sizing without weights: (config, stage) -> MemoryEstimate, and (model, w, h, seconds, fps) -> HandoffSizes.
    stage_memory: Callable | None = None
    handoff_sizes: Callable | None = None


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)
