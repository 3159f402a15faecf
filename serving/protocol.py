"""What travels between stages, and the job record.

Hand-off objects are named after what they carry. Tensors in them live on the
CPU so a hand-off can cross process boundaries (Ray object references) no
matter which device produced it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "RenderPlan",
    "PromptEmbeddings",
    "ImageCondition",
    "DenoisedLatents",
    "VideoFrames",
    "Waveform",
    "StepCallback",
    "JobStatus",
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
        temporal_compression: int,
    ) -> RenderPlan:
        output_frames = max(1, round(seconds * fps))
        # Smallest count of the form k * temporal_compression + 1 that covers the output.
        blocks = math.ceil(max(output_frames - 1, 0) / temporal_compression)
        generated_frames = blocks * temporal_compression + 1
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


@dataclass
class PromptEmbeddings:
    """Text encoder output for the prompt and, when guidance is on, the negative prompt."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_attention_mask: torch.Tensor | None = None


@dataclass
class ImageCondition:
    """The photo encoded by the video VAE: raw latents of one frame, ``[1, C, 1, h, w]``."""

    latents: torch.Tensor
    width: int
    height: int


@dataclass
class DenoisedLatents:
    """Diffusion output: video latents ``[1, C, F, H, W]`` and audio latents ``[1, C, L, M]``.

    Both are denormalised, i.e. ready for their decoders.
    """

    video: torch.Tensor
    audio: torch.Tensor


@dataclass
class VideoFrames:
    """Decoded RGB frames, ``uint8`` ``[F, H, W, 3]``."""

    pixels: np.ndarray
    fps: int

    @classmethod
    def from_unit_float(cls, frames: np.ndarray, fps: int) -> VideoFrames:
        """From floats in [0, 1] (the decoder's output) to 8-bit pixels."""
        pixels = np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
        return cls(pixels=pixels, fps=fps)


@dataclass
class Waveform:
    """Decoded audio, ``float32`` ``[channels, samples]`` in [-1, 1]."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


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

    @property
    def is_terminal(self) -> bool:
        return self > JobStatus.IN_PROGRESS

    @property
    def api_name(self) -> str:
        return self.name.lower()

