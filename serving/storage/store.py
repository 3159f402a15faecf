"""One object store interface over a local directory, S3 (and S3-compatible stores), GCS and memory.

Built on ``obstore`` (Python bindings of the Rust ``object_store`` crate, the
one the Arrow/DataFusion ecosystem uses), chosen over ``fsspec`` + ``s3fs`` /
``gcsfs`` for the hot path:

- one wheel (16 MB, no Python dependencies, imported in 17 ms) speaks local,
  S3, GCS, Azure and memory with the same calls; ``s3fs`` brings 20 packages
  (35 MB, 412 ms to import) and ``gcsfs`` 38 (58 MB);
- every put is atomic on every backend: a local put writes a staging file of
  its own and renames it (concurrent writers never share one), an S3 or GCS
  object appears only when its upload is complete (one PUT up to 64 MiB; a
  streamed iterable goes up as a multipart upload);
- sync calls release the GIL (stage threads keep running) and every call has
  an ``async`` twin the asyncio runner and ingress await without a thread hop
  (``s3fs``'s sync calls run its own event loop in a thread);
- signed URLs for S3 and GCS are computed locally, no request made;
- puts take iterables of buffers and gets stream in chunks, so a download
  never holds the whole MP4 in Python. Against the same S3 server the two are
  within run-to-run noise, obstore ahead in most runs (7.3 MB put 33-72 ms vs
  48-103 ms, 42 MB put 181-338 ms vs 261-537 ms; ``docs/storage-figures.md``).

Keys are checked against the layout in ``serving.storage.keys`` on every
call, whatever the caller did before: a key string that is not of the layout
never reaches a backend. Errors come out as ``StorageFull``,
``StorageUnavailable`` (bounded by the timeouts below, never a hang) or
``StorageError``; a missing object is ``None``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import obstore

if TYPE_CHECKING:
    from obstore import ObjectMeta

from serving.storage.errors import (
    SigningNotSupported,
    StorageError,
    StorageFull,
    StorageUnavailable,
)
from serving.storage.keys import check_prefix, parse_key

__all__ = ["MAX_SIGNED_URL_TTL_S", "Backend", "ObjectInfo", "Storage"]

logger = logging.getLogger("ray.serve.reelserve.storage")

Backend = Literal["local", "s3", "gcs", "memory", "redis"]
Data = bytes | bytearray | memoryview | Path | Iterable[bytes | bytearray | memoryview]

MAX_SIGNED_URL_TTL_S = 7 * 24 * 3600  # S3's and GCS's longest presigned URL life
_CONTENT_TYPES = {".mp4": "video/mp4", ".png": "image/png"}
_DOWNLOAD_CHUNK = 1 << 20  # gRPC's receive limit is 4 MiB: stream in ~1 MiB chunks
# One PUT below this size: against the S3 server a single 7.3 MB PUT took 37 ms, the 5 MB-part
# multipart default 84 ms (42 MB: 242 vs 371 ms), and there is no incomplete upload to clean up.
_SINGLE_PUT_UP_TO = 64 << 20
_STREAMED_PART = 8 << 20  # an iterable's length is unknown: multipart, with parts this big, 4 at a time

# How a full disk or an exceeded quota reads in obstore's messages: the local
# file system's errno (ENOSPC, EDQUOT, EFBIG) or the error code of an
# S3-compatible store (AWS, MinIO, Ceph RGW) or GCS.
_FULL = re.compile(
    r"os error (?:28|122|27)\b|kind: (?:StorageFull|QuotaExceeded|FileTooLarge)\b"
    r"|\b(?:QuotaExceeded|InsufficientStorage|XMinioStorageFull|XMinioAdminBucketQuotaExceeded"
    r"|EntityTooLarge|storageQuotaExceeded|quotaExceeded)\b"
    r"|status code: 507\b"
)
_STATUS = re.compile(r"status code: (\d{3})\b")
# Local errnos that mean the file system went away (NFS down or stale), not that we did something wrong.
_LOCAL_GONE = re.compile(r"os error (?:5|107|110|112|113|116)\b")


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or ``head`` says about one object."""

    key: str
    size: int
    modified_at: float  # seconds since the epoch, the store's clock


