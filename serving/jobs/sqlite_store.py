"""SQLite job store: the embedded default (one machine; every process opens the same file)."""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from serving.jobs.record import JobRecord
from serving.jobs.store import ConditionalWrites
from serving.protocol import JobStatus

__all__ = ["SQLiteJobStore", "default_sqlite_path"]

_TERMINAL = int(JobStatus.COMPLETED)  # every terminal status sorts at or after this


def default_sqlite_path() -> str:
    import platformdirs

    return str(Path(platformdirs.user_data_dir("reelserve")) / "jobs.sqlite3")


class SQLiteJobStore(ConditionalWrites):
    def __init__(self, path: str | None = None):
        self.path = path or default_sqlite_path()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs ("
                " id TEXT PRIMARY KEY, created_at REAL NOT NULL, status INTEGER NOT NULL,"
                " lease_until REAL NOT NULL DEFAULT 0, cancel INTEGER NOT NULL DEFAULT 0, data TEXT NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at, id)")

    def _connection(self) -> sqlite3.Connection:
        # One connection per thread: sqlite3 connections must not cross threads.
        db = getattr(self._local, "db", None)
        if db is None:
            # Wait for a busy database well under a job lease (10 s by default).
            db = sqlite3.connect(self.path, timeout=3, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self):
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str) -> JobRecord | None:
        row = self._connection().execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.from_dict(json.loads(row[0]))

    def list(self, *, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        db = self._connection()
        descending = order == "desc"
        query, params = "SELECT data FROM jobs", []
        if after is not None:
            anchor = db.execute("SELECT created_at, id FROM jobs WHERE id = ?", (after,)).fetchone()
            if anchor is None:
                return [], False
            comparison = "<" if descending else ">"
            query += f" WHERE (created_at, id) {comparison} (?, ?)"
            params += list(anchor)
        direction = "DESC" if descending else "ASC"
        query += f" ORDER BY created_at {direction}, id {direction} LIMIT ?"
        rows = db.execute(query, params + [limit + 1]).fetchall()
        records = [JobRecord.from_dict(json.loads(r[0])) for r in rows[:limit]]
        return records, len(rows) > limit

    def is_cancel_requested(self, job_id: str) -> bool:
        row = self._connection().execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])  # a deleted job is as good as cancelled

    def orphans(self, now: float, limit: int = 100) -> list[str]:
        rows = self._connection().execute(
            "SELECT id FROM jobs WHERE status < ? AND lease_until < ? ORDER BY created_at LIMIT ?",
            (_TERMINAL, now, limit),
        ).fetchall()
        return [r[0] for r in rows]

    def count_active(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM jobs WHERE status < ?", (_TERMINAL,)).fetchone()[0]

    # ------------------------------------------------------------------ writes

    def create(self, record: JobRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, created_at, status, lease_until, cancel, data) VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.created_at, int(record.status), record.lease_until,
                 int(record.cancel_requested), json.dumps(record.to_dict())),
            )

    def _modify(self, job_id: str, changes: dict, *, must_be_active: bool) -> JobRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            data = json.loads(row[0])
            if must_be_active and data["status"] >= _TERMINAL:
                return None
            data.update({k: int(v) if isinstance(v, JobStatus) else v for k, v in changes.items()})
            db.execute(
                "UPDATE jobs SET status = ?, lease_until = ?, cancel = ?, data = ? WHERE id = ?",
                (data["status"], data["lease_until"], int(data["cancel_requested"]), json.dumps(data), job_id),
            )
            return JobRecord.from_dict(data)

    def delete(self, job_id: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def claim(self, job_id: str, owner: str, lease_s: float, now: float) -> bool:
        with self._transaction() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False
            data = json.loads(row[0])
            free = data["owner"] is None or data["lease_until"] < now or data["owner"] == owner
            if data["status"] >= _TERMINAL or not free:
                return False
            data.update(owner=owner, lease_until=now + lease_s)
            db.execute(
                "UPDATE jobs SET lease_until = ?, data = ? WHERE id = ?", (data["lease_until"], json.dumps(data), job_id)
            )
            return True

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
