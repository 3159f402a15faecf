"""LTX-2's model config: the shared limits plus its guidance knobs, recipes and speed switches.

``model.family: ltx2`` selects it (``cluster.config.ModelConfig`` is the union
of the families' configs). Cross-field rules are checked when the config is
built, never at request time.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cluster.model_config import EngineLoopConfig, ModelConfigBase
from cluster.sizes import parse_shape_bucket, parse_size

__all__ = ["LTX2ModelConfig", "DiffusionEngineConfig", "DiffusionSettings", "SpeedConfig", "LTX2_DEFAULT_NEGATIVE_PROMPT"]

LTX2_DEFAULT_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"

# Off values of ModelConfig's guidance settings: recipes that run without guidance require them.
_GUIDANCE_OFF = {
    "guidance_scale": 1.0,
    "audio_guidance_scale": 1.0,
    "stg_scale": 0.0,
    "audio_stg_scale": 0.0,
    "modality_scale": 1.0,
    "audio_modality_scale": 1.0,
}


class DiffusionEngineConfig(EngineLoopConfig):
    """How LTX-2's diffusion stage runs its denoising loop (``model.diffusion``): the loop's settings and the recipe."""

    recipe: Literal["dev", "distilled", "two_stage"] = Field(
        "dev",
        description=(
            "dev: num_inference_steps steps with the guidance settings (CFG, spatio-temporal, modality: up to 4 "
            "transformer passes a step). distilled: LTX-2's 8 distilled sigmas, one pass a step, no guidance and no "
            "negative prompt (for distilled weights; the guidance settings must be off). two_stage: the first stage at "
            "half width and height, the latents upsampled x2 by the latent upsampler inside this stage, then 3 "
            "refinement steps (sigmas .909375, .725, .421875) without guidance at full size; sizes must be multiples "
            "of 64."
        ),
    )
    first_stage: Literal["dev", "distilled"] = Field(
        "dev",
        description=(
            "two_stage only: the half-size stage's schedule. dev: num_inference_steps with the guidance settings; "
            "distilled: the 8 distilled sigmas without guidance."
        ),
    )
    upsampler_path: str | None = Field(
        None,
        description=(
            "two_stage only: local directory or hub id holding latent_upsampler/ (diffusers layout). "
            "Unset: the model checkpoint's own latent_upsampler/ subfolder."
        ),
    )
    step_cache: Literal["none", "first_block", "mag", "taylorseer"] = Field(
        "none",
        description=(
            "diffusers step cache that skips transformer work on some steps (first_block: First-Block Cache; mag: "
            "MagCache, needs mag_ratios; taylorseer: TaylorSeer). Trades quality for speed: see BENCHMARKS.md for the "
            "measured deviation. Needs batching off (the caches keep per-request state between steps)."
        ),
    )
    step_cache_threshold: float | None = Field(
        None,
        gt=0,
        description="first_block and mag: how much change is tolerated before blocks run again (unset: 0.05 / 0.06).",
    )
    mag_ratios: list[float] | None = Field(
        None,
        description="mag only: the checkpoint's per-step residual magnitude ratios, from a calibration run.",
    )

    @model_validator(mode="after")
    def _options_fit_the_recipe(self) -> DiffusionEngineConfig:
        if self.recipe != "two_stage":
            if self.first_stage != "dev":
                raise ValueError(f"diffusion.first_stage applies to the two_stage recipe only (recipe is {self.recipe})")
            if self.upsampler_path is not None:
                raise ValueError(f"diffusion.upsampler_path applies to the two_stage recipe only (recipe is {self.recipe})")
        if self.step_cache != "none" and self.batching:
            raise ValueError(
                f"diffusion.step_cache {self.step_cache} keeps state per request between steps, which a shared "
                "batch cannot: set diffusion.batching to false"
            )
        if self.step_cache == "mag" and not self.mag_ratios:
            raise ValueError("diffusion.step_cache mag needs diffusion.mag_ratios (the checkpoint's calibrated ratios)")
        if self.mag_ratios is not None and self.step_cache != "mag":
            raise ValueError("diffusion.mag_ratios applies to step_cache mag only")
        if self.step_cache_threshold is not None and self.step_cache not in ("first_block", "mag"):
            raise ValueError("diffusion.step_cache_threshold applies to step_cache first_block or mag only")
        return self

    @property
    def runs_without_guidance(self) -> bool:
        """True when no phase of the recipe uses the guidance settings."""
        return self.recipe == "distilled" or (self.recipe == "two_stage" and self.first_stage == "distilled")


def diffusion_fits_model(value: DiffusionEngineConfig, info: ValidationInfo) -> DiffusionEngineConfig:
    """Rules between the engine and the rest of the model config."""
    model = info.data
    if value.runs_without_guidance:
        on = {name: model[name] for name, off in _GUIDANCE_OFF.items() if name in model and model[name] != off}
        if on:
            settings = ", ".join(f"{name} {number:g}" for name, number in on.items())
            offs = ", ".join(f"{name}: {off:g}" for name, off in _GUIDANCE_OFF.items())
            raise ValueError(
                f"diffusion.recipe {value.recipe} runs without guidance, but guidance is on ({settings}); set {offs}"
            )
    if value.recipe == "two_stage" and "default_size" in model:
        width, height = parse_size(model["default_size"])
        if width % 64 or height % 64:
            raise ValueError(
                f"diffusion.recipe two_stage halves the size, so default_size ({model['default_size']}) must be a "
                "multiple of 64 in both dimensions"
            )
    return value


# LTX2ModelConfig.diffusion: the engine's section, checked against the rest of the model config.
DiffusionSettings = Annotated[DiffusionEngineConfig, AfterValidator(diffusion_fits_model)]


class SpeedConfig(BaseModel):
    """GPU speed switches of the diffusion transformer; each is off by default or safe on the CPU.

    The weights dtype is ``model.dtype`` (bfloat16 on GPUs by default). A switch
    the device cannot honour is refused at start-up with the field's name.
    """

    model_config = ConfigDict(extra="forbid")

    attention_backend: str = Field(
        "auto",
        description=(
            "Attention kernels. auto: at start-up, the fastest of flash-attn 3, flash-attn 2, SageAttention, cuDNN, "
            "PyTorch flash/efficient and native SDPA that is installed and passes a numeric probe (native on CPUs). "
            "Or one diffusers backend name (e.g. _flash_3, flash, sage, _native_cudnn, native). Attention with a "
            "mask (text cross-attention) always runs on a backend that takes masks."
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "Regional torch.compile of the transformer blocks: one compiled block serves all of them, "
            "compiled once per shape (see shape_buckets) and kept in compile_cache_dir across restarts."
        ),
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode for the blocks (max-autotune tunes matmuls: slower start, faster steps)."
    )
    compile_cache_dir: str | None = Field(
        None,
        description="Directory for compiled kernels, reused after restarts (unset: reelserve/compile under the user cache directory).",
    )
    shape_buckets: list[str] = Field(
        default_factory=list,
        description=(
            "WIDTHxHEIGHTxFRAMES shapes (e.g. 1280x704x121) compiled, and captured as CUDA graphs when on, at replica "
            "start so no request pays for it; another shape compiles on its first request."
        ),
    )
    warmup_batch_sizes: list[int] = Field(
        default_factory=lambda: [1],
        description="Transformer batch sizes warmed up per shape bucket (2 per job with classifier-free guidance; more with step batching).",
    )
    fp8: bool = Field(
        False,
        description=(
            "FP8 (e4m3, per-row scales) weights and matmuls for the transformer blocks' linear layers via torchao "
            "(the [gpu] extra); needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."
        ),
    )
    cuda_graphs: bool = Field(
        False,
        description="Replay the compiled blocks as CUDA graphs (static shapes: one graph per shape and batch size); needs compile and a CUDA device.",
    )
    text_tokens: int = Field(
        1024, ge=1, description="Prompt length (tokens after the text connectors) used for warm-up passes; the served length."
    )

    @field_validator("shape_buckets")
    @classmethod
    def _buckets_parse(cls, value: list[str]) -> list[str]:
        for bucket in value:
            parse_shape_bucket(bucket)
        return value

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _batches_positive(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("warmup_batch_sizes needs at least one batch size, each >= 1")
        return value

    @model_validator(mode="after")
    def _graphs_need_compile(self) -> SpeedConfig:
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs replays compiled blocks: set compile: true as well")
        return self


class LTX2ModelConfig(ModelConfigBase):
    """An LTX-2 checkpoint (diffusers layout) and how it generates."""

    # The video VAE: 32x in space, 8x in time; 8k + 1 frames (the tiny checkpoint keeps the same rules).
    SPATIAL_COMPRESSION = 32
    TEMPORAL_COMPRESSION = 8
    FRAME_STEP = 8
    FRAME_OFFSET = 1

    family: Literal["ltx2"] = Field("ltx2", description="Model family: LTX-2 (joint audio+video DiT).")
    num_inference_steps: int = Field(
        30, ge=2, le=200, description="Denoising steps per video (at least 2: LTX-2's shifted schedule needs two)."
    )
    guidance_scale: float = Field(3.0, ge=1.0, description="Classifier-free guidance for video (1 turns it off).")
    audio_guidance_scale: float = Field(7.0, ge=1.0, description="Classifier-free guidance for audio.")
    stg_scale: float = Field(1.0, ge=0.0, description="Spatio-temporal guidance for video (0 turns it off).")
    audio_stg_scale: float = Field(
        1.0, ge=0.0, description="Spatio-temporal guidance for audio; 0 is allowed only with stg_scale 0 (both off)."
    )
    stg_blocks: list[int] = Field(
        default_factory=lambda: [28],
        description="Transformer block indices perturbed by spatio-temporal guidance; each must be below the block count.",
    )
    modality_scale: float = Field(3.0, ge=1.0, description="Modality-isolation guidance for video (1 turns it off).")
    audio_modality_scale: float = Field(3.0, ge=1.0, description="Modality-isolation guidance for audio.")
    guidance_rescale: float = Field(0.7, ge=0.0, le=1.0, description="Guidance rescale factor against over-exposure.")
    negative_prompt: str = Field(LTX2_DEFAULT_NEGATIVE_PROMPT, description="Negative prompt used when a request gives none.")
    max_latent_tokens: int = Field(
        27_280,
        ge=1,
        description=(
            "Per-request budget in latent tokens: latent frames x (height / 32) x (width / 32), with latent frames "
            "= (generated frames - 1) / 8 + 1. It bounds a request's memory and GPU time together; requests over it "
            "are refused with the largest size allowed at their length. Default: 1280x704 for 10 s at 24 fps "
            "(31 x 22 x 40), which fits one 80 GB GPU beside the 19B transformer's weights."
        ),
    )
    vae_tiling: bool = Field(False, description="Decode video in tiles to bound GPU memory on large frames.")
    seconds_per_token_step: float = Field(
        3.5e-4,
        gt=0,
        description=(
            "Expected diffusion seconds per latent token per denoising step, all guidance passes included, on the "
            "diffusion stage's hardware. It sizes drain timeouts and capacity estimates until replicas have measured "
            "their own. Default: LTX-2 19B on one H100 (1.22 s per pass at 14,080 tokens, 4 passes per step)."
        ),
    )
    diffusion: DiffusionSettings = Field(
        default_factory=lambda: DiffusionEngineConfig(),
        description="The diffusion stage's loop: recipe, step batching, step caches, checkpoints.",
    )
    speed: SpeedConfig = Field(
        default_factory=lambda: SpeedConfig(),
        description="GPU speed switches of the diffusion transformer (all off or CPU-safe by default).",
    )

    @field_validator("stg_blocks")
    @classmethod
    def _blocks_non_negative(cls, value: list[int]) -> list[int]:
        if any(b < 0 for b in value):
            raise ValueError("block indices start at 0")
        return value

    @model_validator(mode="after")
    def _guidance_settings_agree(self) -> LTX2ModelConfig:
        if self.audio_stg_scale == 0 and self.stg_scale > 0:
            # diffusers reads an audio scale of 0 as "unset" and uses the video scale instead.
            raise ValueError("audio_stg_scale 0 cannot turn audio STG off while stg_scale > 0; set both to 0")
        if (self.stg_scale > 0 or self.audio_stg_scale > 0) and not self.stg_blocks:
            raise ValueError("spatio-temporal guidance is on (stg_scale > 0) but stg_blocks is empty")
        return self

    @model_validator(mode="after")
    def _warmup_shapes_are_requests(self) -> LTX2ModelConfig:
        """A warm-up shape is a request the limits accept: warming anything else costs start time for nothing."""
        for index, bucket in enumerate(self.speed.shape_buckets):
            width, height, frames = parse_shape_bucket(bucket)
            where = f"model.speed.shape_buckets[{index}] ({bucket})"
            if width % self.SPATIAL_COMPRESSION or height % self.SPATIAL_COMPRESSION:
                raise ValueError(f"{where}: width and height must be multiples of {self.SPATIAL_COMPRESSION}")
            if (frames - self.FRAME_OFFSET) % self.FRAME_STEP:
                raise ValueError(f"{where}: frames must be {self.FRAME_STEP}k + {self.FRAME_OFFSET} (e.g. 121)")
            if width > self.max_width or height > self.max_height:
                raise ValueError(f"{where}: above the request limits (max_width {self.max_width}, max_height {self.max_height})")
            longest = self.generated_frames(self.max_seconds, self.max_fps)
            if frames > longest:
                raise ValueError(f"{where}: {frames} frames, above the longest request ({longest} frames: max_seconds at max_fps)")
            tokens = self.latent_frames(frames) * (height // self.SPATIAL_COMPRESSION) * (width // self.SPATIAL_COMPRESSION)
            if tokens > self.max_latent_tokens:
                raise ValueError(f"{where}: {tokens} latent tokens, above max_latent_tokens ({self.max_latent_tokens})")
        return self

    @classmethod
    def tiny(cls, **overrides) -> LTX2ModelConfig:
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
            max_latent_tokens=8192,  # e.g. 512x512 for 10 s at 24 fps (31 x 16 x 16 = 7936)
            seconds_per_token_step=2e-3,  # measured on a 2-core CPU at small sizes
            max_prompt_tokens=256,
        )
        settings.update(overrides)
        return cls(**settings)
