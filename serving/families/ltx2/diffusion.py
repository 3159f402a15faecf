"""LTX-2's denoising step for the engine: per-request state, batched guidance passes, checkpoints.

``LTX2Engine(config)`` is the diffusion stage's engine (see ``serving.engine.core``
for the loop, events and failure isolation). This module is the LTX-2 step math,
built from diffusers' pieces: ``LTX2VideoTransformer3DModel``,
``FlowMatchEulerDiscreteScheduler`` (one pair per request), the pipelines'
static helpers, ``calculate_shift`` and ``rescale_noise_cfg``.

One step of one request is up to four transformer rows: conditional,
unconditional (negative prompt, CFG), spatio-temporal (STG: self-attention of the
chosen blocks perturbed) and modality-isolated (audio<->video cross-attention
off). All rows of all requests in a batch go through the transformer together,
in chunks of at most ``max_batch_tokens``:

- STG per row: the transformer's ``perturbation_mask`` (0 = perturbed, 1 = not);
- modality isolation per row: a forward hook on each block's audio-to-video and
  video-to-audio attention multiplies its output by 0 for isolated rows, which is
  exactly ``isolate_modalities=True`` for them (the block adds ``gate * 0``);
- image-to-video rows carry per-token timesteps (0 on the clean first frame).

Rows differ only in what the pipeline varies between its passes, so each row's
prediction equals the pipeline's pass up to floating-point summation order.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift, rescale_noise_cfg

from serving.devices import resolve_device, resolve_dtype
from serving.engine.core import DiffusionEngine, StateUntouchedError
from serving.families.ltx2.checkpoint import checkpoint_path
from serving.families.ltx2.config import LTX2ModelConfig
from serving.families.ltx2.latents import Geometry, LatentSpace, read_latent_space
from serving.families.ltx2.passes import LTX2Passes, load_transformer
from serving.families.ltx2.recipes import (
    GUIDANCE_OFF,
    Guidance,
    Phase,
    drop_step_cache_state,
    enable_step_cache,
    load_latent_upsampler,
    recipe_phases,
)
from serving.families.ltx2.speed import SpeedSettingError, apply_speed, check_speed_settings, warm_up
from serving.protocol import (
    AudioLatents,
    DenoisedLatents,
    HostTensor,
    ImageCondition,
    PromptEmbeddings,
    RenderPlan,
    TextEmbeddings,
    VideoLatents,
)
from serving.weights import LoadLog

__all__ = ["LTX2Engine", "LTX2Diffusion", "LTX2StepModel", "DenoiseRequest", "DenoiseCheckpoint", "Guidance"]


@dataclass(frozen=True)
class DenoiseRequest:
    """One job for the engine. ``guidance`` None: the model config's (off for recipes without guidance)."""

    request_id: str
    embeddings: PromptEmbeddings
    condition: ImageCondition | None
    plan: RenderPlan
    guidance: Guidance | None = None


@dataclass(frozen=True)
class DenoiseCheckpoint:
    """Everything a new engine needs to continue a request: host arrays and plain numbers, picklable.

    Size: the packed latents (7.3 MB at 1280x704 x 121 frames, float32) plus a
    few hundred bytes. The request itself (embeddings, photo latents, plan)
    travels with the resumed ``add`` call; the fields below check it is the same.
    """

    request_id: str
    recipe: str
    phase_index: int
    step_index: int  # steps finished in this phase
    finished_steps: int  # over all phases
    total_steps: int
    video_latents: HostTensor  # packed, normalised, float32
    audio_latents: HostTensor
    generator_state: HostTensor  # the request's random generator (later phases draw noise from it)
    sigmas: HostTensor  # this phase's schedule, to refuse a checkpoint from an engine configured otherwise
    seed: int
    width: int
    height: int
    generated_frames: int
    fps: int
    guidance: Guidance

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.video_latents, self.audio_latents, self.generator_state, self.sigmas))


_ROW_KINDS = ("conditional", "unconditional", "spatio_temporal", "isolated")


class _Text:
    """One prompt's connector outputs on the compute device."""

    def __init__(self, text: TextEmbeddings, device, dtype):
        self.video = text.video.to(device, dtype)
        self.audio = text.audio.to(device, dtype)
        self.mask = text.mask.to(device)


