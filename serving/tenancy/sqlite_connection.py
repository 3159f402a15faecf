"""Per-thread SQLite connections and ``BEGIN IMMEDIATE`` transactions, as the SQLite job store opens them.

The embedded (one machine) forms of the rate limiter and the idempotency store share the
job store's file or use their own; every process on the machine sees the same rows.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from serving.errors import StoreUnavailable

__all__ = ["SQLiteFile"]


class SQLiteFile:
    """A database file opened once per thread (sqlite3 connections must not cross threads)."""

    def __init__(self, path: str, schema: tuple[str, ...] = ()):
        self.path = path  # a file: every thread and process opens it (":memory:" would be one database per thread)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.transaction() as db:
            for statement in schema:
                db.execute(statement)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            # Wait for a busy database well under a job lease (10 s by default).
            db = sqlite3.connect(self.path, timeout=3, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self):
        """One write transaction: readers see all of it or nothing, writers queue behind it."""
        try:
            db = self.connection()
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the job database is busy or unreadable: {error}") from None
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as error:
            try:
                db.execute("ROLLBACK")  # a failed COMMIT leaves the connection in the transaction otherwise
            except sqlite3.Error:
                pass
            if isinstance(error, sqlite3.Error):
                raise StoreUnavailable(f"the job database is busy or unreadable: {error}") from None
            raise

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
