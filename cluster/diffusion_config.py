"""The diffusion stage's settings: its denoising loop (``model.diffusion``) and its GPU speed switches
(``model.speed``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cluster.sizes import parse_shape_bucket, parse_size

__all__ = ["DiffusionEngineConfig", "DiffusionSettings", "SpeedConfig", "diffusion_fits_model"]

# Off values of ModelConfig's guidance settings: recipes that run without guidance require them.
_GUIDANCE_OFF = {
    "guidance_scale": 1.0,
    "audio_guidance_scale": 1.0,
    "stg_scale": 0.0,
    "audio_stg_scale": 0.0,
    "modality_scale": 1.0,
    "audio_modality_scale": 1.0,
}


class DiffusionEngineConfig(BaseModel):
    """How the diffusion stage runs its denoising loop (``model.diffusion``)."""

    model_config = ConfigDict(extra="forbid")

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
    batching: bool = Field(
        True,
        description=(
            "Step-level batching: requests whose latents have the same shape run each transformer pass together; a "
            "request joins at its first step and leaves after its last. Off: one request per pass."
        ),
    )
    max_batch_tokens: int = Field(
        65536,
        ge=1,
        description=(
            "Most video+audio tokens one transformer pass carries (rows x tokens per row; every guidance pass of a "
            "request is a row). A single row always runs; after an out-of-memory error the engine halves it until "
            "idle. 65536 holds one 1280x704 x 121-frame dev step (3 or 4 rows of 14206 tokens, about 3 GB of "
            "activations a row in bf16) or ten 768x512 x 121-frame rows."
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


# ModelConfig.diffusion: the engine's section, checked against the rest of the model config.
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
