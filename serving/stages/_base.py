"""What every stage deployment shares: one request at a time on the model, off the event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

from serving.metrics import StageStats

T = TypeVar("T")

__all__ = ["StageRunner"]


class StageRunner:
    """Runs blocking model calls in a worker thread, one at a time.

    Pipeline objects keep per-call state, so calls on one replica must not
    overlap; waiting requests queue on the lock (bounded by the deployment's
    ``max_ongoing_requests``).
    """

    def __init__(self, stage: str):
        self.stats = StageStats(stage=stage)
        self._lock = asyncio.Lock()

    async def run(self, work: Callable[..., T], *args) -> T:
        async with self._lock:
            started = time.perf_counter()
            try:
                result = await asyncio.to_thread(work, *args)
            except BaseException:
                self.stats.record(time.perf_counter() - started, ok=False)
                raise
            self.stats.record(time.perf_counter() - started, ok=True)
            return result
