"""API keys -> tenants.

A caller sends its key as ``Authorization: Bearer <key>`` (HTTP) or in the gRPC
metadata ``authorization`` (same value). The key's SHA-256 is compared with every
configured hash with ``hmac.compare_digest``, without stopping at a match, so the
time taken says nothing about which tenant (if any) holds the key. Only hashes are
kept: a leaked config or key file gives no usable key.

Without ``auth:`` in the config the server runs open: every call is the tenant
``default`` with no quotas (the caller logs that it runs open at start).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cluster.auth_config import AuthConfig, KeyFileError, TenantConfig, load_tenants
from serving.tenancy.errors import Unauthenticated

__all__ = [
    "Tenant",
    "Authenticator",
    "Unauthenticated",
    "OPEN_TENANT",
    "KEY_PREFIX",
    "new_api_key",
    "key_sha256",
    "bearer_value",
]

logger = logging.getLogger("ray.serve.reelserve.tenancy")

KEY_PREFIX = "rs_"  # makes a leaked key recognizable to secret scanners and in logs
_MAX_KEY_CHARS = 512  # longer values are refused before hashing


@dataclass(frozen=True)
class Tenant:
    """Who a call is from, with the limits the config gives it (None: no limit)."""

    name: str
    share: float = 1.0
    max_concurrent_jobs: int | None = None
    max_queued_jobs: int | None = None
    jobs_per_minute: int | None = None
    max_priority: str = "normal"

    @classmethod
    def from_config(cls, config: TenantConfig) -> Tenant:
        return cls(
            name=config.name, share=config.share, max_concurrent_jobs=config.max_concurrent_jobs,
            max_queued_jobs=config.max_queued_jobs, jobs_per_minute=config.jobs_per_minute,
            max_priority=config.max_priority,
        )


# Open mode: one tenant, no quotas, any priority (today's behaviour).
OPEN_TENANT = Tenant(name="default", max_priority="high")


def new_api_key() -> tuple[str, str]:
    """A new API key and its hex SHA-256: give the key to the tenant, put the hash in the config."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key_sha256(key)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_value(authorization: str | None, where: str = "Authorization header") -> str:
    """The key in ``Bearer <key>``; ``Unauthenticated`` (never echoing the value) when missing or malformed."""
    if authorization is None or not authorization.strip():
        raise Unauthenticated(f"{where}: no API key; send `{_form(where)}`")
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or " " in key:
        raise Unauthenticated(f"{where}: not of the form `{_form(where)}`")
    if len(key) > _MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise Unauthenticated(f"{where}: the API key is not valid")
    return key


def _form(where: str) -> str:
    return "authorization: Bearer <key>" if where.startswith("authorization metadata") else "Authorization: Bearer <key>"


class Authenticator:
    """Maps a key to its tenant. Thread-safe; reloads ``auth.key_file`` when it changes (rotation without restart)."""

    def __init__(self, auth: AuthConfig | None, clock: Callable[[], float] = time.monotonic):
        self._auth = auth
        self._clock = clock
        self._lock = threading.Lock()
        self._by_digest: list[tuple[bytes, Tenant]] = []
        self._by_name: dict[str, Tenant] = {}
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = clock()
        if auth is not None:
            self._install(load_tenants(auth))  # a bad key file fails the replica's start, loudly
            self._file_stamp = self._stamp()

    @property
    def open(self) -> bool:
        """No keys configured: every call is ``OPEN_TENANT``."""
        return self._auth is None

    @property
    def tenants(self) -> dict[str, Tenant]:
        """Configured tenants by name (``{"default": OPEN_TENANT}`` when open)."""
        self._reload_if_due()
        return {OPEN_TENANT.name: OPEN_TENANT} if self.open else dict(self._by_name)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an HTTP ``Authorization`` header value."""
        return self._tenant_of(authorization, "Authorization header")

    def authenticate_grpc(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant:
        """The tenant of gRPC invocation metadata (its ``authorization`` entry)."""
        value = None
        for name, item in metadata or ():
            if name.lower() == "authorization":
                value = item.decode("latin-1") if isinstance(item, bytes) else item
                break
        return self._tenant_of(value, "authorization metadata")

    def _tenant_of(self, authorization: str | None, where: str) -> Tenant:
        if self.open:
            return OPEN_TENANT
        key = bearer_value(authorization, where)
        digest = hashlib.sha256(key.encode("ascii")).hexdigest().encode("ascii")
        self._reload_if_due()
        found = None
        for known, tenant in self._by_digest:  # every hash, no early exit
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise Unauthenticated(f"{where}: the API key is not valid")
        return found

    # ------------------------------------------------------------------ key file reloads

    def _install(self, tenants: list[TenantConfig]) -> None:
        by_digest = [(digest.encode("ascii"), Tenant.from_config(t)) for t in tenants for digest in t.key_sha256]
        by_name = {t.name: Tenant.from_config(t) for t in tenants}
        with self._lock:
            self._by_digest, self._by_name = by_digest, by_name

    def _stamp(self) -> tuple[float, int] | None:
        if self._auth is None or not self._auth.key_file:
            return None
        try:
            stat = os.stat(self._auth.key_file)  # follows the symlinks a mounted Secret swaps on update
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def _reload_if_due(self) -> None:
        if self._auth is None or not self._auth.key_file:
            return
        now = self._clock()
        with self._lock:
            if now - self._checked_at < self._auth.key_file_reload_s:
                return
            self._checked_at = now
        stamp = self._stamp()
        if stamp == self._file_stamp:
            return
        try:
            self._install(load_tenants(self._auth))
        except KeyFileError as error:
            # Keep serving with the keys we have: a half-written Secret must not lock every tenant out.
            logger.error("keeping the previous API keys: %s", error)
            return
        self._file_stamp = stamp
        logger.info("reloaded API keys from %s: %d tenants", self._auth.key_file, len(self._by_name))
