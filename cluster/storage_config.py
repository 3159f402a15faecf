"""The ``storage:`` section of the config: where inputs, results, stage outputs and checkpoints live.

```yaml
storage:
  results_url: s3://videos/reelserve      # or gs://..., or a local directory (the default)
  artifacts_url: s3://videos/artifacts    # stage outputs and checkpoints; or redis, or a local directory
  s3_endpoint_url: http://127.0.0.1:9100  # for S3-compatible stores; credentials from the standard AWS variables
  results_ttl_s: 604800
  redirect_downloads: true
```

Credentials never appear here: S3 reads ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_REGION``, GCS reads
``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["StorageConfig", "default_results_dir"]

_SCHEMES = ("", "file", "s3", "gs")


def default_results_dir() -> str:
    """Where results live when nothing is configured: a directory under the user data directory (one machine)."""
    return str(Path(platformdirs.user_data_dir("reelserve")) / "results")


def _check_url(url: str | None, field: str) -> str | None:
    if url is None or (field == "artifacts_url" and url == "redis"):
        return url
    parsed = urlparse(url)
    schemes = (*_SCHEMES, "redis", "rediss") if field == "artifacts_url" else _SCHEMES
    if parsed.scheme not in schemes:
        allowed = "a directory, file://, s3://bucket/prefix or gs://bucket/prefix"
        if field == "artifacts_url":
            allowed += ", redis (the job store's) or redis://"
        raise ValueError(f"{field} must be {allowed}, not {url!r}")
    if parsed.scheme == "" and not url.startswith(("/", "~")):
        raise ValueError(f"{field}: a directory must be absolute (every replica resolves it alike), not {url!r}")
    if parsed.scheme in ("s3", "gs") and not parsed.netloc:
        raise ValueError(f"{field} names no bucket: {url!r}")
    if parsed.query or parsed.fragment or (parsed.password and parsed.scheme not in ("redis", "rediss")):
        raise ValueError(f"{field} must not carry a query, a fragment or credentials: {url!r}")
    return url


class StorageConfig(BaseModel):
    """Object storage: one store for inputs and results, one (possibly the same) for stage outputs."""

    model_config = ConfigDict(extra="forbid")

    results_url: str | None = Field(
        None,
        description=(
            "Where photos and MP4s live: a local directory (a shared volume in a cluster), s3://bucket/prefix "
            "or gs://bucket/prefix. Unset: jobs.results_dir, or a directory under the user data directory."
        ),
    )
    artifacts_url: str | None = Field(
        None,
        description=(
            "Where stage outputs and denoising checkpoints are kept per attempt until the job ends: a local "
            "directory, s3://bucket/prefix, gs://bucket/prefix, redis (the job store's Redis, jobs.redis_url) "
            "or a redis:// URL. Unset: the results store (under artifacts/)."
        ),
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="Endpoint of an S3-compatible store (MinIO, Ceph RGW, R2...); unset for AWS S3 itself.",
    )
    results_ttl_s: int = Field(
        604800,
        ge=3600,
        description=(
            "Seconds a finished job's video, inputs and record are kept (sets expires_at); after that the "
            "content route answers 410 and the objects are swept (S3: also a lifecycle rule, in whole days)."
        ),
    )
    artifacts_ttl_s: int = Field(
        86400,
        ge=3600,
        description=(
            "Backstop for stage outputs and checkpoints left behind by a job that never ended cleanly; "
            "a job's own are deleted when it ends."
        ),
    )
    redirect_downloads: bool = Field(
        True,
        description=(
            "With an object store, GET /v1/videos/{id}/content answers a redirect to a short-lived signed URL; "
            "false streams the video through the ingress. A local directory always streams."
        ),
    )
    signed_url_ttl_s: int = Field(
        900, ge=60, le=604800, description="Lifetime of a signed download URL (S3 and GCS allow up to 7 days)."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Time to connect to the object store before a call fails.")
    read_timeout_s: float = Field(
        20.0, gt=0, description="Time without a byte from the object store before a call fails (a hung store)."
    )
    retry_timeout_s: float = Field(
        10.0,
        ge=0,
        description=(
            "Retries with backoff inside one call stop after this long; the call then fails with "
            "storage_unavailable and the caller's own retry (or a 503) takes over."
        ),
    )
    sweep_interval_s: float = Field(
        600.0, gt=0, description="How often expired and unwanted objects are swept (stores without lifecycle rules)."
    )
    outage_wait_s: float = Field(
        300.0,
        ge=0,
        description=(
            "How long a running job's stage waits out an unreachable store (retrying with backoff) before the "
            "job fails with storage_unavailable; bounded by jobs.job_timeout_s too."
        ),
    )

    @field_validator("results_url", "artifacts_url")
    @classmethod
    def _store_urls(cls, url: str | None, info) -> str | None:
        return _check_url(url, info.field_name)

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, url: str | None) -> str | None:
        if url is not None and urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"s3_endpoint_url must be an http(s) URL, not {url!r}")
        return url

    @model_validator(mode="after")
    def _endpoint_needs_s3(self) -> StorageConfig:
        schemes = {urlparse(url).scheme for url in (self.results_url, self.artifacts_url) if url}
        if self.s3_endpoint_url and "s3" not in schemes:
            raise ValueError("storage.s3_endpoint_url is set but neither results_url nor artifacts_url is s3://")
        return self

    def with_job_defaults(self, results_dir: str | None, artifacts: str = "results_dir") -> StorageConfig:
        """This section with the older settings filled in: ``jobs.results_dir`` is the default of
        ``results_url`` and ``jobs.artifacts: redis`` the default of ``artifacts_url``; set both ways, they must agree."""
        update: dict = {}
        if results_dir:
            if self.results_url is not None and self.results_url != results_dir:
                raise ValueError(
                    f"jobs.results_dir ({results_dir!r}) and storage.results_url ({self.results_url!r}) disagree; "
                    "set only storage.results_url"
                )
            update["results_url"] = results_dir
        if artifacts == "redis":
            if self.artifacts_url is not None and self.artifacts_url != "redis":
                raise ValueError("jobs.artifacts redis and storage.artifacts_url disagree; set only storage.artifacts_url")
            update["artifacts_url"] = "redis"
        return self.model_copy(update=update) if update else self

    def client_options(self) -> dict:
        """Keyword arguments for ``serving.storage.store.open_storage``."""
        return {
            "s3_endpoint_url": self.s3_endpoint_url,
            "connect_timeout_s": self.connect_timeout_s,
            "read_timeout_s": self.read_timeout_s,
            "retry_timeout_s": self.retry_timeout_s,
        }

    def artifacts_store_url(self, default_dir: str, redis_url: str | None) -> str:
        """The URL to open for stage outputs: ``redis`` is the job store's Redis, unset is the results store."""
        if self.artifacts_url == "redis":
            if not redis_url:
                raise ValueError("storage.artifacts_url redis needs jobs.redis_url")
            return redis_url
        return self.artifacts_url or self.results_url or default_dir

    def describe(self, default_dir: str) -> list[str]:
        """What ``reelserve plan`` prints: where each kind of object goes (never a password)."""
        results = self.results_url or default_dir
        artifacts = self.artifacts_url or f"{results} (under artifacts/)"
        if artifacts == "redis":
            artifacts = "the job store's Redis"
        elif urlparse(artifacts).password:
            parsed = urlparse(artifacts)
            artifacts = parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl()
        endpoint = f" at {self.s3_endpoint_url}" if self.s3_endpoint_url else ""
        downloads = "signed-URL redirects" if self.redirect_downloads and urlparse(results).scheme in ("s3", "gs") else "streamed"
        return [
            f"results: {results}{endpoint}, kept {self.results_ttl_s} s, downloads {downloads}",
            f"stage outputs and checkpoints: {artifacts}",
        ]
