"""What travels between stages, what a job asks for, and what a family's pipeline sees of the runner.

Hand-off objects are named after what they carry. Their tensors are numpy
arrays on the host (``HostTensor``): a hand-off can cross process boundaries
(Ray object references) no matter which device produced it, and Ray moves
numpy buffers without copying them through pickle.

At the bottom: ``JobSpec`` (what a pipeline generates) and ``JobContext``, the
small protocol through which a family's pipeline calls its stages. The job
runner (``serving.jobs``) implements it durably; ``serving.generate`` in one
process. The job record itself lives with the runner (``serving.jobs.record``).
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Awaitable, Mapping, Protocol

import numpy as np
import torch

__all__ = [
    "RenderPlan",
    "HostTensor",
    "TextEmbeddings",
    "PromptEmbeddings",
    "ImageCondition",
    "VideoLatents",
    "AudioLatents",
    "DenoisedLatents",
    "VideoFrames",
    "EncodedVideo",
    "Waveform",
    "Fence",
    "JobTicket",
    "Handoff",
    "JobInput",
    "DenoiseResult",
    "StoredVideo",
    "StepCallback",
    "JobStatus",
    "InputSpec",
    "JobSpec",
    "JobContext",
]


@dataclass(frozen=True)
class RenderPlan:
    """The exact shape of one generation, fixed before any stage runs.

    ``generated_frames`` is what the model must produce (its frame count rule,
    e.g. 8k+1 for LTX-2); ``output_frames`` is what the MP4 holds, so that the
    clip lasts the requested seconds to within one frame.
    """

    width: int
    height: int
    fps: int
    seconds: float
    generated_frames: int
    output_frames: int
    seed: int
    num_inference_steps: int

    @classmethod
    def build(
        cls,
        *,
        width: int,
        height: int,
        fps: int,
        seconds: float,
        seed: int,
        num_inference_steps: int,
        frame_step: int,
        frame_offset: int = 1,
    ) -> RenderPlan:
        """The plan for a request; the model generates ``k * frame_step + frame_offset`` frames (the smallest such
        count that covers the output: 8k+1 for LTX-2, 17k+5 for MiniMax-H3)."""
        output_frames = max(1, round(seconds * fps))
        blocks = math.ceil(max(output_frames - frame_offset, 0) / frame_step)
        generated_frames = blocks * frame_step + frame_offset
        return cls(
            width=width,
            height=height,
            fps=fps,
            seconds=seconds,
            generated_frames=generated_frames,
            output_frames=output_frames,
            seed=seed,
            num_inference_steps=num_inference_steps,
        )

    @property
    def duration_s(self) -> float:
        """Duration of the delivered clip: output frames at the frame rate."""
        return self.output_frames / self.fps


@dataclass(frozen=True)
class HostTensor:
    """A tensor handed between stages as a numpy array, so Ray moves it without pickling.

    Ray hands numpy arrays over zero-copy (torch tensors only behind a global
    switch). numpy has no bfloat16, so 16-bit floats travel as their raw bits
    and ``dtype`` says how to read them back.
    """

    array: np.ndarray
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> HostTensor:
        tensor = tensor.detach().contiguous().cpu()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype in (torch.bfloat16, torch.float16):
            return cls(array=tensor.view(torch.int16).numpy(), dtype=dtype)
        return cls(array=tensor.numpy(), dtype=dtype)

    def to(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """A torch tensor of its own (never aliasing the shared, read-only buffer) on ``device``."""
        stored = getattr(torch, self.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only zero-copy buffers: copied below
            tensor = torch.from_numpy(self.array)
        if stored in (torch.bfloat16, torch.float16):
            tensor = tensor.view(stored)
        return tensor.to(device=device, dtype=dtype or stored, copy=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass(frozen=True)
class TextEmbeddings:
    """One prompt as the diffusion transformer reads it: the text connectors' outputs.

    ``video`` ``[1, L, Dv]`` and ``audio`` ``[1, L, Da]`` feed the video and audio
    cross-attention; ``mask`` ``[1, L]`` marks the tokens they may attend to.
    """

    video: HostTensor
    audio: HostTensor
    mask: HostTensor

    @property
    def nbytes(self) -> int:
        return self.video.nbytes + self.audio.nbytes + self.mask.nbytes


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text encoder output: the prompt and, when guidance is on, the negative prompt."""

    prompt: TextEmbeddings
    negative: TextEmbeddings | None = None

    @property
    def nbytes(self) -> int:
        return self.prompt.nbytes + (self.negative.nbytes if self.negative is not None else 0)