class _RequestState:
    """One request's state between steps."""

    def __init__(self, request: DenoiseRequest, phases: tuple[Phase, ...], guidance: Guidance, generator, prompt, negative):
        self.request = request
        self.phases = phases
        self.guidance = guidance
        self.generator = generator
        self.prompt: _Text = prompt
        self.negative: _Text | None = negative
        self.phase_index = 0
        self.step_index = 0
        # Set when the first phase starts (``LTX2StepModel.start``), before anything reads them.
        self.geometry: Geometry = None  # type: ignore[assignment]
        self.video: torch.Tensor = None  # type: ignore[assignment]
        self.audio: torch.Tensor = None  # type: ignore[assignment]
        self.condition_mask: torch.Tensor | None = None
        self.video_scheduler: Any = None  # diffusers schedulers
        self.audio_scheduler: Any = None
        self.video_coords: torch.Tensor | None = None
        self.audio_coords: torch.Tensor | None = None
        self.rows: tuple[str, ...] = ()

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    @property
    def conditioned(self) -> bool:
        return self.request.condition is not None

    @property
    def active_guidance(self) -> Guidance:
        return self.guidance if self.phase.guided else GUIDANCE_OFF

    @property
    def cache_context(self) -> str:
        return f"{self.request.request_id}/{self.phase_index}"

    @property
    def finished_steps(self) -> int:
        return sum(phase.steps for phase in self.phases[: self.phase_index]) + self.step_index

    @property
    def total_steps(self) -> int:
        return sum(phase.steps for phase in self.phases)


