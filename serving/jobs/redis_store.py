"""Redis job store: cluster mode (every node reaches the same Redis).

One hash per job holds the JSON record; a sorted set orders jobs by creation
time. Conditional writes run as Lua scripts so they are atomic.
"""

from __future__ import annotations

import json

from serving.jobs.record import JobRecord
from serving.protocol import JobStatus

__all__ = ["RedisJobStore"]

_PREFIX = "reelserve:job:"
_INDEX = "reelserve:jobs"
_ACTIVE = "reelserve:active"  # ids of jobs not yet terminal
_TERMINAL = int(JobStatus.COMPLETED)

# KEYS[1] job hash, KEYS[2] active set; ARGV: JSON changes, 1 if the job must be active, terminal, job id.
_MODIFY = """
local raw = redis.call('HGET', KEYS[1], 'data')
if not raw then return nil end
local data = cjson.decode(raw)
if ARGV[2] == '1' and data['status'] >= tonumber(ARGV[3]) then return nil end
local changes = cjson.decode(ARGV[1])
for k, v in pairs(changes) do data[k] = v end
local encoded = cjson.encode(data)
local cancel = '0'
if data['cancel_requested'] then cancel = '1' end
redis.call('HSET', KEYS[1], 'data', encoded, 'status', data['status'], 'lease_until', data['lease_until'], 'cancel', cancel)
if data['status'] >= tonumber(ARGV[3]) then redis.call('SREM', KEYS[2], ARGV[4]) end
return encoded
"""

# KEYS[1] job hash; ARGV: owner, lease_s, now, terminal.
_CLAIM = """
local raw = redis.call('HGET', KEYS[1], 'data')
if not raw then return 0 end
local data = cjson.decode(raw)
if data['status'] >= tonumber(ARGV[4]) then return 0 end
local owner = data['owner']
local now = tonumber(ARGV[3])
if owner ~= cjson.null and owner ~= ARGV[1] and data['lease_until'] >= now then return 0 end
data['owner'] = ARGV[1]
data['lease_until'] = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'data', cjson.encode(data), 'lease_until', data['lease_until'])
return 1
"""


class RedisJobStore:
    def __init__(self, url: str | None):
        import redis

        if not url:
            raise ValueError("jobs.redis_url: required for the redis job store (e.g. redis://localhost:6380/0)")
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        self._modify_script = self._redis.register_script(_MODIFY)
        self._claim_script = self._redis.register_script(_CLAIM)

    def create(self, record: JobRecord) -> None:
        key = _PREFIX + record.id
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping={
            "data": json.dumps(record.to_dict()), "status": int(record.status),
            "lease_until": record.lease_until, "cancel": int(record.cancel_requested),
        })
        pipe.zadd(_INDEX, {record.id: record.created_at})
        if not record.status.is_terminal:
            pipe.sadd(_ACTIVE, record.id)
        pipe.execute()

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
        encoded = {k: int(v) if isinstance(v, JobStatus) else v for k, v in changes.items()}
        result = self._modify_script(
            keys=[_PREFIX + job_id, _ACTIVE],
            args=[json.dumps(encoded), "1" if must_be_active else "0", _TERMINAL, job_id],
        )
        return None if result is None else JobRecord.from_dict(json.loads(result))

    def update(self, job_id: str, **changes) -> bool:
        return self._modify(job_id, changes, must_be_active=True) is not None

    def finish(self, job_id: str, **changes) -> bool:
        if not JobStatus(changes["status"]).is_terminal:
            raise ValueError("finish() needs a terminal status")
        return self._modify(job_id, changes, must_be_active=True) is not None

    def request_cancel(self, job_id: str, delete: bool = False) -> JobRecord | None:
        changes = {"cancel_requested": True}
        if delete:
            changes["delete_requested"] = True
        return self._modify(job_id, changes, must_be_active=False)

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
        return bool(self._claim_script(keys=[_PREFIX + job_id], args=[owner, lease_s, now, _TERMINAL]))

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
