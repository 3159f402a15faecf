"""Redis job store: cluster mode (every node reaches the same Redis).

One hash per job holds the JSON record (plus a few fields copied out for
cheap checks); a sorted set orders jobs by creation time and a set holds the
ids of jobs not yet terminal. Conditional writes are optimistic transactions
(WATCH / MULTI), read-modify-write in Python so numbers keep full precision.
"""

from __future__ import annotations

import json

from serving.jobs.record import JobRecord
from serving.jobs.store import ConditionalWrites
from serving.protocol import JobStatus

__all__ = ["RedisJobStore"]

_PREFIX = "reelserve:job:"
_INDEX = "reelserve:jobs"
_ACTIVE = "reelserve:active"  # ids of jobs not yet terminal
_TERMINAL = int(JobStatus.COMPLETED)


def _hash_fields(data: dict) -> dict:
    return {
        "data": json.dumps(data),
        "status": int(data["status"]),
        "lease_until": data["lease_until"],
        "cancel": int(bool(data["cancel_requested"])),
    }


class RedisJobStore(ConditionalWrites):
    def __init__(self, url: str | None):
        import redis

        if not url:
            raise ValueError("jobs.redis_url: required for the redis job store (e.g. redis://localhost:6380/0)")
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)

    def create(self, record: JobRecord) -> None:
        key = _PREFIX + record.id
        data = record.to_dict()

        def insert(pipe):
            if pipe.exists(key):
                raise ValueError(f"job {record.id} already exists")
            pipe.multi()
            pipe.hset(key, mapping=_hash_fields(data))
            pipe.zadd(_INDEX, {record.id: record.created_at})
            if not record.status.is_terminal:
                pipe.sadd(_ACTIVE, record.id)

        self._redis.transaction(insert, key)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self._redis.hget(_PREFIX + job_id, "data")
        return None if raw is None else JobRecord.from_dict(json.loads(raw))

    def list(self, *, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        descending = order == "desc"
        start = 0
        if after is not None:
            rank = self._redis.zrevrank(_INDEX, after) if descending else self._redis.zrank(_INDEX, after)
            if rank is None:
                return [], False
            start = rank + 1
        stop = start + limit  # one extra to learn whether more exist
        ids = self._redis.zrange(_INDEX, start, stop, desc=descending)
        records = [r for r in (self.get(i) for i in ids[:limit]) if r is not None]
        return records, len(ids) > limit

    def _modify(self, job_id: str, changes: dict, must_be_active: bool) -> JobRecord | None:
        key = _PREFIX + job_id
        encoded = {k: int(v) if isinstance(v, JobStatus) else v for k, v in changes.items()}
        outcome: dict = {}

        def apply(pipe):
            raw = pipe.hget(key, "data")
            outcome["data"] = None
            if raw is None:
                return
            data = json.loads(raw)
            if must_be_active and data["status"] >= _TERMINAL:
                return
            data.update(encoded)
            pipe.multi()
            pipe.hset(key, mapping=_hash_fields(data))
            if data["status"] >= _TERMINAL:
                pipe.srem(_ACTIVE, job_id)
            outcome["data"] = data

        self._redis.transaction(apply, key)
        return None if outcome["data"] is None else JobRecord.from_dict(outcome["data"])

    def is_cancel_requested(self, job_id: str) -> bool:
        flag = self._redis.hget(_PREFIX + job_id, "cancel")
        return flag is None or flag == "1"

    def delete(self, job_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(_PREFIX + job_id)
        pipe.zrem(_INDEX, job_id)
        pipe.srem(_ACTIVE, job_id)
        removed, _, _ = pipe.execute()
        return bool(removed)

    def claim(self, job_id: str, owner: str, lease_s: float, now: float) -> bool:
        key = _PREFIX + job_id
        outcome = {"claimed": False}

        def take(pipe):
            raw = pipe.hget(key, "data")
            outcome["claimed"] = False
            if raw is None:
                return
            data = json.loads(raw)
            free = data["owner"] is None or data["lease_until"] < now or data["owner"] == owner
            if data["status"] >= _TERMINAL or not free:
                return
            data.update(owner=owner, lease_until=now + lease_s)
            pipe.multi()
            pipe.hset(key, mapping=_hash_fields(data))
            outcome["claimed"] = True

        self._redis.transaction(take, key)
        return outcome["claimed"]

    def orphans(self, now: float, limit: int = 100) -> list[str]:
        found = []
        for job_id in self._redis.smembers(_ACTIVE):
            values = self._redis.hmget(_PREFIX + job_id, "status", "lease_until")
            if values[0] is None:
                continue
            if int(values[0]) < _TERMINAL and float(values[1]) < now:
                found.append(job_id)
                if len(found) >= limit:
                    break
        return found

    def count_active(self) -> int:
        return self._redis.scard(_ACTIVE)

    def close(self) -> None:
        self._redis.close()
