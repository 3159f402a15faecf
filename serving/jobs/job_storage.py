"""A job's objects in the configured stores: its inputs and its video, its stage outputs and checkpoints.

Two stores (``storage.results_url`` and ``storage.artifacts_url``, possibly the
same one), laid out as ``serving.storage.keys`` says:

- the results store holds ``inputs/<job>/<name>`` (what the client sent) and
  ``results/<job>/<attempt>/video.mp4`` (each attempt's MP4; the record's
  fenced "completed" write names the one that is the result, ``result_attempt``);
- the artifacts store holds ``artifacts/<job>/<attempt>/...``: each attempt's
  stage outputs and denoising checkpoints, safetensors + JSON (never pickle).

Every key is built here from a checked job id, attempt and name; nothing a
record or a client says becomes a key or a path any other way. A later
attempt reads what it or an earlier attempt kept (newest first); a stale
attempt (higher numbers never exist while it runs) cannot hide a newer one's.
An object that does not decode is missing: the work is redone, never executed.

The calls block (obstore releases the GIL while it waits): async code runs
them in a thread, and ``patiently`` retries them through an outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cluster.storage_config import StorageConfig, default_results_dir
from serving.storage import outputs
from serving.storage.codec import codec
from serving.storage.errors import StorageUnavailable
from serving.storage.keys import (
    AREAS,
    attempt_prefix,
    check_attempt,
    check_job_id,
    input_key,
    job_prefix,
    parse_key,
    result_key,
)
from serving.storage.opening import open_storage
from serving.storage.store import ObjectInfo, Storage

__all__ = ["JobStorage", "patiently", "register_stored_types"]

logger = logging.getLogger("ray.serve.reelserve.storage")

T = TypeVar("T")

_FAIL_FAST_S = 2.0  # an ingress answers a client within about this long when a store is down (then 503)


def register_stored_types(family) -> None:
    """Let the codec write and read what ``family`` keeps beyond the protocol's hand-offs (its checkpoint), each
    under ``<family>.<class>``: two families may name their classes alike (both have a ``DenoiseCheckpoint``), and a
    process may hold both (a test, a tool, a deployment serving both)."""
    for cls in family.stored_types():
        codec.register(cls, name=f"{family.name}.{cls.__name__}")


class JobStorage:
    """The results store and the artifacts store of one replica, and every key they are used with."""

    def __init__(self, config: StorageConfig, redis_url: str | None = None, *, fail_fast: bool = False):
        """``redis_url``: the job store's Redis (``artifacts_url: redis``). ``fail_fast``: give up on an unreachable
        store within about two seconds (the ingress, where a client waits)."""
        self.config = config
        options = config.client_options()
        if fail_fast:
            options["connect_timeout_s"] = min(options["connect_timeout_s"], _FAIL_FAST_S)
            options["retry_timeout_s"] = min(options["retry_timeout_s"], _FAIL_FAST_S)
        results_url = config.results_url or default_results_dir()
        self.results: Storage = open_storage(results_url, **options)
        artifacts_url = config.artifacts_store_url(results_url, redis_url)
        self.artifacts: Storage = self.results if artifacts_url == results_url else open_storage(artifacts_url, **options)

    @property
    def stores(self) -> tuple[Storage, ...]:
        return (self.results,) if self.artifacts is self.results else (self.results, self.artifacts)

    def describe(self) -> str:
        return "; ".join(store.describe() for store in self.stores)

    # ------------------------------------------------------------------ inputs (results store)

    def save_input(self, job_id: str, name: str, data: bytes) -> int:
        return self.results.put(input_key(job_id, name), data)

    def load_input(self, job_id: str, name: str) -> bytes | None:
        return self.results.get(input_key(job_id, name))

    def probe(self) -> None:
        """One cheap request to the results store: raises ``StorageUnavailable`` when it cannot be reached."""
        self.results.head(input_key("video_" + "0" * 24, "photo"))

    # ------------------------------------------------------------------ videos (results store)

    def save_video(self, job_id: str, attempt: int, path: Path) -> int:
        """This attempt's MP4 (one atomic put: a reader sees all of it or nothing)."""
        return self.results.put(result_key(job_id, attempt), Path(path))

    def video_key(self, job_id: str, attempt: object) -> str:
        """The key of an attempt's MP4; ``ValueError`` for anything but a job id and an attempt number."""
        return result_key(check_job_id(job_id), check_attempt(attempt))

    def video_info(self, key: str) -> ObjectInfo | None:
        return self.results.head(key)

    @property
    def signs_downloads(self) -> bool:
        """Downloads are redirects to signed URLs: an object store that can sign, and ``redirect_downloads``."""
        return self.config.redirect_downloads and self.results.can_sign

    def legacy_video_path(self, job_id: str) -> Path | None:
        """Where a local store kept a job's MP4 before results were kept per attempt (``<root>/<id>.mp4``), for
        records written then; derived from the checked job id, never read from the record."""
        root = self.results.local_root
        return None if root is None else root / f"{check_job_id(job_id)}.mp4"

    # ------------------------------------------------------------------ stage outputs and checkpoints

    def keep_output(self, job_id: str, attempt: int, name: str, value: object) -> int:
        return outputs.keep_output(self.artifacts, job_id, attempt, name, value)

    def load_output(self, job_id: str, attempt: int, name: str) -> Any | None:
        """The output ``name`` kept by ``attempt`` or an earlier attempt (newest first), or ``None``."""
        return outputs.load_output(self.artifacts, job_id, _up_to(attempt), name, None)  # type: ignore[arg-type]

    def keep_checkpoint(self, job_id: str, attempt: int, step: int, value: object) -> int:
        return outputs.keep_checkpoint(self.artifacts, job_id, attempt, step, value)

    def newest_checkpoint(self, job_id: str, attempt: int) -> outputs.Checkpoint | None:
        """The readable checkpoint with the most finished steps kept by ``attempt`` or an earlier one."""
        return outputs.newest_checkpoint(self.artifacts, job_id, _up_to(attempt), None)  # type: ignore[arg-type]

    def newest_checkpoint_step(self, job_id: str, attempt: int) -> int | None:
        """The step of the newest checkpoint of ``attempt`` or an earlier one, from the listing alone."""
        steps = [
            parsed.checkpoint_step
            for parsed in (parse_key(info.key) for info in self.artifacts.list(job_prefix("artifacts", job_id)))
            if parsed.checkpoint_step is not None and parsed.attempt is not None and parsed.attempt <= attempt
        ]
        return max(steps, default=None)

    # ------------------------------------------------------------------ clean-up

    def remove_job(self, job_id: str) -> int:
        """Everything of the job, every attempt, in both stores; returns how many objects."""
        return sum(store.delete_prefix(job_prefix(area, job_id)) for store in self.stores for area in AREAS)

    def remove_result(self, job_id: str, attempt: int) -> int:
        """One attempt's MP4 (an attempt whose MP4 is not the job's result)."""
        return self.results.delete_prefix(attempt_prefix("results", job_id, attempt))

    def remove_outputs(self, job_id: str, keep_result_of: int | None, keep_artifacts: bool = False) -> int:
        """After the job ended: every attempt's MP4 but the accepted one, and (unless kept) every stage output."""
        removed = 0
        for info in list(self.results.list(job_prefix("results", job_id))):
            if parse_key(info.key).attempt != keep_result_of:
                self.results.delete(info.key)
                removed += 1
        if not keep_artifacts:
            removed += self.artifacts.delete_prefix(job_prefix("artifacts", job_id))
        return removed


def _up_to(attempt: int) -> range:
    return range(1, check_attempt(attempt) + 1)


async def patiently(call: Callable[..., T], *args: Any, wait_s: float, what: str) -> T:
    """``call(*args)`` in a thread, called again with backoff (0.5 s doubling to 5 s) while the store is
    unavailable, for at most ``wait_s``; then its ``StorageUnavailable``. Other errors (full, refused) at once."""
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return await asyncio.to_thread(call, *args)
        except StorageUnavailable as error:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: storage is unreachable (%s); trying again in %.1f s", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
