"""What a stage replica records for autoscaling: Ray-free trackers.

A replica keeps one tracker, tells it what happens to its requests, and
returns ``tracker.report()`` from its ``record_autoscaling_stats`` method;
Ray Serve pushes that dict to the controller, where the policies in
``cluster.autoscaling`` read it. Everything reported is measured on the
replica: request sizes as they arrive, step times as they pass.

- Diffusion reports its backlog in latent token-steps (a request's latent
  tokens x its remaining denoising steps) and its measured seconds per
  token-step, so the policy can turn the backlog into expected GPU-seconds.
- Every other stage reports its arrival rate, its measured service time per
  request and what it holds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = [
    "DiffusionLoad",
    "StageLoad",
    "RUNNING_TOKEN_STEPS",
    "QUEUED_TOKEN_STEPS",
    "RUNNING_REQUESTS",
    "QUEUED_REQUESTS",
    "SECONDS_PER_TOKEN_STEP",
    "MEAN_REQUEST_TOKEN_STEPS",
    "ARRIVALS_PER_S",
    "COMPLETIONS_PER_S",
    "SERVICE_SECONDS",
    "IN_FLIGHT",
    "STORE_QUEUED_REQUESTS",
    "STORE_QUEUED_TOKEN_STEPS",
]

# Keys of the reported dicts (what ``record_autoscaling_stats`` returns). Serve keeps its own request counts in
# the same per-replica store under plain names ("running_requests"), so ours carry a prefix.
RUNNING_TOKEN_STEPS = "reelserve_running_token_steps"  # token-steps still to do of the requests being denoised
QUEUED_TOKEN_STEPS = "reelserve_queued_token_steps"  # token-steps of the requests waiting on this replica
RUNNING_REQUESTS = "reelserve_running_requests"
QUEUED_REQUESTS = "reelserve_queued_requests"
SECONDS_PER_TOKEN_STEP = "reelserve_seconds_per_token_step"  # measured; 0 until the first step
MEAN_REQUEST_TOKEN_STEPS = "reelserve_mean_request_token_steps"  # of requests that arrived in the window; 0 when none
ARRIVALS_PER_S = "reelserve_arrivals_per_s"
COMPLETIONS_PER_S = "reelserve_completions_per_s"
SERVICE_SECONDS = "reelserve_service_seconds"  # measured busy seconds per request; 0 until the first one
IN_FLIGHT = "reelserve_in_flight"  # requests running or waiting on this replica
# Jobs queued in the job store (not yet claimed: they wait there for a diffusion slot), as one replica last read
# them. Every diffusion replica reports the same store, so the policy takes the largest report, not the sum.
STORE_QUEUED_REQUESTS = "reelserve_store_queued_requests"
STORE_QUEUED_TOKEN_STEPS = "reelserve_store_queued_token_steps"

Clock = Callable[[], float]


class _EventRate:
    """Events per second over the last ``window_s`` seconds (with a value per event, e.g. its size)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float = 1.0) -> None:
        self._events.append((now, value))

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()

    def per_second(self, now: float) -> float:
        self._trim(now)
        return len(self._events) / self.window_s

    def mean_value(self, now: float) -> float:
        self._trim(now)
        if not self._events:
            return 0.0
        return sum(value for _, value in self._events) / len(self._events)


class _Smoothed:
    """An exponentially weighted mean; 0 until the first sample."""

    def __init__(self, weight: float):
        self.weight = weight
        self.value = 0.0
        self.samples = 0

    def add(self, sample: float) -> None:
        self.value = sample if self.samples == 0 else (1 - self.weight) * self.value + self.weight * sample
        self.samples += 1


@dataclass
class _DiffusionRequest:
    tokens: int
    steps: int
    finished_steps: int
    running: bool = False

    @property
    def token_steps_left(self) -> int:
        return self.tokens * max(self.steps - self.finished_steps, 0)


