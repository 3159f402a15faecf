"""Many teams on one cluster: the building blocks, Ray-free and each usable alone.

- ``auth``: API keys -> tenants (SHA-256 digests compared in constant time), and making keys.
- ``quotas``: priority parsing, per-tenant caps on queued and running jobs, jobs per minute (Redis, SQLite, in-process).
- ``fair_share``: the order queued jobs are claimed in, queue positions and estimated start times.
- ``idempotency``: request fingerprints and the ``Idempotency-Key`` store (Redis, SQLite).
- ``webhooks``: Standard Webhooks signing and verifying, callback URL allow-lists, delivery with backoff.
- ``errors``: the client-facing errors these raise and the HTTP / gRPC status each maps to.
"""

__all__: list[str] = []