class LTX2StepModel:
    """The engine's ``StepModel`` for LTX-2: loads the transformer, scheduler config and latent statistics.

    ``passes``: the transformer already loaded on a rank group (a multi-GPU replica); unset, it is loaded here.
    """

    def __init__(self, config: LTX2ModelConfig, passes=None):
        self.config = config
        self.settings = config.diffusion
        path = checkpoint_path(config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        check_speed_settings(config.speed, self.device)  # before the weights: a bad switch costs no load
        if config.speed.compile and self.settings.step_cache != "none":
            raise SpeedSettingError(
                "model.speed.compile: not with a step cache (model.diffusion.step_cache); its hooks skip blocks per "
                "step, which the compiled blocks do not follow; turn one of them off"
            )
        if passes is None:  # one GPU: weights straight onto it, then attention kernels, FP8, compilation (model.speed)
            self.loaded = LoadLog()
            transformer = load_transformer(config, self.device, self.dtype, self.loaded)
            passes = LTX2Passes(transformer, apply_speed(transformer, config.speed, self.device, self.dtype))
        else:
            self.loaded = passes.loaded
        self.passes = passes
        self.transformer, self.speed = passes.transformer, passes.speed
        self.default_guidance = GUIDANCE_OFF if self.settings.runs_without_guidance else Guidance.from_config(config)
        self._check_stg_blocks(self.default_guidance, "model.stg_blocks")
        self._scheduler_class = FlowMatchEulerDiscreteScheduler
        self._scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
        self.latents: LatentSpace = read_latent_space(path, self.transformer.config, self.device)
        self.upsampler: Any = None  # the latent upsampler, for the two_stage recipe
        if self.settings.recipe == "two_stage":
            self.upsampler = load_latent_upsampler(self.settings, path, self.device, self.dtype)
        self._perturbed_blocks = {
            index for index, block in enumerate(self.transformer.transformer_blocks) if block.perturbed_attn
        }
        self.step_cache = self.settings.step_cache != "none"
        enable_step_cache(self.transformer, self.settings, recipe_phases(self.settings, config.num_inference_steps)[0].steps)
        self.batchable = not self.step_cache
        self.forwards = 0  # transformer passes run
        self.rows_run = 0  # transformer rows run

    # ------------------------------------------------------------------ checks (cheap, at add time)

    def check(self, request: DenoiseRequest, resume_from: DenoiseCheckpoint | None) -> None:
        plan = request.plan
        phases = recipe_phases(self.settings, plan.num_inference_steps)
        if any(phase.sigmas is None and phase.steps < 2 for phase in phases):
            raise ValueError(f"num_inference_steps {plan.num_inference_steps}: LTX-2's shifted schedule needs at least 2")
        first = self._phase_size(plan, phases[0])
        if any(phase.size_divisor == 2 for phase in phases) and (plan.width % 64 or plan.height % 64):
            raise ValueError(
                f"size {plan.width}x{plan.height}: the two_stage recipe generates at half size, so width and height "
                "must be multiples of 64"
            )
        condition = request.condition
        if condition is not None and (condition.width, condition.height) != first:
            where = "the plan is" if first == (plan.width, plan.height) else "the two_stage recipe's first stage is"
            raise ValueError(
                f"image condition is {condition.width}x{condition.height} but {where} {first[0]}x{first[1]}"
            )
        guidance = request.guidance or self.default_guidance
        if resume_from is not None:
            guidance = resume_from.guidance  # a resumed request keeps the guidance it started with
        if request.guidance is not None:
            if self.settings.runs_without_guidance and not request.guidance.is_off:
                raise ValueError(f"the {self.settings.recipe} recipe runs without guidance; this request asks for it")
            self._check_stg_blocks(request.guidance, "guidance.stg_blocks")
        needs_negative = any(phase.guided for phase in phases) and guidance.classifier_free
        if needs_negative and request.embeddings.negative is None:
            raise ValueError("classifier-free guidance is on but the prompt embeddings carry no negative prompt")
        if resume_from is not None:
            self._check_checkpoint(request, resume_from, phases)

    def _check_stg_blocks(self, guidance: Guidance, field: str) -> None:
        blocks = self.transformer.config.num_layers
        bad = [b for b in guidance.stg_blocks if b >= blocks]
        if bad and guidance.spatio_temporal:
            raise ValueError(f"{field}: blocks {bad} do not exist; this transformer has {blocks} blocks (0..{blocks - 1})")

    def _check_checkpoint(self, request: DenoiseRequest, checkpoint: DenoiseCheckpoint, phases) -> None:
        plan = request.plan
        expected = dict(
            recipe=self.settings.recipe,
            seed=plan.seed,
            width=plan.width,
            height=plan.height,
            generated_frames=plan.generated_frames,
            fps=plan.fps,
            total_steps=sum(phase.steps for phase in phases),
        )
        where = f"checkpoint of {checkpoint.request_id}"
        for name, value in expected.items():
            if getattr(checkpoint, name) != value:
                raise ValueError(f"{where}: {name} is {getattr(checkpoint, name)}, the request's is {value}")
        phase, step = checkpoint.phase_index, checkpoint.step_index
        if not 0 <= phase < len(phases) or not 0 <= step < phases[phase].steps:
            raise ValueError(f"{where}: phase {phase} step {step} is not in this recipe")

    # ------------------------------------------------------------------ state

    @torch.no_grad()
    def start(self, request: DenoiseRequest, resume_from: DenoiseCheckpoint | None) -> _RequestState:
        plan = request.plan
        phases = recipe_phases(self.settings, plan.num_inference_steps)
        guidance = resume_from.guidance if resume_from is not None else (request.guidance or self.default_guidance)
        generator = torch.Generator(device=self.device).manual_seed(plan.seed)
        prompt = _Text(request.embeddings.prompt, self.device, self.dtype)
        negative = None
        if request.embeddings.negative is not None and guidance.classifier_free:
            negative = _Text(request.embeddings.negative, self.device, self.dtype)
        job = _RequestState(request, phases, guidance, generator, prompt, negative)
        if resume_from is None:
            self._enter_first_phase(job)
        else:
            self._restore(job, resume_from)
        return job

    def _enter_first_phase(self, job: _RequestState) -> None:
        self._set_geometry(job, 0)
        condition = job.request.condition
        photo = condition.latents.to(self.device, torch.float32) if condition is not None else None
        start = self.latents.noise(job.geometry, photo, job.generator)
        job.video, job.audio, job.condition_mask = start.video, start.audio, start.condition_mask
        self._set_schedule(job, begin=0)

    def _enter_next_phase(self, job: _RequestState) -> None:
        before = job.geometry
        self.release(job)  # the finished phase's cache context
        self._set_geometry(job, job.phase_index + 1)
        start = self.latents.upsample_and_renoise(
            job.video, job.audio, before, job.geometry, self.upsampler, job.conditioned, job.phase.renoise, job.generator
        )
        job.video, job.audio, job.condition_mask = start.video, start.audio, start.condition_mask
        self._set_schedule(job, begin=0)

    def _restore(self, job: _RequestState, checkpoint: DenoiseCheckpoint) -> None:
        self._set_geometry(job, checkpoint.phase_index)
        job.video = checkpoint.video_latents.to(self.device, torch.float32)
        job.audio = checkpoint.audio_latents.to(self.device, torch.float32)
        expected = (1, job.geometry.video_tokens)
        if tuple(job.video.shape[:2]) != expected or job.audio.shape[1] != job.geometry.audio_tokens:
            raise ValueError(f"checkpoint of {checkpoint.request_id}: latents {tuple(job.video.shape)} do not fit this plan")
        if job.conditioned:
            job.condition_mask = self.latents.condition_mask(job.geometry)
        job.generator.set_state(checkpoint.generator_state.to("cpu"))
        self._set_schedule(job, begin=checkpoint.step_index)
        if not torch.equal(job.video_scheduler.sigmas.cpu(), checkpoint.sigmas.to("cpu")):
            raise ValueError(f"checkpoint of {checkpoint.request_id} was taken with another schedule")

    def _phase_size(self, plan: RenderPlan, phase: Phase) -> tuple[int, int]:
        return plan.width // phase.size_divisor, plan.height // phase.size_divisor

    def _set_geometry(self, job: _RequestState, phase_index: int) -> None:
        plan = job.request.plan
        job.phase_index, job.step_index = phase_index, 0
        width, height = self._phase_size(plan, job.phase)
        job.geometry = self.latents.geometry(width, height, plan.generated_frames, float(plan.fps))
        geometry = job.geometry
        job.video_coords = self.transformer.rope.prepare_video_coords(
            1, geometry.latent_frames, geometry.latent_height, geometry.latent_width, self.device, fps=float(plan.fps)
        )
        job.audio_coords = self.transformer.audio_rope.prepare_audio_coords(1, geometry.audio_frames, self.device)
        job.rows = self._rows(job.active_guidance)

    def _set_schedule(self, job: _RequestState, begin: int) -> None:
        """The phase's video and audio schedulers (the pipeline keeps a copy for audio), positioned at ``begin``."""
        phase, config = job.phase, self._scheduler_config
        if phase.sigmas is None:
            scheduler = self._scheduler_class.from_config(config)
            sigmas: np.ndarray | list[float] = np.linspace(1.0, 1 / phase.steps, phase.steps)
            mu = calculate_shift(
                job.geometry.video_tokens,
                config.get("base_image_seq_len", 1024),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.95),
                config.get("max_shift", 2.05),
            )
        else:
            # Fixed schedules are used exactly as listed: no resolution shift, no terminal stretch.
            scheduler = self._scheduler_class.from_config(config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None)
            sigmas, mu = list(phase.sigmas), None
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        audio_scheduler = copy.deepcopy(scheduler)
        scheduler.set_begin_index(begin)
        audio_scheduler.set_begin_index(begin)
        job.video_scheduler, job.audio_scheduler = scheduler, audio_scheduler
        job.step_index = begin

    def _rows(self, guidance: Guidance) -> tuple[str, ...]:
        rows = ["conditional"]
        if guidance.classifier_free:
            rows.append("unconditional")
        # Without perturbed attention in the chosen blocks the STG pass equals the conditional one
        # (its delta is 0), so it is not run.
        if guidance.spatio_temporal and self._perturbed_blocks.intersection(guidance.stg_blocks):
            rows.append("spatio_temporal")
        if guidance.modality_isolation:
            rows.append("isolated")
        return tuple(rows)

    # ------------------------------------------------------------------ the engine's questions

    def request_id(self, job: _RequestState) -> str:
        return job.request.request_id

    def bucket(self, job: _RequestState) -> Hashable:
        g = job.geometry
        text = tuple(job.prompt.video.shape[1:]) + tuple(job.prompt.audio.shape[1:])
        return (g.latent_frames, g.latent_height, g.latent_width, g.audio_frames, text, job.conditioned)

    def cost(self, job: _RequestState) -> int:
        return len(job.rows) * job.geometry.tokens

    def progress(self, job: _RequestState) -> tuple[int, int]:
        return job.finished_steps, job.total_steps

    def done(self, job: _RequestState) -> bool:
        return job.phase_index == len(job.phases) - 1 and job.step_index == job.phase.steps

    @torch.no_grad()
    def finish(self, job: _RequestState) -> DenoisedLatents:
        video, audio = self.latents.denormalised(job.video, job.audio, job.geometry)
        return DenoisedLatents(
            video=VideoLatents(HostTensor.of(video.float())), audio=AudioLatents(HostTensor.of(audio.float()))
        )

    def checkpoint(self, job: _RequestState) -> DenoiseCheckpoint:
        plan = job.request.plan
        return DenoiseCheckpoint(
            request_id=job.request.request_id,
            recipe=self.settings.recipe,
            phase_index=job.phase_index,
            step_index=job.step_index,
            finished_steps=job.finished_steps,
            total_steps=job.total_steps,
            video_latents=_host_copy(job.video),
            audio_latents=_host_copy(job.audio),
            generator_state=HostTensor.of(job.generator.get_state()),
            sigmas=_host_copy(job.video_scheduler.sigmas),
            seed=plan.seed,
            width=plan.width,
            height=plan.height,
            generated_frames=plan.generated_frames,
            fps=plan.fps,
            guidance=job.guidance,
        )

    def release(self, job: _RequestState) -> None:
        if self.step_cache:
            drop_step_cache_state(self.transformer, job.cache_context)

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def advance(self, jobs: Sequence[_RequestState], token_budget: int) -> None:
        rows = [(job, kind) for job in jobs for kind in job.rows]
        try:
            predictions = {}
            for chunk in self._chunks(rows, token_budget):
                video, audio = self._forward(chunk)
                for index, (job, kind) in enumerate(chunk):
                    predictions[(id(job), kind)] = (video[index : index + 1], audio[index : index + 1])
        except Exception as error:
            raise StateUntouchedError(error) from error
        # Every pass succeeded: only now does any request's state change.
        for job in jobs:
            self._take_step(job, {kind: predictions[(id(job), kind)] for kind in job.rows})
            if job.step_index == job.phase.steps and job.phase_index + 1 < len(job.phases):
                self._enter_next_phase(job)

    def _chunks(self, rows: list, token_budget: int) -> list[list]:
        """Rows in transformer passes: up to the token budget, never splitting a row; STG block sets apart."""
        if self.step_cache:
            # A step cache keeps one state per request: all of a request's rows in one pass under its context.
            return [list(group) for _, group in itertools.groupby(rows, key=lambda row: id(row[0]))]
        chunks: list[list] = []
        chunk: list = []
        tokens = 0
        for row in rows:
            cost = row[0].geometry.tokens
            stg_clash = row[1] == "spatio_temporal" and any(
                kind == "spatio_temporal" and job.active_guidance.stg_blocks != row[0].active_guidance.stg_blocks
                for job, kind in chunk
            )
            if chunk and (tokens + cost > token_budget or stg_clash):
                chunks.append(chunk)
                chunk, tokens = [], 0
            chunk.append(row)
            tokens += cost
        if chunk:
            chunks.append(chunk)
        return chunks

    def _forward(self, chunk: list) -> tuple[torch.Tensor, torch.Tensor]:
        jobs = [job for job, _ in chunk]
        kinds = [kind for _, kind in chunk]
        first, geometry = jobs[0], jobs[0].geometry
        texts = [job.negative if kind == "unconditional" else job.prompt for job, kind in chunk]
        timestep = torch.stack([job.video_scheduler.timesteps[job.step_index] for job in jobs])
        audio_timestep = None
        video_timestep = timestep
        if first.conditioned:
            # Per-token timesteps: 0 on the clean first frame (the image-to-video pipeline's rule).
            video_timestep = timestep.unsqueeze(-1) * (1 - torch.cat([job.condition_mask for job in jobs]))
            audio_timestep = timestep
        isolated = [kind == "isolated" for kind in kinds]
        perturbed = [kind == "spatio_temporal" for kind in kinds]
        stg_blocks = None
        perturbation_mask = None
        if any(perturbed):
            stg_blocks = list(next(job for job, kind in chunk if kind == "spatio_temporal").active_guidance.stg_blocks)
            if not all(perturbed):
                perturbation_mask = torch.tensor([0.0 if p else 1.0 for p in perturbed], device=self.device, dtype=self.dtype)
        keep = None
        if any(isolated) and not all(isolated):
            keep = torch.tensor([0.0 if i else 1.0 for i in isolated], device=self.device, dtype=self.dtype)
        cache = self.transformer.cache_context(first.cache_context) if self.step_cache else nullcontext()
        with cache:
            video, audio = self.passes(
                modality_keep=keep,
                hidden_states=torch.cat([job.video for job in jobs]).to(self.dtype),
                audio_hidden_states=torch.cat([job.audio for job in jobs]).to(self.dtype),
                encoder_hidden_states=torch.cat([text.video for text in texts]),
                audio_encoder_hidden_states=torch.cat([text.audio for text in texts]),
                timestep=video_timestep,
                audio_timestep=audio_timestep,
                sigma=timestep,
                encoder_attention_mask=torch.cat([text.mask for text in texts]),
                audio_encoder_attention_mask=torch.cat([text.mask for text in texts]),
                num_frames=geometry.latent_frames,
                height=geometry.latent_height,
                width=geometry.latent_width,
                fps=float(first.request.plan.fps),
                audio_num_frames=geometry.audio_frames,
                video_coords=torch.cat([job.video_coords for job in jobs]),
                audio_coords=torch.cat([job.audio_coords for job in jobs]),
                isolate_modalities=all(isolated),
                spatio_temporal_guidance_blocks=stg_blocks,
                perturbation_mask=perturbation_mask,
                use_cross_timestep=True,
            )
        self.forwards += 1
        self.rows_run += len(chunk)
        return video.float(), audio.float()

    def _take_step(self, job: _RequestState, predictions: dict) -> None:
        """Combine the rows' predictions as the pipeline does (in x0 space), then one Euler step."""
        guidance, index = job.active_guidance, job.step_index
        video_velocity = _guided_velocity(
            job.video,
            {kind: video for kind, (video, _) in predictions.items()},
            job.video_scheduler.sigmas[index],
            guidance.guidance_scale,
            guidance.stg_scale,
            guidance.modality_scale,
            guidance.guidance_rescale,
            rescale_noise_cfg,
        )
        audio_velocity = _guided_velocity(
            job.audio,
            {kind: audio for kind, (_, audio) in predictions.items()},
            job.audio_scheduler.sigmas[index],
            guidance.audio_guidance_scale,
            guidance.audio_stg_scale,
            guidance.audio_modality_scale,
            guidance.audio_guidance_rescale,
            rescale_noise_cfg,
        )
        t = job.video_scheduler.timesteps[index]
        if job.conditioned:
            # Frame 0 is the photo: only the other frames take the step.
            latents = self.latents.unpack_video(job.video, job.geometry)
            velocity = self.latents.unpack_video(video_velocity, job.geometry)
            stepped = job.video_scheduler.step(
                velocity[:, :, 1:], t, latents[:, :, 1:], generator=job.generator, return_dict=False
            )[0]
            job.video = self.latents.pack_video(torch.cat([latents[:, :, :1], stepped], dim=2))
        else:
            job.video = job.video_scheduler.step(video_velocity, t, job.video, generator=job.generator, return_dict=False)[0]
        job.audio = job.audio_scheduler.step(audio_velocity, t, job.audio, generator=job.generator, return_dict=False)[0]
        job.step_index += 1


