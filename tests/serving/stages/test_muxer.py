"""The muxer stage in this process (no cluster): its MP4 goes to the store under the attempt, or nowhere.

The decoders' outputs are read back from their kept copies, as after a takeover.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading

import numpy as np
import pytest

from cluster.config import JobsConfig
from cluster.storage_config import StorageConfig
from serving.jobs.failures import StageFailure, client_safe_error
from serving.jobs.record import JobRecord, new_job_id
from serving.jobs.sqlite_store import SQLiteJobStore
from serving.media import encode_video
from serving.protocol import Handoff, JobTicket, VideoFrames, Waveform
from serving.stages.muxer import MuxerStage, StaleAttempt
from serving.storage.errors import StorageFull
from tests.serving.storage.test_store_errors import _AnsweringServer, _Handler


def _muxer_with_a_job(tmp_path, storage: StorageConfig, claims: int = 1):
    """A muxer, a job claimed ``claims`` times, and the decoders' outputs kept by its first attempt."""
    jobs = JobsConfig(backend="sqlite", sqlite_path=str(tmp_path / "jobs.sqlite3"))
    store = SQLiteJobStore(jobs.sqlite_path)
    record = JobRecord(id=new_job_id(), model="m", prompt="p", negative_prompt="", seconds=0.5, width=64, height=64,
                       fps=24, seed=1, has_image=False)
    store.create(record)
    for _ in range(claims):
        store.claim(record.id, "owner", lease_s=30.0, grace_s=-60.0)
    muxer = MuxerStage(jobs, (), "m", storage)
    frames = VideoFrames(pixels=np.zeros((12, 64, 64, 3), np.uint8), fps=24)
    kept = muxer._runner.storage
    kept.keep_output(record.id, 1, "encoded_video", encode_video(frames))
    kept.keep_output(record.id, 1, "waveform", Waveform(samples=np.zeros((1, 8000), np.float32), sample_rate=16000))
    handoffs = [Handoff(record.id, name, ref=None, nbytes=0, attempt=1) for name in ("encoded_video", "waveform")]
    return muxer, JobTicket(record.id, "owner", 1), handoffs


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """The muxer's temporary files go here, so the test sees what is left."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_the_mp4_goes_under_the_attempt(tmp_path, own_tmp):
    muxer, ticket, handoffs = _muxer_with_a_job(tmp_path, StorageConfig(results_url=str(tmp_path / "results")))
    stored = asyncio.run(muxer.call(ticket, "mux", *handoffs))
    assert stored.attempt == 1 and stored.record_changes() == {"result_attempt": 1, "result_bytes": stored.num_bytes}
    assert (tmp_path / "results" / "results" / ticket.job_id / "1" / "video.mp4").stat().st_size == stored.num_bytes
    assert not list(own_tmp.iterdir())


def test_a_replaced_attempt_puts_no_mp4(tmp_path, own_tmp):
    muxer, ticket, handoffs = _muxer_with_a_job(tmp_path, StorageConfig(results_url=str(tmp_path / "results")),
                                                claims=2)
    with pytest.raises(StaleAttempt):
        asyncio.run(muxer.call(ticket, "mux", *handoffs))  # attempt 1's call, after attempt 2 took the job
    assert not (tmp_path / "results" / "results").exists() and not list(own_tmp.iterdir())
    assert muxer.stats()["extra"]["stale_results_refused_total"] == 1


def test_a_full_bucket_fails_the_job_naming_the_muxer_and_leaves_no_file(tmp_path, own_tmp, aws_environment):
    server = _AnsweringServer(("127.0.0.1", 0), _Handler)
    server.answer = (403, "QuotaExceeded")  # what Ceph RGW answers a bucket over its quota
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        storage = StorageConfig(results_url="s3://full/results", artifacts_url=str(tmp_path / "outputs"),
                                s3_endpoint_url=f"http://127.0.0.1:{server.server_port}", retry_timeout_s=1)
        muxer, ticket, handoffs = _muxer_with_a_job(tmp_path, storage)
        with pytest.raises(StorageFull) as raised:
            asyncio.run(muxer.call(ticket, "mux", *handoffs))
    finally:
        server.shutdown()
        server.server_close()
    code, message = client_safe_error(StageFailure("muxer", raised.value).error, "muxer")
    assert (code, message) == ("storage_unavailable", "the muxer stage could not use storage: storage is full")
    assert not list(own_tmp.iterdir())  # the local MP4 is gone; no object was put
