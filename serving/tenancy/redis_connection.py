"""One way to open the job store's Redis: its password from the environment, timeouts that fail fast.

The password never travels in the config (which KubeRay puts in ``serveConfigV2``): on
Kubernetes it is ``REELSERVE_REDIS_PASSWORD``, filled from a Secret. A password inside
the URL still works (a managed Redis), and wins over the variable.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

import redis

from cluster.auth_config import redis_password
from serving.errors import StoreUnavailable

__all__ = ["connect_redis", "redis_auth_options", "unavailable_on_redis_errors"]


def redis_auth_options(url: str) -> dict:
    """``{"password": ...}`` from ``REELSERVE_REDIS_PASSWORD`` when the URL holds none (else empty).

    For every client of the job store's Redis, whatever its constructor: pass it to
    ``redis.Redis.from_url`` and ``redis.asyncio.Redis.from_url`` alike.
    """
    password = redis_password()
    return {"password": password} if password is not None and urlsplit(url).password is None else {}


def connect_redis(url: str | None, *, field: str = "jobs.redis_url"):
    """A ``redis.Redis`` client (decoded responses) for ``url``, authenticated from the environment when needed."""
    if not url:
        raise ValueError(f"{field}: required for the redis backend (e.g. redis://localhost:6380/0)")
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2,
                                **redis_auth_options(url))


def unavailable_on_redis_errors(method):
    """A Redis failure becomes ``StoreUnavailable`` (503 / UNAVAILABLE for clients), never a traceback."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except redis.RedisError as error:  # unreachable, wrong password, read-only after a failover, out of memory
            raise StoreUnavailable(f"the job store (Redis) is unreachable: {type(error).__name__}") from None

    return wrapper