def _guided_velocity(latents, predictions, sigma, cfg_scale, stg_scale, modality_scale, rescale, rescale_noise_cfg):
    """The pipeline's guidance: deltas of the denoised estimate (x0 = x - sigma * v), then back to a velocity."""
    conditional = latents - predictions["conditional"] * sigma
    cfg_delta = stg_delta = modality_delta = 0
    if "unconditional" in predictions:
        cfg_delta = (cfg_scale - 1) * (conditional - (latents - predictions["unconditional"] * sigma))
    if "spatio_temporal" in predictions:
        stg_delta = stg_scale * (conditional - (latents - predictions["spatio_temporal"] * sigma))
    if "isolated" in predictions:
        modality_delta = (modality_scale - 1) * (conditional - (latents - predictions["isolated"] * sigma))
    guided = conditional + cfg_delta + stg_delta + modality_delta
    if rescale > 0:
        guided = rescale_noise_cfg(guided, conditional, guidance_rescale=rescale)
    return (latents - guided) / sigma


def _host_copy(tensor: torch.Tensor) -> HostTensor:
    """A host copy that never aliases the live tensor (on the CPU ``.cpu()`` would not copy)."""
    return HostTensor.of(tensor.detach().to("cpu", copy=True))


class LTX2Engine(DiffusionEngine[DenoiseRequest, _RequestState, DenoiseCheckpoint]):
    """The LTX-2 diffusion engine, configured by ``LTX2ModelConfig`` (``model.diffusion`` for the loop)."""

    model: LTX2StepModel

    def __init__(self, config: LTX2ModelConfig, passes=None):
        settings = config.diffusion
        super().__init__(
            LTX2StepModel(config, passes),
            batching=settings.batching,
            max_batch_tokens=settings.max_batch_tokens,
            checkpoint_every_steps=settings.checkpoint_every_steps,
            oom_recovery_steps=settings.oom_recovery_steps,
        )

    def total_steps(self, plan: RenderPlan) -> int:
        """Steps a request with this plan runs (what progress counts to)."""
        return sum(phase.steps for phase in recipe_phases(self.model.settings, plan.num_inference_steps))

    def condition_size(self, plan: RenderPlan) -> tuple[int, int]:
        """The size the photo must be encoded at: the plan's, or half of it for the two_stage recipe."""
        first = recipe_phases(self.model.settings, plan.num_inference_steps)[0]
        return plan.width // first.size_divisor, plan.height // first.size_divisor


