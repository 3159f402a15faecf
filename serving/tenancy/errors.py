"""Client-facing errors of the tenancy features, and the status each one answers with.

They extend ``serving.errors`` (``Overloaded`` already maps to 429 / RESOURCE_EXHAUSTED with
Retry-After); the ingress's error mapping needs two new rows, given in ``HTTP_STATUS`` and
``GRPC_STATUS`` so the mapping lives in one place.
"""

from __future__ import annotations

from serving.errors import Overloaded, ReelserveError

__all__ = ["Unauthenticated", "QuotaExceeded", "IdempotencyConflict", "HTTP_STATUS", "GRPC_STATUS"]


class Unauthenticated(ReelserveError):
    """No API key, a malformed one, or one no tenant holds (revoked keys included): 401 / UNAUTHENTICATED.

    The message says which of the three and never contains the key.
    """


class QuotaExceeded(Overloaded):
    """A tenant's own limit (queued jobs, running jobs, jobs per minute): 429 / RESOURCE_EXHAUSTED + Retry-After.

    ``code`` names the limit (``tenant_queue_full``, ``tenant_concurrency``, ``tenant_rate``) for metrics and
    the error body.
    """

    def __init__(self, code: str, message: str, retry_after_s: int):
        super().__init__(message, retry_after_s=retry_after_s)
        self.code = code


class IdempotencyConflict(ReelserveError):
    """An ``Idempotency-Key`` reused with another body, or still being used by a create in flight: 409 / ALREADY_EXISTS."""


# (status, OpenAI error type) for the HTTP error body; gRPC status code names.
HTTP_STATUS = {
    Unauthenticated: (401, "authentication_error"),
    QuotaExceeded: (429, "rate_limit_error"),
    IdempotencyConflict: (409, "conflict_error"),
}
GRPC_STATUS = {
    Unauthenticated: "UNAUTHENTICATED",
    QuotaExceeded: "RESOURCE_EXHAUSTED",
    IdempotencyConflict: "ALREADY_EXISTS",
}
