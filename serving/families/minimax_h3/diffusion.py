"""MiniMax-H3's denoising step for reelserve's engine: per-request state, packed-layout batching, checkpoints.

A request's state is what diffusers' H3 blocks build before their loop: the
packed layout (rotary grid, modality tags, row indices), the video and audio
rows (conditioning rows first, held at their noise level), the row-timestep
plan of every step, and two schedulers of its own (diffusers' shared ones keep
a step index). ``start`` runs the blocks up to ``set_timesteps``; ``advance``
runs one transformer pass and diffusers' own scheduler-update block; ``finish``
runs ``after_denoise``. That is the blocks' loop, taken apart at the step.

Batching: the transformer's batch axis replicates one packed layout (one
rotary grid, one timestep table, no attention mask), so requests share a pass
only with the same layout (same prompt length, same references' geometry, same
keyframes) at the same step of the same schedule. ``bucket`` says exactly that.

The replica loads only the transformer partition(s) its workflows need:
``transformer/`` for t2va and fl2va, ``transformer_ref/`` for ref2va.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import MiniMaxH3Transformer3DModel
from diffusers.modular_pipelines.minimax_h3 import (
    MiniMaxH3AudioReference,
    MiniMaxH3ImageReference,
    MiniMaxH3VideoReference,
)
from diffusers.modular_pipelines.minimax_h3.denoise import MiniMaxH3LoopSchedulerStep
from diffusers.modular_pipelines.modular_pipeline import BlockState

from serving.devices import resolve_device, resolve_dtype
from serving.engine.core import DiffusionEngine, StateUntouchedError
from serving.families.minimax_h3.blocks import StagePipelines
from serving.families.minimax_h3.checkpoint import (
    TRANSFORMER_OF_WORKFLOW,
    checkpoint_path,
    component_config,
)
from serving.families.minimax_h3.config import FPS, MiniMaxH3ModelConfig
from serving.families.minimax_h3.handoffs import ReferenceConditioning, TextConditioning
from serving.protocol import (
    AudioLatents,
    DenoisedLatents,
    HostTensor,
    RenderPlan,
    VideoLatents,
)

__all__ = [
    "DenoiseCheckpoint",
    "DenoiseRequest",
    "MiniMaxH3Diffusion",
    "MiniMaxH3Engine",
    "MiniMaxH3StepModel",
    "layout_references",
    "stored_types",
]

# What the prepare blocks leave for the loop (and after_denoise), by their own names.
_LAYOUT = ("position_ids", "token_tags", "video_indices", "audio_indices", "text_indices")
_PREPARED = (*_LAYOUT, "latents", "audio_latents", "row_timestep_plan", "timesteps", "audio_timesteps",
             "num_condition_video_rows", "num_condition_audio_rows", "num_latent_frames", "latent_height",
             "latent_width", "num_audio_latents")
_GEOMETRY = ("num_condition_video_rows", "num_condition_audio_rows", "num_latent_frames", "latent_height",
             "latent_width", "num_audio_latents")


@dataclass(frozen=True)
class DenoiseRequest:
    """One ``denoise`` call: the conditioner's output, the encoded keyframes or references (None: t2va), the plan."""

    request_id: str
    text: TextConditioning
    references: ReferenceConditioning | None
    plan: RenderPlan

    @property
    def workflow(self) -> str:
        return "t2va" if self.references is None else self.references.workflow


@dataclass(frozen=True)
class DenoiseCheckpoint:
    """Everything a new engine needs to continue a request, besides the request itself: the rows after
    ``step_index`` steps (float32, exact) and the fields that prove it is the same request and layout.

    Size: the packed video and audio rows, e.g. 9.9 MB at 1344x768 x 5 s (37,296 video rows x 96 + 414 audio rows
    x 32, float32) plus the references' conditioning rows.
    """

    request_id: str
    workflow: str
    step_index: int
    total_steps: int
    video_rows: HostTensor
    audio_rows: HostTensor
    layout_digest: str
    seed: int
    width: int
    height: int
    generated_frames: int
    num_inference_steps: int

    @property
    def nbytes(self) -> int:
        return self.video_rows.nbytes + self.audio_rows.nbytes

    @property
    def finished_steps(self) -> int:
        """Steps finished, as the diffusion stage keys and reports checkpoints (H3 runs one phase: ``step_index``)."""
        return self.step_index


