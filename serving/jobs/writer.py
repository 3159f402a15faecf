"""Every write about a running job, fenced to its owner's attempt: queued, coalesced, retried through outages.

One writer per job attempt and writer of it (the runner that owns the job;
the diffusion stage writing progress after every step). ``note`` queues
changes (newest wins) and returns at once; a task sends them, one write at a
time, so a slow store coalesces them instead of piling them up. While the
store is unreachable the changes wait and the job goes on. A write the store
refuses means the fence is stale (another attempt owns the job now):
``on_lost`` is called once and the writer stops.

The runner's writer also renews the job's lease every third of it; the
diffusion stage's also reads the cancel flag after each write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

from serving.errors import StoreUnavailable
from serving.jobs.events import wait_for_event
from serving.jobs.store import JobStore
from serving.protocol import Fence

__all__ = ["FencedWriter"]

logger = logging.getLogger("ray.serve.reelserve.writer")

RETRY_WRITE_S = 1.0  # how often queued writes try an unreachable store again


class FencedWriter:
    def __init__(
        self,
        store: JobStore,
        fence: Fence,
        io: Callable[..., Awaitable[Any]],
        on_lost: Callable[[], object],
        *,
        lease_s: float | None = None,
        on_cancel_requested: Callable[[], None] | None = None,
    ):
        """``io(function, *args, **kwargs)`` runs a blocking store call off the event loop."""
        self.store, self.fence, self._io = store, fence, io
        self._on_lost, self._on_cancel_requested = on_lost, on_cancel_requested
        self._lease_s = lease_s
        self.pending: dict[str, Any] = {}
        self.lost = False
        self._flush = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write_forever())

    def note(self, **changes) -> None:
        """Queue changes about the job; they are written now, or when the store answers again."""
        self.pending.update(changes)
        self._flush.set()

    async def stop(self) -> dict[str, Any]:
        """Stop writing; return what was still queued (the caller's last write sends it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        pending, self.pending = self.pending, {}
        return pending

    async def _write_forever(self) -> None:
        renew_every = self._lease_s / 3 if self._lease_s else None
        next_renewal = 0.0 if renew_every else float("inf")
        while True:
            await wait_for_event(self._flush, next_renewal - time.monotonic())
            self._flush.clear()
            changes, self.pending = self.pending, {}
            try:
                current = await self._write(changes)
                if current and renew_every and time.monotonic() >= next_renewal:
                    current = await self._io(self.store.renew, self.fence, self._lease_s)
                    next_renewal = time.monotonic() + renew_every
                if current and changes and self._on_cancel_requested is not None:
                    if await self._io(self.store.is_cancel_requested, self.fence.job_id):
                        self._on_cancel_requested()
            except asyncio.CancelledError:
                self.pending = {**changes, **self.pending}  # stopped mid-write: the last write sends them
                raise
            except Exception as error:  # noqa: BLE001 - an outage, or anything else: keep them and try again
                if not isinstance(error, StoreUnavailable):
                    logger.warning("job %s: writing to the store failed: %r; retrying", self.fence.job_id, error)
                self.pending = {**changes, **self.pending}  # newest last, for when the store is back
                await asyncio.sleep(RETRY_WRITE_S)
                self._flush.set()
                continue
            if not current:
                self.lost = True
                self._on_lost()
                return

    async def _write(self, changes: dict[str, Any]) -> bool:
        if not changes:
            return True
        return await self._io(self.store.update, self.fence, **changes)
