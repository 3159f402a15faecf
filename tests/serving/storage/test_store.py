"""What every backend does alike: local directory, memory and S3 (a real moto server process)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from urllib.parse import parse_qsl, urlsplit

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from serving.storage.errors import SigningNotSupported
from serving.storage.keys import (
    artifact_key,
    attempt_prefix,
    input_key,
    job_prefix,
    result_key,
)
from serving.storage.opening import open_storage
from tests.serving.storage.conftest import new_bucket

JOB = "video_" + "aa" * 12
OTHER = "video_" + "bb" * 12


def test_put_get_head_delete(storage):
    key = result_key(JOB, 1)
    assert storage.get(key) is None and storage.head(key) is None
    before = time.time()
    assert storage.put(key, b"mp4 bytes") == 9
    assert storage.get(key) == b"mp4 bytes"
    info = storage.head(key)
    assert info.key == key and info.size == 9 and before - 5 < info.modified_at < time.time() + 5
    storage.put(key, b"replaced")
    assert storage.get(key) == b"replaced"
    storage.delete(key)
    assert storage.get(key) is None
    storage.delete(key)  # deleting what is gone is no error


def test_puts_take_buffers_files_and_iterables(storage, tmp_path):
    source = tmp_path / "video.mp4"
    source.write_bytes(b"from a file")
    assert storage.put(result_key(JOB, 1), source) == 11
    assert storage.get(result_key(JOB, 1)) == b"from a file"
    storage.put(result_key(JOB, 2), memoryview(b"a view"))
    assert storage.get(result_key(JOB, 2)) == b"a view"
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert storage.put(result_key(OTHER, 1), array) == 48
    assert storage.get(result_key(OTHER, 1)) == array.tobytes()
    with pytest.raises(ValueError, match="contiguous"):
        storage.put(result_key(OTHER, 2), array[:, ::2])
    chunks = [bytes([i]) * (1 << 20) for i in range(7)]  # 7 MiB in pieces: a multipart upload on S3
    assert storage.put(result_key(JOB, 3), iter(chunks)) == 7 << 20
    assert storage.get(result_key(JOB, 3)) == b"".join(chunks)
    assert storage.head(result_key(JOB, 3)).size == 7 << 20


def test_ranges_and_streams(storage):
    data = bytes(range(256)) * 9000  # 2.3 MB
    key = result_key(JOB, 1)
    storage.put(key, data)
    assert storage.get_range(key, 1000, 10) == data[1000:1010]
    assert storage.get_range(key, len(data) - 3, 100) == data[-3:]
    chunks = list(storage.stream(key, chunk_size=1 << 20))
    assert b"".join(chunks) == data and len(chunks) >= 2
    assert storage.stream(result_key(OTHER, 1)) is None
    assert storage.get_range(result_key(OTHER, 1), 0, 10) is None
    with pytest.raises(ValueError):
        storage.get_range(key, -1, 10)


def test_listing_and_prefix_delete(storage):
    keys = [
        input_key(JOB, "photo"),
        result_key(JOB, 1),
        result_key(JOB, 2),
        artifact_key(JOB, 1, "video_latents"),
        artifact_key(JOB, 2, "video_latents"),
        artifact_key(OTHER, 1, "video_latents"),
    ]
    for key in keys:
        storage.put(key, b"x")
    assert {info.key for info in storage.list()} == set(keys)
    assert {info.key for info in storage.list("artifacts/")} == set(keys[3:])
    assert {info.key for info in storage.list(attempt_prefix("artifacts", JOB, 2))} == {keys[4]}
    assert storage.delete_prefix(job_prefix("artifacts", JOB)) == 2
    assert {info.key for info in storage.list()} == {*keys[:3], keys[5]}
    assert storage.delete_prefix(attempt_prefix("results", JOB, 1)) == 1
    assert storage.delete_prefix(job_prefix("results", JOB)) == 1
    assert {info.key for info in storage.list()} == {keys[0], keys[5]}
    with pytest.raises(ValueError, match="at least an area"):
        storage.delete_prefix("")


@pytest.mark.parametrize(
    "key", ["../escape", "/etc/passwd", f"results/{JOB}/1/../../../x", "results/../inputs", "a\x00b", f"results/{JOB}/1/video.mp4#1"]
)
def test_every_call_refuses_keys_not_of_the_layout(storage, key):
    for call in (
        lambda: storage.put(key, b"x"),
        lambda: storage.get(key),
        lambda: storage.get_range(key, 0, 1),
        lambda: storage.stream(key),
        lambda: storage.head(key),
        lambda: storage.delete(key),
        lambda: storage.list(key),
        lambda: storage.delete_prefix(key),
    ):
        with pytest.raises(ValueError):
            call()
    assert list(storage.list()) == []


def test_concurrent_writers_of_one_key_leave_one_whole_object(storage):
    """Eight writers race on one key while a reader watches: it only ever sees a whole payload."""
    key = artifact_key(JOB, 1, "video_latents")
    payloads = [bytes([i]) * (3 << 20) for i in range(8)]
    seen: list[bytes | None] = []
    writing = threading.Event()

    def read_while_writing():
        while not writing.is_set():
            seen.append(storage.get(key))

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    writers = [threading.Thread(target=storage.put, args=(key, payload)) for payload in payloads]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    writing.set()
    reader.join()
    assert storage.get(key) in payloads
    assert all(value is None or value in payloads for value in seen)
    assert [info.key for info in storage.list()] == [key]


def test_the_async_twins(storage):
    async def scenario():
        key = result_key(JOB, 1)
        assert await storage.get_async(key) is None
        assert await storage.put_async(key, b"0123456789") == 10
        assert await storage.get_async(key) == b"0123456789"
        assert await storage.get_range_async(key, 2, 3) == b"234"
        assert (await storage.head_async(key)).size == 10
        stream = await storage.stream_async(key, chunk_size=4)
        assert b"".join([chunk async for chunk in stream]) == b"0123456789"
        assert await storage.stream_async(result_key(OTHER, 1)) is None
        assert [info.key async for info in storage.list_async("results/")] == [key]
        assert await storage.delete_prefix_async("results/") == 1
        await storage.delete_async(key)
        assert await storage.head_async(key) is None

    asyncio.run(scenario())


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_local_and_memory_stores_cannot_sign(backend, tmp_path):
    storage = open_storage(str(tmp_path) if backend == "local" else "memory://")
    storage.put(result_key(JOB, 1), b"x")
    assert not storage.can_sign
    with pytest.raises(SigningNotSupported):
        storage.signed_url(result_key(JOB, 1), 60)
    with pytest.raises(SigningNotSupported):
        asyncio.run(storage.signed_url_async(result_key(JOB, 1), 60))


def test_local_store_files_are_where_the_key_says(tmp_path):
    storage = open_storage(f"file://{tmp_path}/store")
    storage.put(result_key(JOB, 1), b"mp4")
    assert (tmp_path / "store" / "results" / JOB / "1" / "video.mp4").read_bytes() == b"mp4"
    storage.delete_prefix(job_prefix("results", JOB))
    assert not (tmp_path / "store" / "results" / JOB).exists()  # empty folders go with their last file


def test_a_local_store_ignores_foreign_files(tmp_path):
    storage = open_storage(str(tmp_path))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("not ours")
    storage.put(result_key(JOB, 1), b"x")
    assert [info.key for info in storage.list()] == [result_key(JOB, 1)]
    storage.delete_prefix("results/")
    assert (tmp_path / "results" / "notes.txt").exists()


def test_unknown_store_urls_are_refused():
    for url in ("ftp://host/x", "http://example.com/bucket", "unix:///tmp/redis.sock"):
        with pytest.raises(ValueError, match="storage URL"):
            open_storage(url)


# -- S3 only -----------------------------------------------------------------------------------


def test_s3_objects_land_in_the_bucket_under_the_prefix(s3_storage, s3_server):
    s3_storage.put(result_key(JOB, 1), b"mp4 bytes")
    bucket = s3_storage.url.removeprefix("s3://").split("/")[0]
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == [f"reelserve/results/{JOB}/1/video.mp4"]
    head = s3_server.client().head_object(Bucket=bucket, Key=f"reelserve/results/{JOB}/1/video.mp4")
    assert head["ContentType"] == "video/mp4"


def test_s3_signed_url_downloads_with_plain_httpx(s3_storage):
    data = bytes(range(256)) * 4096
    s3_storage.put(result_key(JOB, 2), data)
    url = s3_storage.signed_url(result_key(JOB, 2), 300)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "video/mp4"
    assert asyncio.run(s3_storage.signed_url_async(result_key(JOB, 2), 60)).startswith(s3_storage.endpoint_url)
    for bad in (0, -5, 7 * 24 * 3600 + 1, 1.5):
        with pytest.raises(ValueError):
            s3_storage.signed_url(result_key(JOB, 2), bad)


def test_s3_credentials_come_from_the_environment(s3_server, monkeypatch):
    """Without the AWS variables the client has no credentials and signs nothing."""
    url = f"s3://{new_bucket(s3_server)}/reelserve"
    open_storage(url, s3_endpoint_url=s3_server.endpoint_url).put(result_key(JOB, 1), b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    signed = open_storage(url, s3_endpoint_url=s3_server.endpoint_url).signed_url(result_key(JOB, 1), 60)
    assert "someone-else" in signed


# -- GCS: no server here; the interface runs on the memory backend above, and signing is checked offline ----


def _service_account(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    account = {
        "type": "service_account",
        "project_id": "reelserve-test",
        "private_key_id": "test",
        "private_key": pem.decode(),
        "client_email": "reelserve@reelserve-test.iam.gserviceaccount.com",
        "token_uri": "http://127.0.0.1:9/token",  # never reached: signing a URL is local
    }
    path = tmp_path / "service-account.json"
    path.write_text(__import__("json").dumps(account))
    return path, key.public_key()


def test_gcs_signed_urls_carry_a_valid_v4_signature(tmp_path, monkeypatch):
    """Credentials from GOOGLE_APPLICATION_CREDENTIALS; the signature verifies against the account's public key."""
    path, public_key = _service_account(tmp_path)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    storage = open_storage("gs://videos/reelserve")
    assert storage.can_sign and storage.backend == "gcs"
    url = storage.signed_url(result_key(JOB, 1), 900)

    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "storage.googleapis.com", f"/videos/reelserve/results/{JOB}/1/video.mp4")
    query = dict(parse_qsl(parts.query))
    assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256" and query["X-Goog-Expires"] == "900"
    unsigned = "&".join(pair for pair in parts.query.split("&") if not pair.startswith("X-Goog-Signature="))
    canonical = f"GET\n{parts.path}\n{unsigned}\nhost:storage.googleapis.com\n\nhost\nUNSIGNED-PAYLOAD"
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["GOOG4-RSA-SHA256", query["X-Goog-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()])
    public_key.verify(bytes.fromhex(query["X-Goog-Signature"]), to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


def test_a_redis_store_cannot_sign_and_never_shows_its_password(redis_url):
    storage = open_storage(redis_url.replace("redis://", "redis://:secret-password@"))
    assert storage.backend == "redis" and not storage.can_sign
    assert "secret-password" not in storage.describe() and "secret-password" not in repr(storage)
    with pytest.raises(SigningNotSupported):
        storage.signed_url(result_key(JOB, 1), 60)


def test_an_attempt_prefix_is_not_a_string_prefix(storage):
    """Attempt 1's prefix does not take in attempts 10..19 (prefixes end at a segment)."""
    storage.put(result_key(JOB, 1), b"one")
    storage.put(result_key(JOB, 10), b"ten")
    assert [info.key for info in storage.list(attempt_prefix("results", JOB, 1))] == [result_key(JOB, 1)]
    assert storage.delete_prefix(attempt_prefix("results", JOB, 1)) == 1
    assert storage.get(result_key(JOB, 10)) == b"ten"
