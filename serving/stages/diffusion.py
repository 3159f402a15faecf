"""Diffusion stage: the family's denoising, on an engine that owns its loop.

Family-free: the family's ``DiffusionModel`` turns a ``denoise`` call's
payloads into an engine request and the engine's output into the stage's
declared hand-offs. One thread per replica runs the engine: every ``step()``
advances all the requests it holds by one denoising step, batched where
shapes allow. Around it, per request, on the event loop:

- progress after every step, written with the job's fence (``FencedWriter``);
  a refused write means another attempt owns the job, and this one stops;
- cancellation within one step (the job's cancel flag, read after each write);
- checkpoints every few steps into the artifacts store, under the job's
  attempt and step, and one more when the call is cancelled (hand-over,
  redeploy), so a successor resumes at the very step this one stopped; a
  request resumes from the newest readable checkpoint of its attempt or an
  earlier one (unreadable bytes are skipped, and logged, never executed);
- out of memory fails only the requests of that batch; the replica serves on;
  any other CUDA error, or a rank group that lost a worker, loses the replica
  (``serving.stages.health``): its requests end ``ReplicaLost`` (blamed on the
  batch whose pass broke the device) and resume from their checkpoints elsewhere;
- a request whose job is a suspect (its replica died while it ran) runs in a
  batch of its own;
- with ``stages.diffusion.num_gpus`` N > 1 the replica is rank 0 of a group of
  N (``serving.parallel_group``) and every transformer pass runs on all ranks;
- the replica tells the job store it is up (its slots are diffusion's capacity,
  which runners claim jobs into) and reads the store's queue for the autoscaler.

The constructor does the whole start (``serving.stages.startup``): node-local
weights, the memory cap, the rank group, the load, then the warm-up of every
shape bucket, so Serve routes nothing to the replica before it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from ray import serve

from cluster.config import FaultConfig, JobsConfig, ModelConfig, StorageConfig
from cluster.load import DiffusionLoad
from cluster.startup_config import StageRuntime
from serving import metrics
from serving.device_errors import DeviceFailure, device_failure
from serving.devices import resolve_device, resolve_dtype
from serving.engine.core import CheckpointReady, RequestFailed, RequestFinished, StepFinished
from serving.errors import GenerationFailed, JobCancelled, StageDead, StageOutOfMemory
from serving.families import get_family
from serving.jobs.backends import open_store
from serving.jobs.job_storage import patiently, register_stored_types
from serving.jobs.progress import ProgressMarks
from serving.jobs.writer import FencedWriter
from serving.parallel_group import ShardedTransformerGroup
from serving.protocol import DenoiseResult, Handoff, JobTicket
from serving.stages._base import LoadTimer, StageRunner, free_device_memory, is_out_of_memory, placement
from serving.stages.ledger import LedgerEntry
from serving.stages.startup import cap_memory, export_loads, local_weights, warm_up

__all__ = ["DiffusionStage"]

logger = logging.getLogger("ray.serve.reelserve.diffusion")

HEARTBEAT_TTL_S = 15.0  # three health-check periods: a replica whose checks stopped no longer counts as capacity
_STORE_CALL_S = 3.0  # a health check never waits longer than this for the store
_STORE_QUEUE_FRESH_S = 2.0  # the autoscaling report reads the store's queue at most this often
_STOP_WAIT_S = 20.0  # how long a stopping replica waits for its requests' stop checkpoints (about a step)


@dataclass
class _Request:
    """A request in the engine, as the event loop sees it."""

    ticket: JobTicket
    future: asyncio.Future
    total_steps: int
    engine_id: str  # "<job id>/<attempt>": attempts of one job never share an engine request
    resolution: str  # metrics bucket of the request's size
    entry: LedgerEntry  # the request in the stage's ledger: started at its first step
    resumed_from_step: int | None = None
    first_step_at: float | None = None  # perf_counter of its first step: the end of its queue wait
    checkpoint_on_stop: bool = False  # stopped by a hand-over: leave a checkpoint for the successor
    writer: FencedWriter | None = None  # progress, fenced to the job's attempt


class DiffusionStage:
    def __init__(self, stage: str, model: ModelConfig, jobs: JobsConfig, faults: Sequence[FaultConfig] = (),
                 storage: StorageConfig | None = None, runtime: StageRuntime | None = None):
        family = get_family(model.family)
        register_stored_types(family)
        runtime = runtime or StageRuntime()
        self._spec = family.stage(stage)
        self._marks = ProgressMarks(family.stages)
        self._name = stage
        self._model = model.name
        self._store = open_store(jobs.backend, sqlite_path=jobs.sqlite_path, redis_url=jobs.redis_url)
        self._device = str(resolve_device(model.device))  # what the family computes on
        # Its autoscaling load is a DiffusionLoad, fed per denoising step (below), not the ledger's.
        self._runner = StageRunner(stage, jobs, faults, model.name, storage, load=None)
        self._memory_fraction = cap_memory(self._device, runtime.memory_fraction)
        with LoadTimer(stage, model.name) as load:
            model = local_weights(model, self._spec, runtime)
            self._group = _rank_group(family, model, runtime.ranks)
            self._diffusion = family.diffusion_model(model, passes=self._group)
        self._engine = self._diffusion.engine
        self._runner.stats.load_seconds = load.seconds
        self._loads = export_loads(stage, model.name, getattr(self._diffusion, "loaded", None))
        self._warmup_seconds = warm_up(stage, model.name, getattr(self._diffusion, "warm_up", None), runtime,
                                       self._runner.faults)
        _inject_device_faults(self._engine, self._runner.faults, lambda engine_id: self._requests.get(engine_id))
        # Store writes (progress, cancel checks) and artifact writes (checkpoints) each get their own threads: a
        # slow store never holds up a checkpoint, nor the other way round.
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diffusion-store")
        self._artifact_io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diffusion-artifacts")
        self._requests: dict[str, _Request] = {}  # request id -> request
        self._load = DiffusionLoad()  # what the autoscaling policy reads (record_autoscaling_stats)
        self._load_lock = threading.Lock()  # touched by the engine's thread and the event loop
        self._started: set[str] = set()
        self._step_seconds = 0.0  # the last engine step's wall time (every request in it took that long)
        self._stop_requests: set[str] = set()  # abort these before the next step (checkpointing first if asked)
        self._wake = threading.Condition()
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set when the first request comes
        self._thread: threading.Thread | None = None
        self._replica = _replica_id()
        self._latent_tokens = model.latent_tokens
        self._store_read_at = -1e9  # when the store's queue was last read for the autoscaler
        try:  # loaded: count as capacity at once (health checks keep it up after this)
            self._beat()
        except Exception as error:  # noqa: BLE001 - the store may be away; the first health check tries again
            logger.info("first heartbeat to the job store failed: %r", error)

    # ------------------------------------------------------------------ the call

    async def call(self, ticket: JobTicket, method: str, *args: Any) -> DenoiseResult:
        """Denoise for the job: ``args`` are the family's ``denoise`` inputs (hand-offs and plain values)."""
        names = self._spec.outputs(method)
        self._runner.health.refuse()  # lost: this call goes to another replica
        entry = self._runner.ledger.arrived()  # waiting until its first denoising step
        ok, request = False, None
        try:
            await self._runner.faults.on_entry(ticket)
            request = await self._submit(ticket, args, entry)
            try:
                output = await request.future
            except asyncio.CancelledError:
                # The caller went away. A hand-over (shutdown, lost lease) keeps the work for the successor; a
                # cancel or a deadline does not. The store says which; this call must stop now either way.
                asyncio.ensure_future(self._stop_when_the_caller_left(request))
                raise
            ok = True
        finally:
            if request is not None and request.writer is not None:
                await request.writer.stop()
            self._runner.ledger.left(entry, ok)
        logger.info("job %s denoised (%d steps)", ticket.job_id, request.total_steps)
        values = self._diffusion.outputs(output)
        if len(values) != len(names):
            raise GenerationFailed(f"{self._name} returned {len(values)} outputs, not {len(names)}")
        outputs = tuple([await self._runner.publish(ticket, name, value) for name, value in zip(names, values)])
        return DenoiseResult(outputs, request.total_steps, request.total_steps, request.resumed_from_step)

    async def _stop_when_the_caller_left(self, request: _Request) -> None:
        try:
            record = await asyncio.get_running_loop().run_in_executor(self._io, self._store.get, request.ticket.job_id)
            request.checkpoint_on_stop = (
                record is not None and not record.status.is_terminal and not record.cancel_requested
            )
        except Exception:  # noqa: BLE001 - the store cannot tell: keep the work, a sweep removes what is not needed
            request.checkpoint_on_stop = True
        self._stop(request.engine_id)

    async def _submit(self, ticket: JobTicket, args: tuple, entry: LedgerEntry):
        self._ensure_running()
        payloads = [await self._runner.receive(arg) if isinstance(arg, Handoff) else arg for arg in args]
        loop = asyncio.get_running_loop()
        for older in [r for r in list(self._requests.values()) if r.ticket.job_id == ticket.job_id]:
            # An older attempt of this job still runs here: it stops first, leaving a checkpoint to resume from.
            older.checkpoint_on_stop = True
            self._stop(older.engine_id)
            await asyncio.wait([older.future])
        storage = self._runner.storage
        kept = await patiently(storage.newest_checkpoint, ticket.job_id, ticket.attempt,
                               wait_s=storage.config.outage_wait_s, what=f"job {ticket.job_id}: reading its checkpoint")
        resume = kept.value if kept is not None else None
        engine_id = f"{ticket.job_id}/{ticket.attempt}"
        denoise = self._diffusion.request(engine_id, *payloads)
        plan = self._diffusion.plan_of(denoise)
        request = _Request(
            ticket, loop.create_future(), self._diffusion.total_steps(denoise), engine_id,
            metrics.resolution_bucket(plan.width, plan.height), entry,
        )
        request.writer = FencedWriter(
            self._store, ticket.fence, self._store_io,
            on_lost=lambda: self._superseded(request), on_cancel_requested=lambda: self._cancelled(request),
        )
        request.writer.start()
        self._requests[engine_id] = request
        alone = ticket.isolate  # a suspect (its replica died while it ran): never batched with others
        try:
            try:
                self._engine.add(denoise, resume_from=resume, alone=alone)
            except ValueError as mismatch:
                if resume is None:
                    raise
                # Taken with other settings (a redeploy changed the steps or the recipe): start over.
                logger.warning("job %s: its checkpoint does not fit this engine (%s); starting over", ticket.job_id, mismatch)
                resume = None
                self._engine.add(denoise, alone=alone)
        except BaseException:
            self._requests.pop(engine_id, None)
            await request.writer.stop()
            with self._load_lock:
                self._load.finished(engine_id, completed=False)
            raise
        tokens = self._diffusion.latent_tokens(denoise)
        with self._load_lock:
            self._load.queued(engine_id, tokens, request.total_steps, resume.finished_steps if resume else 0)
        if resume is not None:
            request.resumed_from_step = resume.finished_steps
            logger.info("job %s resumes from step %d", ticket.job_id, resume.finished_steps)
            request.writer.note(resumed_from_step=resume.finished_steps, step=resume.finished_steps)
        with self._wake:
            self._wake.notify()
        return request

    def _stop(self, engine_id: str) -> None:
        with self._wake:
            self._stop_requests.add(engine_id)
            self._wake.notify()

    # ------------------------------------------------------------------ the engine's thread

    def _ensure_running(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run_engine, name="diffusion-engine", daemon=True)
            self._thread.start()

    @property
    def _engine_alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def _run_engine(self) -> None:
        while self._runner.health.lost is None:  # a lost replica computes nothing more (its process is ending)
            with self._wake:
                while not self._engine.has_work and not self._stop_requests:
                    self._wake.wait(timeout=5.0)  # idle; woken by every new request and stop
                stopping, self._stop_requests = self._stop_requests, set()
            try:
                self._one_step(stopping)
            except Exception as error:  # noqa: BLE001 - fail what is running, never the thread
                logger.exception("the diffusion engine's loop failed; failing the requests it held")
                for engine_id in list(self._requests):
                    self._engine.abort(engine_id)
                    self._resolve(engine_id, error=error)

    def _one_step(self, stopping: set[str]) -> None:
        for engine_id in stopping:
            self._stop_in_engine(engine_id)
        started = time.perf_counter()
        try:
            events = self._engine.step()
        except Exception as error:  # noqa: BLE001 - the engine isolates batches; this is a last resort
            logger.exception("diffusion engine step failed")
            failed = list(self._engine.active_requests)
            for engine_id in failed:
                self._engine.abort(engine_id)  # so it does not run (and fail) again
            events = [_EngineFailure(engine_id, error) for engine_id in failed]  # type: ignore[misc]  # handled as RequestFailed
        self._step_seconds = time.perf_counter() - started
        if self._lost_in(events):
            return
        self._mark_started(events)
        for event in events:
            self._dispatch(event)
        # The load the autoscaler reads counts the whole step, slow hardware (or an injected slowdown) included.
        self._measure(events, time.perf_counter() - started)

    def _mark_started(self, events) -> None:
        with self._load_lock:
            for event in events:
                engine_id = event.request_id
                if isinstance(event, StepFinished) and engine_id in self._requests and engine_id not in self._started:
                    self._started.add(engine_id)
                    self._load.started(engine_id)
                    self._requests[engine_id].first_step_at = time.perf_counter() - self._step_seconds

    def _measure(self, events, seconds: float) -> None:
        with self._load_lock:  # requests that ended in this step have left the tracker already
            stepped = [e.request_id for e in events if isinstance(e, StepFinished) and e.request_id in self._started]
            if stepped:
                self._load.stepped(stepped, seconds)

    def _lost_in(self, events) -> bool:
        """A pass broke the device (or the rank group): end every request here with ``ReplicaLost``, the ones of
        the batch whose pass broke it blamed, and lose the replica. True when that happened."""
        failed = [e for e in events if isinstance(e, (RequestFailed, _EngineFailure))]
        broken = next((e.error for e in failed if device_failure(e.error) is not None), None)
        if broken is None:
            return False
        code = cast(DeviceFailure, device_failure(broken))  # not None: that is how broken was chosen
        health = self._runner.health
        health.lose(f"{type(broken).__name__}: {str(broken)[:200]}", code)
        # The batch that raised it first shares that very error object; later batches of the step, on a broken
        # device, fail with errors of their own and are not to blame.
        culprits = {e.request_id for e in failed if e.error is broken} if code == "device" else set()
        for engine_id in list(self._requests):
            self._engine.abort(engine_id)
            self._resolve(engine_id, error=health.error(blamed=engine_id in culprits))
        return True

    def _stop_in_engine(self, engine_id: str) -> None:
        request = self._requests.get(engine_id)
        if request is not None and request.checkpoint_on_stop and engine_id in self._engine.active_requests:
            try:
                self._save_checkpoint(request.ticket, self._engine.checkpoint(engine_id))
            except Exception as error:  # noqa: BLE001 - a lost checkpoint costs steps, not the job
                logger.warning("request %s: checkpoint on stop failed: %r", engine_id, error)
        self._engine.abort(engine_id)
        self._resolve(engine_id, error=JobCancelled(f"denoising of {engine_id} stopped"))

    def _dispatch(self, event) -> None:
        engine_id = event.request_id
        request = self._requests.get(engine_id)
        if request is None:
            return
        if isinstance(event, StepFinished):
            self._runner.stats.bump("steps_total")
            try:
                self._runner.faults.at_step(request.ticket, event.finished_steps)
            except Exception as error:  # noqa: BLE001 - an injected out-of-memory error, as the step would raise
                self._engine.abort(engine_id)
                free_device_memory()
                self._resolve(engine_id, error=StageOutOfMemory(self._name) if is_out_of_memory(error) else error)
                return
            metrics.denoise_step(self._model, request.resolution, self._step_seconds)
            self._loop.call_soon_threadsafe(self._after_step, request, event.finished_steps, event.total_steps)
        elif isinstance(event, CheckpointReady):
            self._artifact_io.submit(self._save_checkpoint, request.ticket, event.checkpoint)
        elif isinstance(event, RequestFinished):
            self._resolve(engine_id, result=event.output)
        elif isinstance(event, (RequestFailed, _EngineFailure)):
            failure = event.error
            self._resolve(engine_id, error=StageOutOfMemory(self._name) if is_out_of_memory(failure) else failure)

    def _resolve(self, engine_id: str, result=None, error: BaseException | None = None) -> None:
        request = self._requests.pop(engine_id, None)
        if request is None:
            return
        with self._load_lock:
            self._started.discard(engine_id)
            self._load.finished(engine_id, completed=error is None)

        def settle() -> None:
            if request.future.done():
                return
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    # ------------------------------------------------------------------ around each step (event loop)

    def _after_step(self, request: _Request, finished: int, total: int) -> None:
        if request.entry.started is None:  # its first step: the end of its wait for the engine
            self._runner.ledger.started(request.entry)
            request.entry.started = request.first_step_at or request.entry.started
        progress = self._marks.within(self._name, finished, total)
        assert request.writer is not None  # a request in the engine has its writer
        request.writer.note(step=finished, total_steps=total, progress=progress)
        metrics.job_progressed(self._model)

    async def _store_io(self, method, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._io, lambda: method(*args, **kwargs))

    def _superseded(self, request: _Request) -> None:
        """A write was refused: another attempt owns the job now. Stop, leaving a checkpoint for it."""
        logger.info("job %s attempt %d is superseded; stopping it", request.ticket.job_id, request.ticket.attempt)
        request.checkpoint_on_stop = True
        self._stop(request.engine_id)

    def _cancelled(self, request: _Request) -> None:
        self._runner.stats.bump("cancelled_total")
        self._stop(request.engine_id)

    def _save_checkpoint(self, ticket: JobTicket, checkpoint) -> None:
        """Keep the checkpoint under the job's attempt and its step (a resume takes the newest readable one)."""
        try:
            self._runner.storage.keep_checkpoint(ticket.job_id, ticket.attempt, checkpoint.finished_steps, checkpoint)
            self._runner.stats.bump("checkpoints_total")
        except Exception as error:  # noqa: BLE001 - a lost checkpoint costs steps on a takeover, not the job
            logger.warning("job %s: saving a checkpoint failed: %r", ticket.job_id, error)

    def stats(self) -> dict:
        return {**self._runner.stats.snapshot(), "component_load_seconds": self._loads,
                "warmup_seconds": self._warmup_seconds, "token_budget": self._engine.token_budget,
                "ranks": self._group.degree if self._group is not None else 1,
                "rank_workers": list(self._group.worker_names) if self._group is not None else []}

    def placement(self) -> dict:
        """Rank 0 (this replica) and, for a replica over several GPUs, each worker rank, as Ray placed them."""
        workers = self._group.placements() if self._group is not None else []
        return {**placement(self._device), "memory_fraction": self._memory_fraction, "ranks": 1 + len(workers),
                "workers": workers}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # Jobs waiting in the store for a slot are load the policy must see: read them at most every 2 s.
        if time.monotonic() - self._store_read_at > _STORE_QUEUE_FRESH_S:
            self._store_read_at = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._io, self._read_store_queue),
                                       timeout=_STORE_CALL_S)
            except Exception as error:  # noqa: BLE001 - the last reading stands
                logger.info("reading the job store's queue failed: %r", error)
        with self._load_lock:
            return self._load.report()

    async def ready(self) -> bool:
        """Answers once this replica is up (its constructor loaded the model): the runner claims jobs only then."""
        return True

    async def check_health(self) -> None:
        """Dead when the denoising thread died (every request would wait forever), the device broke, or a worker
        rank of its group is gone (every pass would fail or hang). Alive, it tells the store it is up (its slots
        count as diffusion's capacity) and reads the store's queue for the autoscaler."""
        health = self._runner.health
        if self._group is not None and health.lost is None and not await asyncio.to_thread(self._group.alive):
            health.lose("a worker rank of the replica's group is gone", "group")
            for engine_id in list(self._requests):
                self._stop(engine_id)  # its thread may hang in a collective; the process ends in a moment
                self._resolve(engine_id, error=health.error(blamed=False))
        health.check()
        if not self._engine_alive:
            raise StageDead("the diffusion engine's thread has stopped")
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._io, self._beat), timeout=_STORE_CALL_S)
        except Exception as error:  # noqa: BLE001 - a store outage is not this replica's death
            logger.info("heartbeat to the job store failed: %r", error)

    def _beat(self) -> None:
        with self._load_lock:
            rate = self._load.seconds_per_token_step
        self._store.heartbeat(self._name, self._replica, {"seconds_per_token_step": rate}, HEARTBEAT_TTL_S)

    def _read_store_queue(self) -> None:
        queued = [r for r in self._store.active_records() if r.attempts == 0 and not r.status.is_terminal]
        token_steps = sum(self._latent_tokens(r.width, r.height, r.seconds, r.fps) * max(r.total_steps, 1)
                          for r in queued)
        with self._load_lock:
            self._load.store_queue(len(queued), token_steps)

    async def __del__(self):
        # Serve calls this once the replica's calls drained or its drain time (sized for the longest job) is
        # nearly over. Whatever still runs stops at its next step with a checkpoint, so a successor resumes there.
        try:  # no longer capacity: runners stop counting its slots at once
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                self._io, self._store.forget_replica, self._name, self._replica), timeout=_STORE_CALL_S)
        except Exception as error:  # noqa: BLE001 - its heartbeat lapses on its own
            logger.info("leaving the job store's replica list failed: %r", error)
        requests = list(self._requests.values())
        for request in requests:
            request.checkpoint_on_stop = True
            self._stop(request.engine_id)
        if requests:
            await asyncio.wait([r.future for r in requests], timeout=_STOP_WAIT_S)


