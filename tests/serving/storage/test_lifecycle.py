"""Expiry: S3 lifecycle rules visible through the S3 API, sweeps for the rest, deleted jobs stay deleted."""

from __future__ import annotations

import os
import time

from serving.storage.keys import artifact_key, checkpoint_key, input_key, result_key
from serving.storage.lifecycle import (
    delete_job,
    delete_other_attempts,
    gcs_lifecycle_document,
    install_expiration_rules,
    sweep_expired,
    sweep_jobs,
    sweep_staging,
)
from serving.storage.opening import open_storage

JOB = "video_" + "ee" * 12
OTHER = "cgt-" + "ff" * 12
WEEK_S = 604800


def _everything(storage) -> set[str]:
    return {info.key for info in storage.list()}


def test_s3_expiration_rules_are_installed_and_visible(s3_storage, s3_server):
    bucket = s3_storage.url.removeprefix("s3://").split("/")[0]
    s3 = s3_server.client()
    foreign = {"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 30}}
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [foreign]})

    assert install_expiration_rules(s3_storage, {"results": WEEK_S, "inputs": WEEK_S, "artifacts": 3600})
    assert install_expiration_rules(s3_storage, {"results": 2 * WEEK_S, "inputs": WEEK_S, "artifacts": 3600})  # again

    # A second store in the same bucket, under another prefix (stage outputs apart from results).
    other = open_storage(f"s3://{bucket}/outputs", s3_endpoint_url=s3_server.endpoint_url)
    assert install_expiration_rules(other, {"artifacts": 3600})

    rules = {rule["ID"]: rule for rule in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    results, inputs = "reelserve-results@reelserve/results/", "reelserve-inputs@reelserve/inputs/"
    artifacts, others = "reelserve-artifacts@reelserve/artifacts/", "reelserve-artifacts@outputs/artifacts/"
    assert set(rules) == {"logs", results, inputs, artifacts, others}
    assert rules[results]["Filter"]["Prefix"] == "reelserve/results/"
    assert rules[results]["Expiration"]["Days"] == 14
    assert rules[artifacts]["Expiration"]["Days"] == 1  # rounded up to S3's whole days
    assert rules[others]["Filter"]["Prefix"] == "outputs/artifacts/"
    assert rules[inputs]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    assert rules["logs"]["Expiration"]["Days"] == 30


def test_stores_without_rules_say_so(tmp_path):
    for url in (str(tmp_path), "memory://"):
        assert install_expiration_rules(open_storage(url), {"results": WEEK_S}) is False


def test_the_gcs_rule_document(aws_environment):
    storage = open_storage("memory://")
    storage.url = "gs://videos/reelserve"  # the document depends on the URL only
    document = gcs_lifecycle_document(storage, {"results": WEEK_S})
    assert document == {
        "rule": [{"action": {"type": "Delete"}, "condition": {"age": 7, "matchesPrefix": ["reelserve/results/"]}}]
    }


def test_sweep_expired_removes_only_old_objects_of_the_area(storage):
    storage.put(result_key(JOB, 1), b"old")
    storage.put(input_key(JOB, "photo"), b"old input")
    now = time.time()
    assert sweep_expired(storage, "results", ttl_s=WEEK_S, now=now) == 0
    assert sweep_expired(storage, "results", ttl_s=WEEK_S, now=now + WEEK_S + 60) == 1
    assert _everything(storage) == {input_key(JOB, "photo")}


def test_sweep_jobs_removes_deleted_jobs_and_superseded_attempts(storage):
    keys = {
        input_key(JOB, "photo"),
        result_key(JOB, 1),
        result_key(JOB, 2),
        artifact_key(JOB, 2, "video_latents"),
        checkpoint_key(JOB, 1, 3),
        input_key(OTHER, "first_frame"),
        result_key(OTHER, 1),
    }
    for key in keys:
        storage.put(key, b"x")
    asked = []

    def wanted(job_id, attempt):
        asked.append((job_id, attempt))
        if job_id == OTHER:
            return False  # its record was deleted: nothing of it may stay (or come back)
        return attempt in (None, 2)  # completed by attempt 2: inputs and that attempt stay

    assert sweep_jobs(storage, wanted) == 4
    assert _everything(storage) == {input_key(JOB, "photo"), result_key(JOB, 2), artifact_key(JOB, 2, "video_latents")}
    assert len(asked) == len(set(asked))  # asked once per job and attempt


def test_delete_job_and_other_attempts(storage):
    for key in (input_key(JOB, "photo"), result_key(JOB, 1), result_key(JOB, 3), checkpoint_key(JOB, 1, 2), result_key(OTHER, 1)):
        storage.put(key, b"x")
    assert delete_other_attempts(storage, JOB, accepted_attempt=3) == 2
    assert _everything(storage) == {input_key(JOB, "photo"), result_key(JOB, 3), result_key(OTHER, 1)}
    assert delete_job(storage, JOB) == 2
    assert _everything(storage) == {result_key(OTHER, 1)}


def test_sweep_staging_removes_what_a_killed_local_writer_left(tmp_path):
    storage = open_storage(str(tmp_path))
    storage.put(result_key(JOB, 1), b"whole")
    folder = tmp_path / "results" / JOB / "2"
    folder.mkdir(parents=True)
    stale = folder / "video.mp4#1"
    stale.write_bytes(b"half")
    fresh = tmp_path / "results" / JOB / "1" / "video.mp4#4"
    fresh.write_bytes(b"being written")
    hour_ago = time.time() - 7200
    os.utime(stale, (hour_ago, hour_ago))
    assert sweep_staging(storage, older_than_s=3600) == 1
    assert not folder.exists()  # the emptied folder went too
    assert fresh.exists() and storage.get(result_key(JOB, 1)) == b"whole"
    assert sweep_staging(open_storage("memory://")) == 0
