"""MiniMax-H3's model config: the shared limits plus its frame rule, canvas, workflows and reference limits.

``model.family: minimax_h3`` selects it (``cluster.config.ModelConfig`` is the
union of the families' configs). H3 is guidance-distilled: there is no
negative prompt and no guidance scale, one transformer pass per step. Its
blocks hard-code 24 fps, clips of 5 to 15 s (after the 17n + 5 frame snap) and
a canvas whose sides are multiples of 32 with an aspect ratio between 1:4 and
4:1; the fields below bound requests inside those rules, and the validators
refuse a config that would let a request past them.

This module imports neither torch nor diffusers: the cluster config reads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.model_config import EngineLoopConfig, ModelConfigBase
from cluster.sizes import parse_size

__all__ = [
    "FPS",
    "LATENTS_PER_CLIP",
    "MAX_GENERATED_SECONDS",
    "MIN_GENERATED_SECONDS",
    "WORKFLOWS",
    "MiniMaxH3ModelConfig",
    "Workflow",
    "latent_frame_count",
]

Workflow = Literal["t2va", "fl2va", "ref2va"]
WORKFLOWS: tuple[Workflow, ...] = ("t2va", "fl2va", "ref2va")

# What diffusers' MiniMax-H3 blocks hard-code (MiniMaxH3ModularPipeline.fps / min_duration / max_duration): the
# generated frame count, snapped up to 17n + 5, must last 5 to 15 s at 24 fps.
FPS = 24
MIN_GENERATED_SECONDS = 5.0
MAX_GENERATED_SECONDS = 15.0
# The blocks' own caps on references (MiniMaxH3Ref2VASetupStep): a config may lower them, never raise them.
_BLOCK_REFERENCE_CAPS = {"max_reference_images": 9, "max_reference_videos": 3, "max_reference_audios": 3,
                         "max_references": 12}
_MAX_ASPECT_RATIO = 4.0  # resolve_canvas_size: 1:4 to 4:1
# The video VAE encodes 17-frame clips into 5 latent frames each and drops the last 3 (token_drop).
LATENTS_PER_CLIP = 5
_TOKEN_DROP = 3


def latent_frame_count(generated_frames: int, frame_step: int = 17, frame_offset: int = 5) -> int:
    """Latent frames of ``frame_step * n + frame_offset`` generated frames: ``5n + 2`` (diffusers'
    ``video_latent_num_frames``: the clips padded to whole 17-frame chunks, 5 latents each, 3 dropped)."""
    clips = (generated_frames - frame_offset) // frame_step + 1
    return clips * LATENTS_PER_CLIP - _TOKEN_DROP


class MiniMaxH3ModelConfig(ModelConfigBase):
    """A MiniMax-H3 checkpoint (diffusers' modular layout: ``modular_model_index.json``) and how it generates."""

    # The transformer's token grid: the video VAE compresses 16x in space and the transformer packs 2x2 latent
    # patches, so a token covers 32x32 pixels; in time the VAE compresses 4x, in 17-frame clips (latent_frames).
    SPATIAL_COMPRESSION = 32
    TEMPORAL_COMPRESSION = 4
    FRAME_STEP = 17
    FRAME_OFFSET = 5

    name: str = Field(
        "minimax-h3",
        description="Model id that clients name in requests (the `model` field); requests naming another id are refused.",
    )
    family: Literal["minimax_h3"] = Field(
        "minimax_h3", description="Model family: MiniMax-H3 (one packed audio+video transformer, Qwen3-VL conditioner)."
    )
    workflows: list[Workflow] = Field(
        default_factory=lambda: list(WORKFLOWS),
        description=(
            "The workflows this deployment serves: t2va (text only), fl2va (first and/or last keyframe), ref2va "
            "(omni-reference: images, videos, audio clips). They decide which transformer partition the diffusion "
            "replica loads: transformer/ (61.7 GB) for t2va and fl2va, transformer_ref/ (61.7 GB) for ref2va."
        ),
    )
    num_inference_steps: int = Field(
        50,
        ge=2,
        le=200,
        description=(
            "Sigma grid points per video, the terminal 0 included: N runs N - 1 transformer passes (diffusers' "
            "MiniMaxH3Scheduler; at least 2). The checkpoint is guidance-distilled: one pass per step, no negative "
            "prompt."
        ),
    )
    default_size: str = Field(
        "1344x768",
        description="WIDTHxHEIGHT used when a request gives no size (H3's own 16:9 canvas: 768 short edge, 1344x768).",
    )
    default_fps: int = Field(FPS, ge=FPS, le=FPS, description="Frame rate: MiniMax-H3 generates at 24 fps only.")
    max_fps: int = Field(FPS, ge=FPS, le=FPS, description="Highest frame rate a request may ask for: 24 (the only one).")
    default_seconds: float = Field(5.0, gt=0, description="Clip length used when a request gives none.")
    min_seconds: float = Field(
        5.0,
        gt=0,
        description=(
            "Shortest clip a request may ask for. The model generates at least 5 s (124 frames, 17n + 5, for a 5 s "
            "clip), so shorter clips are refused rather than padded."
        ),
    )
    max_seconds: float = Field(
        14.375,
        gt=0,
        description=(
            "Longest clip a request may ask for. The blocks cap the generated frames (17n + 5) at 15 s = 360 frames; "
            "the largest such count is 345, so 14.375 s is the longest clip that fits."
        ),
    )
    max_width: int = Field(2016, ge=32, description="Widest frame a request may ask for, in pixels (a multiple of 32).")
    max_height: int = Field(2016, ge=32, description="Tallest frame a request may ask for, in pixels (a multiple of 32).")
    max_pixels: int = Field(
        1_032_192,
        ge=32 * 32,
        description=(
            "Largest canvas, width x height in pixels: H3's released canvas area (768 x 1344, canvas_max_pixels). "
            "Sides must be multiples of 32 with an aspect ratio between 1:4 and 4:1."
        ),
    )
    max_latent_tokens: int = Field(
        102_816,
        ge=1,
        description=(
            "Per-request budget in transformer video tokens: latent frames x (height / 32) x (width / 32), with "
            "5n + 2 latent frames for 17n + 5 generated frames. Default: 1344x768 for 14.375 s (102 x 24 x 42), the "
            "largest request the released canvas allows."
        ),
    )
    max_prompt_tokens: int = Field(
        1024, ge=8, description="Longest prompt in Qwen3-VL tokens (without the references' labels and vision blocks)."
    )
    seconds_per_token_step: float = Field(
        3.0e-4,
        gt=0,
        description=(
            "Expected diffusion seconds per video token per step on the diffusion stage's hardware. Default: "
            "computed, not measured: about 1.25e16 FLOPs a pass at 1344x768 x 10 s (72,576 video tokens; 33 B "
            "parameters and full attention over the packed sequence) at 600 TFLOP/s on one H100."
        ),
    )
    max_reference_images: int = Field(9, ge=0, description="Image references a request may carry (at most 9).")
    max_reference_videos: int = Field(3, ge=0, description="Video references a request may carry (at most 3).")
    max_reference_audios: int = Field(3, ge=0, description="Audio references a request may carry (at most 3).")
    max_references: int = Field(12, ge=0, description="References of any kind a request may carry in all (at most 12).")
    min_video_reference_seconds_total: float = Field(
        2.0, ge=0, description="Shortest total duration of a request's video references, in seconds."
    )
    max_video_reference_seconds_total: float = Field(
        15.0, gt=0, description="Longest total duration of a request's video references, in seconds."
    )
    min_video_reference_seconds: float = Field(
        0.6,
        ge=13 / FPS,
        description=(
            "Shortest single video reference: the conditioner reads a video at 2 fps in pairs of frames, so it needs "
            "13 frames at 24 fps (0.54 s)."
        ),
    )
    max_audio_reference_seconds_total: float = Field(
        15.0, gt=0, description="Longest total duration of a request's audio references (clips, not soundtracks)."
    )
    max_image_reference_bytes: int = Field(30_000_000, ge=1, description="Largest image file (keyframe or reference).")
    max_video_reference_bytes: int = Field(50_000_000, ge=1, description="Largest video reference file.")
    max_audio_reference_bytes: int = Field(15_000_000, ge=1, description="Largest audio reference file.")
    max_image_reference_pixels: int = Field(
        36_000_000, ge=1, description="Largest image (keyframe or reference), width x height in pixels (6000 x 6000)."
    )
    min_image_reference_side: int = Field(16, ge=1, description="Shortest side of an image (keyframe or reference).")
    max_video_reference_pixels: int = Field(
        1920 * 1080, ge=1, description="Largest video reference frame, width x height in pixels (1080p)."
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["jpeg", "png", "webp"],
        description="Image file formats accepted for keyframes and image references (Pillow's format names).",
    )
    video_formats: list[str] = Field(
        default_factory=lambda: ["mp4", "mov", "webm"],
        description="Video containers accepted for video references (any name of the container PyAV reports).",
    )
    audio_formats: list[str] = Field(
        default_factory=lambda: ["wav", "mp3", "aac", "m4a", "flac", "ogg"],
        description="Audio containers accepted for audio references (any name of the container PyAV reports).",
    )
    diffusion: EngineLoopConfig = Field(
        default_factory=lambda: EngineLoopConfig(),
        description=(
            "The diffusion stage's loop: step batching (only requests of the same packed layout at the same step "
            "share a pass), the token budget of a pass, checkpoints."
        ),
    )

    # ------------------------------------------------------------------ rules between fields

    @field_validator("workflows")
    @classmethod
    def _workflows_listed_once(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("serve at least one workflow: t2va, fl2va or ref2va")
        if len(set(value)) != len(value):
            raise ValueError(f"each workflow once, got {value}")
        return value

    @field_validator("image_formats", "video_formats", "audio_formats")
    @classmethod
    def _formats_lower_case(cls, value: list[str]) -> list[str]:
        return [name.strip().lower() for name in value]

    @model_validator(mode="after")
    def _within_the_blocks_rules(self) -> MiniMaxH3ModelConfig:
        for name, cap in _BLOCK_REFERENCE_CAPS.items():
            if getattr(self, name) > cap:
                raise ValueError(f"{name} is {getattr(self, name)}, but MiniMax-H3's blocks accept at most {cap}")
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds:g}) exceeds max_seconds ({self.max_seconds:g})")
        for name in ("min_seconds", "max_seconds", "default_seconds"):
            self._check_generated_length(name, getattr(self, name))
        if not self.min_seconds <= self.default_seconds <= self.max_seconds:
            raise ValueError(
                f"default_seconds ({self.default_seconds:g}) must lie within min_seconds ({self.min_seconds:g}) and "
                f"max_seconds ({self.max_seconds:g})"
            )
        for name in ("max_width", "max_height"):
            if getattr(self, name) % self.SPATIAL_COMPRESSION:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of {self.SPATIAL_COMPRESSION}")
        width, height = parse_size(self.default_size)
        problem = self.canvas_problem(width, height)
        if problem:
            raise ValueError(f"default_size {self.default_size}: {problem}")
        if self.min_video_reference_seconds_total > self.max_video_reference_seconds_total:
            raise ValueError("min_video_reference_seconds_total exceeds max_video_reference_seconds_total")
        return self

    def _check_generated_length(self, name: str, seconds: float) -> None:
        generated = self.generated_frames(seconds, FPS)
        if not MIN_GENERATED_SECONDS <= generated / FPS <= MAX_GENERATED_SECONDS:
            raise ValueError(
                f"{name} {seconds:g} s: the model would generate {generated} frames (17n + 5) = "
                f"{generated / FPS:.3f} s, outside the {MIN_GENERATED_SECONDS:g} to {MAX_GENERATED_SECONDS:g} s its "
                "blocks accept"
            )

    def shape_problem(self, width: int, height: int, seconds: float, fps: int) -> tuple[str, str] | None:
        if fps != FPS:
            return "fps", f"{fps} is not allowed; MiniMax-H3 generates at {FPS} fps only"
        problem = self.canvas_problem(width, height)
        if problem:
            return "size", problem
        if seconds < self.min_seconds:
            return "seconds", (f"{seconds:g} s is too short; MiniMax-H3 generates {self.min_seconds:g} s to "
                               f"{self.max_seconds:g} s (model.min_seconds)")
        return None

    def canvas_problem(self, width: int, height: int) -> str | None:
        """Why ``width`` x ``height`` is not a canvas this config serves (None when it is)."""
        multiple = self.SPATIAL_COMPRESSION
        if width % multiple or height % multiple:
            return f"width and height must be multiples of {multiple}, got {width}x{height}"
        if width > self.max_width or height > self.max_height:
            return f"{width}x{height} exceeds max_width x max_height ({self.max_width}x{self.max_height})"
        if width * height > self.max_pixels:
            return f"{width}x{height} is {width * height} pixels, over max_pixels ({self.max_pixels})"
        if max(width / height, height / width) > _MAX_ASPECT_RATIO:
            return f"{width}x{height}: the aspect ratio must lie between 1:4 and 4:1"
        return None

    # ------------------------------------------------------------------ H3's latent grid

    def latent_frames(self, generated_frames: int) -> int:
        return latent_frame_count(generated_frames, self.FRAME_STEP, self.FRAME_OFFSET)

    @property
    def audio_latents_per_second(self) -> int:
        """The audio VAE hops 800 samples at 32 kHz: 40 latents a second (hard-coded in the blocks)."""
        return 40

    def audio_latents(self, generated_frames: int) -> int:
        """Audio latents per stereo channel for a clip (diffusers' ``audio_latent_num_frames``)."""
        return round(generated_frames / FPS * self.audio_latents_per_second)

    def sequence_tokens(self, width: int, height: int, generated_frames: int, text_tokens: int,
                        reference_rows: int = 0) -> int:
        """Rows of the packed sequence one transformer pass carries: text, reference rows, both audio channels and
        the video tokens."""
        video = self.latent_frames(generated_frames) * (height // self.SPATIAL_COMPRESSION) * (
            width // self.SPATIAL_COMPRESSION)
        return text_tokens + reference_rows + 2 * self.audio_latents(generated_frames) + video

    @classmethod
    def tiny(cls, **overrides) -> MiniMaxH3ModelConfig:
        """Settings that suit the tiny random checkpoint (its 32-pixel canvas, short steps on a CPU)."""
        settings = {
            "name": "minimax-h3-tiny",
            "num_inference_steps": 4,
            "default_size": "64x32",  # the tiny checkpoint's own 16:9 canvas (canvas_short_edge 32)
            "default_seconds": 5.0,
            "max_width": 256,
            "max_height": 256,
            "max_pixels": 256 * 256,
            "max_latent_tokens": 8192,  # e.g. 256x256 for 14.375 s (102 x 8 x 8 = 6528)
            "seconds_per_token_step": 5e-4,  # measured on a 2-core CPU at small sizes
            "max_prompt_tokens": 256,
            "max_video_reference_pixels": 640 * 360,
            "max_image_reference_pixels": 4_000_000,
        }
        settings.update(overrides)
        return cls(**settings)