class _Job:
    """One request's state between steps."""

    def __init__(self, request: DenoiseRequest, prepared: dict, schedulers, text: torch.Tensor, device):
        self.request = request
        self.workflow = request.workflow
        self.text = text
        self.video: torch.Tensor = prepared["latents"].to(device)
        self.audio: torch.Tensor = prepared["audio_latents"].to(device)
        self.layout = {name: prepared[name].to(device) for name in _LAYOUT}
        self.timestep_plan = [(t.to(device), i.to(device)) for t, i in prepared["row_timestep_plan"]]
        self.timesteps = prepared["timesteps"].to(device)
        self.audio_timesteps = prepared["audio_timesteps"].to(device)
        self.geometry = {name: int(prepared[name]) for name in _GEOMETRY}
        self.video_scheduler, self.audio_scheduler = schedulers
        self.digest = _layout_digest(prepared, text)
        self.step_index = 0

    @property
    def total_steps(self) -> int:
        return len(self.timestep_plan)

    @property
    def sequence_length(self) -> int:
        return int(self.layout["position_ids"].shape[0])


def _layout_digest(prepared: dict, text: torch.Tensor) -> str:
    """Identifies a packed layout: requests with equal digests can share a transformer pass."""
    digest = hashlib.sha1()
    for name in _LAYOUT:
        digest.update(np.ascontiguousarray(prepared[name].cpu().numpy()).tobytes())
    digest.update(repr((tuple(text.shape[1:]), str(text.dtype),
                        [int(prepared[name]) for name in _GEOMETRY])).encode())
    return digest.hexdigest()


# Placeholders for the ref2va layout block, which reads only each reference's modality and whether it brings audio
# (diffusers: "Only their modality is read here; the geometry comes from the latents").
_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)
_NO_FRAMES = np.zeros((1, 1, 1, 3), dtype=np.uint8)
_NO_AUDIO = torch.zeros(2, 0)


def layout_references(references: ReferenceConditioning) -> list:
    """What the ref2va layout block reads of each reference (its modality, whether it brings audio), as diffusers'
    reference types holding no media."""
    placeholders = []
    for kind, has_audio in zip(references.kinds, references.has_audio):
        if kind == "image":
            placeholders.append(MiniMaxH3ImageReference(image=_NO_IMAGE))
        elif kind == "video":
            placeholders.append(MiniMaxH3VideoReference(frames=_NO_FRAMES, audio=_NO_AUDIO if has_audio else None))
        else:
            placeholders.append(MiniMaxH3AudioReference(audio=_NO_AUDIO))
    return placeholders