@dataclass(frozen=True)
class ImageCondition:
    """The photo encoded by the video VAE: raw latents of one frame, ``[1, C, 1, h, w]`` float32."""

    latents: HostTensor
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return self.latents.nbytes


@dataclass(frozen=True)
class VideoLatents:
    """Denoised video latents ``[1, C, F, H, W]`` float32, denormalised: the video decoder's input."""

    latents: HostTensor

    @property
    def nbytes(self) -> int:
        return self.latents.nbytes


@dataclass(frozen=True)
class AudioLatents:
    """Denoised audio latents ``[1, C, L, M]`` float32, denormalised: the audio decoder's input."""

    latents: HostTensor

    @property
    def nbytes(self) -> int:
        return self.latents.nbytes


@dataclass(frozen=True)
class DenoisedLatents:
    """Diffusion output. The two parts travel separately, each to its own decoder."""

    video: VideoLatents
    audio: AudioLatents

    @property
    def nbytes(self) -> int:
        return self.video.nbytes + self.audio.nbytes


@dataclass(frozen=True)
class VideoFrames:
    """Decoded RGB frames, ``uint8`` ``[F, H, W, 3]``. They stay inside the video decoder stage."""

    pixels: np.ndarray
    fps: int

    @classmethod
    def from_unit_float(cls, frames: np.ndarray, fps: int) -> VideoFrames:
        """From floats in [0, 1] to 8-bit pixels (the rounding diffusers' ``output_type="np"`` implies)."""
        pixels = np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
        return cls(pixels=pixels, fps=fps)


