"""Every recipe on the tiny checkpoint equals diffusers' own way of running it; step caches behind a switch.

- dev: ``LTX2Pipeline`` / ``LTX2ImageToVideoPipeline`` with the config's guidance;
- distilled: the same pipelines with the distilled sigmas, guidance off, a non-shifting scheduler;
- two_stage: the pipeline at half size, ``LTX2LatentUpsamplePipeline``, then the pipeline again
  on the upsampled latents with the refine sigmas, re-noised to the first of them.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2ImageToVideoPipeline, LTX2Pipeline
from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES

from serving.engine.core import RequestFinished
from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig as ModelConfig
from serving.families.ltx2.diffusion import DenoiseRequest, LTX2Engine
from serving.families.ltx2.tiny import tiny_latent_upsampler
from serving.protocol import PromptEmbeddings, RenderPlan

PROMPT = "a tabby cat looks around and purrs"
WIDTH, HEIGHT, FPS, SEED, STEPS = 128, 128, 24, 7, 3
GUIDANCE_OFF = dict(
    guidance_scale=1.0,
    audio_guidance_scale=1.0,
    stg_scale=0.0,
    audio_stg_scale=0.0,
    modality_scale=1.0,
    audio_modality_scale=1.0,
)


@pytest.fixture(scope="module")
def plan():
    return RenderPlan.build(
        width=WIDTH, height=HEIGHT, fps=FPS, seconds=0.5, seed=SEED, num_inference_steps=STEPS, frame_step=8
    )


@pytest.fixture(scope="module")
def photo(sample_photo):
    return sample_photo.crop((75, 0, 375, 300))  # square, as the plan


def _config(tiny_config, recipe: str, **diffusion):
    overrides = dict(GUIDANCE_OFF) if recipe == "distilled" else {}
    return tiny_config.model_copy(
        update={"diffusion": tiny_config.diffusion.model_copy(update={"recipe": recipe, **diffusion}), **overrides}
    )


def _run(engine, *requests) -> dict:
    for request in requests:
        engine.add(request)
    results = {}
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, RequestFinished):
                results[event.request_id] = event.output
    return results


def _pipeline_kwargs(config, plan, generator):
    return dict(
        prompt=PROMPT,
        negative_prompt=config.negative_prompt,
        num_frames=plan.generated_frames,
        frame_rate=float(plan.fps),
        guidance_scale=config.guidance_scale,
        audio_guidance_scale=config.audio_guidance_scale,
        stg_scale=config.stg_scale,
        audio_stg_scale=config.audio_stg_scale,
        spatio_temporal_guidance_blocks=list(config.stg_blocks),
        modality_scale=config.modality_scale,
        audio_modality_scale=config.audio_modality_scale,
        guidance_rescale=config.guidance_rescale,
        audio_guidance_rescale=config.guidance_rescale,
        max_sequence_length=config.max_prompt_tokens,
        generator=generator,
        output_type="latent",
        return_dict=False,
    )


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint):
    """diffusers' own pipelines on the tiny checkpoint, loaded once."""
    loaded = {}
    for mode, cls in (("text-to-video", LTX2Pipeline), ("image-to-video", LTX2ImageToVideoPipeline)):
        loaded[mode] = cls.from_pretrained(str(tiny_checkpoint))
        loaded[mode].set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def stages(tiny_config):
    family = get_family("ltx2")
    return family.stage("text_encoder").component(tiny_config), family.stage("image_conditioner").component(tiny_config)


def _diffusers_reference(recipe, config, pipeline, checkpoint, plan, photo):
    """The recipe run with diffusers' pipelines only."""
    image = {} if photo is None else {"image": photo}
    generator = torch.Generator().manual_seed(plan.seed)
    kwargs = _pipeline_kwargs(config, plan, generator)
    original_scheduler = pipeline.scheduler

    def fixed_schedule():
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            original_scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None
        )

    try:
        return _run_reference(recipe, pipeline, checkpoint, plan, kwargs, image, fixed_schedule)
    finally:
        pipeline.scheduler = original_scheduler


def _run_reference(recipe, pipeline, checkpoint, plan, kwargs, image, fixed_schedule):
    from diffusers import LTX2LatentUpsamplePipeline  # noqa: PLC0415 - keeps collection of `make check` fast
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel  # noqa: PLC0415 - keeps collection of `make check` fast

    with torch.no_grad():
        if recipe == "dev":
            return pipeline(height=plan.height, width=plan.width, num_inference_steps=STEPS, **kwargs, **image)
        if recipe == "distilled":
            fixed_schedule()
            return pipeline(
                height=plan.height, width=plan.width, sigmas=DISTILLED_SIGMA_VALUES, num_inference_steps=8, **kwargs, **image
            )
        video, audio = pipeline(height=plan.height // 2, width=plan.width // 2, num_inference_steps=STEPS, **kwargs, **image)
        upsampler = LTX2LatentUpsamplerModel.from_pretrained(str(checkpoint), subfolder="latent_upsampler")
        upsampled = LTX2LatentUpsamplePipeline(vae=pipeline.vae, latent_upsampler=upsampler)(
            latents=video, output_type="latent", return_dict=False
        )[0]
        fixed_schedule()
        refine = {**kwargs, **GUIDANCE_OFF}
        return pipeline(
            latents=upsampled,
            audio_latents=audio,
            height=plan.height,
            width=plan.width,
            sigmas=STAGE_2_DISTILLED_SIGMA_VALUES,
            num_inference_steps=3,
            noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0],
            **refine,
            **image,
        )


