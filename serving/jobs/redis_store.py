"""Redis job store: cluster mode (every node reaches the same Redis).

One hash per job holds the JSON record (plus a few fields copied out for
cheap checks); a sorted set orders jobs by creation time (one per tenant too)
and sets hold the ids of jobs not yet terminal (all, and per tenant: active
and running, which quotas and fair share count). Conditional writes are optimistic transactions
(WATCH / MULTI): the record is read, the fence checked and the write queued
against Redis's own clock (``TIME``), and the write is refused if the record
changed in between. Numbers keep full precision (read-modify-write in Python).
Every write publishes the job id on ``EVENTS_CHANNEL``, which is how watchers
and orchestrators hear of it without polling. An ended job's record carries a
TTL: it goes ``RECORD_KEPT_AFTER_EXPIRY_S`` after its ``expires_at``.
"""

from __future__ import annotations

import builtins
import functools
import json
from typing import Any

import redis

from serving.jobs.record import RECORD_KEPT_AFTER_EXPIRY_S, JobRecord
from serving.jobs.store import (
    ConditionalWrites,
    QueueSnapshot,
    StoreUnavailable,
    TenantCheck,
    _webhook_due,
    snapshot_of,
)
from serving.protocol import JobStatus
from serving.tenancy.redis_connection import redis_auth_options

__all__ = ["RedisJobStore", "EVENTS_CHANNEL"]

_PREFIX = "reelserve:job:"
_INDEX = "reelserve:jobs"
_ACTIVE = "reelserve:active"  # ids of jobs not yet terminal
EVENTS_CHANNEL = "reelserve:events"  # a job id per write
_WEBHOOKS = "reelserve:webhooks"  # ids of ended jobs whose callback is still to be delivered
_REPLICAS = "reelserve:replicas:"  # + stage: replica -> heartbeat expiry (ZSET), and its info (HASH, ":info")
_TERMINAL = int(JobStatus.COMPLETED)


def _tenant_keys(tenant: str) -> tuple[str, str, str]:
    """(jobs by creation time, active ids, running ids) of one tenant (names are checked in the config)."""
    base = f"reelserve:tenant:{tenant}:"
    return base + "jobs", base + "active", base + "running"


def _hash_fields(data: dict) -> dict:
    return {
        "data": json.dumps(data),
        "status": int(data["status"]),
        "lease_until": data["lease_until"],
        "owner": data["owner"] or "",
        "cancel": int(bool(data["cancel_requested"])),
    }


