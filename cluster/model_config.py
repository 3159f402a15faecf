"""What every family's model config shares: the checkpoint, the request limits, the engine's loop.

Each family extends :class:`ModelConfigBase` in its own package
(``serving/families/<family>/config.py``) with its knobs (guidance, recipes,
speed switches); ``cluster.config.ModelConfig`` is the union of them,
discriminated on ``family``. This module imports no family.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.sizes import parse_size

__all__ = ["ModelConfigBase", "EngineLoopConfig"]


class EngineLoopConfig(BaseModel):
    """How the diffusion stage runs its denoising loop, whatever the family (``model.diffusion``)."""

    model_config = ConfigDict(extra="forbid")

    batching: bool = Field(
        True,
        description=(
            "Step-level batching: requests the family says may share a transformer pass (e.g. equal latent shapes) "
            "run each pass together; a request joins at its first step and leaves after its last. Off: one request "
            "per pass."
        ),
    )
    max_batch_tokens: int = Field(
        65536,
        ge=1,
        description=(
            "Most tokens one transformer pass carries (rows x tokens per row; every guidance pass of a request is a "
            "row). A single row always runs; after an out-of-memory error the engine halves it and climbs back as "
            "passes succeed. 65536 holds one 1280x704 x 121-frame LTX-2 dev step (3 or 4 rows of 14206 tokens)."
        ),
    )
    oom_recovery_steps: int = Field(
        8,
        ge=1,
        description=(
            "After an out-of-memory error halved the batch budget, each later engine step that runs without one "
            "raises it by max_batch_tokens / oom_recovery_steps, so batching comes back under steady load (and at "
            "once when the engine is idle)."
        ),
    )
    checkpoint_every_steps: int = Field(
        4,
        ge=0,
        description=(
            "Emit a resumable checkpoint of each request every this many finished steps (0: never). The engine's "
            "part is a copy of the latents to the host (7.3 MB at 1280x704 x 121 frames, about 1 ms on a GPU); with a "
            "store write of about 40 ms, every 4 steps costs under 1% of a 1.22 s step, and a takeover redoes at "
            "most 3 steps."
        ),
    )


class ModelConfigBase(BaseModel):
    """Which checkpoint a deployment serves, and the limits of what a request may ask for."""

    model_config = ConfigDict(extra="forbid")

    # Latent grid of the family's VAE; the request budget (max_latent_tokens) counts in it.
    SPATIAL_COMPRESSION: ClassVar[int] = 32
    TEMPORAL_COMPRESSION: ClassVar[int] = 8
    # Generated frame counts are k * FRAME_STEP + FRAME_OFFSET.
    FRAME_STEP: ClassVar[int] = 8
    FRAME_OFFSET: ClassVar[int] = 1

    name: str = Field(
        "ltx-2",
        description="Model id that clients name in requests (the `model` field); requests naming another id are refused.",
    )
    family: str = Field("ltx2", description="Model family: which package's stages and pipeline run the checkpoint.")
    path: str | None = Field(
        None,
        description=(
            "Local directory (Hugging Face diffusers layout) or a hub id your machines can reach. "
            "Unset: the family's tiny random checkpoint, built on first use under the user cache directory."
        ),
    )
    device: str = Field(
        "auto",
        description=(
            "Default torch device of the model's stages (a stage may set its own): auto (cuda for replicas that "
            "reserve GPUs, cpu for the others; in one process, cuda when present), cpu, cuda, cuda:N."
        ),
    )
    dtype: str = Field(
        "auto", description="Weights and compute dtype (auto, float32, bfloat16, float16); auto is bfloat16 on GPUs and float32 on the CPU."
    )
    num_inference_steps: int = Field(30, ge=2, le=200, description="Denoising steps per video.")
    min_inference_steps: int = Field(
        2, ge=2, le=200, description="Fewest denoising steps a request may ask for (its num_inference_steps field)."
    )
    max_inference_steps: int = Field(
        100, ge=2, le=200,
        description=(
            "Most denoising steps a request may ask for (its num_inference_steps field); admission counts a job's GPU "
            "time with the steps it asked for."
        ),
    )
    negative_prompt: str = Field("", description="Negative prompt used when a request gives none.")
    default_size: str = Field("768x512", description="WIDTHxHEIGHT used when a request gives no size.")
    default_fps: int = Field(24, ge=1, le=60, description="Frame rate used when a request gives none.")
    default_seconds: float = Field(5.0, gt=0, description="Clip length used when a request gives none.")
    max_seconds: float = Field(20.0, gt=0, description="Longest clip a request may ask for.")
    max_width: int = Field(1920, ge=32, description="Widest frame a request may ask for, in pixels (a cap on one side).")
    max_height: int = Field(1920, ge=32, description="Tallest frame a request may ask for, in pixels (a cap on one side).")
    max_fps: int = Field(60, ge=1, description="Highest frame rate a request may ask for.")
    max_latent_tokens: int = Field(
        27_280,
        ge=1,
        description=(
            "Per-request budget in latent tokens: latent frames x latent height x latent width (the family's VAE "
            "grid). It bounds a request's memory and GPU time together; requests over it are refused with the largest "
            "size allowed at their length."
        ),
    )
    max_prompt_tokens: int = Field(
        1024, ge=8, description="Longest prompt in text-encoder tokens; longer prompts are refused, never truncated."
    )
    seconds_per_token_step: float = Field(
        3.5e-4,
        gt=0,
        description=(
            "Expected diffusion seconds per latent token per denoising step, all guidance passes included, on the "
            "diffusion stage's hardware. It sizes drain timeouts and capacity estimates until replicas have measured "
            "their own."
        ),
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = ("auto", "float32", "bfloat16", "float16")
        if value not in allowed:
            raise ValueError(f"'{value}' is not a dtype; allowed: {', '.join(allowed)}")
        return value

    @field_validator("default_size")
    @classmethod
    def _size_is_parsable(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self):
        if self.default_seconds > self.max_seconds:
            raise ValueError(f"default_seconds ({self.default_seconds}) exceeds max_seconds ({self.max_seconds})")
        if self.default_fps > self.max_fps:
            raise ValueError(f"default_fps ({self.default_fps}) exceeds max_fps ({self.max_fps})")
        if not self.min_inference_steps <= self.num_inference_steps <= self.max_inference_steps:
            raise ValueError(
                f"num_inference_steps ({self.num_inference_steps}) must lie within min_inference_steps "
                f"({self.min_inference_steps}) and max_inference_steps ({self.max_inference_steps})"
            )
        width, height = parse_size(self.default_size)
        default_tokens = self.latent_tokens(width, height, self.default_seconds, self.default_fps)
        if default_tokens > self.max_latent_tokens:
            raise ValueError(
                f"the default request ({self.default_size}, {self.default_seconds:g} s at {self.default_fps} fps) is "
                f"{default_tokens} latent tokens, over max_latent_tokens ({self.max_latent_tokens})"
            )
        return self

    # ------------------------------------------------------------------ sizes in the family's latent grid

    def shape_problem(self, width: int, height: int, seconds: float, fps: int) -> tuple[str, str] | None:
        """``(field, why)`` when the family cannot generate this shape although the shared limits allow it (None:
        it can). The shared checks (multiples, caps, the latent budget) run first."""
        return None

    def generated_frames(self, seconds: float, fps: int) -> int:
        """Frames the model generates for a clip: the smallest ``k * FRAME_STEP + FRAME_OFFSET`` covering it."""
        output_frames = max(1, round(seconds * fps))
        blocks = math.ceil(max(output_frames - self.FRAME_OFFSET, 0) / self.FRAME_STEP)
        return blocks * self.FRAME_STEP + self.FRAME_OFFSET

    def latent_frames(self, generated_frames: int) -> int:
        return (generated_frames - 1) // self.TEMPORAL_COMPRESSION + 1

    def latent_tokens(self, width: int, height: int, seconds: float, fps: int) -> int:
        """Latent tokens of one request: the unit of the request budget (and of diffusion's cost per step)."""
        frames = self.latent_frames(self.generated_frames(seconds, fps))
        spatial = self.SPATIAL_COMPRESSION
        return frames * (height // spatial) * (width // spatial)

    @property
    def uses_tiny_checkpoint(self) -> bool:
        return self.path is None

    @classmethod
    def tiny(cls, **overrides):
        """Settings that suit the family's tiny random checkpoint; families override this."""
        return cls(**overrides)