@dataclass(frozen=True)
class EncodedVideo:
    """The video stream, already compressed (an MP4 holding one H.264 track): what leaves the decoder."""

    data: bytes
    num_frames: int
    fps: int
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Waveform:
    """Decoded audio, ``float32`` ``[channels, samples]`` in [-1, 1]."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.samples.shape[-1] / self.sample_rate

    @property
    def nbytes(self) -> int:
        return int(self.samples.nbytes)


@dataclass(frozen=True)
class Fence:
    """Who may write about a running job: its owner, in the attempt it claimed."""

    job_id: str
    owner: str
    attempt: int


@dataclass(frozen=True)
class JobTicket:
    """Who a stage call works for: the job and its owner's fence (owner, attempt), which every write
    the stage makes about the job carries. ``prompt`` lets injected faults pick their job. ``isolate``:
    the job is a suspect (a replica died while running it), so it never shares a batch."""

    job_id: str
    owner: str
    attempt: int
    prompt: str = ""
    isolate: bool = False

    @property
    def fence(self) -> Fence:
        return Fence(self.job_id, self.owner, self.attempt)


@dataclass(frozen=True)
class Handoff:
    """A stage output on its way to the next stage.

    ``ref`` is the Ray object holding the payload (put by the producing
    replica; read zero-copy on its node). The same payload is kept under
    ``name`` in the job's artifacts until the job ends, so a takeover (with no
    ``ref``) or a consumer whose producer replica is gone still finds it.
    ``kept`` is false when keeping that copy failed: the job goes on, but the
    stage is not marked done, so a takeover runs it again. ``attempt`` is the
    job attempt it belongs to: the kept copy is read from that attempt or an
    earlier one, never from another.
    """

    job_id: str
    name: str
    ref: object | None
    nbytes: int
    kept: bool = True
    attempt: int = 1


@dataclass(frozen=True)
class JobInput:
    """One of the job's own inputs (a photo, a reference clip), named as the ingress stored it.

    It travels to a stage as this small name, never as bytes through the runner:
    the stage reads the bytes from the results store itself.
    """

    job_id: str
    name: str


@dataclass(frozen=True)
class DenoiseResult:
    """What the diffusion stage returns: its hand-offs (in the order its family declares) and how it went.

    The step counts travel back with the result, so the runner records them
    even when the per-step progress writes were lost (a store outage).
    """

    outputs: tuple[Handoff, ...]
    finished_steps: int
    total_steps: int
    resumed_from_step: int | None = None

    @property
    def kept(self) -> bool:
        return all(handoff.kept for handoff in self.outputs)

    def record_changes(self) -> dict[str, Any]:
        changes: dict[str, Any] = {"step": self.finished_steps, "total_steps": self.total_steps}
        if self.resumed_from_step is not None:
            changes["resumed_from_step"] = self.resumed_from_step
        return changes


@dataclass(frozen=True)
class StoredVideo:
    """The finished MP4, written by the muxer where the results live, under the attempt that made it.

    It becomes the job's result only through the fenced write that completes the
    job (``result_attempt``): the store's key derives from the job id and this number.
    """

    attempt: int
    num_bytes: int
    kept: bool = True

    def record_changes(self) -> dict[str, Any]:
        return {"result_attempt": self.attempt, "result_bytes": self.num_bytes}


class StepCallback:
    """Receives ``(finished_steps, total_steps)`` after each denoising step.

    Raising from it (e.g. :class:`serving.errors.JobCancelled`) stops the loop
    at once; that is how cancellation reaches the diffusion stage.
    """

    def __call__(self, finished_steps: int, total_steps: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class JobStatus(enum.IntEnum):
    """Ordered job status: every terminal state sorts after ``IN_PROGRESS``."""

    QUEUED = 0
    IN_PROGRESS = 1
    COMPLETED = 2
    FAILED = 3
    CANCELLED = 4
    EXPIRED = 5  # still queued after jobs.max_queue_wait_s (or the request's execution_expires_after)

    @property
    def is_terminal(self) -> bool:
        return self > JobStatus.IN_PROGRESS

    @property
    def api_name(self) -> str:
        return self.name.lower()



# --------------------------------------------------------------------------- what a pipeline sees


@dataclass(frozen=True)
class InputSpec:
    """One input the client sent with the job: its stored name, its kind and the role it plays.

    ``kind`` is image, video or audio; ``role`` is what the model does with it
    (first_frame, last_frame, reference_image, reference_video, reference_audio).
    """

    name: str
    kind: str
    role: str


@dataclass(frozen=True)
class JobSpec:
    """What one job asks a family's pipeline to generate, after validation.

    ``options`` holds family-specific request settings (e.g. a workflow);
    every value is plain data.
    """

    job_id: str
    prompt: str
    negative_prompt: str
    plan: RenderPlan
    inputs: tuple[InputSpec, ...] = ()
    enhance_prompt: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def inputs_with(self, role: str) -> tuple[InputSpec, ...]:
        return tuple(spec for spec in self.inputs if spec.role == role)


class JobContext(Protocol):
    """What a family's pipeline sees of the runner: its stages, by name, and nothing else.

    Every ``call`` is durable: its output is kept (a later attempt of the job
    skips a stage that finished), a failure names its stage, a cancelled job
    stops at once, and progress and timing are recorded. ``call`` returns the
    stage's hand-off, a tuple of them when the stage declares several outputs,
    or the ``StoredVideo`` of the muxer.
    """

    job: JobSpec

    def call(self, stage: str, method: str, *args: Any) -> Awaitable[Any]:
        """Run ``method`` of ``stage`` on ``args`` (hand-offs, ``JobInput`` names, plain values)."""

    async def gather(self, *calls: Awaitable[Any] | None, label: str | None = None) -> tuple[Any, ...]:
        """Run calls side by side (``None`` entries give ``None``); the first failure cancels the others. ``label``
        names them together in the job's record."""

    def job_input(self, name: str) -> JobInput:
        """A reference to one of the job's stored inputs, for a stage to read."""

    async def rewritten_prompt(self) -> str:
        """The prompt to generate from: the prompt rewriter's when the job asked for it, else the user's.

        Rewriting never fails a job: on any trouble the user's prompt comes back.
        """