class LTX2Diffusion:
    """The diffusion stage's side of LTX-2 (``DiffusionModel``): the engine, and how a ``denoise`` call enters it.

    A call carries the prompt embeddings, the photo's latents (or ``None``) and
    the plan; its outputs are the video and the audio latents, each for its own
    decoder.
    """

    def __init__(self, config: LTX2ModelConfig, passes=None):
        self.config = config
        self.engine = LTX2Engine(config, passes)
        self.loaded = self.engine.model.loaded  # seconds per component loaded
        self._alone = 0  # requests run by ``denoise``

    def warm_up(self) -> dict[str, float]:
        """Each of ``model.speed.shape_buckets`` once (compile included), on every rank; seconds per pass."""
        model = self.engine.model
        if not self.config.speed.shape_buckets:
            return {}
        with torch.inference_mode():
            return warm_up(model.transformer, self.config.speed, model.speed, run_pass=model.passes,
                           stg_blocks=list(model.default_guidance.stg_blocks) or None)

    def request(self, request_id: str, embeddings, condition, plan: RenderPlan) -> DenoiseRequest:
        return DenoiseRequest(request_id, embeddings, condition, plan)

    def plan_of(self, request: DenoiseRequest) -> RenderPlan:
        return request.plan

    def total_steps(self, request: DenoiseRequest) -> int:
        return self.engine.total_steps(request.plan)

    def latent_tokens(self, request: DenoiseRequest) -> int:
        plan = request.plan
        return self.config.latent_tokens(plan.width, plan.height, plan.seconds, plan.fps)

    def outputs(self, result: DenoisedLatents) -> tuple[VideoLatents, AudioLatents]:
        return result.video, result.audio

    def condition_size(self, plan: RenderPlan) -> tuple[int, int]:
        return self.engine.condition_size(plan)

    @property
    def transformer(self):
        return self.engine.model.transformer

    def denoise(
        self,
        embeddings: PromptEmbeddings,
        condition: ImageCondition | None,
        plan: RenderPlan,
        on_step: Callable[[int, int], None] | None = None,
    ) -> DenoisedLatents:
        """One request alone, to its end, on this thread (``reelserve generate``, tests, benchmarks)."""
        self._alone += 1
        return self.engine.run_alone(DenoiseRequest(f"alone-{self._alone}", embeddings, condition, plan), on_step)


def stored_types() -> tuple[type, ...]:
    """What LTX-2 keeps beyond the protocol's hand-offs: its denoising checkpoint (and the guidance inside it)."""
    return (Guidance, DenoiseCheckpoint)
