"""Opening the store a URL names: a local directory, S3 or S3-compatible, GCS, Redis or memory."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from obstore.store import GCSStore, LocalStore, MemoryStore, S3Store

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

from serving.storage.redis_store import open_redis_storage
from serving.storage.store import Storage

__all__ = ["open_storage"]


def open_storage(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 20.0,
    request_timeout_s: float = 600.0,
    retry_timeout_s: float = 10.0,
    max_retries: int = 3,
) -> Storage:
    """The store ``url`` names: a local directory (a path or ``file://``), ``s3://bucket/prefix``,
    ``gs://bucket/prefix``, ``redis://host:port/db`` (see ``serving.storage.redis_store``) or ``memory://``.

    S3 credentials and region come from the standard AWS environment variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_REGION``), GCS's from ``GOOGLE_APPLICATION_CREDENTIALS`` or the
    metadata server. ``s3_endpoint_url`` points at an S3-compatible store.

    An unreachable store fails a call within about ``retry_timeout_s`` plus
    ``read_timeout_s`` (a silent server) or ``connect_timeout_s`` (a refused
    connection): retries with backoff happen inside that bound.
    ``request_timeout_s`` caps one whole request, body included (a slow
    download stream).
    """
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return Storage(MemoryStore(), "memory", url)
    if scheme in ("redis", "rediss"):
        return open_redis_storage(url, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)
    if scheme in ("s3", "gs"):
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=connect_timeout_s),
            "read_timeout": timedelta(seconds=read_timeout_s),
            "timeout": timedelta(seconds=request_timeout_s),
        }
        retry: RetryConfig = {
            "max_retries": max_retries,
            "retry_timeout": timedelta(seconds=retry_timeout_s),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
        }
        if scheme == "gs":
            return Storage(GCSStore.from_url(url, client_options=client, retry_config=retry), "gcs", url)
        config: S3Config = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if s3_endpoint_url:
            config["endpoint"] = s3_endpoint_url
            client["allow_http"] = s3_endpoint_url.startswith("http://")
        store = S3Store.from_url(url, config=config, client_options=client, retry_config=retry)
        return Storage(store, "s3", url, endpoint_url=s3_endpoint_url)
    if scheme in ("", "file"):
        root = Path(urlparse(url).path if scheme == "file" else url).expanduser().resolve()
        # automatic_cleanup: deleting a job's last file removes its now empty folders too.
        return Storage(LocalStore(root, mkdir=True, automatic_cleanup=True), "local", str(root), local_root=root)
    raise ValueError(f"storage URL must be a directory, file://, s3://, gs://, redis:// or memory://, not {url!r}")
