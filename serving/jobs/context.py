"""The job context a family's pipeline runs over, inside a runner replica: every stage call made durable.

For each ``ctx.call(stage, method, *args)`` this module:

- **skips** a stage an earlier attempt finished (its outputs are kept in the
  job's artifacts; the hand-offs it returns then read the kept copies), and
  runs it again when a kept copy turns out unreadable;
- **blames** a failure on its stage (``StageFailure``), retrying the call when
  only its replica died (diffusion then resumes from its checkpoint);
- **cancels** the call in flight as soon as the job's cancel flag is set (the
  store's change events say so at once; a bounded wait covers a lost event);
- **records** progress when the stage starts, and its time, its kept outputs
  (``done_stages``) and what its receipt reports (steps, the result) when it ends.

Only small receipts reach this process: the tensors travel between stage
replicas as Ray objects named in the hand-offs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from cluster.auth_config import CallbacksConfig
from cluster.config import JobsConfig, RewriterConfig
from serving import metrics
from serving.errors import JobCancelled, PoisonInput, ReplicaLost, StoreUnavailable
from serving.families.base import Family
from serving.jobs.events import JobEvents
from serving.jobs.failures import StageFailure, kept_output_lost, replica_died
from serving.jobs.job_storage import JobStorage
from serving.jobs.progress import ProgressMarks
from serving.jobs.quarantine import QUARANTINE_AFTER, Strikes, strike_of
from serving.jobs.record import JobRecord
from serving.jobs.store import JobStore
from serving.jobs.writer import FencedWriter
from serving.metrics import StageStats
from serving.protocol import Handoff, JobInput, JobSpec, JobTicket

__all__ = ["RunnerServices", "RunnerJobContext", "StageCall"]

logger = logging.getLogger("ray.serve.reelserve.runner")

CANCEL_CHECK_S = 2.0  # the longest a stage call runs on unnoticed after a cancel (events usually tell at once)
LOST_REPLICA_BACKOFF_S = 3.0  # a lost replica ends its process 2 s after answering (serving.stages.health)
REWRITER_STAGE = "prompt_rewriter"


@dataclass
class RunnerServices:
    """What every job of a runner replica shares: the store, the stage handles (by name), the family."""

    store: JobStore
    events: JobEvents
    storage: JobStorage  # the job's inputs and video, its stage outputs and checkpoints
    io: Callable[..., Awaitable[Any]]  # runs a blocking store call off the event loop
    family: Family
    handles: Mapping[str, Any]  # stage name -> deployment handle (each has ``call(ticket, method, *args)``)
    marks: ProgressMarks
    jobs: JobsConfig
    rewriter: RewriterConfig
    prompt_fits: Callable[[str], bool]  # does a rewritten prompt fit the video model's text encoder?
    model_name: str
    stats: StageStats
    tenants: Mapping[str, Any] = field(default_factory=dict)  # tenant name -> its config (share, max_concurrent_jobs)
    diffusion_slots: int = 1  # jobs one diffusion replica runs at once (its max_ongoing_requests)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    signer: Any = None  # WebhookSigner, when a signing secret is configured


class StageCall:
    """One call a pipeline asked for; awaiting it runs it (``ctx.gather`` runs several side by side)."""

    def __init__(self, context: RunnerJobContext, stage: str, method: str, args: tuple):
        self.context, self.stage, self.method, self.args = context, stage, method, args

    def __await__(self):
        return self.context._run(self, advance=True).__await__()


class RunnerJobContext:
    """One attempt of one job, as its pipeline sees it (``serving.protocol.JobContext``)."""

    def __init__(self, services: RunnerServices, record: JobRecord, job: JobSpec, ticket: JobTicket,
                 writer: FencedWriter):
        self.services, self.record, self.job, self.ticket, self.writer = services, record, job, ticket, writer
        self.done: set[str] = set(record.done_stages)
        self.timings: dict[str, float] = dict(record.stage_seconds)
        self.denoising = 0  # diffusion calls in flight (a hand-over waits for their stop checkpoint)
        self._skipped: dict[str, StageCall] = {}  # output name -> the skipped call whose kept copy stands for it
        self.strikes = Strikes(record.id, ticket.attempt, services.storage, services.io)
        self._strikes_lock = asyncio.Lock()

    # ------------------------------------------------------------------ the pipeline's side

    def call(self, stage: str, method: str, *args: Any) -> StageCall:
        self.services.family.stage(stage).outputs(method)  # an unknown stage or method fails here, in the pipeline
        return StageCall(self, stage, method, args)

    async def gather(self, *calls: StageCall | None, label: str | None = None) -> tuple[Any, ...]:
        """Calls side by side; the first failure cancels the others. ``label`` names them together in the record."""
        running = [call for call in calls if call is not None]
        if label is not None and running:
            self._advance(label, min(self.services.marks.start(call.stage) for call in running))
        else:
            for call in running:
                self._advance(call.stage, self.services.marks.start(call.stage))
        tasks = {id(call): asyncio.ensure_future(self._run(call, advance=False)) for call in running}
        try:
            await asyncio.gather(*tasks.values())
        finally:
            for task in tasks.values():
                if not task.done():
                    task.cancel()
        return tuple(None if call is None else tasks[id(call)].result() for call in calls)

    def job_input(self, name: str) -> JobInput:
        return JobInput(self.job.job_id, name)

    async def rewritten_prompt(self) -> str:
        """The rewriter's prompt, or the user's when rewriting is off or falls back (it never fails the job)."""
        record = self.record
        if not self.job.enhance_prompt:
            return self.job.prompt
        if record.revised_prompt or record.rewrite_fallback:  # decided by an earlier attempt
            return record.revised_prompt or record.prompt
        self._advance(REWRITER_STAGE, self.services.marks.start(REWRITER_STAGE))
        started = time.perf_counter()
        text, fallback = await self._rewrite()
        if fallback is not None:
            self.services.stats.bump(f"rewrite_fallbacks_{fallback}_total")
            if fallback in ("unavailable", "overlong"):  # the stage itself counts the others
                metrics.rewrite_fallback(self.services.model_name, fallback)
            logger.info("job %s: prompt rewrite fell back (%s); using the original prompt", record.id, fallback)
        self.writer.note(revised_prompt=text, rewrite_fallback=fallback)
        self._finished(REWRITER_STAGE, started, kept=True)
        return text or record.prompt

    # ------------------------------------------------------------------ one call

    async def _run(self, call: StageCall, advance: bool) -> Any:
        spec = self.services.family.stage(call.stage)
        outputs = spec.outputs(call.method)
        if outputs and call.stage in self.done:  # finished by an earlier attempt: read its kept outputs
            self._skipped.update(dict.fromkeys(outputs, call))
            kept = tuple(Handoff(self.job.job_id, name, ref=None, nbytes=0, attempt=self.ticket.attempt) for name in outputs)
            return kept[0] if len(kept) == 1 else kept
        if advance:
            self._advance(call.stage, self.services.marks.start(call.stage))
        handle = self.services.handles[call.stage]
        started = time.perf_counter()
        self.denoising += spec.kind == "diffusion"
        try:
            receipt = await self._attempt(call.stage, lambda: handle.call.remote(self.ticket, call.method, *call.args),
                                          call)
        finally:
            self.denoising -= spec.kind == "diffusion"
        self._finished(call.stage, started, kept=bool(getattr(receipt, "kept", True)),
                       **getattr(receipt, "record_changes", dict)())
        handoffs = getattr(receipt, "outputs", None)
        if handoffs is not None:  # several hand-offs (diffusion's video and audio latents)
            return handoffs[0] if len(handoffs) == 1 else tuple(handoffs)
        return receipt

    async def _attempt(self, stage: str, make_call: Callable[[], Any], call: StageCall | None = None) -> Any:
        """The call, cancelled with the job; made again when its replica died mid-call, or (with the stage that
        made it run again) when a kept input of an earlier attempt was unreadable. A job that broke a replica is
        a suspect: it runs apart from other jobs, and is set aside once it broke ``QUARANTINE_AFTER``."""
        retries, retry = self.services.jobs.stage_retries, 0
        if await self.strikes.count():  # a suspect since an earlier attempt: never batched with others
            self.ticket = dataclasses.replace(self.ticket, isolate=True)
        while True:
            await self._raise_if_cancelled()
            response = make_call()
            try:
                return await self._await_unless_cancelled(response)
            except (asyncio.CancelledError, JobCancelled):
                response.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - every failure is attributed to this stage
                lost = kept_output_lost(error)
                if call is not None and lost in self._skipped:
                    call.args = await self._redo(lost, call.args)
                    continue
                if await self._struck(stage, error):
                    raise StageFailure(stage, PoisonInput(stage, QUARANTINE_AFTER)) from None
                if replica_died(error) and retry < retries:
                    retry += 1
                    if isinstance(getattr(error, "cause", None) or error, ReplicaLost):
                        # The lost replica answered and ends in a moment: call again once it is gone (and Serve
                        # knows), or the retry may reach it and be refused again.
                        await asyncio.sleep(LOST_REPLICA_BACKOFF_S)
                    logger.warning("job %s: a %s replica died mid-call; calling again (%d of %d)",
                                   self.job.job_id, stage, retry, retries)
                    self.services.stats.bump("stage_retries_total")
                    continue
                raise StageFailure(stage, error) from None

    async def _redo(self, name: str, args: tuple) -> tuple:
        """The kept ``name`` of an earlier attempt is unreadable: run the skipped call that made it again, and
        hand its fresh outputs on instead (``args`` with them in place)."""
        producer = self._skipped[name]
        for output in self.services.family.stage(producer.stage).outputs(producer.method):
            self._skipped.pop(output, None)
        self.done.discard(producer.stage)
        logger.warning("job %s: its kept %s is unreadable; running %s again", self.job.job_id, name, producer.stage)
        self.services.stats.bump("kept_outputs_redone_total")
        fresh = await self._run(producer, advance=False)
        made = {h.name: h for h in (fresh if isinstance(fresh, tuple) else (fresh,)) if isinstance(h, Handoff)}
        return tuple(made.get(arg.name, arg) if isinstance(arg, Handoff) else arg for arg in args)

    async def _struck(self, stage: str, error: BaseException) -> bool:
        """Count a strike when the call's replica was lost with the job to blame; True once it is quarantined."""
        blamed = strike_of(error)
        if not blamed:
            return False
        async with self._strikes_lock:
            count = await self.strikes.add()
        self.ticket = dataclasses.replace(self.ticket, isolate=True)  # from now on it runs apart from other jobs
        logger.warning("job %s: a %s replica was lost running it (strike %d of %d)", self.job.job_id, stage, count,
                       QUARANTINE_AFTER)
        if count >= QUARANTINE_AFTER:
            self.services.stats.bump("quarantined_total")
            return True
        return False

    async def _await_unless_cancelled(self, response) -> Any:
        call = asyncio.ensure_future(_result_of(response))
        try:
            while True:
                watch = asyncio.ensure_future(self.services.events.wait(self.job.job_id, CANCEL_CHECK_S))
                done, _ = await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
                if call in done:
                    watch.cancel()
                    return call.result()
                await self._raise_if_cancelled()
        finally:
            if not call.done():
                call.cancel()

    async def _raise_if_cancelled(self) -> None:
        try:
            cancelled = await self.services.io(self.services.store.is_cancel_requested, self.job.job_id)
        except StoreUnavailable:
            return  # cannot tell now; the next check will
        if cancelled:
            raise JobCancelled(self.job.job_id)

    async def _rewrite(self) -> tuple[str | None, str | None]:
        """(rewritten text or None, fallback reason or None)."""
        services, record = self.services, self.record
        handle = services.handles.get(REWRITER_STAGE)
        response = None
        try:
            if handle is None:  # e.g. a takeover after a redeploy without the rewriter
                raise LookupError("no prompt_rewriter stage deployed")
            photo = None
            firsts = self.job.inputs_with("first_frame")
            if firsts and services.rewriter.multimodal:
                photo = await services.io(services.storage.load_input, record.id, firsts[0].name)
            response = handle.rewrite.remote(record.prompt, record.seed, photo)
            # The stage enforces the timeout itself; this bound covers an unreachable or queued stage.
            result = await asyncio.wait_for(_result_of(response), timeout=services.rewriter.timeout_s + 5)
            text, fallback = result.text, result.fallback
        except Exception:  # noqa: BLE001 - includes asyncio.TimeoutError
            if response is not None:
                response.cancel()
            text, fallback = None, "unavailable"
        if text is not None and not services.prompt_fits(text):
            text, fallback = None, "overlong"
        return text, fallback

    # ------------------------------------------------------------------ what the record learns

    def _advance(self, stage: str, progress: int) -> None:
        self.writer.note(stage=stage, progress=progress)
        metrics.job_progressed(self.services.model_name)

    def _finished(self, stage: str, started: float, kept: bool, **changes: Any) -> None:
        """The stage's output landed: time it (unless an earlier attempt did) and, when it is kept, skip it on a
        takeover."""
        if stage not in self.done:
            self.timings[stage] = round(time.perf_counter() - started, 4)
            if kept:
                self.done.add(stage)
        self.writer.note(done_stages=sorted(self.done), stage_seconds=dict(self.timings), **changes)


async def _result_of(response):
    return await response