def _unavailable_on_connection_errors(method):
    """A connection failure becomes ``StoreUnavailable`` (503 for clients; retried by orchestrators)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as error:  # unreachable, read-only after a failover, out of memory...
            raise StoreUnavailable(f"the job store (Redis) is unreachable: {type(error).__name__}") from None

    return wrapper


class RedisJobStore(ConditionalWrites):
    def __init__(self, url: str | None):
        if not url:
            raise ValueError("jobs.redis_url: required for the redis job store (e.g. redis://localhost:6380/0)")
        self.url = url
        # Fail fast when Redis is down: callers retry on their own schedule. The password, if any, comes from the
        # environment (a Kubernetes Secret), never from the config.
        # Any: redis-py annotates replies for every mode (async, RESP3); with decode_responses they are str.
        self._redis: Any = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2, **redis_auth_options(url)
        )

    @_unavailable_on_connection_errors
    def now(self) -> float:
        seconds, micros = self._redis.time()
        return seconds + micros / 1e6

    @_unavailable_on_connection_errors
    def create(self, record: JobRecord, max_active: int | None = None, check_tenant: TenantCheck | None = None) -> bool:
        key = _PREFIX + record.id
        data = record.to_dict()
        jobs, active, running = _tenant_keys(record.tenant)
        outcome = {"created": False}

        def insert(pipe):
            # Watching the active sets makes "count, then add" one step even with many ingress replicas.
            outcome["created"] = False
            if pipe.exists(key):
                raise ValueError(f"job {record.id} already exists")
            if max_active is not None and pipe.scard(_ACTIVE) >= max_active:
                return
            if check_tenant is not None:
                tenant_running = pipe.scard(running)
                check_tenant(pipe.scard(active) - tenant_running, tenant_running)
            pipe.multi()
            pipe.hset(key, mapping=_hash_fields(data))
            pipe.zadd(_INDEX, {record.id: record.created_at})
            pipe.zadd(jobs, {record.id: record.created_at})
            if not record.status.is_terminal:
                pipe.sadd(_ACTIVE, record.id)
                pipe.sadd(active, record.id)
            pipe.publish(EVENTS_CHANNEL, record.id)
            outcome["created"] = True

        self._redis.transaction(insert, key, _ACTIVE, active, running)
        return outcome["created"]

    @_unavailable_on_connection_errors
    def get(self, job_id: str) -> JobRecord | None:
        raw = self._redis.hget(_PREFIX + job_id, "data")
        return None if raw is None else JobRecord.from_dict(json.loads(raw))

    @_unavailable_on_connection_errors
    def list(self, *, after: str | None, limit: int, order: str, tenant: str | None = None) -> tuple[list[JobRecord], bool]:
        descending = order == "desc"
        index = _INDEX if tenant is None else _tenant_keys(tenant)[0]
        start = 0
        if after is not None:
            rank = self._redis.zrevrank(index, after) if descending else self._redis.zrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        stop = start + limit  # one extra to learn whether more exist
        ids = self._redis.zrange(index, start, stop, desc=descending)
        found = [(i, self.get(i)) for i in ids[:limit]]
        gone = [i for i, record in found if record is None]
        if gone:  # records that expired (their TTL) leave their ids in the indexes: drop them
            self._redis.zrem(index, *gone)
            if index != _INDEX:
                self._redis.zrem(_INDEX, *gone)
        return [record for _, record in found if record is not None], len(ids) > limit

    @_unavailable_on_connection_errors
    def _modify(self, job_id: str, decide) -> JobRecord | None:
        key = _PREFIX + job_id
        outcome: dict = {}

        def apply(pipe):
            outcome["data"] = None
            raw = pipe.hget(key, "data")
            if raw is None:
                return
            seconds, micros = pipe.time()
            data = json.loads(raw)
            changes = decide(JobRecord.from_dict(data), seconds + micros / 1e6)
            if changes is None:
                return
            data.update({k: int(v) if isinstance(v, JobStatus) else v for k, v in changes.items()})
            record = JobRecord.from_dict(data)
            _, active, running = _tenant_keys(record.tenant)
            pipe.multi()
            pipe.hset(key, mapping=_hash_fields(data))
            if record.status.is_terminal:
                pipe.srem(_ACTIVE, job_id)
                pipe.srem(active, job_id)
                pipe.srem(running, job_id)
                if data.get("expires_at"):  # an ended job's record goes a day after its video (the sweeps too)
                    pipe.expireat(key, int(data["expires_at"] + RECORD_KEPT_AFTER_EXPIRY_S) + 1)
            elif record.attempts > 0:
                pipe.sadd(running, job_id)
            if _webhook_due(record):
                pipe.sadd(_WEBHOOKS, job_id)
            else:
                pipe.srem(_WEBHOOKS, job_id)
            pipe.publish(EVENTS_CHANNEL, job_id)
            outcome["data"] = data

        self._redis.transaction(apply, key)
        return None if outcome["data"] is None else JobRecord.from_dict(outcome["data"])

    @_unavailable_on_connection_errors
    def is_cancel_requested(self, job_id: str) -> bool:
        flag = self._redis.hget(_PREFIX + job_id, "cancel")
        return flag is None or flag == "1"

    @_unavailable_on_connection_errors
    def delete(self, job_id: str) -> bool:
        record = self.get(job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(_PREFIX + job_id)
        pipe.zrem(_INDEX, job_id)
        pipe.srem(_ACTIVE, job_id)
        pipe.srem(_WEBHOOKS, job_id)
        if record is not None:
            jobs, active, running = _tenant_keys(record.tenant)
            pipe.zrem(jobs, job_id)
            pipe.srem(active, job_id)
            pipe.srem(running, job_id)
        pipe.publish(EVENTS_CHANNEL, job_id)
        removed = pipe.execute()[0]
        return bool(removed)

    @_unavailable_on_connection_errors
    def queue_snapshot(self, grace_s: float) -> QueueSnapshot:
        return snapshot_of(self.active_records(limit=100_000), self.now(), grace_s)

    @_unavailable_on_connection_errors
    def heartbeat(self, stage: str, replica: str, info: dict, ttl_s: float) -> None:
        expires = self.now() + ttl_s
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(_REPLICAS + stage, {replica: expires})
        pipe.hset(_REPLICAS + stage + ":info", replica, json.dumps(info))
        pipe.execute()

    @_unavailable_on_connection_errors
    def live_replicas(self, stage: str) -> builtins.list[dict]:
        now = self.now()
        gone = self._redis.zrangebyscore(_REPLICAS + stage, "-inf", now)
        if gone:  # forget replicas whose heartbeat lapsed (they died or stopped)
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(_REPLICAS + stage, *gone)
            pipe.hdel(_REPLICAS + stage + ":info", *gone)
            pipe.execute()
        live = self._redis.zrangebyscore(_REPLICAS + stage, now, "+inf")
        infos = self._redis.hmget(_REPLICAS + stage + ":info", live) if live else []
        return [json.loads(info) for info in infos if info is not None]

    @_unavailable_on_connection_errors
    def forget_replica(self, stage: str, replica: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(_REPLICAS + stage, replica)
        pipe.hdel(_REPLICAS + stage + ":info", replica)
        pipe.execute()

    @_unavailable_on_connection_errors
    def webhooks_pending(self, limit: int = 100) -> builtins.list[str]:
        return sorted(self._redis.smembers(_WEBHOOKS))[:limit]

    @_unavailable_on_connection_errors
    def claimable(self, grace_s: float, limit: int = 100) -> builtins.list[str]:
        now = self.now()
        ids = list(self._redis.smembers(_ACTIVE))
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(_PREFIX + job_id, "status", "lease_until", "owner")
            pipe.zscore(_INDEX, job_id)
        answers = pipe.execute()
        found = []
        for index, job_id in enumerate(ids):
            (status, lease_until, owner), created = answers[2 * index], answers[2 * index + 1]
            if status is None or int(status) >= _TERMINAL:
                continue
            if not owner or float(lease_until) + grace_s < now:
                found.append((created or 0.0, job_id))
        return [job_id for _, job_id in sorted(found)[:limit]]

    @_unavailable_on_connection_errors
    def active_records(self, limit: int = 1000) -> builtins.list[JobRecord]:
        ids = list(self._redis.smembers(_ACTIVE))[:limit]
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(_PREFIX + job_id, "data")
        return [JobRecord.from_dict(json.loads(raw)) for raw in pipe.execute() if raw is not None]

    @_unavailable_on_connection_errors
    def count_active(self) -> int:
        return self._redis.scard(_ACTIVE)

    def close(self) -> None:
        self._redis.close()
