"""Where a job's finished stage outputs and denoising checkpoints wait until the job ends.

A takeover reads them to skip finished stages and to resume denoising from
the last checkpoint; a stage reads one when the Ray object it was handed is
gone (its producer replica stopped). They are deleted when the job ends.

Two backends, chosen by ``jobs.artifacts``: a directory under the results
directory (a shared volume in a cluster) or the job store's Redis. Objects
are our own hand-off dataclasses, pickled (protocol 5 keeps numpy buffers
flat); files are written atomically.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import shutil
from pathlib import Path
from typing import Any, Protocol

from serving.tenancy.redis_connection import redis_auth_options
from serving.jobs.store import StoreUnavailable

__all__ = ["ArtifactStore", "DirectoryArtifacts", "RedisArtifacts", "open_artifacts", "CHECKPOINT"]

CHECKPOINT = "denoise_checkpoint"  # the name diffusion keeps its resumable state under

logger = logging.getLogger("ray.serve.reelserve.artifacts")


class ArtifactStore(Protocol):
    def put(self, job_id: str, name: str, value: Any) -> int:
        """Keep ``value`` for the job under ``name`` (replacing any earlier one); return its size in bytes."""

    def get(self, job_id: str, name: str) -> Any | None:
        """The kept value, or ``None``."""

    def names(self, job_id: str) -> set[str]:
        """What is kept for the job."""

    def delete_job(self, job_id: str) -> None:
        """Forget everything kept for the job."""

    def job_ids(self) -> list[str]:
        """Jobs with something kept (what a sweep for ended jobs walks)."""


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=5)


def _loads(data: bytes, where: str) -> Any | None:
    """The kept value; a damaged one counts as missing (a takeover then redoes that work)."""
    try:
        return pickle.loads(data)
    except Exception as error:  # noqa: BLE001 - truncated or foreign bytes
        logger.warning("%s is unreadable (%s); treating it as missing", where, type(error).__name__)
        return None


class DirectoryArtifacts:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, name: str) -> Path:
        return self.root / job_id / f"{name}.pkl"

    def put(self, job_id: str, name: str, value: Any) -> int:
        path = self._path(job_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _dumps(value)
        # A name of its own per write: writers of one artifact (threads, replicas) never share a temporary file.
        partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        try:
            partial.write_bytes(data)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return len(data)

    def get(self, job_id: str, name: str) -> Any | None:
        path = self._path(job_id, name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return _loads(data, str(path))

    def names(self, job_id: str) -> set[str]:
        folder = self.root / job_id
        return {p.stem for p in folder.glob("*.pkl")} if folder.is_dir() else set()

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def job_ids(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if p.is_dir()]


class RedisArtifacts:
    _PREFIX = "reelserve:artifacts:"

    def __init__(self, url: str):
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2, **redis_auth_options(url))

    def _key(self, job_id: str) -> str:
        return self._PREFIX + job_id

    def put(self, job_id: str, name: str, value: Any) -> int:
        data = _dumps(value)
        self._call(self._redis.hset, self._key(job_id), name, data)
        return len(data)

    def get(self, job_id: str, name: str) -> Any | None:
        data = self._call(self._redis.hget, self._key(job_id), name)
        return None if data is None else _loads(data, f"{self._key(job_id)} {name}")

    def names(self, job_id: str) -> set[str]:
        return {n.decode() for n in self._call(self._redis.hkeys, self._key(job_id))}

    def delete_job(self, job_id: str) -> None:
        self._call(self._redis.delete, self._key(job_id))

    def job_ids(self) -> list[str]:
        keys = self._call(lambda: list(self._redis.scan_iter(match=self._PREFIX + "*", count=500)))
        return [key.decode().removeprefix(self._PREFIX) for key in keys]

    @staticmethod
    def _call(method, *args):
        import redis

        try:
            return method(*args)
        except redis.RedisError as error:
            raise StoreUnavailable(f"the artifact store (Redis) is unreachable: {type(error).__name__}") from None


def open_artifacts(jobs) -> ArtifactStore:
    """The artifact store ``jobs`` (a ``JobsConfig``) names."""
    if jobs.artifacts == "redis":
        return RedisArtifacts(jobs.redis_url)
    from serving.jobs.results import default_results_dir

    return DirectoryArtifacts(Path(jobs.results_dir or default_results_dir()) / "artifacts")
