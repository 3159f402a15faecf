"""Who is calling and what they may create: API keys, tenants' quotas, priority, idempotency, callbacks.

One object per ingress replica, shared by both front doors. Everything here
runs before a job exists, and refuses with a 4xx naming the field (401 for
keys, 409 for an idempotency conflict, 429 with Retry-After for quotas).
The tenant's queued and running caps are checked by the job store itself,
inside the transaction that records the job (``tenant_check``), so two
ingress replicas can never both admit a tenant's last allowed job.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from cluster.auth_config import AuthConfig, CallbacksConfig
from cluster.config import JobsConfig
from serving.jobs.sqlite_store import default_sqlite_path
from serving.jobs.store import TenantCheck
from serving.tenancy.auth import Authenticator, Tenant
from serving.tenancy.errors import IdempotencyConflict
from serving.tenancy.idempotency import (
    RedisIdempotencyStore,
    SQLiteIdempotencyStore,
    check_idempotency_key,
    request_fingerprint,
)
from serving.tenancy.quotas import (
    Priority,
    RedisRateLimiter,
    SQLiteRateLimiter,
    TenantJobCounts,
    check_job_caps,
    check_rate,
    parse_priority,
)
from serving.tenancy.webhooks import check_callback_url

__all__ = ["TenantGate", "CreateTicket"]

logger = logging.getLogger("ray.serve.reelserve.ingress")

_IN_FLIGHT_WAIT_S = 2.0  # how long a retried create waits for the first one (same key) to record its job


@dataclass(frozen=True)
class CreateTicket:
    """A create that passed the gate: its tenant, priority, callback and idempotency reservation."""

    tenant: Tenant
    priority: Priority
    callback_url: str | None
    idempotency_key: str | None = None
    existing_job_id: str | None = None  # the same key and body came before: answer with that job


class TenantGate:
    def __init__(self, auth: AuthConfig | None, callbacks: CallbacksConfig, jobs: JobsConfig):
        self.authenticator = Authenticator(auth)
        self.callbacks = callbacks
        if self.authenticator.open:
            logger.warning("no auth configured: the API is open and every job belongs to the tenant 'default'")
        # Rates and idempotency keys live with the jobs: the same Redis, or the same SQLite file (tables of their own).
        self._rates: RedisRateLimiter | SQLiteRateLimiter
        self._keys: RedisIdempotencyStore | SQLiteIdempotencyStore
        if jobs.backend == "redis":
            self._rates = RedisRateLimiter(jobs.redis_url)
            self._keys = RedisIdempotencyStore(jobs.redis_url, ttl_s=int(jobs.idempotency_ttl_s))
        else:
            path = jobs.sqlite_path or default_sqlite_path()
            self._rates = SQLiteRateLimiter(path)
            self._keys = SQLiteIdempotencyStore(path, ttl_s=jobs.idempotency_ttl_s)

    # ------------------------------------------------------------------ who

    def authenticate(self, authorization: str | None) -> Tenant:
        """The HTTP caller's tenant (``Authorization: Bearer <key>``); ``Unauthenticated`` otherwise."""
        return self.authenticator.authenticate(authorization)

    def authenticate_grpc(self, metadata: Iterable[tuple[str, Any]] | None) -> Tenant:
        """The gRPC caller's tenant (metadata ``authorization``)."""
        return self.authenticator.authenticate_grpc(metadata)

    # ------------------------------------------------------------------ what

    def check_fields(self, tenant: Tenant, priority: Any, callback_url: Any, idempotency_key: Any,
                     names: dict[str, str]) -> CreateTicket:
        """The create's own fields, before any work: 400 naming the field for anything not allowed."""
        return CreateTicket(
            tenant=tenant,
            priority=parse_priority(priority, tenant.max_priority, field=names.get("priority", "priority")),
            callback_url=check_callback_url(callback_url, self.callbacks.allowed_url_prefixes,
                                            field=names.get("callback_url", "callback_url")),
            idempotency_key=check_idempotency_key(idempotency_key, field=names.get("idempotency_key", "Idempotency-Key")),
        )

    async def reserve(self, ticket: CreateTicket, fields: dict[str, Any], inputs: dict[str, bytes | None],
                      job_id: str, blocking: Callable[..., Awaitable[Any]]) -> CreateTicket:
        """Bind the idempotency key (if any) to ``job_id``; the same key with the same body answers the first job,
        with another body 409."""
        if ticket.idempotency_key is None:
            return ticket
        fingerprint = request_fingerprint(fields, inputs)
        reservation = await blocking(self._keys.reserve, ticket.tenant.name, ticket.idempotency_key, fingerprint, job_id)
        if reservation.outcome == "conflict":
            raise IdempotencyConflict(
                "Idempotency-Key: this key was used with a different request; use a new key for a new request"
            )
        if reservation.outcome == "same":
            return CreateTicket(ticket.tenant, ticket.priority, ticket.callback_url, ticket.idempotency_key,
                                existing_job_id=reservation.job_id)
        return ticket

    async def release(self, ticket: CreateTicket, job_id: str, blocking: Callable[..., Awaitable[Any]]) -> None:
        """The create was refused after the key was bound: free the key for a retry."""
        if ticket.idempotency_key is not None and ticket.existing_job_id is None:
            await blocking(self._keys.release, ticket.tenant.name, ticket.idempotency_key, job_id)

    async def wait_for_first(self, job_id: str, get: Callable[[str], Awaitable[Any]]) -> Any:
        """The job a retried create answers with; the first create may still be recording it."""
        deadline = asyncio.get_running_loop().time() + _IN_FLIGHT_WAIT_S
        while True:
            record = await get(job_id)
            if record is not None:
                return record
            if asyncio.get_running_loop().time() > deadline:
                raise IdempotencyConflict("Idempotency-Key: a request with this key is still being created; retry")
            await asyncio.sleep(0.1)

    async def check_rate(self, tenant: Tenant, blocking: Callable[..., Awaitable[Any]]) -> None:
        """Jobs per minute (consumes one when admitted)."""
        (await blocking(check_rate, self._rates, tenant)).raise_if_refused()

    @staticmethod
    def tenant_check(tenant: Tenant, expected_service_s: float) -> TenantCheck:
        """For the store's create transaction: refuse when the tenant's queue (or running cap) is full."""

        def check(queued: int, running: int) -> None:
            check_job_caps(tenant, TenantJobCounts(queued, running), expected_service_s).raise_if_refused()

        return check

