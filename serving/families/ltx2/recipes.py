"""LTX-2 recipes as data: guidance settings, step schedules, the two-stage upsampler, step caches.

A recipe is a sequence of phases. ``dev`` is one phase of ``num_inference_steps``
with guidance; ``distilled`` one phase of LTX-2's 8 distilled sigmas without
guidance; ``two_stage`` a half-size phase, the x2 latent upsampler, then a
full-size refinement phase of 3 steps without guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES

from serving.families.ltx2.config import DiffusionEngineConfig, LTX2ModelConfig

__all__ = [
    "Guidance",
    "Phase",
    "recipe_phases",
    "total_steps",
    "load_latent_upsampler",
    "enable_step_cache",
    "drop_step_cache_state",
    "MagRatioRecorder",
    "DISTILLED_SIGMAS",
    "REFINE_SIGMAS",
]

# The scheduler appends the terminal sigma 0 to each: 8 and 3 steps.
DISTILLED_SIGMAS = tuple(float(s) for s in DISTILLED_SIGMA_VALUES)
REFINE_SIGMAS = tuple(float(s) for s in STAGE_2_DISTILLED_SIGMA_VALUES)


@dataclass(frozen=True)
class Guidance:
    """One request's guidance settings (the pipeline's per-modality scales). Plain numbers: picklable."""

    guidance_scale: float = 1.0
    audio_guidance_scale: float = 1.0
    stg_scale: float = 0.0
    audio_stg_scale: float = 0.0
    modality_scale: float = 1.0
    audio_modality_scale: float = 1.0
    guidance_rescale: float = 0.0
    audio_guidance_rescale: float = 0.0
    stg_blocks: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: LTX2ModelConfig) -> Guidance:
        # As the pipeline: an audio setting of 0 means "same as video".
        return cls(
            guidance_scale=config.guidance_scale,
            audio_guidance_scale=config.audio_guidance_scale or config.guidance_scale,
            stg_scale=config.stg_scale,
            audio_stg_scale=config.audio_stg_scale or config.stg_scale,
            modality_scale=config.modality_scale,
            audio_modality_scale=config.audio_modality_scale or config.modality_scale,
            guidance_rescale=config.guidance_rescale,
            audio_guidance_rescale=config.guidance_rescale,
            stg_blocks=tuple(config.stg_blocks) if config.stg_scale > 0 or config.audio_stg_scale > 0 else (),
        )

    @property
    def classifier_free(self) -> bool:
        return self.guidance_scale > 1.0 or self.audio_guidance_scale > 1.0

    @property
    def spatio_temporal(self) -> bool:
        return self.stg_scale > 0.0 or self.audio_stg_scale > 0.0

    @property
    def modality_isolation(self) -> bool:
        return self.modality_scale > 1.0 or self.audio_modality_scale > 1.0

    @property
    def is_off(self) -> bool:
        return not (self.classifier_free or self.spatio_temporal or self.modality_isolation)


GUIDANCE_OFF = Guidance()


@dataclass(frozen=True)
class Phase:
    """One run of the denoising loop at one size.

    ``sigmas`` None is the dev schedule: ``linspace(1, 1/steps)`` shifted by the
    checkpoint's scheduler for the token count. Fixed sigmas (distilled, refine)
    are used as they are. A phase after the first starts from the previous one's
    latents, upsampled x2 and re-noised to ``renoise``.
    """

    name: str
    size_divisor: int  # 1: the plan's size; 2: half its width and height
    steps: int
    sigmas: tuple[float, ...] | None
    guided: bool  # uses the request's guidance; otherwise all guidance is off
    renoise: float = 0.0


def recipe_phases(settings: DiffusionEngineConfig, num_inference_steps: int) -> tuple[Phase, ...]:
    dev = Phase("generate", 1, num_inference_steps, None, guided=True)
    distilled = Phase("generate", 1, len(DISTILLED_SIGMAS), DISTILLED_SIGMAS, guided=False)
    if settings.recipe == "dev":
        return (dev,)
    if settings.recipe == "distilled":
        return (distilled,)
    first = dev if settings.first_stage == "dev" else distilled
    refine = Phase("refine", 1, len(REFINE_SIGMAS), REFINE_SIGMAS, guided=False, renoise=REFINE_SIGMAS[0])
    return (Phase(first.name, 2, first.steps, first.sigmas, first.guided), refine)


def total_steps(settings: DiffusionEngineConfig, num_inference_steps: int) -> int:
    """Denoising steps a request runs under ``settings`` (what progress counts to)."""
    return sum(phase.steps for phase in recipe_phases(settings, num_inference_steps))


# --------------------------------------------------------------------------- two-stage upsampler


def load_latent_upsampler(settings: DiffusionEngineConfig, model_path: str, device, dtype):
    """The x2 latent upsampler (``latent_upsampler/`` of ``upsampler_path`` or of the model checkpoint).

    Real LTX-2 upsampler: 128 latent channels, 1024 middle channels, 4 residual
    blocks of two 3x3x3 convolutions on each side of the resampler: about 0.5 B
    parameters (1 GB in bf16), a fortieth of the transformer. At 1280x704 x 121
    frames it maps [1, 128, 16, 11, 20] to [1, 128, 16, 22, 40]; its largest
    activation is [1, 1024, 16, 22, 40] (29 MB in bf16). Running it inside the
    diffusion stage keeps the latents on the GPU between the two phases.
    """
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel  # noqa: PLC0415 - diffusers only when a recipe is applied

    path = settings.upsampler_path or model_path
    try:
        upsampler = LTX2LatentUpsamplerModel.from_pretrained(path, subfolder="latent_upsampler", torch_dtype=dtype)
    except (OSError, EnvironmentError) as error:
        raise ValueError(
            f"model.diffusion.recipe two_stage needs a latent upsampler under {path}/latent_upsampler "
            f"(set model.diffusion.upsampler_path): {error}"
        ) from error
    return upsampler.to(device).eval()


# --------------------------------------------------------------------------- step caches


def enable_step_cache(transformer, settings: DiffusionEngineConfig, expected_steps: int) -> None:
    """Turn on diffusers' step cache named in ``settings`` (no-op for ``none``).

    Each request runs inside its own cache context, so the caches keep one state per
    request; ``drop_step_cache_state`` forgets a finished request's.
    """
    if settings.step_cache == "none":
        return
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig  # noqa: PLC0415 - diffusers only when a recipe is applied

    _register_ltx2_block()
    if settings.step_cache == "first_block":
        config = FirstBlockCacheConfig(threshold=settings.step_cache_threshold or 0.05)
    elif settings.step_cache == "mag":
        config = MagCacheConfig(
            threshold=settings.step_cache_threshold or 0.06,
            num_inference_steps=expected_steps,
            mag_ratios=torch.tensor(settings.mag_ratios, dtype=torch.float32),
        )
    else:
        # diffusers' default patterns match module names ending in "attn": in LTX-2 only the two
        # cross-modal attentions. Name every block's attentions and feed-forwards instead.
        config = TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, cache_identifiers=[_LTX2_BLOCK_WORK])
    transformer.enable_cache(config)


_LTX2_BLOCK_WORK = (
    r"transformer_blocks\.\d+\."
    r"(attn1|attn2|audio_attn1|audio_attn2|audio_to_video_attn|video_to_audio_attn|ff|audio_ff)"
)


def drop_step_cache_state(transformer, context: str) -> None:
    """Forget the cache state kept for one request's context (it holds activations)."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            manager = getattr(hook, "state_manager", None)
            if manager is not None:
                manager._state_cache.pop(context, None)