class MiniMaxH3StepModel:
    """The engine's ``StepModel`` for H3: the transformer partition(s), diffusers' prepare and after blocks."""

    def __init__(self, config: MiniMaxH3ModelConfig):
        self.config = config
        path = checkpoint_path(config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.workflows = tuple(config.workflows)
        self.prepare = StagePipelines(path, "prepare", self.workflows, torch.device("cpu"), self.dtype)
        self.after = StagePipelines(path, "after_denoise", self.workflows, torch.device("cpu"), self.dtype)
        _check_geometry(path, self.prepare[self.workflows[0]], self.workflows)
        self.transformers: dict[str, MiniMaxH3Transformer3DModel] = {}
        for partition in sorted({TRANSFORMER_OF_WORKFLOW[w] for w in self.workflows}):
            transformer = MiniMaxH3Transformer3DModel.from_pretrained(path, subfolder=partition, dtype=self.dtype)
            self.transformers[partition] = transformer.to(self.device).eval()
        self._update = MiniMaxH3LoopSchedulerStep()  # diffusers' own scheduler-update block of the loop
        self.batchable = True
        self.forwards = 0  # transformer passes run
        self.rows_run = 0  # requests those passes carried

    # ------------------------------------------------------------------ checks (cheap, at add time)

    def check(self, request: DenoiseRequest, resume_from: DenoiseCheckpoint | None) -> None:
        plan, workflow = request.plan, request.workflow
        if workflow not in self.workflows:
            partition = TRANSFORMER_OF_WORKFLOW[workflow]
            raise ValueError(
                f"this diffusion replica serves {', '.join(self.workflows)} and did not load {partition}/, which "
                f"{workflow} needs (model.workflows)"
            )
        if plan.fps != FPS:
            raise ValueError(f"MiniMax-H3 generates at {FPS} fps, the plan asks for {plan.fps}")
        if plan.num_inference_steps < 2:
            raise ValueError(f"num_inference_steps {plan.num_inference_steps}: H3's schedule needs at least 2")
        references = request.references
        if workflow == "fl2va" and references is not None and len(references.keyframe_anchors) != len(references.video_latents):
            raise ValueError("fl2va: one encoded keyframe per anchor")
        if resume_from is not None:
            expected = {"workflow": workflow, "seed": plan.seed, "width": plan.width, "height": plan.height,
                            "generated_frames": plan.generated_frames, "num_inference_steps": plan.num_inference_steps}
            for name, value in expected.items():
                if getattr(resume_from, name) != value:
                    raise ValueError(f"checkpoint of {resume_from.request_id}: {name} is "
                                     f"{getattr(resume_from, name)}, the request's is {value}")

    # ------------------------------------------------------------------ state

    @torch.no_grad()
    def start(self, request: DenoiseRequest, resume_from: DenoiseCheckpoint | None) -> _Job:
        workflow = request.workflow
        prepared = self.prepare.run(workflow, list(_PREPARED), **self._prepare_inputs(request))
        pipeline = self.prepare[workflow]
        # Schedulers of its own: diffusers' shared ones carry a step index.
        schedulers = (copy.deepcopy(pipeline.scheduler), copy.deepcopy(pipeline.audio_scheduler))
        text = request.text.states.to(self.device)
        job = _Job(request, prepared, schedulers, text, self.device)
        if resume_from is not None:
            self._restore(job, resume_from)
        return job

    def _prepare_inputs(self, request: DenoiseRequest) -> dict:
        plan, references = request.plan, request.references
        inputs = {
            "text_token_tags": request.text.token_tags.to("cpu"), "height": plan.height, "width": plan.width,
            "num_frames": plan.generated_frames, "num_inference_steps": plan.num_inference_steps,
            "generator": torch.Generator().manual_seed(plan.seed),  # on the CPU, as the blocks draw it anywhere
        }
        if references is None:
            return inputs
        inputs["condition_latents"] = [t.to("cpu") for t in references.video_latents]
        if references.workflow == "fl2va":
            inputs["keyframe_anchors"] = references.keyframe_anchors
        else:
            inputs["normalized_references"] = layout_references(references)
            inputs["audio_condition_latents"] = [t.to("cpu") for t in references.audio_rows]
        return inputs

    def _restore(self, job: _Job, checkpoint: DenoiseCheckpoint) -> None:
        where = f"checkpoint of {checkpoint.request_id}"
        if checkpoint.layout_digest != job.digest:
            raise ValueError(f"{where} was taken with another packed layout (other references or prompt)")
        if checkpoint.total_steps != job.total_steps or not 0 <= checkpoint.step_index < job.total_steps:
            raise ValueError(f"{where}: step {checkpoint.step_index} of {checkpoint.total_steps} is not in this schedule")
        video, audio = checkpoint.video_rows.to(self.device), checkpoint.audio_rows.to(self.device)
        if video.shape != job.video.shape or audio.shape != job.audio.shape:
            raise ValueError(f"{where}: rows {tuple(video.shape)} / {tuple(audio.shape)} do not fit this layout")
        job.video, job.audio, job.step_index = video, audio, checkpoint.step_index
        job.video_scheduler.set_begin_index(checkpoint.step_index)
        job.audio_scheduler.set_begin_index(checkpoint.step_index)

    # ------------------------------------------------------------------ the engine's questions

    def request_id(self, job: _Job) -> str:
        return job.request.request_id

    def bucket(self, job: _Job) -> Hashable:
        # Same partition, same packed layout, same step of the same schedule: one timestep table for the batch.
        return (TRANSFORMER_OF_WORKFLOW[job.workflow], job.digest, job.request.plan.num_inference_steps, job.step_index)

    def cost(self, job: _Job) -> int:
        return job.sequence_length

    def progress(self, job: _Job) -> tuple[int, int]:
        return job.step_index, job.total_steps

    def done(self, job: _Job) -> bool:
        return job.step_index >= job.total_steps

    @torch.no_grad()
    def finish(self, job: _Job) -> DenoisedLatents:
        out = self.after.run(job.workflow, ["latents", "audio_latents"], latents=job.video.cpu(),
                             audio_latents=job.audio.cpu(), **job.geometry)
        return DenoisedLatents(video=VideoLatents(HostTensor.of(out["latents"])),
                               audio=AudioLatents(HostTensor.of(out["audio_latents"])))

    def checkpoint(self, job: _Job) -> DenoiseCheckpoint:
        plan = job.request.plan
        return DenoiseCheckpoint(
            request_id=job.request.request_id, workflow=job.workflow, step_index=job.step_index,
            total_steps=job.total_steps, video_rows=_host_copy(job.video), audio_rows=_host_copy(job.audio),
            layout_digest=job.digest, seed=plan.seed, width=plan.width, height=plan.height,
            generated_frames=plan.generated_frames, num_inference_steps=plan.num_inference_steps,
        )

    def release(self, job: _Job) -> None:
        """Nothing outside the state: H3 keeps no step cache."""

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def advance(self, jobs: Sequence[_Job], token_budget: int) -> None:
        first = jobs[0]
        transformer = self.transformers[TRANSFORMER_OF_WORKFLOW[first.workflow]]
        timestep, timestep_indices = first.timestep_plan[first.step_index]
        try:
            video, audio = transformer(
                hidden_states=torch.stack([job.video for job in jobs]),
                audio_hidden_states=torch.stack([job.audio for job in jobs]),
                encoder_hidden_states=torch.cat([job.text for job in jobs]),
                timestep=timestep,
                timestep_indices=timestep_indices,
                return_dict=False,
                **first.layout,
            )
        except Exception as error:
            raise StateUntouchedError(error) from error
        self.forwards += 1
        self.rows_run += len(jobs)
        # Every pass succeeded: only now does any request's state change.
        for index, job in enumerate(jobs):
            self._take_step(job, video[index : index + 1], audio[index : index + 1])

    def _take_step(self, job: _Job, video_prediction: torch.Tensor, audio_prediction: torch.Tensor) -> None:
        """diffusers' loop update (``MiniMaxH3LoopSchedulerStep``) on this request's rows and schedulers: the
        generated rows take one Euler step, the conditioning rows stay where they are."""
        components = _Schedulers(job.video_scheduler, job.audio_scheduler)
        state = BlockState(
            latents=job.video, audio_latents=job.audio, noise_pred=video_prediction, audio_noise_pred=audio_prediction,
            audio_timesteps=job.audio_timesteps, num_condition_video_rows=job.geometry["num_condition_video_rows"],
            num_condition_audio_rows=job.geometry["num_condition_audio_rows"],
        )
        self._update(components, state, job.step_index, job.timesteps[job.step_index])
        job.step_index += 1


@dataclass
class _Schedulers:
    """The two components the scheduler-update block reads: this request's own schedulers."""

    scheduler: object
    audio_scheduler: object


def _host_copy(tensor: torch.Tensor) -> HostTensor:
    """A host copy that never aliases the live tensor (on the CPU ``.cpu()`` would not copy)."""
    return HostTensor.of(tensor.detach().to("cpu", copy=True))


def _check_geometry(path: str, bare_pipeline, workflows: Sequence[str]) -> None:
    """This stage loads no VAE, so the blocks read the VAEs' geometry from their released defaults; refuse a
    checkpoint whose VAEs or transformer patch differ from them."""
    vae = component_config(path, "vae")
    audio_vae = component_config(path, "audio_vae")
    temporal = int(np.prod(vae["temporal_downsample_factors"]))
    found: dict[str, Any] = {
        "vae_spatial_compression_ratio": int(np.prod(vae["spatial_downsample_factors"])),
        "vae_latent_channels": int(vae["latent_channels"]),
        "vae_frames_per_chunk": int(vae["clip_length"]),
        "vae_latents_per_chunk": -(-int(vae["clip_length"]) // temporal),
        "audio_sampling_rate": int(audio_vae["sampling_rate"]),
        "audio_latent_channels": int(audio_vae["latent_channels"]),
    }
    for partition in {TRANSFORMER_OF_WORKFLOW[w] for w in workflows}:
        found["patch_size"] = tuple(component_config(path, partition)["patch_size"])
    for name, value in found.items():
        if getattr(bare_pipeline, name) != value:
            raise ValueError(f"checkpoint {path}: {name} is {value}, but H3's blocks assume "
                             f"{getattr(bare_pipeline, name)} without the component loaded")


class MiniMaxH3Engine(DiffusionEngine[DenoiseRequest, _Job, DenoiseCheckpoint]):
    """The H3 diffusion engine, configured by ``MiniMaxH3ModelConfig`` (``model.diffusion`` for the loop)."""

    model: MiniMaxH3StepModel

    def __init__(self, config: MiniMaxH3ModelConfig):
        settings = config.diffusion
        super().__init__(
            MiniMaxH3StepModel(config),
            batching=settings.batching,
            max_batch_tokens=settings.max_batch_tokens,
            checkpoint_every_steps=settings.checkpoint_every_steps,
        )


class MiniMaxH3Diffusion:
    """The diffusion stage's side of H3 (``DiffusionModel``): the engine, and how a ``denoise`` call enters it.

    A call carries the text conditioning, the encoded keyframes or references (None for t2va) and the plan; its
    outputs are the video and the audio latents, each for its own decoder.
    """

    def __init__(self, config: MiniMaxH3ModelConfig, passes=None):
        if passes is not None:  # the family declares no sequence-parallel pass, so a rank group never reaches here
            raise ValueError("the minimax-h3 family runs its transformer on one GPU per replica")
        self.config = config
        self.engine = MiniMaxH3Engine(config)
        self._alone = 0

    def request(self, request_id: str, text: TextConditioning, references: ReferenceConditioning | None,
                plan: RenderPlan) -> DenoiseRequest:
        return DenoiseRequest(request_id, text, references, plan)

    def plan_of(self, request: DenoiseRequest) -> RenderPlan:
        return request.plan

    def total_steps(self, request: DenoiseRequest) -> int:
        """Transformer passes: the schedule's timesteps (N sigmas, N - 1 passes, repeated sigmas collapsed)."""
        scheduler = copy.deepcopy(self.engine.model.prepare[self.engine.model.workflows[0]].scheduler)
        scheduler.set_timesteps(request.plan.num_inference_steps)
        return int(scheduler.timesteps.numel())

    def latent_tokens(self, request: DenoiseRequest) -> int:
        plan = request.plan
        return self.config.latent_tokens(plan.width, plan.height, plan.seconds, plan.fps)

    def outputs(self, result: DenoisedLatents) -> tuple[VideoLatents, AudioLatents]:
        return result.video, result.audio

    def denoise(self, text: TextConditioning, references: ReferenceConditioning | None, plan: RenderPlan,
                on_step: Callable[[int, int], None] | None = None) -> DenoisedLatents:
        """One request alone, to its end, on this thread (tests, benchmarks)."""
        self._alone += 1
        return self.engine.run_alone(DenoiseRequest(f"alone-{self._alone}", text, references, plan), on_step)


def stored_types() -> tuple[type, ...]:
    """What H3 keeps beyond the protocol's hand-offs: the encoders' hand-offs and its denoising checkpoint."""
    return (TextConditioning, ReferenceConditioning, DenoiseCheckpoint)
