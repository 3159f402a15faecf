"""A job attempt's stage outputs and denoising checkpoints on a store, encoded by the codec.

Each attempt writes only under its own prefix (``artifacts/<job>/<attempt>/``),
so two overlapping attempts never touch the same object. Reads name the
attempts the job record accepts (e.g. the current one and the one it took
over from), newest first; an object that does not decode counts as missing,
so the caller redoes that work. Checkpoints are kept by step: a resume takes
the newest one that decodes, falling back to the one before when the newest
is damaged.

These calls block (obstore releases the GIL while it waits; encoding a 7.3 MB
checkpoint takes about 1 ms, a job's 42 MB of outputs about 50 ms): the
asyncio runner calls them in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from serving.storage.codec import Codec
from serving.storage.codec import codec as default_codec
from serving.storage.keys import (
    artifact_key,
    attempt_prefix,
    check_attempt,
    checkpoint_key,
    parse_key,
)
from serving.storage.store import Storage

__all__ = ["Checkpoint", "keep_checkpoint", "keep_output", "kept_outputs", "load_output", "newest_checkpoint"]

T = TypeVar("T")


@dataclass(frozen=True)
class Checkpoint(Generic[T]):
    """A decoded checkpoint and where it came from."""

    value: T
    attempt: int
    step: int


def keep_output(storage: Storage, job_id: str, attempt: int, name: str, value: object, codec: Codec = default_codec) -> int:
    """Keep a stage output of this attempt under ``name``; returns its size in bytes."""
    return storage.put(artifact_key(job_id, attempt, name), codec.encode(value))


def load_output(
    storage: Storage, job_id: str, attempts: Iterable[int], name: str, expected: type[T], codec: Codec = default_codec
) -> T | None:
    """The output ``name`` kept by the newest of ``attempts`` that has a readable one, or ``None``."""
    for attempt in sorted({check_attempt(a) for a in attempts}, reverse=True):
        key = artifact_key(job_id, attempt, name)
        data = storage.get(key)
        if data is not None:
            value = codec.decode(data, expected, where=key)
            if value is not None:
                return value
    return None


def kept_outputs(storage: Storage, job_id: str, attempt: int) -> set[str]:
    """Names of the stage outputs this attempt kept (checkpoints not included)."""
    names = set()
    for info in storage.list(attempt_prefix("artifacts", job_id, attempt)):
        parsed = parse_key(info.key)
        if parsed.checkpoint_step is None:
            names.add(parsed.name.removesuffix(".safetensors"))
    return names


def keep_checkpoint(
    storage: Storage, job_id: str, attempt: int, step: int, value: object, *, keep_last: int = 2, codec: Codec = default_codec
) -> int:
    """Keep a checkpoint after ``step`` finished steps, then drop this attempt's older ones beyond the
    newest ``keep_last`` (one spare, in case the newest turns out unreadable). Returns its size in bytes."""
    size = storage.put(checkpoint_key(job_id, attempt, step), codec.encode(value))
    steps = sorted(_checkpoint_steps(storage, job_id, attempt), reverse=True)
    for old in steps[max(keep_last, 1) :]:
        storage.delete(checkpoint_key(job_id, attempt, old))
    return size


def newest_checkpoint(
    storage: Storage, job_id: str, attempts: Iterable[int], expected: type[T], codec: Codec = default_codec
) -> Checkpoint[T] | None:
    """The checkpoint with the most finished steps among ``attempts`` that decodes, or ``None``.

    Equal steps: the later attempt wins. An unreadable one is logged by the codec and skipped.
    """
    found = [
        (step, attempt)
        for attempt in {check_attempt(a) for a in attempts}
        for step in _checkpoint_steps(storage, job_id, attempt)
    ]
    for step, attempt in sorted(found, reverse=True):
        key = checkpoint_key(job_id, attempt, step)
        data = storage.get(key)
        value = None if data is None else codec.decode(data, expected, where=key)
        if value is not None:
            return Checkpoint(value=value, attempt=attempt, step=step)
    return None


def _checkpoint_steps(storage: Storage, job_id: str, attempt: int) -> list[int]:
    steps = (parse_key(info.key).checkpoint_step for info in storage.list(attempt_prefix("artifacts", job_id, attempt)))
    return [step for step in steps if step is not None]
