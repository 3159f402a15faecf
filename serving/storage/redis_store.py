"""The same store interface on Redis: stage outputs and checkpoints in the job store's Redis.

For clusters without a shared volume or an object store (``storage.artifacts_url: redis``).
Each object is one hash, ``reelserve:objects:<key>`` with the bytes (``d``) and
the write time (``t``), written by one ``HSET`` so a reader sees a whole object
or none. Keys are of the layout in ``serving.storage.keys``, which has no glob
characters, so ``SCAN MATCH <prefix>*`` lists exactly a prefix.

A Redis over its ``maxmemory`` (the "OOM command not allowed" answer) is
``StorageFull``; a Redis that does not answer is ``StorageUnavailable``. There
are no signed URLs. The ``async`` twins run the blocking client in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import redis

from serving.storage.errors import StorageError, StorageFull, StorageUnavailable
from serving.storage.keys import check_prefix, parse_key
from serving.storage.store import (
    _DOWNLOAD_CHUNK,
    Data,
    ObjectInfo,
    Storage,
    _check_chunk,
    _check_range,
    _deletable,
    _pieces,
    _Upload,
)
from serving.tenancy.redis_connection import redis_auth_options

__all__ = ["RedisStorage", "open_redis_storage"]

_PREFIX = "reelserve:objects:"


class RedisStorage(Storage):
    """``Storage`` on a Redis server; see the module docstring."""

    def __init__(self, client, url: str):
        super().__init__(None, "redis", url)  # type: ignore[arg-type]
        self._redis = client

    # -- writes -----------------------------------------------------------------------------------

    def put(self, key: str, data: Data) -> int:
        key = parse_key(key).key
        payload = _materialised(data)
        with self._redis_errors("put", key):
            self._redis.hset(_PREFIX + key, mapping={"d": payload, "t": repr(time.time())})
        return len(payload)

    def delete(self, key: str) -> None:
        key = parse_key(key).key
        with self._redis_errors("delete", key):
            self._redis.delete(_PREFIX + key)

    def delete_prefix(self, prefix: str) -> int:
        keys = [_PREFIX + info.key for info in self.list(_deletable(prefix))]
        with self._redis_errors("delete", prefix):
            for start in range(0, len(keys), 500):
                self._redis.delete(*keys[start : start + 500])
        return len(keys)

    # -- reads ------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        key = parse_key(key).key
        with self._redis_errors("get", key):
            return self._redis.hget(_PREFIX + key, "d")

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        _check_range(start, length)
        data = self.get(key)
        return None if data is None else data[start : start + length]

    def stream(self, key: str, chunk_size: int = _DOWNLOAD_CHUNK) -> Iterator[bytes] | None:
        _check_chunk(chunk_size)
        data = self.get(key)
        return None if data is None else _pieces(data, chunk_size)

    def head(self, key: str) -> ObjectInfo | None:
        key = parse_key(key).key
        with self._redis_errors("head", key):
            size, written = self._redis.pipeline().hstrlen(_PREFIX + key, "d").hget(_PREFIX + key, "t").execute()
        return None if written is None else ObjectInfo(key=key, size=int(size), modified_at=float(written))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._listing(check_prefix(prefix))

    def _listing(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._redis_errors("list", prefix):
            names = [name.decode() for name in self._redis.scan_iter(match=f"{_PREFIX}{prefix}*", count=1000)]
            pipeline = self._redis.pipeline()
            for name in names:
                pipeline.hstrlen(name, "d").hget(name, "t")
            answers = pipeline.execute()
        for index, name in enumerate(names):
            size, written = answers[2 * index], answers[2 * index + 1]
            key = name.removeprefix(_PREFIX)
            if written is None:
                continue  # deleted between the scan and the read
            try:
                parse_key(key)
            except ValueError:
                continue  # not ours
            yield ObjectInfo(key=key, size=int(size), modified_at=float(written))

    # -- async twins: the blocking client in a thread ----------------------------------------------

    async def put_async(self, key: str, data: Data) -> int:
        return await asyncio.to_thread(self.put, key, data)

    async def delete_async(self, key: str) -> None:
        await asyncio.to_thread(self.delete, key)

    async def delete_prefix_async(self, prefix: str) -> int:
        return await asyncio.to_thread(self.delete_prefix, prefix)

    async def get_async(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self.get, key)

    async def get_range_async(self, key: str, start: int, length: int) -> bytes | None:
        return await asyncio.to_thread(self.get_range, key, start, length)

    async def stream_async(self, key: str, chunk_size: int = _DOWNLOAD_CHUNK) -> AsyncIterator[bytes] | None:
        chunks = await asyncio.to_thread(self.stream, key, chunk_size)
        return None if chunks is None else _async_iter(chunks)

    async def head_async(self, key: str) -> ObjectInfo | None:
        return await asyncio.to_thread(self.head, key)

    def list_async(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        check_prefix(prefix)
        return _async_list(self, prefix)

    # -- errors -----------------------------------------------------------------------------------

    @contextmanager
    def _redis_errors(self, operation: str, key: str):
        where = f"{operation} {key!r} on the redis store"
        try:
            yield
        except redis.exceptions.OutOfMemoryError:  # Redis answered "OOM command not allowed ..."
            raise StorageFull(f"{where}: no room (Redis is at its maxmemory)") from None
        except redis.ResponseError as error:
            raise StorageError(f"{where} was refused ({error})") from None
        except redis.RedisError as error:
            raise StorageUnavailable(f"{where}: the store is unreachable ({type(error).__name__})") from None


def open_redis_storage(url: str, *, connect_timeout_s: float = 5.0, read_timeout_s: float = 20.0) -> RedisStorage:
    """A ``RedisStorage`` on the Redis at ``url`` (``redis://host:port/db``), e.g. the job store's."""
    client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=read_timeout_s,
                                  **redis_auth_options(url))
    parsed = urlparse(url)
    shown = parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl()  # never print a password
    return RedisStorage(client, shown)


def _materialised(data: Data) -> bytes:
    upload = _Upload(data)
    if isinstance(upload.body, Path):
        return upload.body.read_bytes()
    if upload.whole:
        return bytes(upload.body)
    return b"".join(bytes(chunk) for chunk in upload.body)


async def _async_iter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _async_list(storage: RedisStorage, prefix: str) -> AsyncIterator[ObjectInfo]:
    for info in await asyncio.to_thread(lambda: list(storage.list(prefix))):
        yield info
