"""Admission that tracks capacity: refuse a job whose expected queue wait is too long, even at max replicas.

The ingress computes the backlog from the job store (every queued or running
job's latent tokens x remaining steps), asks ``admit``, and on a refusal
answers HTTP 429 / gRPC ``RESOURCE_EXHAUSTED`` with ``Retry-After`` from the
estimate. The wait is a fluid estimate: the backlog's GPU-seconds shared by
diffusion at its maximum replica count, at the measured seconds per
token-step (``StepRate``, fed from finished jobs' diffusion times), so it is
the shortest wait the cluster could offer; when even that is over the bound,
queueing the job only lengthens every later job's wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

__all__ = [
    "JobLoad", "Admission", "AdmissionLimits", "StepRate", "backlog_token_steps", "estimated_queue_wait_s", "admit",
]


@dataclass(frozen=True)
class JobLoad:
    """A queued or running job as the store knows it."""

    tokens: int  # latent tokens of its size, length and fps (the model config's latent_tokens)
    steps: int  # denoising steps it runs
    finished_steps: int = 0  # denoising steps done (a resumed job counts its checkpointed steps)

    @property
    def token_steps_left(self) -> int:
        return self.tokens * max(self.steps - self.finished_steps, 0)

    @classmethod
    def of(cls, model, width: int, height: int, seconds: float, fps: int, steps: int, finished_steps: int = 0) -> JobLoad:
        """The load of a job of this size on ``model`` (a model config, whose family's latent grid counts)."""
        return cls(model.latent_tokens(width, height, seconds, fps), steps, finished_steps)


@dataclass(frozen=True)
class Admission:
    """The answer for one new job."""

    admitted: bool
    estimated_wait_s: float
    retry_after_s: int  # 0 when admitted
    reason: str  # one line, client-safe


@dataclass(frozen=True)
class AdmissionLimits:
    """What the ingress needs from the config to admit by capacity (so it need not hold the whole config)."""

    max_queue_wait_s: float | None
    diffusion_replicas: int  # diffusion's most replicas: the capacity the estimate assumes
    retry_after_s: int
    seconds_per_token_step: float  # the prior, until diffusion replicas have measured theirs
    diffusion_slots: int = 1  # jobs one diffusion replica runs at once (max_ongoing_requests)

    @classmethod
    def of(cls, config) -> AdmissionLimits:
        diffusion = config.stages["diffusion"]
        replicas = diffusion.num_replicas if diffusion.num_replicas is not None else diffusion.max_replicas
        return cls(
            max_queue_wait_s=config.jobs.max_queue_wait_s,
            diffusion_replicas=replicas,
            retry_after_s=config.jobs.retry_after_s,
            seconds_per_token_step=config.model.seconds_per_token_step,
            diffusion_slots=diffusion.max_ongoing_requests,
        )


class StepRate:
    """Measured seconds per latent token-step, from finished jobs' diffusion times (the prior until one)."""

    def __init__(self, prior: float, smoothing: float = 0.2):
        if prior <= 0:
            raise ValueError(f"prior seconds per token-step must be positive, got {prior}")
        self.value = prior
        self.measured = 0
        self._smoothing = smoothing

    def observe(self, tokens: int, steps: int, diffusion_seconds: float) -> None:
        """A job finished its denoising: ``steps`` steps of ``tokens`` tokens in ``diffusion_seconds``."""
        if tokens <= 0 or steps <= 0 or diffusion_seconds <= 0:
            return
        sample = diffusion_seconds / (tokens * steps)
        self.value = sample if self.measured == 0 else (1 - self._smoothing) * self.value + self._smoothing * sample
        self.measured += 1


def backlog_token_steps(jobs: Iterable[JobLoad]) -> int:
    """Latent token-steps still to denoise, over every queued and running job."""
    return sum(job.token_steps_left for job in jobs)


def estimated_queue_wait_s(backlog: float, seconds_per_token_step: float, max_replicas: int) -> float:
    """Seconds a new job waits before its denoising starts, with the backlog shared by ``max_replicas``."""
    if max_replicas < 1:
        raise ValueError(f"max_replicas must be at least 1, got {max_replicas}")
    return backlog * seconds_per_token_step / max_replicas


def admit(
    backlog: float,
    seconds_per_token_step: float,
    max_replicas: int,
    max_queue_wait_s: float | None,
    min_retry_after_s: int = 1,
) -> Admission:
    """Admit a new job unless its estimated queue wait exceeds ``max_queue_wait_s`` (``None``: never refuse).

    ``Retry-After`` is the time until the backlog, drained at ``max_replicas``,
    lets a job in again: the estimated wait less the bound.
    """
    wait = estimated_queue_wait_s(backlog, seconds_per_token_step, max_replicas)
    if max_queue_wait_s is None or wait <= max_queue_wait_s:
        return Admission(True, wait, 0, "")
    retry_after = max(min_retry_after_s, math.ceil(wait - max_queue_wait_s))
    reason = (
        f"the video queue is full: a new job would wait about {_minutes(wait)} before it starts, over the "
        f"{_minutes(max_queue_wait_s)} limit; retry in {_minutes(retry_after)}"
    )
    return Admission(False, wait, retry_after, reason)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
