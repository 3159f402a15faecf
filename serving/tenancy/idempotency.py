"""``Idempotency-Key``: a create that is safe to retry, per tenant, for 24 h.

The ingress fingerprints the create request (its fields and the bytes of its inputs)
and *reserves* ``(tenant, key)`` for the job id it is about to create, before creating it:

- **new**: nobody used the key: create the job with that id (and ``release`` the key
  if the create is then refused, so the client's retry is not stuck to a job that
  never existed);
- **same**: the key was used with the same fingerprint: answer the job already made
  (if its record is not there yet, another replica is creating it right now: wait for
  it briefly, or answer ``IdempotencyConflict`` "in progress", as Stripe does);
- **conflict**: the key was used with another body: 409 / ALREADY_EXISTS.

The reservation is one atomic step in the store (Redis ``SET NX EX``; SQLite one
``BEGIN IMMEDIATE`` transaction), so two replicas receiving the same key at once
create one job. Keys are kept hashed (they are client-chosen strings of any content).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from serving.errors import InvalidRequest
from serving.tenancy.errors import IdempotencyConflict
from serving.tenancy.redis_connection import connect_redis, unavailable_on_redis_errors
from serving.tenancy.sqlite_connection import SQLiteFile

__all__ = [
    "IDEMPOTENCY_TTL_S",
    "request_fingerprint",
    "check_idempotency_key",
    "Reservation",
    "IdempotencyStore",
    "RedisIdempotencyStore",
    "SQLiteIdempotencyStore",
    "reserve_or_raise",
]

IDEMPOTENCY_TTL_S = 24 * 3600
_MAX_KEY_CHARS = 255


def request_fingerprint(fields: Mapping[str, Any], inputs: Mapping[str, bytes | None] | None = None) -> str:
    """Hex SHA-256 of a create request: its fields as canonical JSON and the SHA-256 of each input's bytes.

    Unset fields (None) are left out, so an absent optional field and an explicit null
    agree; floats that are whole numbers count as integers (``5`` and ``5.0`` agree).
    Fingerprint the parsed request (typed values), not the raw body: JSON and multipart
    carry the same request differently.
    """
    canonical = {
        "fields": {name: _canonical(value, name) for name, value in fields.items() if value is not None},
        "inputs": {name: hashlib.sha256(data).hexdigest() for name, data in (inputs or {}).items() if data is not None},
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any, name: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name}: a fingerprint needs finite numbers")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # enums
        return value.value
    raise TypeError(f"{name}: {type(value).__name__} cannot be fingerprinted as a field; pass bytes as inputs")


def check_idempotency_key(value: str | None, field: str = "Idempotency-Key") -> str | None:
    """The key as sent (None when absent), or ``InvalidRequest`` naming the header or field."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be a string of 1 to {_MAX_KEY_CHARS} printable ASCII characters")
    if len(value) > _MAX_KEY_CHARS or not value.isascii() or not value.isprintable():
        raise InvalidRequest(field, f"must be 1 to {_MAX_KEY_CHARS} printable ASCII characters, e.g. a UUID")
    return value


@dataclass(frozen=True)
class Reservation:
    outcome: Literal["new", "same", "conflict"]
    job_id: str  # new: the id proposed; same / conflict: the id of the job first made with the key


class IdempotencyStore(Protocol):
    def reserve(self, tenant: str, key: str, fingerprint: str, job_id: str) -> Reservation:
        """Bind ``(tenant, key)`` to ``job_id`` and ``fingerprint`` unless bound already (atomically)."""

    def release(self, tenant: str, key: str, job_id: str) -> bool:
        """Unbind the key if it is still bound to ``job_id`` (its create failed); whether it did."""