@pytest.mark.parametrize("mode", ["text-to-video", "image-to-video"])
@pytest.mark.parametrize("recipe", ["dev", "distilled", "two_stage"])
def test_recipe_equals_diffusers(recipe, mode, tiny_config, tiny_checkpoint, plan, photo, pipelines, stages):
    config = _config(tiny_config, recipe)
    text_encoder, image_conditioner = stages
    embeddings = text_encoder.encode(PROMPT, config.negative_prompt)
    if recipe == "distilled":
        embeddings = PromptEmbeddings(prompt=embeddings.prompt, negative=None)  # no negative prompt at all
    engine = LTX2Engine(config)
    condition = None
    if mode == "image-to-video":
        condition = image_conditioner.condition(photo, *engine.condition_size(plan))

    ours = _run(engine, DenoiseRequest("job", embeddings, condition, plan))["job"]
    video, audio = _diffusers_reference(
        recipe, config, pipelines[mode], tiny_checkpoint, plan, None if condition is None else photo
    )

    assert ours.video.latents.shape == tuple(video.shape) == (1, 8, 3, HEIGHT // 32, WIDTH // 32)
    assert float((ours.video.latents.to() - video).abs().max()) <= 1e-4
    assert float((ours.audio.latents.to() - audio).abs().max()) <= 1e-4
    expected_steps = {"dev": STEPS, "distilled": 8, "two_stage": STEPS + 3}[recipe]
    assert engine.total_steps(plan) == expected_steps
    assert engine.model.forwards == expected_steps  # one transformer pass a step: guidance rows batched


def test_two_stage_needs_sizes_in_multiples_of_64(tiny_config):
    with pytest.raises(ValueError, match="multiple of 64"):
        ModelConfig.tiny(default_size="96x64", diffusion={"recipe": "two_stage"})
    limits = get_family("ltx2").read_limits(_config(tiny_config, "two_stage"))
    assert limits.size_multiple == 64


def test_the_tiny_latent_upsampler_loads_back(tiny_checkpoint):
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel  # noqa: PLC0415 - keeps collection of `make check` fast

    loaded = LTX2LatentUpsamplerModel.from_pretrained(str(tiny_checkpoint), subfolder="latent_upsampler")
    built = tiny_latent_upsampler()
    expected = built.state_dict()
    assert sorted(loaded.state_dict()) == sorted(expected) and expected
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    latents = torch.randn(1, 8, 2, 2, 3)
    assert tuple(loaded(latents).shape) == (1, 8, 2, 4, 6)  # x2 in space, not in time


# --------------------------------------------------------------------------- step caches


class _BlockWork:
    """Counts query projections in the last block's self-attention: work a step cache skips shows as fewer calls."""

    def __init__(self, engine):
        self.calls = 0
        engine.model.transformer.transformer_blocks[-1].attn1.to_q.register_forward_hook(self._count)

    def _count(self, *args):
        self.calls += 1


@pytest.mark.parametrize(
    ("cache", "options"),
    [("first_block", {"step_cache_threshold": 10.0}), ("taylorseer", {}), ("mag", {"mag_ratios": [1.0] * 8})],
)
def test_step_caches_skip_work_and_keep_each_request_apart(cache, options, tiny_config, stages):
    config = _config(tiny_config, "dev", batching=False, step_cache=cache, **options).model_copy(
        update={"num_inference_steps": 8}
    )
    uncached_config = config.model_copy(update={"diffusion": tiny_config.diffusion})
    embeddings = stages[0].encode(PROMPT, config.negative_prompt)
    long_plan = RenderPlan.build(
        width=WIDTH, height=HEIGHT, fps=FPS, seconds=0.5, seed=SEED, num_inference_steps=8, frame_step=8
    )
    other_plan = RenderPlan.build(
        width=WIDTH, height=HEIGHT, fps=FPS, seconds=0.5, seed=SEED + 1, num_inference_steps=8, frame_step=8
    )
    uncached = _run(LTX2Engine(uncached_config), DenoiseRequest("a", embeddings, None, long_plan))["a"]

    engine = LTX2Engine(config)
    work = _BlockWork(engine)
    alone = _run(engine, DenoiseRequest("a", embeddings, None, long_plan))["a"]
    assert work.calls < 8  # some steps reused cached work

    # Interleaved with another request step by step, each keeps its own cache state.
    together = _run(
        engine, DenoiseRequest("a", embeddings, None, long_plan), DenoiseRequest("b", embeddings, None, other_plan)
    )
    assert torch.equal(together["a"].video.latents.to(), alone.video.latents.to())
    assert torch.equal(together["a"].audio.latents.to(), alone.audio.latents.to())
    # The price: the output moves away from the uncached one (BENCHMARKS.md measures by how much).
    deviation = float((alone.video.latents.to() - uncached.video.latents.to()).abs().max())
    assert 0 < deviation < float("inf")
    assert all(not key.startswith("a/") for key in _cache_contexts(engine))  # finished requests' state dropped


def _cache_contexts(engine) -> set[str]:
    names = set()
    for module in engine.model.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in [] if registry is None else registry.hooks.values():
            manager = getattr(hook, "state_manager", None)
            if manager is not None:
                names.update(manager._state_cache)
    return names
