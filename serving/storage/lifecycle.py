"""Expiry and clean-up: lifecycle rules where the backend has them, sweeps everywhere.

- ``install_expiration_rules`` puts one S3 lifecycle rule per area (expire
  after N days, by prefix) and one that aborts incomplete multipart uploads,
  keeping any rule of the bucket that is not ours, and ours for other
  prefixes (another store in the same bucket). S3 counts whole days and
  runs about once a day, so the rule is the backstop; what the API serves is
  decided by the record's ``expires_at``, and the sweeps below remove objects
  on the minute.
- For GCS, ``gcs_lifecycle_document`` gives the same rules as the JSON that
  ``gcloud storage buckets update --lifecycle-file`` applies (installing them
  from here would need the google-cloud clients); local, memory and GCS stores
  rely on the sweeps.
- ``sweep_expired`` removes objects older than a TTL; ``sweep_jobs`` removes
  what the job store no longer wants (a deleted job, a superseded attempt), so
  a late writer's file does not come back for good; ``sweep_staging`` removes
  the staging files a crashed local writer left.

The S3 rule goes through botocore (obstore has no bucket-configuration calls);
it is imported only here, when a rule is installed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast
from urllib.parse import urlparse

import botocore.exceptions
import botocore.session

from serving.storage.errors import StorageError, StorageUnavailable
from serving.storage.keys import (
    AREAS,
    Area,
    area_prefix,
    attempt_prefix,
    job_prefix,
    parse_key,
)
from serving.storage.store import Storage

__all__ = [
    "RULE_ID_PREFIX",
    "delete_job",
    "delete_other_attempts",
    "gcs_lifecycle_document",
    "install_expiration_rules",
    "sweep_expired",
    "sweep_jobs",
    "sweep_staging",
]

logger = logging.getLogger("ray.serve.reelserve.storage")

RULE_ID_PREFIX = "reelserve-"
_DAY_S = 86400
_STAGING = re.compile(r"#\d+$")  # obstore's local staging files: <key>#<n>


def _days(ttl_s: float) -> int:
    """Lifecycle rules count whole days: at least one, rounded up."""
    return max(1, math.ceil(ttl_s / _DAY_S))


def _rules(storage: Storage, ttl_by_area: Mapping[Area, float]) -> dict[Area, str]:
    """Rule id -> full key prefix in the bucket (the store's own prefix included)."""
    base = urlparse(storage.url).path.strip("/")
    return {area: f"{base}/{area_prefix(area)}" if base else area_prefix(area) for area in ttl_by_area}


def install_expiration_rules(storage: Storage, ttl_by_area: Mapping[Area, float]) -> bool:
    """Expire each area's objects ``ttl_by_area[area]`` seconds (rounded up to days) after they were written.

    Returns ``True`` when the rules are installed (S3), ``False`` when the
    backend has no lifecycle rules reachable from here (local, memory, GCS):
    run ``sweep_expired`` on a schedule there. Rules of the bucket that are
    not ours are kept.
    """
    if storage.backend != "s3":
        return False

    bucket = urlparse(storage.url).netloc
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    client = botocore.session.get_session().create_client("s3", endpoint_url=storage.endpoint_url, region_name=region)
    # One rule per prefix, named after it: stores in one bucket under different prefixes keep each other's rules.
    ours: list[dict[str, Any]] = [
        {
            "ID": f"{RULE_ID_PREFIX}{area}@{prefix}",
            "Filter": {"Prefix": prefix},
            "Status": "Enabled",
            "Expiration": {"Days": _days(ttl_by_area[area])},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
        for area, prefix in _rules(storage, ttl_by_area).items()
    ]
    try:
        try:
            current = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                raise
            current = []
        replaced = {rule["Filter"]["Prefix"] for rule in ours}
        kept = [
            rule for rule in current
            if not str(rule.get("ID", "")).startswith(RULE_ID_PREFIX) or _rule_prefix(rule) not in replaced
        ]
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": kept + ours})
    except botocore.exceptions.ClientError as error:
        raise StorageError(f"installing lifecycle rules on s3://{bucket} was refused: {error}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise StorageUnavailable(f"installing lifecycle rules on s3://{bucket} failed: {error}") from None
    finally:
        client.close()
    logger.info("lifecycle rules on s3://%s: %s", bucket, {rule["ID"]: rule["Expiration"] for rule in ours})
    return True


def _rule_prefix(rule: dict) -> str | None:
    return (rule.get("Filter") or {}).get("Prefix", rule.get("Prefix"))


def gcs_lifecycle_document(storage: Storage, ttl_by_area: Mapping[Area, float]) -> dict:
    """The same rules for a GCS bucket, as ``gcloud storage buckets update --lifecycle-file`` reads them."""
    return {
        "rule": [
            {"action": {"type": "Delete"}, "condition": {"age": _days(ttl_by_area[area]), "matchesPrefix": [prefix]}}
            for area, prefix in _rules(storage, ttl_by_area).items()
        ]
    }


def sweep_expired(storage: Storage, area: Area, ttl_s: float, now: float | None = None) -> int:
    """Delete the objects of ``area`` written more than ``ttl_s`` seconds ago; returns how many."""
    cutoff = (time.time() if now is None else now) - ttl_s
    expired = [info.key for info in storage.list(area_prefix(area)) if info.modified_at < cutoff]
    for key in expired:
        storage.delete(key)
    if expired:
        logger.info("swept %d expired objects from %s/", len(expired), area)
    return len(expired)


def sweep_jobs(storage: Storage, wanted: Callable[[str, int | None], bool]) -> int:
    """Delete everything whose job and attempt ``wanted(job_id, attempt)`` refuses; returns how many objects.

    ``attempt`` is ``None`` for a job's inputs. Typical answers: the job's
    record is gone or deleted -> refuse all; the record completed with attempt
    3 -> refuse every other attempt's results and every attempt's artifacts.
    Asked once per job and attempt.
    """
    decided: dict[tuple[str, int | None], bool] = {}
    removed = 0
    for area in AREAS:
        for info in storage.list(area_prefix(area)):
            parsed = parse_key(info.key)
            owner = (parsed.job_id, parsed.attempt)
            if owner not in decided:
                decided[owner] = wanted(*owner)
            if not decided[owner]:
                storage.delete(info.key)
                removed += 1
    if removed:
        logger.info("swept %d objects of unwanted jobs or attempts", removed)
    return removed


def delete_job(storage: Storage, job_id: str) -> int:
    """Delete a job's inputs, results and artifacts (every attempt); returns how many objects."""
    return sum(storage.delete_prefix(job_prefix(area, job_id)) for area in AREAS)


def delete_other_attempts(storage: Storage, job_id: str, accepted_attempt: int) -> int:
    """Delete results and artifacts of every attempt of the job but ``accepted_attempt``; returns how many."""
    removed = 0
    areas: tuple[Literal["results", "artifacts"], ...] = ("results", "artifacts")
    for area in areas:
        attempts = {cast(int, parse_key(info.key).attempt) for info in storage.list(job_prefix(area, job_id))}
        for attempt in attempts - {accepted_attempt}:
            removed += storage.delete_prefix(attempt_prefix(area, job_id, attempt))
    return removed


def sweep_staging(storage: Storage, older_than_s: float = 3600.0, now: float | None = None) -> int:
    """Local stores only: delete staging files (``<key>#<n>``) older than ``older_than_s`` that a writer
    killed mid-put left behind, and the empty folders around them; returns how many files."""
    if storage.local_root is None:
        return 0
    cutoff = (time.time() if now is None else now) - older_than_s
    removed = 0
    for area in AREAS:
        root = storage.local_root / area
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            if path.is_file() and _STAGING.search(path.name) and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                pass
    return removed