@dataclass(frozen=True)
class _EngineFailure:
    request_id: str
    error: BaseException


def _replica_id() -> str:
    """This replica's id in Serve, or a random one outside Serve (tests that build the stage directly)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica
        return "diffusion-" + secrets.token_hex(4)


def _rank_group(family, model: ModelConfig, ranks: int) -> ShardedTransformerGroup | None:
    """The replica's rank group when it spans several GPUs (the family's sequence-parallel pass on every rank)."""
    if ranks <= 1:
        return None
    if family.sequence_parallel is None:
        raise ValueError(f"stages.diffusion.num_gpus: the {family.name} family has no sequence-parallel pass; use 1")
    device = resolve_device(model.device)
    name = None
    try:  # inside a replica only: the workers are named after it
        name = f"reelserve-{serve.get_replica_context().replica_id.unique_id}"
    except Exception:  # noqa: BLE001 - not a Serve replica
        pass
    return ShardedTransformerGroup.start(family.sequence_parallel(model), ranks,
                                         dtype=resolve_dtype(model.dtype, device), name=name)


def _inject_device_faults(engine, faults, request_of) -> None:
    """``device_error`` / ``poison_input`` faults strike inside the pass of the batch that holds their job, as a
    broken device would: the whole batch fails with the same error."""
    if not faults.armed:
        return
    model = engine.model
    advance = model.advance

    def advance_with_faults(states, token_budget):
        for state in states:
            request = request_of(model.request_id(state))
            if request is not None:
                faults.in_pass(request.ticket, model.progress(state)[0])
        return advance(states, token_budget)

    model.advance = advance_with_faults
