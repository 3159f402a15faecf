"""A diffusion engine that owns its denoising loop.

One ``step()`` advances every active request by exactly one denoising step and
returns what happened as events: a step finished, a request finished (with its
output), a request failed (with its error), a checkpoint is ready. Requests
join between steps (``add``) and leave after their last step, without waiting
for each other; ``abort`` removes one between steps.

Step-level batching: requests in the same *bucket* (the model says which, e.g.
equal latent shapes) run their transformer pass together, packed up to a token
budget. The model's step math sits behind :class:`StepModel`; this module knows
nothing about any model family.

Failure isolation: an error while advancing a batch touches only that batch's
requests. An out-of-memory error in a batch of several requests retries them
one by one in the same step (the batch may simply have been too big) and halves
the token budget below the failed batch's size; every later step without one
raises it by ``max_batch_tokens / oom_recovery_steps`` (back to the full budget
at once when the engine is idle). Any other error, or an out-of-memory error of
a single request, fails the requests of that batch and the engine goes on with
the rest. A request added ``alone`` (a suspect: its replica died while it ran)
never shares a batch, so it cannot take others down with it.
"""

from __future__ import annotations

import gc
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Protocol, Sequence, TypeVar, Union

import torch

__all__ = [
    "StepModel",
    "DiffusionEngine",
    "EngineEvent",
    "StepFinished",
    "RequestFinished",
    "RequestFailed",
    "CheckpointReady",
    "EngineStats",
    "StateUntouchedError",
]

RequestT = TypeVar("RequestT")
RequestT_contra = TypeVar("RequestT_contra", contravariant=True)  # a StepModel only takes requests
StateT = TypeVar("StateT")
CheckpointT = TypeVar("CheckpointT")


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StepFinished:
    """``request_id`` finished its ``finished_steps``-th step of ``total_steps``."""

    request_id: str
    finished_steps: int
    total_steps: int


@dataclass(frozen=True)
class RequestFinished:
    """The request's last step ran; ``output`` is its result (e.g. ``DenoisedLatents``)."""

    request_id: str
    output: Any


@dataclass(frozen=True)
class RequestFailed:
    """The request stopped with ``error``; the engine keeps serving the others."""

    request_id: str
    error: BaseException


@dataclass(frozen=True)
class CheckpointReady:
    """A resumable checkpoint of the request, taken after ``finished_steps`` steps."""

    request_id: str
    finished_steps: int
    checkpoint: Any


EngineEvent = Union[StepFinished, RequestFinished, RequestFailed, CheckpointReady]


# --------------------------------------------------------------------------- the model's side


class StateUntouchedError(Exception):
    """Raised by a model whose ``advance`` failed before changing any state (so a retry is safe)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class StepModel(Protocol[RequestT_contra, StateT, CheckpointT]):
    """What the engine needs from a model family's step math."""

    batchable: bool  # False when requests must run alone (e.g. a step cache with per-request state)

    def check(self, request: RequestT_contra, resume_from: CheckpointT | None) -> None:
        """Raise ``ValueError`` for a request (or checkpoint) that cannot run; cheap, no tensors."""

    def start(self, request: RequestT_contra, resume_from: CheckpointT | None) -> StateT:
        """The request's state before its first (or next, when resumed) step."""

    def request_id(self, state: StateT) -> str: ...

    def bucket(self, state: StateT) -> Hashable:
        """States with equal buckets may share a transformer pass."""

    def cost(self, state: StateT) -> int:
        """Tokens the state's next step puts through the transformer (all its guidance passes)."""

    def advance(self, states: Sequence[StateT], token_budget: int) -> None:
        """One denoising step for each state.

        Errors raised before any state changed come wrapped in ``StateUntouchedError``.
        """

    def progress(self, state: StateT) -> tuple[int, int]:
        """(finished steps, total steps)."""

    def done(self, state: StateT) -> bool: ...

    def finish(self, state: StateT) -> Any:
        """The request's output after its last step."""

    def checkpoint(self, state: StateT) -> CheckpointT: ...

    def release(self, state: StateT) -> None:
        """Drop whatever the state holds outside itself (e.g. cache entries)."""


# --------------------------------------------------------------------------- the engine


