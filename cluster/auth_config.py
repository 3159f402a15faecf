"""Config of the many-teams features: tenants and their API keys, quotas, and job callbacks (webhooks).

Two sections, to sit in ``ReelserveConfig`` beside the others:

```yaml
auth:                        # absent: reelserve runs open (one tenant, "default")
  tenants:                   # inline (tests, small setups) ...
    - name: team-a
      key_sha256: <hex sha256 of the API key>   # or a list: old and new key during a rotation
      share: 1
      max_concurrent_jobs: 4
      max_queued_jobs: 120
      jobs_per_minute: 60
      max_priority: normal
  key_file: /etc/reelserve/api-keys/tenants.yaml  # ... and/or a file with the same fields (a mounted Secret)
callbacks:
  allowed_url_prefixes: ["https://hooks.example.com/reelserve/"]
```

Plain API keys never appear here: only their SHA-256. The key file is read where
the keys are checked (an ingress replica), not when the config is validated, so a
config can be validated and rendered on a machine that does not hold the Secret.
Secrets (the webhook signing secret, Redis passwords) come from environment
variables filled from Kubernetes Secrets, never from this config, which ends up in
KubeRay's ``serveConfigV2`` where anyone who can read the RayService reads it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "PRIORITY_NAMES",
    "TenantConfig",
    "AuthConfig",
    "TenantFile",
    "CallbacksConfig",
    "ReferencesConfig",
    "load_tenants",
    "KeyFileError",
    "REDIS_PASSWORD_ENV",
    "WEBHOOK_SECRET_ENV",
    "redis_password",
]

PRIORITY_NAMES = ("low", "normal", "high")  # lowest first
REDIS_PASSWORD_ENV = "REELSERVE_REDIS_PASSWORD"  # the job store's Redis password (a secretKeyRef on Kubernetes)
WEBHOOK_SECRET_ENV = "REELSERVE_WEBHOOK_SECRET"  # whsec_... signing secret(s), space-separated during a rotation

_TENANT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Error messages must never echo what was written: a key_sha256 field may hold a plain key pasted by mistake.
# Pydantic follows the *outermost* model's setting: a config that contains AuthConfig (ReelserveConfig) must
# set hide_input_in_errors=True as well.
_QUIET = ConfigDict(extra="forbid", hide_input_in_errors=True)


class TenantConfig(BaseModel):
    """One team or app: its API key hashes, its weight in fair share and its quotas."""

    model_config = _QUIET

    name: str = Field(
        description=(
            "Tenant name: lowercase letters, digits and '-', at most 63 (Kubernetes-safe; it labels metrics "
            "and is written into every job record). Unique."
        ),
    )
    key_sha256: list[str] = Field(
        description=(
            "Hex SHA-256 of the tenant's API key (64 hex digits), or a list of them: during a rotation the old "
            "and the new key are both valid. `reelserve keys new` prints a key and its hash. Never the key itself."
        ),
    )
    share: float = Field(
        1.0, gt=0, description="Weight in fair share: a tenant with share 2 gets twice the running jobs of share 1 under contention."
    )
    max_concurrent_jobs: int | None = Field(
        None,
        ge=1,
        description=(
            "Most jobs of this tenant running at once; more wait queued (or are refused with 429 when "
            "max_queued_jobs is 0). Unset: only the cluster's capacity bounds it."
        ),
    )
    max_queued_jobs: int = Field(
        120, ge=0, description="Most jobs of this tenant waiting to start; a create beyond it is refused (429), as Seedance does at 120."
    )
    jobs_per_minute: int | None = Field(
        None, ge=1, description="Most creates accepted in any 60 s window, across every ingress replica (429 beyond). Unset: no rate cap."
    )
    max_priority: Literal["low", "normal", "high"] = Field(
        "normal", description="Highest `priority` this tenant's requests may ask for (low < normal < high)."
    )

    @field_validator("name")
    @classmethod
    def _kubernetes_safe(cls, value: str) -> str:
        if not _TENANT_NAME.fullmatch(value):
            raise ValueError("must be lowercase letters, digits and '-' (at most 63, starting and ending alphanumeric)")
        return value

    @field_validator("key_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("key_sha256")
    @classmethod
    def _well_formed_hashes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("lists no hash; give the hex SHA-256 of at least one API key")
        hashes = [item.strip().lower() for item in value]
        for item in hashes:
            if not _SHA256_HEX.fullmatch(item):
                # Never echo the value: it may be a plain key pasted by mistake.
                raise ValueError(
                    f"an entry of {len(item)} characters is not a hex SHA-256 (64 hex digits); store the key's "
                    "hash, never the key (`reelserve keys new` prints both)"
                )
        if len(set(hashes)) != len(hashes):
            raise ValueError("lists the same hash twice")
        return hashes

    @model_validator(mode="after")
    def _queueing_needs_a_cap(self) -> TenantConfig:
        if self.max_queued_jobs == 0 and self.max_concurrent_jobs is None:
            raise ValueError(
                f"tenants '{self.name}': max_queued_jobs 0 needs max_concurrent_jobs (without a cap every job "
                "waits for the cluster, so every create would be refused)"
            )
        return self


def _check_unique(tenants: list[TenantConfig]) -> None:
    names: set[str] = set()
    owner_of: dict[str, str] = {}
    for tenant in tenants:
        if tenant.name in names:
            raise ValueError(f"tenants: the name '{tenant.name}' is used twice; names must be unique")
        names.add(tenant.name)
        for digest in tenant.key_sha256:
            if digest in owner_of:
                raise ValueError(
                    f"tenants: '{tenant.name}' and '{owner_of[digest]}' share a key hash; each key belongs to one tenant"
                )
            owner_of[digest] = tenant.name


class TenantFile(BaseModel):
    """The key file: the same fields as inline tenants (production form, e.g. a mounted Kubernetes Secret)."""

    model_config = _QUIET

    tenants: list[TenantConfig] = Field(description="Tenants, as under auth.tenants.")

    @model_validator(mode="after")
    def _unique(self) -> TenantFile:
        _check_unique(self.tenants)
        return self


class AuthConfig(BaseModel):
    """API keys and tenants. Present: every call needs a key. Absent: reelserve runs open."""

    model_config = _QUIET

    tenants: list[TenantConfig] = Field(
        default_factory=list, description="Tenants written inline (tests, small setups); merged with key_file's."
    )
    key_file: str | None = Field(
        None,
        description=(
            "YAML or JSON file with `tenants:` in the same form (the production form: mount it from a "
            "Kubernetes Secret). Read by each ingress replica at start and again when it changes."
        ),
    )
    key_file_reload_s: float = Field(
        30.0, gt=0, description="How often an ingress replica checks key_file for changes (a rotation needs no restart)."
    )

    @model_validator(mode="after")
    def _some_tenants_and_unique(self) -> AuthConfig:
        if not self.tenants and not self.key_file:
            raise ValueError("auth: lists no tenants and no key_file; remove `auth:` to run open")
        _check_unique(self.tenants)
        return self


class KeyFileError(ValueError):
    """The key file is missing, unreadable or invalid; the message names the file, never a key."""


def load_tenants(auth: AuthConfig) -> list[TenantConfig]:
    """The inline tenants plus those of ``key_file``, checked for unique names and hashes across both."""
    tenants = list(auth.tenants)
    if auth.key_file:
        tenants += _read_key_file(Path(auth.key_file)).tenants
    try:
        _check_unique(tenants)
    except ValueError as error:
        raise KeyFileError(f"auth.key_file {auth.key_file}: {error} (counting the inline tenants)") from None
    return tenants


def _read_key_file(path: Path) -> TenantFile:
    try:
        text = path.read_text()
    except OSError as error:
        raise KeyFileError(f"auth.key_file: cannot read {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        raise KeyFileError(f"auth.key_file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}") from None
    try:
        return TenantFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise KeyFileError(f"auth.key_file {path}: {where}: {first['msg']}") from None


class CallbacksConfig(BaseModel):
    """Job callbacks (Seedance's `callback_url`): where they may go and how hard delivery tries."""

    model_config = ConfigDict(extra="forbid")

    allowed_url_prefixes: list[str] = Field(
        default_factory=list,
        description=(
            "URL prefixes a callback_url must start with: scheme, host, port and a path prefix (e.g. "
            "https://hooks.example.com/reelserve/), compared on the parsed URL. Empty: callbacks are refused."
        ),
    )
    refuse_private_addresses: bool = Field(
        True,
        description=(
            "Refuse to deliver to a host that resolves to a loopback, private, link-local or otherwise "
            "non-public address (the connection is pinned to the checked address). Turn off only for receivers "
            "inside your own network."
        ),
    )
    max_attempts: int = Field(8, ge=1, le=50, description="Delivery attempts per callback, the first included.")
    max_elapsed_s: float = Field(
        3600.0, gt=0, description="Give up once this long has passed since the first attempt, whatever the attempts left."
    )
    backoff_base_s: float = Field(2.0, gt=0, description="Wait before the second attempt; it doubles after each failure.")
    backoff_cap_s: float = Field(600.0, gt=0, description="Longest wait between two attempts (before jitter).")
    timeout_s: float = Field(10.0, gt=0, description="Longest one attempt may take, connection included.")
    signing_secret_env: str = Field(
        WEBHOOK_SECRET_ENV,
        description=(
            "Environment variable holding the signing secret (whsec_ + base64, Standard Webhooks), several "
            "separated by spaces while receivers rotate; on Kubernetes filled from a Secret. Never in this config."
        ),
    )

    @field_validator("allowed_url_prefixes")
    @classmethod
    def _prefixes_are_urls(cls, value: list[str]) -> list[str]:
        for prefix in value:
            parts = urlsplit(prefix)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError(f"'{prefix}' is not an http(s) URL with a host; write e.g. https://hooks.example.com/path/")
            if "@" in parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"'{prefix}' may not hold a user, a query or a fragment; give scheme, host, port and path")
        return value

    @model_validator(mode="after")
    def _backoff_bounds(self) -> CallbacksConfig:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("callbacks.backoff_cap_s must be at least backoff_base_s")
        return self