class MagRatioRecorder:
    """Records MagCache's per-step ratios on an uncached transformer (its calibration), for ``mag_ratios``.

    MagCache's ratio of a step is the mean over tokens of |residual_t| / |residual_t-1|,
    the residual being the last block's video output minus the first block's video
    input. Run one request alone, one pass a step (batching on or off), inside
    ``with MagRatioRecorder(transformer) as recorder:``; then ``recorder.ratios``.
    """

    def __init__(self, transformer):
        self._blocks = transformer.transformer_blocks
        self._input: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self.ratios: list[float] = []

    def __enter__(self) -> MagRatioRecorder:
        self._handles = [
            self._blocks[0].register_forward_pre_hook(self._record_input, with_kwargs=True),
            self._blocks[-1].register_forward_hook(self._record_output),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _record_input(self, module, args, kwargs):
        self._input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _record_output(self, module, args, output):
        residual = (output[0] - self._input).float()
        if self._previous is None:
            self.ratios.append(1.0)
        else:
            current, previous = torch.linalg.norm(residual, dim=-1), torch.linalg.norm(self._previous, dim=-1)
            self.ratios.append(float((current / (previous + 1e-8)).mean()))
        self._previous = residual


def _register_ltx2_block() -> None:
    """Describe LTX-2's two-stream block to diffusers' block caches.

    An LTX-2 block returns ``(video, audio)``; the caches treat the second output
    as the "encoder" stream and read its input by that name, so map the name to
    the block's ``audio_hidden_states`` argument.
    """
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry  # noqa: PLC0415 - diffusers only when a recipe is applied
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformerBlock  # noqa: PLC0415 - diffusers only when a recipe is applied

    class _AudioAsSecondStream(TransformerBlockMetadata):
        def _get_parameter_from_args_kwargs(self, identifier: str, args=(), kwargs=None):
            if identifier == "encoder_hidden_states":
                identifier = "audio_hidden_states"
            return super()._get_parameter_from_args_kwargs(identifier, args, kwargs)

    TransformerBlockRegistry.register(
        model_class=LTX2VideoTransformerBlock,
        metadata=_AudioAsSecondStream(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
    )