@dataclass
class EngineStats:
    """Counters of one engine (read them between steps)."""

    steps: int = 0  # step() calls that advanced something
    batches: int = 0  # model.advance calls that succeeded
    request_steps: int = 0  # request-steps advanced (sum of batch sizes)
    largest_batch: int = 0  # most requests advanced together
    oom_retries: int = 0  # batches retried one request at a time after running out of memory
    failed: int = 0  # requests that ended with an error
    batch_sizes: dict[int, int] = field(default_factory=dict)  # requests per batch -> how many such batches


class DiffusionEngine(Generic[RequestT, StateT, CheckpointT]):
    """Request queue, per-request state and one-step-at-a-time scheduling over a :class:`StepModel`.

    ``add`` and ``abort`` may be called from any thread: they take effect at the
    start of the next ``step()``. ``step`` and ``checkpoint`` belong to one
    thread (the loop's).
    """

    def __init__(
        self,
        model: StepModel[RequestT, StateT, CheckpointT],
        *,
        batching: bool = True,
        max_batch_tokens: int = 65536,
        checkpoint_every_steps: int = 0,
        oom_recovery_steps: int = 8,
    ):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        if checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be 0 (never) or more, got {checkpoint_every_steps}")
        self.model = model
        self.batching = batching and model.batchable
        self.max_batch_tokens = max_batch_tokens
        self.checkpoint_every_steps = checkpoint_every_steps
        self.stats = EngineStats()
        self._token_budget = max_batch_tokens
        self._recovery_tokens = max(1, -(-max_batch_tokens // max(1, oom_recovery_steps)))  # ceil
        self._alone: set[str] = set()  # request ids that never share a batch
        self._lock = threading.Lock()
        self._inbox: list[tuple[RequestT, CheckpointT | None]] = []
        self._aborts: set[str] = set()
        self._active: dict[str, StateT] = {}  # arrival order

    # ------------------------------------------------------------------ public surface

    def add(self, request: RequestT, resume_from: CheckpointT | None = None, *, alone: bool = False) -> None:
        """Queue a request; it runs its first step in the next ``step()`` (in a batch of its own when ``alone``).

        Raises ``ValueError`` at once for a request that cannot run (bad sizes, a
        checkpoint of another plan, a request id already queued or running).
        """
        self.model.check(request, resume_from)
        request_id = request.request_id  # type: ignore[attr-defined]
        with self._lock:
            queued = any(r.request_id == request_id for r, _ in self._inbox)  # type: ignore[attr-defined]
            if queued or (request_id in self._active and request_id not in self._aborts):
                raise ValueError(f"request_id {request_id!r} is already queued or running")
            self._aborts.discard(request_id)
            self._inbox.append((request, resume_from))
            if alone:
                self._alone.add(request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a queued or running request before the next step; False if the engine does not hold it."""
        with self._lock:
            before = len(self._inbox)
            self._inbox = [(r, c) for r, c in self._inbox if r.request_id != request_id]  # type: ignore[attr-defined]
            if len(self._inbox) != before:
                return True
            if request_id in self._active:
                self._aborts.add(request_id)
                return True
            return False

    @property
    def has_work(self) -> bool:
        """True while anything is queued or running (an aborted request until the next step frees it)."""
        with self._lock:
            return bool(self._inbox) or bool(self._active)

    @property
    def active_requests(self) -> list[str]:
        return list(self._active)

    @property
    def token_budget(self) -> int:
        """The current batch budget: ``max_batch_tokens``, or less after an out-of-memory error."""
        return self._token_budget

    def checkpoint(self, request_id: str) -> CheckpointT:
        """A resumable checkpoint of a running request, between steps (the loop's thread)."""
        state = self._active.get(request_id)
        if state is None:
            raise KeyError(f"request_id {request_id!r} is not running")
        return self.model.checkpoint(state)

    def run_alone(self, request: RequestT, on_step: Callable[[int, int], None] | None = None) -> Any:
        """Run one request to its end on this thread (nothing else queued): its output, or its error raised.

        ``on_step(finished, total)`` follows each step; raising from it (a cancel) stops the request at once and
        leaves the engine ready for the next one.
        """
        request_id = request.request_id  # type: ignore[attr-defined]
        self.add(request)
        while True:
            for event in self.step():
                if event.request_id != request_id:
                    continue
                if isinstance(event, StepFinished) and on_step is not None:
                    try:
                        on_step(event.finished_steps, event.total_steps)
                    except BaseException:
                        self.abort(request_id)
                        self.step()  # applies the abort: frees the request, runs nothing else
                        raise
                elif isinstance(event, RequestFinished):
                    return event.output
                elif isinstance(event, RequestFailed):
                    raise event.error

    def step(self) -> list[EngineEvent]:
        """Advance every active request by one denoising step; return what happened."""
        events: list[EngineEvent] = []
        self._admit(events)
        batches = self._batches()
        retries = self.stats.oom_retries
        for batch in batches:
            self._run(batch, events)
        if batches:
            self.stats.steps += 1
        if not self._active:
            self._token_budget = self.max_batch_tokens  # idle: forget any out-of-memory shrink
        elif batches and self.stats.oom_retries == retries:  # a step without running out of memory: climb back
            self._token_budget = min(self.max_batch_tokens, self._token_budget + self._recovery_tokens)
        with self._lock:  # forget the lone requests that left (those still queued stay)
            self._alone.intersection_update({*self._active, *(r.request_id for r, _ in self._inbox)})  # type: ignore[attr-defined]
        return events

    # ------------------------------------------------------------------ admission and scheduling

    def _admit(self, events: list[EngineEvent]) -> None:
        with self._lock:
            arrivals, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for request_id in aborts:
            state = self._active.pop(request_id, None)
            if state is not None:
                self.model.release(state)
        for request, resume_from in arrivals:
            request_id = request.request_id  # type: ignore[attr-defined]
            try:
                self._active[request_id] = self.model.start(request, resume_from)
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the others
                _free_memory()
                self.stats.failed += 1
                events.append(RequestFailed(request_id, error))

    def _batches(self) -> list[list[StateT]]:
        states = list(self._active.values())
        if not self.batching:
            return [[state] for state in states]
        buckets: dict[Hashable, list[StateT]] = defaultdict(list)
        for state in states:
            request_id = self.model.request_id(state)
            key = ("alone", request_id) if request_id in self._alone else ("shared", self.model.bucket(state))
            buckets[key].append(state)
        batches = []
        for members in buckets.values():
            batch: list[StateT] = []
            tokens = 0
            for state in members:
                cost = self.model.cost(state)
                if batch and tokens + cost > self._token_budget:
                    batches.append(batch)
                    batch, tokens = [], 0
                batch.append(state)
                tokens += cost
            batches.append(batch)
        return batches

    # ------------------------------------------------------------------ running one batch

    def _run(self, batch: list[StateT], events: list[EngineEvent]) -> None:
        try:
            self.model.advance(batch, self._token_budget)
        except StateUntouchedError as failure:
            _free_memory()
            if _is_out_of_memory(failure.cause) and len(batch) > 1:
                self.stats.oom_retries += 1
                cost = sum(self.model.cost(state) for state in batch)
                self._token_budget = max(1, min(self._token_budget, cost // 2))
                for state in batch:
                    self._run([state], events)
                return
            self._fail(batch, failure.cause, events)
            return
        except Exception as error:  # noqa: BLE001 - states may be half-advanced: these requests end here
            _free_memory()
            self._fail(batch, error, events)
            return
        self.stats.batches += 1
        self.stats.request_steps += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        for state in batch:
            self._after_step(state, events)

    def _after_step(self, state: StateT, events: list[EngineEvent]) -> None:
        request_id = self.model.request_id(state)
        try:
            finished, total = self.model.progress(state)
            events.append(StepFinished(request_id, finished, total))
            if self.model.done(state):
                output = self.model.finish(state)
                self._active.pop(request_id, None)
                self.model.release(state)
                events.append(RequestFinished(request_id, output))
            elif self.checkpoint_every_steps and finished % self.checkpoint_every_steps == 0:
                events.append(CheckpointReady(request_id, finished, self.model.checkpoint(state)))
        except Exception as error:  # noqa: BLE001
            _free_memory()
            self._fail([state], error, events)

    def _fail(self, batch: Sequence[StateT], error: BaseException, events: list[EngineEvent]) -> None:
        for state in batch:
            request_id = self.model.request_id(state)
            if self._active.pop(request_id, None) is not None:
                self.model.release(state)
            self.stats.failed += 1
            events.append(RequestFailed(request_id, error))


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free_memory() -> None:
    """Give back what a failed pass held, so the next request finds the memory free."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
