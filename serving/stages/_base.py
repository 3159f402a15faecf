"""What every model stage deployment shares.

- One request at a time on the model, in a worker thread, off the event loop
  (pipeline objects keep per-call state); a cancelled caller never lets the
  next request in while the model is still busy.
- Measured: request time, queue wait (waiting for that lock), in-flight and
  queued requests, bytes handed on (``serving.metrics``), and the load the
  autoscaling policy reads (``cluster.load``).
- Out of memory is a per-request failure: the replica frees what it held and
  serves on; the orchestrator reports it as this stage's. Any other CUDA error
  loses the replica (``serving.stages.health``): the call ends ``ReplicaLost``
  (blamed on its input), queued calls are handed on, the process ends.
- Outputs leave as a ``Handoff``: a Ray object put by this replica (read
  zero-copy on its node) plus a copy kept in the artifacts store under the
  job's attempt (safetensors + JSON), which a takeover or a consumer whose
  producer is gone reads instead. Reads a stage cannot do without (the job's
  inputs, a lost hand-off's kept copy) wait out a storage outage.
- Injected faults (config ``faults``) strike here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Callable, TypeVar, cast

import torch

from cluster.config import FaultConfig, JobsConfig, StorageConfig
from cluster.load import StageLoad
from serving import metrics
from serving.device_errors import device_failure
from serving.errors import GenerationFailed, KeptOutputLost, StageOutOfMemory
from serving.jobs.faults import FaultInjector, InjectedOutOfMemory
from serving.jobs.job_storage import JobStorage, patiently
from serving.protocol import Handoff, JobInput, JobTicket
from serving.stages.health import ReplicaHealth
from serving.stages.ledger import StageLedger

T = TypeVar("T")

__all__ = ["StageRunner", "LoadTimer", "free_device_memory", "is_out_of_memory", "placement"]

# Under "ray.serve": inside a replica, Serve writes these to the replica's own log file.
logger = logging.getLogger("ray.serve.reelserve.stage")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, InjectedOutOfMemory)) or "out of memory" in str(error).lower()


def free_device_memory() -> None:
    """Give back what a failed request held, so the replica can take the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def placement(device: str | None) -> dict:
    """Where this replica really runs: what Ray gave it and the device its model computes on."""
    import ray  # noqa: PLC0415 - Ray only inside a replica

    context = ray.get_runtime_context()
    return {
        "device": device,
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "resources": context.get_assigned_resources(),
        "node_id": context.get_node_id(),
    }


class StageRunner:
    def __init__(self, stage: str, jobs: JobsConfig, faults: Sequence[FaultConfig] = (), model: str = "unknown",
                 storage: StorageConfig | None = None, load: StageLoad | None | bool = True):
        """``load``: the autoscaling tracker the ledger feeds (True: a ``StageLoad``; None: the stage keeps its own)."""
        self.stage = stage
        self.ledger = StageLedger(stage, model, StageLoad() if load is True else load or None)
        self.stats = self.ledger.stats
        self.load = self.ledger.load  # what the autoscaling policy reads (record_autoscaling_stats)
        self.storage = JobStorage(storage or StorageConfig().with_job_defaults(jobs.results_dir, jobs.artifacts),
                                  jobs.redis_url)
        self.faults = FaultInjector(stage, list(faults), self.storage)
        self.health = ReplicaHealth(stage, model)
        self._lock = asyncio.Lock()

    async def run(self, ticket: JobTicket, work: Callable[..., T], *args) -> T:
        entry = self.ledger.arrived()
        ok = False
        try:
            await self.faults.on_entry(ticket)
            async with self._lock:
                self.health.refuse()  # lost while this call waited: it goes to another replica
                self.ledger.started(entry)
                future = asyncio.ensure_future(asyncio.to_thread(self._guarded, ticket, work, *args))
                try:
                    result = await asyncio.shield(future)
                    ok = True
                except asyncio.CancelledError:
                    await asyncio.wait([future])  # the model call cannot be interrupted: hold the lock until it ends
                    raise
                return result
        finally:
            self.ledger.left(entry, ok)

    def _guarded(self, ticket: JobTicket, work: Callable[..., T], *args) -> T:
        try:
            self.faults.in_call(ticket)
            return work(*args)
        except Exception as error:
            failure = device_failure(error)
            if failure is not None:  # the device (or rank group) broke in this call: the replica is lost
                self.health.lose(f"{type(error).__name__}: {str(error)[:200]}", failure)
                raise self.health.error(blamed=failure == "device") from None
            if not is_out_of_memory(error):
                raise
        # Out of memory: freed outside the except block, so the failed call's frames (and tensors) are gone.
        free_device_memory()
        self.stats.bump("out_of_memory_total")
        raise StageOutOfMemory(self.stage)

    # ------------------------------------------------------------------ hand-offs

    async def publish(self, ticket: JobTicket, name: str, payload: Any) -> Handoff:
        """Put the payload where the next stage reads it, and keep a copy for a takeover."""
        import ray  # noqa: PLC0415 - Ray only inside a replica

        ref = ray.put(payload)
        kept = True
        try:
            await asyncio.to_thread(self.storage.keep_output, ticket.job_id, ticket.attempt, name, payload)
        except Exception as error:  # noqa: BLE001 - the job goes on; only a takeover would redo this stage
            kept = False
            logger.warning("job %s: keeping the %s failed (%s); continuing without a copy", ticket.job_id, name, error)
        nbytes = metrics.handoff_nbytes(payload)
        self.ledger.handed(nbytes)
        return Handoff(job_id=ticket.job_id, name=name, ref=ref, nbytes=nbytes, kept=kept, attempt=ticket.attempt)

    async def receive(self, handoff: Handoff) -> Any:
        """The payload: from the Ray object, or from the kept copy when there is none or it is gone."""
        import ray  # noqa: PLC0415 - Ray only inside a replica

        if handoff.ref is not None:
            try:
                return await cast(Any, handoff.ref)  # a Ray ObjectRef
            except ray.exceptions.RayError as error:
                logger.info("job %s: the %s object is gone (%s); reading the kept copy",
                            handoff.job_id, handoff.name, type(error).__name__)
        value = await self._patiently(self.storage.load_output, handoff.job_id, handoff.attempt, handoff.name,
                                      what=f"job {handoff.job_id}: reading the kept {handoff.name}")
        if value is None:
            raise KeptOutputLost(handoff.name)
        return value

    async def read_input(self, job_input: JobInput) -> bytes:
        """One of the job's stored inputs (checked when the job was accepted)."""
        data = await self._patiently(self.storage.load_input, job_input.job_id, job_input.name,
                                     what=f"job {job_input.job_id}: reading its input {job_input.name}")
        if data is None:
            raise GenerationFailed(f"the job's input '{job_input.name}' is no longer stored")
        return data

    async def _patiently(self, call, *args, what: str):
        """A storage call the job cannot do without: tried again through an outage (``storage.outage_wait_s``)."""
        return await patiently(call, *args, wait_s=self.storage.config.outage_wait_s, what=what)


class LoadTimer:
    """Times a stage's model load: ``with LoadTimer("text_encoder", model.name) as timer: ...``.

    Records ``reelserve_model_load_seconds`` and keeps the figure in ``timer.seconds``.
    """

    def __init__(self, stage: str, model: str):
        self.stage, self.model = stage, model
        self.seconds: float | None = None

    def __enter__(self) -> LoadTimer:
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.seconds = time.perf_counter() - self._started
            metrics.model_loaded(self.stage, self.model, self.seconds)
