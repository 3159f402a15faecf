"""Retention sweeps over a real job store (SQLite) and the S3 server: what each kind of job leaves, and when."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cluster.config import JobsConfig
from cluster.storage_config import StorageConfig
from serving.jobs.job_storage import JobStorage
from serving.jobs.record import RECORD_KEPT_AFTER_EXPIRY_S, JobRecord, new_job_id
from serving.jobs.retention import ORPHAN_GRACE_S, Retention
from serving.jobs.sqlite_store import SQLiteJobStore
from serving.protocol import HostTensor, JobStatus, VideoLatents
from tests.serving.conftest import new_bucket

DAY_S = 86400.0


@pytest.fixture
def world(s3_server, tmp_path):
    bucket = new_bucket(s3_server)
    config = StorageConfig(results_url=f"s3://{bucket}/results", artifacts_url=f"s3://{bucket}/outputs",
                           s3_endpoint_url=s3_server.endpoint_url, results_ttl_s=7 * 86400)
    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite3"))
    storage = JobStorage(config)
    yield store, storage, Retention(store, storage, JobsConfig())
    store.close()


def _job(store, storage, tmp_path, status: JobStatus, attempts: int = 2, **fields) -> JobRecord:
    """A job with a photo, an MP4 from each attempt and a stage output."""
    now = time.time()
    record = JobRecord(id=new_job_id(), model="m", prompt="p", negative_prompt="", seconds=1.0, width=64, height=64,
                       fps=24, seed=1, has_image=True, status=status, attempts=attempts,
                       completed_at=now if status.is_terminal else None, created_at=now, **fields)
    store.create(record)
    storage.save_input(record.id, "photo", b"jpeg")
    for attempt in range(1, attempts + 1):
        video = tmp_path / "video.mp4"
        video.write_bytes(b"mp4")
        storage.save_video(record.id, attempt, video)
    latents = VideoLatents(latents=HostTensor(array=np.zeros((1, 2), np.float32), dtype="float32"))
    storage.keep_output(record.id, attempts, "video_latents", latents)
    return record


def _keys(storage: JobStorage, job_id: str) -> set[str]:
    return {info.key for store in storage.stores for info in store.list() if f"/{job_id}/" in info.key}


def test_each_job_keeps_what_it_still_needs(world, tmp_path):
    store, storage, retention = world
    running = _job(store, storage, tmp_path, JobStatus.IN_PROGRESS)
    done = _job(store, storage, tmp_path, JobStatus.COMPLETED, result_attempt=2, expires_at=time.time() + DAY_S)
    failed = _job(store, storage, tmp_path, JobStatus.FAILED, expires_at=time.time() + DAY_S)
    deleted = _job(store, storage, tmp_path, JobStatus.CANCELLED, delete_requested=True)

    retention.sweep()
    assert len(_keys(storage, running.id)) == 4  # photo, two MP4s, a stage output: it still runs
    assert _keys(storage, done.id) == {f"inputs/{done.id}/photo", f"results/{done.id}/2/video.mp4"}
    assert _keys(storage, failed.id) == {f"inputs/{failed.id}/photo"}
    assert _keys(storage, deleted.id) == set()


def test_an_expired_job_loses_its_objects_then_its_record(world, tmp_path):
    store, storage, retention = world
    expires = time.time() + retention.ttl_s  # as the runner writes it: the job's end + results_ttl_s
    record = _job(store, storage, tmp_path, JobStatus.COMPLETED, result_attempt=2, expires_at=expires)
    retention.sweep()
    assert _keys(storage, record.id)
    later = expires + 60
    assert retention.sweep(now=later).objects == 2  # the photo and the accepted MP4 (the first sweep took the rest)
    assert _keys(storage, record.id) == set() and store.get(record.id) is not None  # "expired" for a day
    assert retention.sweep(now=later + RECORD_KEPT_AFTER_EXPIRY_S).records == 1
    assert store.get(record.id) is None


def test_a_job_without_a_record_is_swept_after_a_grace(world, tmp_path):
    """A late writer's objects of a deleted job do not come back for good; a photo put just before its job is
    recorded is left alone."""
    _, storage, retention = world
    ghost = new_job_id()
    storage.save_input(ghost, "photo", b"jpeg")
    retention.sweep()
    assert _keys(storage, ghost) == {f"inputs/{ghost}/photo"}
    retention.sweep(now=time.time() + ORPHAN_GRACE_S + 1)
    assert _keys(storage, ghost) == set()


def test_lifecycle_rules_cover_both_stores(world, s3_server):
    _, storage, retention = world
    assert retention.install_rules()
    bucket = storage.results.url.removeprefix("s3://").split("/")[0]
    rules = s3_server.client().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    prefixes = {rule["Filter"]["Prefix"]: rule["Expiration"]["Days"] for rule in rules}
    # A week and a job's longest run (30 min) in whole days: 8, never earlier than the record says.
    assert prefixes == {"results/inputs/": 8, "results/results/": 8, "outputs/artifacts/": 2}
