"""The one deployment config: pydantic, every field described.

YAML maps straight onto it; cross-field rules are checked here, when the
config is built, never at request time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ModelConfig", "parse_size"]

LTX2_DEFAULT_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> ``(768, 512)``; raises ``ValueError`` with the accepted form."""
    parts = str(text).strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"'{text}' is not a size; write WIDTHxHEIGHT in pixels, e.g. 768x512")
    width, height = (int(p) for p in parts)
    if width <= 0 or height <= 0:
        raise ValueError(f"'{text}' has a zero dimension; both width and height must be positive")
    return width, height


class ModelConfig(BaseModel):
    """Which checkpoint a deployment serves and how it generates."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "ltx-2",
        description="Model id that clients name in requests (the `model` field); requests naming another id are refused.",
    )
    family: Literal["ltx2"] = Field("ltx2", description="Model family: which stage code runs the checkpoint.")
    path: str | None = Field(
        None,
        description=(
            "Local directory (Hugging Face diffusers layout) or a hub id your machines can reach. "
            "Unset: the tiny random checkpoint, built on first use under the user cache directory."
        ),
    )
    device: str = Field("auto", description="Torch device for this model's stages: auto (cuda when present), cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype; auto is bfloat16 on GPUs and float32 on the CPU."
    )
    num_inference_steps: int = Field(30, ge=1, le=200, description="Denoising steps per video.")
    guidance_scale: float = Field(3.0, ge=1.0, description="Classifier-free guidance for video (1 turns it off).")
    audio_guidance_scale: float = Field(7.0, ge=1.0, description="Classifier-free guidance for audio.")
    stg_scale: float = Field(1.0, ge=0.0, description="Spatio-temporal guidance for video (0 turns it off).")
    audio_stg_scale: float = Field(1.0, ge=0.0, description="Spatio-temporal guidance for audio (0 turns it off).")
    stg_blocks: list[int] = Field(
        default_factory=lambda: [28],
        description="Transformer block indices perturbed by spatio-temporal guidance; each must be below the block count.",
    )
    modality_scale: float = Field(3.0, ge=1.0, description="Modality-isolation guidance for video (1 turns it off).")
    audio_modality_scale: float = Field(3.0, ge=1.0, description="Modality-isolation guidance for audio.")
    guidance_rescale: float = Field(0.7, ge=0.0, le=1.0, description="Guidance rescale factor against over-exposure.")
    negative_prompt: str = Field(LTX2_DEFAULT_NEGATIVE_PROMPT, description="Negative prompt used when a request gives none.")
    default_size: str = Field("768x512", description="WIDTHxHEIGHT used when a request gives no size.")
    default_fps: int = Field(24, ge=1, le=60, description="Frame rate used when a request gives none.")
    default_seconds: float = Field(5.0, gt=0, description="Clip length used when a request gives none.")
    max_seconds: float = Field(20.0, gt=0, description="Longest clip a request may ask for.")
    max_width: int = Field(1920, ge=32, description="Widest frame a request may ask for, in pixels.")
    max_height: int = Field(1920, ge=32, description="Tallest frame a request may ask for, in pixels.")
    max_fps: int = Field(60, ge=1, description="Highest frame rate a request may ask for.")
    max_prompt_tokens: int = Field(
        1024, ge=8, description="Longest prompt in text-encoder tokens; longer prompts are refused, never truncated."
    )
    vae_tiling: bool = Field(False, description="Decode video in tiles to bound GPU memory on large frames.")

    @field_validator("default_size")
    @classmethod
    def _size_is_parsable(cls, value: str) -> str:
        parse_size(value)
        return value

    @field_validator("stg_blocks")
    @classmethod
    def _blocks_non_negative(cls, value: list[int]) -> list[int]:
        if any(b < 0 for b in value):
            raise ValueError("block indices start at 0")
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ModelConfig:
        if self.default_seconds > self.max_seconds:
            raise ValueError(f"default_seconds ({self.default_seconds}) exceeds max_seconds ({self.max_seconds})")
        if self.default_fps > self.max_fps:
            raise ValueError(f"default_fps ({self.default_fps}) exceeds max_fps ({self.max_fps})")
        if (self.stg_scale > 0 or self.audio_stg_scale > 0) and not self.stg_blocks:
            raise ValueError("spatio-temporal guidance is on (stg_scale > 0) but stg_blocks is empty")
        return self

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """Settings that suit the tiny random checkpoint (2 transformer blocks, short clips)."""
        settings = dict(
            name="ltx-2-tiny",
            num_inference_steps=8,
            stg_blocks=[1],
            default_size="256x256",
            default_seconds=2.0,
            max_seconds=20.0,
            max_width=1024,
            max_height=1024,
            max_prompt_tokens=256,
        )
        settings.update(overrides)
        return cls(**settings)

    @property
    def uses_tiny_checkpoint(self) -> bool:
        return self.path is None
