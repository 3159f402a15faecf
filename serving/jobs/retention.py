"""What a job leaves behind, and for how long: its objects and its record, swept on schedule.

- **Ended jobs.** A job's video and inputs stay until its ``expires_at`` (its
  end + ``storage.results_ttl_s``, in both APIs); then they go, and the record
  ``RECORD_KEPT_AFTER_EXPIRY_S`` later (so its routes say "expired" meanwhile;
  Redis also holds a TTL on the record itself). Its stage outputs and
  checkpoints go when it ends (``jobs.keep_artifacts`` keeps them).
- **Stale attempts.** Only the MP4 of the attempt the record accepted
  (``result_attempt``) is kept; another attempt's is removed, whenever it lands.
- **Deleted jobs.** Objects of a job without a record go after a short grace
  (the ingress puts a photo just before it records its job), so a late writer's
  file does not come back for good.
- **Object stores with lifecycle rules** (S3) get them as a backstop, in whole
  days and a job's longest run later than the record's expiry, never earlier.

Runner replicas call ``sweep`` every ``storage.sweep_interval_s``; it blocks
(run it in a thread) and stops at the first store outage (the next sweep goes on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import cast

from cluster.config import JobsConfig
from serving.jobs.job_storage import JobStorage
from serving.jobs.record import RECORD_KEPT_AFTER_EXPIRY_S, JobRecord
from serving.jobs.store import JobStore
from serving.protocol import JobStatus
from serving.storage.keys import AREAS, Area, ParsedKey, area_prefix, parse_key
from serving.storage.lifecycle import install_expiration_rules, sweep_staging

__all__ = ["Retention", "SweepCounts", "expires_at", "is_expired"]

logger = logging.getLogger("ray.serve.reelserve.storage")

ORPHAN_GRACE_S = 900.0  # objects of a job without a record are removed once this old
_RECORD_PAGE = 100
_MAX_RECORDS_PER_SWEEP = 10_000


def expires_at(record: JobRecord, results_ttl_s: float) -> float | None:
    """When an ended job's video, inputs and outputs go: the record's ``expires_at``, or (a record written
    before expiry existed, or ended without a runner) its end + ``results_ttl_s``. ``None`` while it runs."""
    if record.expires_at is not None:
        return float(record.expires_at)
    if record.status.is_terminal:
        return (record.completed_at or record.created_at) + results_ttl_s
    return None


def is_expired(record: JobRecord, results_ttl_s: float, now: float | None = None) -> bool:
    when = expires_at(record, results_ttl_s)
    return when is not None and (time.time() if now is None else now) >= when


@dataclass
class SweepCounts:
    objects: int = 0  # objects removed
    records: int = 0  # records removed


class Retention:
    """The sweeps of one runner replica, over its job store and its two object stores."""

    def __init__(self, store: JobStore, storage: JobStorage, jobs: JobsConfig):
        self.store, self.storage, self.jobs = store, storage, jobs
        self.ttl_s = storage.config.results_ttl_s

    def install_rules(self) -> bool:
        """S3 lifecycle rules for every area of our stores (a backstop: whole days, later than the record's
        expiry); ``False`` where a store has none (local, GCS, Redis, memory: the sweeps do it all)."""
        slack = self.jobs.job_timeout_s  # an object may be written that long before its job ends
        ttl: dict[Area, float] = {"inputs": self.ttl_s + slack, "results": self.ttl_s + slack,
               "artifacts": self.storage.config.artifacts_ttl_s + slack}
        results, artifacts = self.storage.results, self.storage.artifacts
        if artifacts is results:
            return install_expiration_rules(results, ttl)
        installed = install_expiration_rules(results, {"inputs": ttl["inputs"], "results": ttl["results"]})
        return install_expiration_rules(artifacts, {"artifacts": ttl["artifacts"]}) or installed

    def sweep(self, now: float | None = None) -> SweepCounts:
        """One pass: expired jobs (oldest records first), then every object whose job no longer wants it."""
        now = time.time() if now is None else now
        counts = SweepCounts()
        self._expired_records(now, counts)
        self._unwanted_objects(now, counts)
        for store in self.storage.stores:
            counts.objects += sweep_staging(store)
        if counts.objects or counts.records:
            logger.info("swept %d objects and %d records", counts.objects, counts.records)
        return counts

    # ------------------------------------------------------------------ records

    def _expired_records(self, now: float, counts: SweepCounts) -> None:
        """Records old enough to have expired are the oldest ones: read in creation order until one is younger
        than the retention time. Their objects go at expiry, the record a day later."""
        candidates: list[JobRecord] = []
        after = None
        for _ in range(_MAX_RECORDS_PER_SWEEP // _RECORD_PAGE):
            page, more = self.store.list(after=after, limit=_RECORD_PAGE, order="asc")
            old = [record for record in page if record.created_at <= now - self.ttl_s]
            candidates += old
            if not more or len(old) < len(page):
                break
            if page:  # an empty page with more after it: ids of records gone (Redis drops them as it lists)
                after = page[-1].id
        for record in candidates:  # acted on after the listing: deleting records moves the listing's cursor
            if not is_expired(record, self.ttl_s, now):
                continue
            counts.objects += self.storage.remove_job(record.id)
            if now >= cast(float, expires_at(record, self.ttl_s)) + RECORD_KEPT_AFTER_EXPIRY_S:
                counts.records += bool(self.store.delete(record.id))

    # ------------------------------------------------------------------ objects

    def _unwanted_objects(self, now: float, counts: SweepCounts) -> None:
        records: dict[str, JobRecord | None] = {}
        for store in self.storage.stores:
            for area in AREAS:
                for info in list(store.list(area_prefix(area))):
                    parsed = parse_key(info.key)
                    if parsed.job_id not in records:
                        records[parsed.job_id] = self.store.get(parsed.job_id)
                    if not self.wanted(records[parsed.job_id], parsed, now - info.modified_at, now):
                        store.delete(info.key)
                        counts.objects += 1

    def wanted(self, record: JobRecord | None, key: ParsedKey, age_s: float, now: float) -> bool:
        """Whether the object ``key`` (``age_s`` old) is still wanted by its job's ``record``."""
        if record is None:
            return age_s < ORPHAN_GRACE_S
        if record.delete_requested and record.status.is_terminal:
            return False
        if is_expired(record, self.ttl_s, now):
            return False
        if not record.status.is_terminal or key.area == "inputs":
            return True
        if key.area == "results":
            return record.status == JobStatus.COMPLETED and key.attempt == record.result_attempt
        return self.jobs.keep_artifacts
