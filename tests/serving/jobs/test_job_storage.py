"""A job's objects in the configured stores (``JobStorage``), on a local directory and on the S3 server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cluster.storage_config import StorageConfig
from serving.jobs.job_storage import JobStorage
from serving.protocol import HostTensor, VideoLatents
from serving.storage.errors import StorageUnavailable
from serving.storage.keys import checkpoint_key
from tests.serving.conftest import new_bucket

JOB = "video_" + "ab" * 12


def latents(value: float) -> VideoLatents:
    return VideoLatents(latents=HostTensor(array=np.full((1, 2, 1, 2, 2), value, np.float32), dtype="float32"))


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> JobStorage:
    if request.param == "local":
        return JobStorage(StorageConfig(results_url=str(tmp_path / "results")))
    server = request.getfixturevalue("s3_server")
    bucket = new_bucket(server)
    config = StorageConfig(results_url=f"s3://{bucket}/results", artifacts_url=f"s3://{bucket}/outputs",
                           s3_endpoint_url=server.endpoint_url)
    return JobStorage(config)


def test_inputs_and_each_attempts_video(storage, tmp_path):
    storage.save_input(JOB, "photo", b"jpeg bytes")
    assert storage.load_input(JOB, "photo") == b"jpeg bytes"
    assert storage.load_input(JOB, "first_frame") is None
    for attempt in (1, 2):
        video = tmp_path / f"{attempt}.mp4"
        video.write_bytes(b"mp4 of attempt %d" % attempt)
        assert storage.save_video(JOB, attempt, video) == video.stat().st_size
    assert storage.video_info(storage.video_key(JOB, 2)).size == len(b"mp4 of attempt 2")
    with pytest.raises(ValueError):
        storage.video_key(JOB, "1/../../inputs")
    with pytest.raises(ValueError):
        storage.video_key("../" + JOB, 1)

    storage.keep_output(JOB, 1, "video_latents", latents(1.0))
    assert storage.remove_outputs(JOB, keep_result_of=2) == 2  # attempt 1's MP4 and the stage output
    assert [info.key for info in storage.results.list(f"results/{JOB}/")] == [f"results/{JOB}/2/video.mp4"]
    assert storage.load_input(JOB, "photo") == b"jpeg bytes"  # inputs stay until the job expires
    assert storage.remove_job(JOB) == 2
    assert not list(storage.results.list()) and not list(storage.artifacts.list())


def test_an_attempt_reads_its_own_and_earlier_attempts_outputs_never_later_ones(storage):
    storage.keep_output(JOB, 1, "video_latents", latents(1.0))
    storage.keep_output(JOB, 3, "video_latents", latents(3.0))  # a later attempt: invisible to attempt 2
    assert float(storage.load_output(JOB, 2, "video_latents").latents.array.flat[0]) == 1.0
    assert float(storage.load_output(JOB, 3, "video_latents").latents.array.flat[0]) == 3.0
    assert storage.load_output(JOB, 2, "audio_latents") is None


def test_a_resume_takes_the_newest_readable_checkpoint(storage, caplog):
    storage.keep_checkpoint(JOB, 1, 2, latents(2.0))
    storage.keep_checkpoint(JOB, 1, 4, latents(4.0))
    storage.keep_checkpoint(JOB, 2, 6, latents(6.0))
    assert storage.newest_checkpoint_step(JOB, 1) == 4 and storage.newest_checkpoint_step(JOB, 2) == 6
    assert storage.newest_checkpoint(JOB, 2).step == 6
    storage.artifacts.put(checkpoint_key(JOB, 2, 6), b"\x80\x04 a pickle, or anything else")
    found = storage.newest_checkpoint(JOB, 2)
    assert (found.attempt, found.step) == (1, 4)
    assert f"{checkpoint_key(JOB, 2, 6)} is unreadable" in caplog.text


def test_the_older_settings_are_the_defaults(tmp_path):
    config = StorageConfig().with_job_defaults(str(tmp_path / "results"), "results_dir")
    storage = JobStorage(config)
    assert storage.results.local_root == tmp_path / "results" and storage.artifacts is storage.results
    assert storage.legacy_video_path(JOB) == tmp_path / "results" / f"{JOB}.mp4"
    with pytest.raises(ValueError):
        storage.legacy_video_path("../../etc/passwd")
    with pytest.raises(ValueError, match="disagree"):
        StorageConfig(results_url="s3://b/p").with_job_defaults("/data/results", "results_dir")
    assert StorageConfig().with_job_defaults(None, "redis").artifacts_url == "redis"


def test_an_ingress_gives_up_on_a_stopped_store_within_about_two_seconds(s3_server):
    bucket = new_bucket(s3_server)
    config = StorageConfig(results_url=f"s3://{bucket}/results", s3_endpoint_url=s3_server.endpoint_url)
    storage = JobStorage(config, fail_fast=True)
    storage.probe()  # the store answers
    s3_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            storage.probe()
        assert time.monotonic() - started < 5
    finally:
        s3_server.start()
    storage.probe()