def reserve_or_raise(store: IdempotencyStore, tenant: str, key: str, fingerprint: str, job_id: str) -> Reservation:
    """``store.reserve`` that raises ``IdempotencyConflict`` (409 / ALREADY_EXISTS) on a conflict."""
    reservation = store.reserve(tenant, key, fingerprint, job_id)
    if reservation.outcome == "conflict":
        raise IdempotencyConflict(
            "Idempotency-Key: already used with a different request in the last 24 h; "
            "use a new key for a new request"
        )
    return reservation


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _outcome(bound: dict, fingerprint: str) -> Reservation:
    return Reservation("same" if bound["fingerprint"] == fingerprint else "conflict", bound["job_id"])


# Delete only our own binding: another create may have bound the key since (after an expiry).
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['job_id'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisIdempotencyStore:
    """Cluster mode: one Redis key per (tenant, idempotency key), expiring after ``ttl_s``."""

    def __init__(self, url: str | None = None, *, client=None, prefix: str = "reelserve:idem:",
                 ttl_s: int = IDEMPOTENCY_TTL_S):
        self._redis = client if client is not None else connect_redis(url)
        self._release = self._redis.register_script(_RELEASE)
        self._prefix = prefix
        self._ttl_s = ttl_s

    def _name(self, tenant: str, key: str) -> str:
        return f"{self._prefix}{tenant}:{_key_digest(key)}"

    @unavailable_on_redis_errors
    def reserve(self, tenant: str, key: str, fingerprint: str, job_id: str) -> Reservation:
        name = self._name(tenant, key)
        value = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
        for _ in range(5):  # the bound key may expire or be released between SET NX and GET: try again
            if self._redis.set(name, value, nx=True, ex=self._ttl_s):
                return Reservation("new", job_id)
            current = self._redis.get(name)
            if current is not None:
                return _outcome(json.loads(current), fingerprint)
        raise RuntimeError(f"idempotency key of tenant '{tenant}' kept changing under five reservations")

    @unavailable_on_redis_errors
    def release(self, tenant: str, key: str, job_id: str) -> bool:
        return bool(self._release(keys=[self._name(tenant, key)], args=[job_id]))

    def close(self) -> None:
        self._redis.close()


class SQLiteIdempotencyStore:
    """Embedded mode: one row per (tenant, idempotency key), expiring after ``ttl_s``."""

    _SCHEMA = (
        (
            "CREATE TABLE IF NOT EXISTS idempotency_keys (tenant TEXT NOT NULL, key_sha256 TEXT NOT NULL,"
            " job_id TEXT NOT NULL, fingerprint TEXT NOT NULL, expires_at REAL NOT NULL,"
            " PRIMARY KEY (tenant, key_sha256))"
        ),
        "CREATE INDEX IF NOT EXISTS idempotency_keys_by_expiry ON idempotency_keys (expires_at)",
    )

    def __init__(self, path: str, ttl_s: float = IDEMPOTENCY_TTL_S, clock: Callable[[], float] = time.time):
        self._db = SQLiteFile(path, self._SCHEMA)
        self._ttl_s = ttl_s
        self._clock = clock

    def reserve(self, tenant: str, key: str, fingerprint: str, job_id: str) -> Reservation:
        digest = _key_digest(key)
        with self._db.transaction() as db:
            now = self._clock()
            db.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
            row = db.execute(
                "SELECT job_id, fingerprint FROM idempotency_keys WHERE tenant = ? AND key_sha256 = ?", (tenant, digest)
            ).fetchone()
            if row is not None:
                return _outcome({"job_id": row[0], "fingerprint": row[1]}, fingerprint)
            db.execute(
                "INSERT INTO idempotency_keys (tenant, key_sha256, job_id, fingerprint, expires_at) VALUES (?, ?, ?, ?, ?)",
                (tenant, digest, job_id, fingerprint, now + self._ttl_s),
            )
            return Reservation("new", job_id)

    def release(self, tenant: str, key: str, job_id: str) -> bool:
        with self._db.transaction() as db:
            deleted = db.execute(
                "DELETE FROM idempotency_keys WHERE tenant = ? AND key_sha256 = ? AND job_id = ?",
                (tenant, _key_digest(key), job_id),
            )
            return deleted.rowcount > 0

    def close(self) -> None:
        self._db.close()
