"""SQLite job store: the embedded default (one machine; every process opens the same file).

Each write is one ``BEGIN IMMEDIATE`` transaction (read, decide, write), so
the fence check and the write are atomic; the clock is this host's, shared
by every process on it. Every write stamps the row with a rising sequence
number, which is how watchers learn what changed (``changed_since``).
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from pathlib import Path

import platformdirs

from serving.jobs.record import JobRecord
from serving.jobs.store import (
    ConditionalWrites,
    QueueSnapshot,
    StoreUnavailable,
    TenantCheck,
    _webhook_due,
    snapshot_of,
)
from serving.protocol import JobStatus
from serving.tenancy.sqlite_connection import SQLiteFile

__all__ = ["SQLiteJobStore", "default_sqlite_path"]

_TERMINAL = int(JobStatus.COMPLETED)  # every terminal status sorts at or after this
_COLUMNS = {  # column -> declaration, for tables made by older versions
    "lease_until": "REAL NOT NULL DEFAULT 0",
    "cancel": "INTEGER NOT NULL DEFAULT 0",
    "owner": "TEXT",
    "seq": "INTEGER NOT NULL DEFAULT 0",
    "tenant": "TEXT NOT NULL DEFAULT 'default'",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "webhook_due": "INTEGER NOT NULL DEFAULT 0",
}


def default_sqlite_path() -> str:
    return str(Path(platformdirs.user_data_dir("reelserve")) / "jobs.sqlite3")


class SQLiteJobStore(ConditionalWrites):
    def __init__(self, path: str | None = None):
        self.path = path or default_sqlite_path()
        # Per-thread connections and BEGIN IMMEDIATE transactions, as the embedded quota and idempotency stores
        # open the same kind of file.
        self._file = SQLiteFile(self.path)
        with self._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs ("
                " id TEXT PRIMARY KEY, created_at REAL NOT NULL, status INTEGER NOT NULL, data TEXT NOT NULL)"
            )
            present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, declaration in _COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at, id)")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_seq ON jobs (seq)")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at, id)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS replicas ("
                " stage TEXT NOT NULL, replica TEXT NOT NULL, expires_at REAL NOT NULL, info TEXT NOT NULL,"
                " PRIMARY KEY (stage, replica))"
            )
            # The change counter lives apart from the rows: deleting the newest job must not hand its number out again.
            db.execute("CREATE TABLE IF NOT EXISTS changes (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)")
            db.execute("INSERT OR IGNORE INTO changes (id, seq) VALUES (1, (SELECT COALESCE(MAX(seq), 0) FROM jobs))")

    def _connection(self) -> sqlite3.Connection:
        return self._file.connection()

    def _transaction(self):
        return self._file.transaction()

    def _read(self, query: str, params: tuple = ()) -> list:
        try:
            return self._connection().execute(query, params).fetchall()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the job database is busy or unreadable: {error}") from None

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        db.execute("UPDATE changes SET seq = seq + 1 WHERE id = 1")
        return db.execute("SELECT seq FROM changes WHERE id = 1").fetchone()[0]

    def now(self) -> float:
        return time.time()  # one host, one clock

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read("SELECT data FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def list(self, *, after: str | None, limit: int, order: str, tenant: str | None = None) -> tuple[list[JobRecord], bool]:
        descending = order == "desc"
        query, params, where = "SELECT data FROM jobs", [], []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if after is not None:
            anchors = self._read("SELECT created_at, id FROM jobs WHERE id = ?", (after,))
            if not anchors:
                return [], False
            comparison = "<" if descending else ">"
            where.append(f"(created_at, id) {comparison} (?, ?)")
            params += list(anchors[0])
        if where:
            query += " WHERE " + " AND ".join(where)
        direction = "DESC" if descending else "ASC"
        query += f" ORDER BY created_at {direction}, id {direction} LIMIT ?"
        rows = self._read(query, tuple(params + [limit + 1]))
        records = [JobRecord.from_dict(json.loads(r[0])) for r in rows[:limit]]
        return records, len(rows) > limit

    def is_cancel_requested(self, job_id: str) -> bool:
        rows = self._read("SELECT cancel FROM jobs WHERE id = ?", (job_id,))
        return not rows or bool(rows[0][0])  # a deleted job is as good as cancelled

    def claimable(self, grace_s: float, limit: int = 100) -> builtins.list[str]:
        rows = self._read(
            "SELECT id FROM jobs WHERE status < ? AND (owner IS NULL OR lease_until + ? < ?) ORDER BY created_at LIMIT ?",
            (_TERMINAL, grace_s, self.now(), limit),
        )
        return [r[0] for r in rows]

    def count_active(self) -> int:
        return self._read("SELECT COUNT(*) FROM jobs WHERE status < ?", (_TERMINAL,))[0][0]

    def active_records(self, limit: int = 1000) -> builtins.list[JobRecord]:
        rows = self._read("SELECT data FROM jobs WHERE status < ? ORDER BY created_at LIMIT ?", (_TERMINAL, limit))
        return [JobRecord.from_dict(json.loads(r[0])) for r in rows]

    def queue_snapshot(self, grace_s: float) -> QueueSnapshot:
        return snapshot_of(self.active_records(limit=100_000), self.now(), grace_s)

    def heartbeat(self, stage: str, replica: str, info: dict, ttl_s: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO replicas (stage, replica, expires_at, info) VALUES (?, ?, ?, ?)",
                (stage, replica, self.now() + ttl_s, json.dumps(info)),
            )

    def live_replicas(self, stage: str) -> builtins.list[dict]:
        rows = self._read("SELECT info FROM replicas WHERE stage = ? AND expires_at > ?", (stage, self.now()))
        return [json.loads(row[0]) for row in rows]

    def forget_replica(self, stage: str, replica: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM replicas WHERE stage = ? AND replica = ?", (stage, replica))

    def webhooks_pending(self, limit: int = 100) -> builtins.list[str]:
        return [row[0] for row in self._read("SELECT id FROM jobs WHERE webhook_due = 1 ORDER BY id LIMIT ?", (limit,))]

    def changed_since(self, seq: int) -> tuple[int, builtins.list[str]]:
        """Jobs written after sequence number ``seq``, and the newest number (what watchers poll)."""
        rows = self._read("SELECT id, seq FROM jobs WHERE seq > ? ORDER BY seq", (seq,))
        if not rows:
            return seq, []
        return rows[-1][1], [r[0] for r in rows]

    def latest_seq(self) -> int:
        return self._read("SELECT seq FROM changes WHERE id = 1")[0][0]

    # ------------------------------------------------------------------ writes

    def create(self, record: JobRecord, max_active: int | None = None, check_tenant: TenantCheck | None = None) -> bool:
        with self._transaction() as db:
            if max_active is not None:
                active = db.execute("SELECT COUNT(*) FROM jobs WHERE status < ?", (_TERMINAL,)).fetchone()[0]
                if active >= max_active:
                    return False
            if check_tenant is not None:
                queued, running = db.execute(
                    "SELECT COALESCE(SUM(attempts = 0), 0), COALESCE(SUM(attempts > 0), 0) FROM jobs"
                    " WHERE status < ? AND tenant = ?", (_TERMINAL, record.tenant),
                ).fetchone()
                check_tenant(queued, running)
            db.execute(
                "INSERT INTO jobs (id, created_at, status, lease_until, cancel, owner, seq, tenant, attempts, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.created_at, int(record.status), record.lease_until, int(record.cancel_requested),
                 record.owner, self._next_seq(db), record.tenant, record.attempts, json.dumps(record.to_dict())),
            )
        return True

    def _modify(self, job_id: str, decide) -> JobRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            data = json.loads(row[0])
            changes = decide(JobRecord.from_dict(data), self.now())
            if changes is None:
                return None
            data.update({k: int(v) if isinstance(v, JobStatus) else v for k, v in changes.items()})
            record = JobRecord.from_dict(data)
            db.execute(
                "UPDATE jobs SET status = ?, lease_until = ?, cancel = ?, owner = ?, seq = ?, attempts = ?,"
                " webhook_due = ?, data = ? WHERE id = ?",
                (data["status"], data["lease_until"], int(data["cancel_requested"]), data["owner"],
                 self._next_seq(db), record.attempts, int(_webhook_due(record)), json.dumps(data), job_id),
            )
            return record

    def delete(self, job_id: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def close(self) -> None:
        """Close this thread's connection."""
        self._file.close()
