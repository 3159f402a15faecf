"""What every stage deployment shares: one request at a time on the model, off the event loop, measured."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

from serving import metrics
from serving.metrics import StageStats

T = TypeVar("T")

__all__ = ["StageRunner", "LoadTimer"]


class StageRunner:
    """Runs blocking model calls in a worker thread, one at a time, and records each one.

    Pipeline objects keep per-call state, so calls on one replica must not
    overlap; waiting requests queue on the lock (bounded by the deployment's
    ``max_ongoing_requests``). Queue wait is the time spent waiting for that
    lock; the request time covers waiting plus running.
    """

    def __init__(self, stage: str, model: str = "unknown"):
        self.stats = StageStats(stage=stage, model=model)
        self._lock = asyncio.Lock()
        self._publish_load()  # every replica reports from its start (the dashboard counts replicas by it)

    async def run(self, work: Callable[..., T], *args) -> T:
        stats = self.stats
        arrived = time.perf_counter()
        stats.queued += 1
        self._publish_load()
        waiting = True
        try:
            async with self._lock:
                started = time.perf_counter()
                stats.queued -= 1
                stats.in_flight += 1
                waiting = False
                self._publish_load()
                ok = False
                try:
                    result = await asyncio.to_thread(work, *args)
                    ok = True
                finally:
                    stats.in_flight -= 1
                    self._finished(arrived, started, ok)
        finally:
            if waiting:  # cancelled or failed before the model took it
                stats.queued -= 1
            self._publish_load()
        nbytes = metrics.handoff_nbytes(result)
        stats.handed_bytes_total += nbytes
        metrics.bytes_handed(stats.stage, stats.model, nbytes)
        return result

    def _finished(self, arrived: float, started: float, ok: bool) -> None:
        stats = self.stats
        now = time.perf_counter()
        stats.record(now - started, ok=ok, queue_wait_s=started - arrived)
        metrics.stage_request(stats.stage, stats.model, started - arrived, now - arrived, ok)
        metrics.record_gpu_memory(stats.stage, stats.model)

    def _publish_load(self) -> None:
        metrics.stage_load(self.stats.stage, self.stats.model, self.stats.in_flight, self.stats.queued)


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