class ReferencesConfig(BaseModel):
    """Media given by URL (a request's first frame, last frame and references): where they may be fetched from."""

    model_config = ConfigDict(extra="forbid")

    allowed_url_prefixes: list[str] = Field(
        default_factory=list,
        description=(
            "URL prefixes (scheme, host, port and a path prefix, e.g. https://media.example.com/uploads/) a media URL "
            "must start with to be fetched. Empty: only data: URLs and file uploads are accepted."
        ),
    )
    refuse_private_addresses: bool = Field(
        True,
        description=(
            "Refuse a URL whose host resolves to a loopback, private, link-local or otherwise non-public address (the "
            "fetch is pinned to the checked address). Turn off only for media servers inside your own network."
        ),
    )
    fetch_timeout_s: float = Field(
        10.0, gt=0, le=120,
        description="Longest the fetches of one request may take together, connections included.",
    )
    max_fetch_bytes: int = Field(
        50_000_000, ge=1024,
        description="Most bytes fetched from URLs for one request, all its files together; the family's own per-kind "
                    "caps apply after.",
    )

    _prefixes_are_urls = field_validator("allowed_url_prefixes")(
        CallbacksConfig._prefixes_are_urls.__func__  # type: ignore[attr-defined]  # the classmethod's function
    )


def redis_password(environ: dict[str, str] | None = None) -> str | None:
    """The job store's Redis password from ``REELSERVE_REDIS_PASSWORD`` (None when unset or empty)."""
    value = (os.environ if environ is None else environ).get(REDIS_PASSWORD_ENV, "")
    return value or None
