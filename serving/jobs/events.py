"""Job change notifications: one listener per process, fanned out to every waiter in it.

Watchers (WatchVideo streams, orchestrators waiting on a stage) wait on an
asyncio event per job instead of each polling the store:

- Redis: every store write publishes the job id (``EVENTS_CHANNEL``); one
  pub/sub connection per process hears them all.
- SQLite (one machine): every write stamps the row with a rising sequence
  number; one task per process reads what changed, a few times a second,
  and only while someone is waiting.

A waiter always re-reads the record after waking, so a missed or spurious
wake-up costs a read, never a wrong answer; waits are bounded, so even a lost
notification only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, cast

import redis.asyncio as aioredis

from serving.jobs.redis_store import EVENTS_CHANNEL
from serving.jobs.store import JobStore
from serving.tenancy.redis_connection import redis_auth_options

if TYPE_CHECKING:
    from serving.jobs.redis_store import RedisJobStore
    from serving.jobs.sqlite_store import SQLiteJobStore

__all__ = ["JobEvents", "wait_for_event"]

logger = logging.getLogger("ray.serve.reelserve.events")

_SQLITE_POLL_S = 0.1
_RECONNECT_S = 1.0


async def wait_for_event(event: asyncio.Event, timeout: float) -> bool:
    """Until ``event`` is set or ``timeout`` passes; True when it was set.

    Not ``asyncio.wait_for``: on Python 3.11 that swallows a cancel that arrives
    just as the event is set, and a task stopped that way runs on unseen.
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(0.0, timeout))
    finally:
        waiter.cancel()
    return event.is_set()


class JobEvents:
    def __init__(self, store: JobStore):
        self._store = store
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task | None = None

    # ------------------------------------------------------------------ waiting

    async def wait(self, job_id: str, timeout: float) -> bool:
        """Until the job is written again or ``timeout`` passes; True when it was written."""
        self._ensure_listening()
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            return await wait_for_event(event, timeout)
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    self._waiters.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for job_id in list(self._waiters):
            self._wake(job_id)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
            self._listener = None

    # ------------------------------------------------------------------ listening

    def _ensure_listening(self) -> None:
        if self._listener is None or self._listener.done():
            listen = self._listen_redis if hasattr(self._store, "url") else self._listen_sqlite
            self._listener = asyncio.get_running_loop().create_task(listen())

    async def _listen_redis(self) -> None:
        while True:
            url = cast("RedisJobStore", self._store).url
            client = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, **redis_auth_options(url))
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    self._wake_all()  # anything written while we were not listening
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            self._wake(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Redis restarts; keep trying, waiters time out meanwhile
                logger.info("job events: Redis unreachable (%s); retrying", type(error).__name__)
                self._wake_all()
                await asyncio.sleep(_RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _listen_sqlite(self) -> None:
        store = cast("SQLiteJobStore", self._store)
        seq = await asyncio.to_thread(store.latest_seq)
        while True:
            await asyncio.sleep(_SQLITE_POLL_S)
            if not self._waiters:
                continue
            try:
                seq, changed = await asyncio.to_thread(store.changed_since, seq)
            except Exception as error:  # noqa: BLE001 - a busy database: try again next tick
                logger.info("job events: reading changes failed (%s)", type(error).__name__)
                continue
            for job_id in changed:
                self._wake(job_id)