class Storage:
    """One store: a backend plus the timeouts and retries of its client. Build it with ``open_storage``."""

    def __init__(
        self, store, backend: Backend, url: str, *, local_root: Path | None = None, endpoint_url: str | None = None
    ):
        self._store = store
        self.backend: Backend = backend
        self.url = url  # as configured; holds no credentials (they come from the environment)
        self.local_root = local_root  # the directory of a local store, else None
        self.endpoint_url = endpoint_url  # an S3-compatible store's endpoint, else None

    def __repr__(self) -> str:
        return f"Storage({self.describe()})"

    def describe(self) -> str:
        """One line for ``reelserve plan``: the backend, the URL and the endpoint if any."""
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"{self.backend} {self.url}{at}"

    @property
    def can_sign(self) -> bool:
        """Whether ``signed_url`` works here (object stores with credentials: S3, GCS)."""
        return self.backend in ("s3", "gcs")

    # -- writes ---------------------------------------------------------------------------------

    def put(self, key: str, data: Data) -> int:
        """Store ``data`` under ``key`` atomically: a reader sees the old object or the new one, never a part.

        ``data`` is bytes or any contiguous byte buffer (a numpy array too), a
        ``Path`` to a local file, or an iterable of buffers (it goes up as a
        multipart upload in 8 MiB parts). Returns the size stored.
        """
        key = parse_key(key).key
        upload = _Upload(data)
        with self._errors("put", key):
            obstore.put(self._store, key, upload.body, **self._put_options(key, upload))
        return upload.size

    async def put_async(self, key: str, data: Data) -> int:
        key = parse_key(key).key
        upload = _Upload(data)
        with self._errors("put", key):
            await obstore.put_async(self._store, key, upload.body, **self._put_options(key, upload))
        return upload.size

    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error."""
        key = parse_key(key).key
        with self._errors("delete", key):
            try:
                obstore.delete(self._store, key)
            except FileNotFoundError:
                pass

    async def delete_async(self, key: str) -> None:
        key = parse_key(key).key
        with self._errors("delete", key):
            try:
                await obstore.delete_async(self._store, key)
            except FileNotFoundError:
                pass

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (an area, a job or an attempt); returns how many."""
        keys = [info.key for info in self.list(_deletable(prefix))]
        with self._errors("delete", prefix):
            for batch in _batches(keys):
                try:
                    obstore.delete(self._store, batch)
                except FileNotFoundError:  # a concurrent delete won for one of them: finish the others
                    for key in batch:
                        _ignore_missing(obstore.delete, self._store, key)
        return len(keys)

    async def delete_prefix_async(self, prefix: str) -> int:
        keys = [info.key async for info in self.list_async(_deletable(prefix))]
        with self._errors("delete", prefix):
            for batch in _batches(keys):
                try:
                    await obstore.delete_async(self._store, batch)
                except FileNotFoundError:
                    for key in batch:
                        try:
                            await obstore.delete_async(self._store, key)
                        except FileNotFoundError:
                            pass
        return len(keys)

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The whole object, or ``None`` when there is none."""
        key = parse_key(key).key
        with self._errors("get", key):
            try:
                return bytes(obstore.get(self._store, key).bytes())
            except FileNotFoundError:
                return None

    async def get_async(self, key: str) -> bytes | None:
        key = parse_key(key).key
        with self._errors("get", key):
            try:
                result = await obstore.get_async(self._store, key)
                return bytes(await result.bytes_async())
            except FileNotFoundError:
                return None

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        """``length`` bytes from ``start`` (fewer at the end of the object), or ``None`` when there is none."""
        key = parse_key(key).key
        _check_range(start, length)
        with self._errors("get", key):
            try:
                return bytes(obstore.get_range(self._store, key, start=start, length=length))
            except FileNotFoundError:
                return None

    async def get_range_async(self, key: str, start: int, length: int) -> bytes | None:
        key = parse_key(key).key
        _check_range(start, length)
        with self._errors("get", key):
            try:
                return bytes(await obstore.get_range_async(self._store, key, start=start, length=length))
            except FileNotFoundError:
                return None

    def stream(self, key: str, chunk_size: int = _DOWNLOAD_CHUNK) -> Iterator[bytes] | None:
        """The object in chunks of at most ``chunk_size`` bytes, or ``None`` when there is none.

        The request is made here, so a missing object is known before the first chunk.
        """
        key = parse_key(key).key
        _check_chunk(chunk_size)
        with self._errors("get", key):
            try:
                result = obstore.get(self._store, key)
            except FileNotFoundError:
                return None
        return self._chunks(result.stream(min_chunk_size=chunk_size), key, chunk_size)

    async def stream_async(self, key: str, chunk_size: int = _DOWNLOAD_CHUNK) -> AsyncIterator[bytes] | None:
        key = parse_key(key).key
        _check_chunk(chunk_size)
        with self._errors("get", key):
            try:
                result = await obstore.get_async(self._store, key)
            except FileNotFoundError:
                return None
        return self._chunks_async(result.stream(min_chunk_size=chunk_size), key, chunk_size)

    def head(self, key: str) -> ObjectInfo | None:
        """Size and modification time, or ``None`` when there is no such object."""
        key = parse_key(key).key
        with self._errors("head", key):
            try:
                return _info(obstore.head(self._store, key))
            except FileNotFoundError:
                return None

    async def head_async(self, key: str) -> ObjectInfo | None:
        key = parse_key(key).key
        with self._errors("head", key):
            try:
                return _info(await obstore.head_async(self._store, key))
            except FileNotFoundError:
                return None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` (``""``: all), in no particular order; foreign keys are skipped."""
        return self._listing(check_prefix(prefix))

    def list_async(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self._listing_async(check_prefix(prefix))

    def _listing(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._errors("list", prefix):
            for chunk in obstore.list(self._store, prefix or None, chunk_size=1000):
                yield from _ours(chunk)

    async def _listing_async(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        with self._errors("list", prefix):
            async for chunk in obstore.list(self._store, prefix or None, chunk_size=1000):
                for info in _ours(chunk):
                    yield info

    # -- direct downloads -----------------------------------------------------------------------

    def signed_url(self, key: str, expires_s: int) -> str:
        """A URL that GETs the object without credentials for ``expires_s`` seconds (S3, GCS only)."""
        key = parse_key(key).key
        expires = self._expiry(expires_s)
        with self._errors("sign", key):
            return obstore.sign(self._store, "GET", key, expires)

    async def signed_url_async(self, key: str, expires_s: int) -> str:
        key = parse_key(key).key
        expires = self._expiry(expires_s)
        with self._errors("sign", key):
            return await obstore.sign_async(self._store, "GET", key, expires)

    # -- helpers --------------------------------------------------------------------------------

    def _expiry(self, expires_s: int) -> timedelta:
        if not self.can_sign:
            raise SigningNotSupported(f"a {self.backend} store cannot sign URLs; stream the object instead")
        if type(expires_s) is not int or not 1 <= expires_s <= MAX_SIGNED_URL_TTL_S:
            raise ValueError(f"signed URL lifetime must be 1..{MAX_SIGNED_URL_TTL_S} s, not {expires_s!r}")
        return timedelta(seconds=expires_s)

    def _put_options(self, key: str, upload: _Upload) -> dict:
        if upload.whole:
            options: dict[str, Any] = {"chunk_size": _SINGLE_PUT_UP_TO}
        else:
            options = {"chunk_size": _STREAMED_PART, "max_concurrency": 4}
        if self.backend != "local":  # a file has no content type (obstore refuses attributes there)
            options["attributes"] = {"Content-Type": _CONTENT_TYPES.get(Path(key).suffix, "application/octet-stream")}
        return options

    def _chunks(self, stream, key: str, size: int) -> Iterator[bytes]:
        # obstore's chunk size is a minimum (a memory store hands the whole object over at once): cut to size.
        with self._errors("get", key):
            for chunk in stream:
                yield from _pieces(chunk, size)

    async def _chunks_async(self, stream, key: str, size: int) -> AsyncIterator[bytes]:
        with self._errors("get", key):
            async for chunk in stream:
                for piece in _pieces(chunk, size):
                    yield piece

    @contextmanager
    def _errors(self, operation: str, key: str):
        """obstore's errors as ours: full, unavailable, or refused."""
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - every backend failure is mapped below
            raise self._translated(error, operation, key) from None

    def _translated(self, error: Exception, operation: str, key: str) -> StorageError:
        message = str(error).split("\n\nDebug source:")[0]
        where = f"{operation} {key!r} on the {self.backend} store"
        status = _STATUS.search(message)
        code = int(status.group(1)) if status else None
        if _FULL.search(str(error)):
            return StorageFull(f"{where}: no room ({_short(message)})")
        if self.backend == "local":
            unavailable = bool(_LOCAL_GONE.search(message))
        else:  # a remote store: no answer, a timeout, a server error or throttling
            unavailable = code is None or code >= 500 or code in (408, 429)
        if unavailable:
            return StorageUnavailable(f"{where}: the store is unreachable ({_short(message)})")
        return StorageError(f"{where} was refused ({_short(message)})")


class _Upload:
    """What a put sends: a whole buffer or file (one PUT up to 64 MiB), or an iterable (multipart), counted."""

    def __init__(self, data: Data):
        self.size = 0
        self.whole = True
        self.body: Any  # a Path, a byte view, or an iterator of chunks
        if isinstance(data, Path):
            self.body, self.size = data, data.stat().st_size
            return
        try:
            view = memoryview(data)  # type: ignore[arg-type]  # an iterable of buffers raises TypeError here
        except TypeError:  # not a buffer: an iterable of buffers
            self.body, self.whole = self._counted(data), False
            return
        if not view.c_contiguous:
            raise ValueError("a put needs a contiguous buffer")
        self.body = view.cast("B")
        self.size = self.body.nbytes

    def _counted(self, chunks: Iterable) -> Iterator:
        for chunk in chunks:
            self.size += memoryview(chunk).nbytes
            yield chunk


def _pieces(chunk, size: int) -> Iterator[bytes]:
    view = memoryview(chunk)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def _info(meta: ObjectMeta) -> ObjectInfo:
    return ObjectInfo(key=meta["path"], size=int(meta["size"]), modified_at=meta["last_modified"].timestamp())


def _ours(chunk: Iterable[ObjectMeta]) -> Iterator[ObjectInfo]:
    """The listed objects whose keys are of the layout; anything else in the store is left alone."""
    for meta in chunk:
        try:
            parse_key(meta["path"])
        except ValueError:
            logger.debug("skipping %r: not a key of the layout", meta["path"])
            continue
        yield _info(meta)


def _deletable(prefix: str) -> str:
    if not check_prefix(prefix):
        raise ValueError("delete_prefix needs at least an area prefix; it never deletes a whole store")
    return prefix


def _batches(keys: list[str], size: int = 1000) -> Iterator[list[str]]:
    """S3's DeleteObjects takes at most 1000 keys a request."""
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def _ignore_missing(delete, store, key: str) -> None:
    try:
        delete(store, key)
    except FileNotFoundError:  # a concurrent delete won: what we wanted
        pass


def _check_range(start: int, length: int) -> None:
    if type(start) is not int or type(length) is not int or start < 0 or length < 1:
        raise ValueError(f"a byte range needs start >= 0 and length >= 1, not {start!r}, {length!r}")


def _check_chunk(size: int) -> None:
    if type(size) is not int or size < 1:
        raise ValueError(f"chunk size must be a positive int, not {size!r}")


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."