class DiffusionLoad:
    """The diffusion replica's load: requests by size and progress, and the measured step rate.

    Call ``queued`` when a request reaches the replica, ``started`` when its
    denoising begins, ``stepped`` after every denoising step (with every
    request the step advanced, when steps are batched, and the step's wall
    seconds), and ``finished`` when it leaves, however it ends. The measured
    seconds per token-step is the replica's throughput: with step batching it
    already includes batching's gain.
    """

    def __init__(self, rate_window_s: float = 120.0, smoothing: float = 0.1, clock: Clock = time.monotonic):
        if rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be positive, got {rate_window_s}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self._clock = clock
        self._requests: dict[str, _DiffusionRequest] = {}
        self._store_queue = (0, 0)  # (jobs, token-steps) queued in the job store, as last read
        self._step_rate = _Smoothed(smoothing)
        self._arrivals = _EventRate(rate_window_s)
        self._completions = _EventRate(rate_window_s)

    def queued(self, request_id: str, tokens: int, steps: int, finished_steps: int = 0) -> None:
        """A request arrived: ``tokens`` latent tokens, ``steps`` denoising steps, ``finished_steps`` already done
        (a job resumed from a checkpoint brings its finished steps)."""
        if tokens <= 0 or steps <= 0:
            raise ValueError(f"request {request_id}: tokens and steps must be positive, got {tokens} and {steps}")
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already tracked")
        self._requests[request_id] = _DiffusionRequest(tokens, steps, min(max(finished_steps, 0), steps))
        self._arrivals.add(self._clock(), float(tokens * steps))

    def started(self, request_id: str) -> None:
        self._requests[request_id].running = True

    def stepped(self, request_ids: str | Iterable[str], seconds: float) -> None:
        """One denoising step of ``request_ids`` (one request, or a batch) took ``seconds``."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        tokens = 0
        for request_id in ids:
            request = self._requests[request_id]
            request.finished_steps = min(request.finished_steps + 1, request.steps)
            tokens += request.tokens
        if tokens > 0 and seconds > 0:
            self._step_rate.add(seconds / tokens)

    def store_queue(self, jobs: int, token_steps: int) -> None:
        """What waits in the job store for a diffusion slot (read every few seconds by the replica)."""
        self._store_queue = (max(jobs, 0), max(token_steps, 0))

    def finished(self, request_id: str, completed: bool = True) -> None:
        """The request left the replica; ``completed`` is False for a failure or a cancel (not a completion)."""
        self._requests.pop(request_id, None)
        if completed:
            self._completions.add(self._clock())

    @property
    def seconds_per_token_step(self) -> float:
        """Measured seconds per latent token per denoising step (0 before the first step)."""
        return self._step_rate.value

    def report(self) -> dict[str, float]:
        """What ``record_autoscaling_stats`` returns."""
        now = self._clock()
        running = [r for r in self._requests.values() if r.running]
        waiting = [r for r in self._requests.values() if not r.running]
        return {
            RUNNING_TOKEN_STEPS: float(sum(r.token_steps_left for r in running)),
            QUEUED_TOKEN_STEPS: float(sum(r.token_steps_left for r in waiting)),
            RUNNING_REQUESTS: float(len(running)),
            QUEUED_REQUESTS: float(len(waiting)),
            SECONDS_PER_TOKEN_STEP: self._step_rate.value,
            MEAN_REQUEST_TOKEN_STEPS: self._arrivals.mean_value(now),
            ARRIVALS_PER_S: self._arrivals.per_second(now),
            COMPLETIONS_PER_S: self._completions.per_second(now),
            IN_FLIGHT: float(len(self._requests)),
            STORE_QUEUED_REQUESTS: float(self._store_queue[0]),
            STORE_QUEUED_TOKEN_STEPS: float(self._store_queue[1]),
        }


class StageLoad:
    """Load of an encoder, decoder or muxer replica: arrivals, measured service time, requests held.

    Call ``arrived`` when a request reaches the replica and ``done`` when it
    leaves, with the seconds it kept the model busy (``None`` when it failed
    before any work).
    """

    def __init__(self, rate_window_s: float = 120.0, smoothing: float = 0.1, clock: Clock = time.monotonic):
        if rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be positive, got {rate_window_s}")
        self._clock = clock
        self._in_flight = 0
        self._service = _Smoothed(smoothing)
        self._arrivals = _EventRate(rate_window_s)
        self._completions = _EventRate(rate_window_s)

    def arrived(self) -> None:
        self._in_flight += 1
        self._arrivals.add(self._clock())

    def done(self, busy_seconds: float | None) -> None:
        self._in_flight = max(self._in_flight - 1, 0)
        self._completions.add(self._clock())
        if busy_seconds is not None and busy_seconds > 0:
            self._service.add(busy_seconds)

    def report(self) -> dict[str, float]:
        now = self._clock()
        return {
            ARRIVALS_PER_S: self._arrivals.per_second(now),
            COMPLETIONS_PER_S: self._completions.per_second(now),
            SERVICE_SECONDS: self._service.value,
            IN_FLIGHT: float(self._in_flight),
        }
