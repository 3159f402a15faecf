"""How a store fails: unreachable (bounded, never a hang, then back), full, refused."""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from serving.errors import StoreUnavailable
from serving.storage.errors import StorageError, StorageFull, StorageUnavailable
from serving.storage.keys import result_key
from serving.storage.opening import open_storage
from tests.helpers import free_port, wait_for_redis
from tests.serving.storage.conftest import new_bucket

JOB = "video_" + "cc" * 12
REPO_ROOT = Path(__file__).resolve().parents[3]

# Tight client limits, so an outage shows within a few seconds: (1 try + 1 retry) x 1 s, plus backoff.
QUICK = {"connect_timeout_s": 1.0, "read_timeout_s": 1.0, "retry_timeout_s": 1.0, "max_retries": 1}
BOUND_S = 6.0


def test_the_error_kinds():
    assert issubclass(StorageUnavailable, StoreUnavailable)  # handled like the job store's outage: 503, retry
    assert not issubclass(StorageFull, StoreUnavailable)  # retrying does not make room: the job fails
    assert issubclass(StorageFull, StorageError) and issubclass(StorageUnavailable, StorageError)
    # what a client may see names no path, bucket or endpoint
    assert StorageFull("put 'results/x' on /data/results: os error 28").client_message == "storage is full"
    assert "127.0.0.1" not in StorageUnavailable("GET http://127.0.0.1:9100/videos/x").client_message


def _timed(call):
    start = time.monotonic()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - returned for the assertions
        return error, time.monotonic() - start
    return None, time.monotonic() - start


def test_a_hung_server_fails_calls_within_a_bound_and_then_serves_again(s3_server):
    storage = open_storage(f"s3://{new_bucket(s3_server)}/reelserve", s3_endpoint_url=s3_server.endpoint_url, **QUICK)
    storage.put(result_key(JOB, 1), b"before")
    calls = {
        "put": lambda: storage.put(result_key(JOB, 2), b"during"),
        "get": lambda: storage.get(result_key(JOB, 1)),
        "head": lambda: storage.head(result_key(JOB, 1)),
        "list": lambda: list(storage.list("results/")),
        "sign": lambda: storage.signed_url(result_key(JOB, 1), 60),  # signing is local: works while down
    }
    with s3_server.down("pause"), ThreadPoolExecutor(len(calls)) as pool:
        outcomes = dict(zip(calls, pool.map(_timed, calls.values())))
    for name in ("put", "get", "head", "list"):
        error, seconds = outcomes[name]
        assert isinstance(error, StorageUnavailable), (name, error)
        assert seconds < BOUND_S, (name, seconds)
        assert "unreachable" in str(error)
    assert outcomes["sign"][0] is None
    assert storage.get(result_key(JOB, 1)) == b"before"
    storage.put(result_key(JOB, 2), b"after")
    assert storage.get(result_key(JOB, 2)) == b"after"


def test_a_stopped_server_refuses_at_once_and_keeps_its_objects_across_the_restart(s3_server):
    storage = open_storage(f"s3://{new_bucket(s3_server)}/reelserve", s3_endpoint_url=s3_server.endpoint_url, **QUICK)
    storage.put(result_key(JOB, 1), b"kept")
    with s3_server.down("stop"):
        for call in (lambda: storage.get(result_key(JOB, 1)), lambda: storage.put(result_key(JOB, 3), b"lost")):
            error, seconds = _timed(call)
            assert isinstance(error, StorageUnavailable) and seconds < BOUND_S
    assert storage.get(result_key(JOB, 1)) == b"kept"
    assert storage.get(result_key(JOB, 3)) is None
    assert httpx.get(storage.signed_url(result_key(JOB, 1), 60)).headers["content-type"] == "video/mp4"


def test_async_calls_are_bounded_too(s3_server):
    storage = open_storage(f"s3://{new_bucket(s3_server)}/reelserve", s3_endpoint_url=s3_server.endpoint_url, **QUICK)

    async def both():
        return await asyncio.gather(
            storage.put_async(result_key(JOB, 1), b"x"), storage.get_async(result_key(JOB, 1)), return_exceptions=True
        )

    with s3_server.down("pause"):
        start = time.monotonic()
        outcomes = asyncio.run(both())
        assert time.monotonic() - start < BOUND_S
    assert all(isinstance(outcome, StorageUnavailable) for outcome in outcomes), outcomes


# -- full stores ---------------------------------------------------------------------------------


def test_a_full_local_disk_is_storage_full_and_leaves_no_partial_file(tmp_path):
    """A real full file system: a 1 MiB tmpfs, mounted in a private mount namespace (no root needed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    script = textwrap.dedent(
        f"""
        import os
        from serving.storage.opening import open_storage
        from serving.storage.keys import result_key
        storage = open_storage({str(mount / "store")!r})
        storage.put(result_key({JOB!r}, 1), b"fits")
        try:
            storage.put(result_key({JOB!r}, 2), b"x" * (2 << 20))
        except Exception as error:
            print(type(error).__name__, error)
        left = sorted(p for _, _, files in os.walk({str(mount)!r}) for p in files)
        print("files:", left)
        """
    )
    command = ["unshare", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$1" -c "$2"']
    done = subprocess.run(
        [*command, str(mount), sys.executable, script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr
    first, files = done.stdout.strip().splitlines()
    assert first.startswith("StorageFull") and "no room" in first
    assert files == "files: ['video.mp4']"  # the failed put left no staging file behind


class _AnsweringServer(http.server.ThreadingHTTPServer):
    """An HTTP endpoint that answers every S3 request with one fixed error, as a store over quota does."""

    answer: tuple[int, str] = (500, "InternalError")


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, code = self.server.answer
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>m</Message></Error>'.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def answering_server():
    server = _AnsweringServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "QuotaExceeded", StorageFull),  # Ceph RGW over its bucket quota
        (507, "XMinioStorageFull", StorageFull),  # MinIO out of disk
        (400, "XMinioAdminBucketQuotaExceeded", StorageFull),  # MinIO bucket quota
        (400, "EntityTooLarge", StorageFull),
        (503, "SlowDown", StorageUnavailable),
        (500, "InternalError", StorageUnavailable),
        (429, "TooManyRequests", StorageUnavailable),
        (403, "AccessDenied", StorageError),
        (400, "InvalidArgument", StorageError),
    ],
)
def test_store_answers_map_to_error_kinds(answering_server, aws_environment, status, code, expected):
    answering_server.answer = (status, code)
    endpoint = f"http://127.0.0.1:{answering_server.server_port}"
    storage = open_storage("s3://bucket/reelserve", s3_endpoint_url=endpoint, **QUICK)
    with pytest.raises(StorageError) as raised:
        storage.put(result_key(JOB, 1), b"x")
    assert type(raised.value) is expected, raised.value
    assert result_key(JOB, 1) in str(raised.value)


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A redis-server for this module's Redis tests (they pause it and fill it; each puts it back)."""
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_redis(process, url)
    yield process, url
    os.kill(process.pid, signal.SIGCONT)
    process.terminate()
    process.wait(timeout=10)


def test_redis_over_its_maxmemory_is_storage_full(own_redis):
    _, url = own_redis
    storage = open_storage(url)
    storage._redis.config_set("maxmemory-policy", "noeviction")
    storage._redis.config_set("maxmemory", "4mb")
    try:
        storage.put(result_key(JOB, 1), b"x" * 1000)
        with pytest.raises(StorageFull, match="maxmemory"):
            for attempt in range(2, 20):
                storage.put(result_key(JOB, attempt), b"x" * (1 << 20))
    finally:
        storage._redis.config_set("maxmemory", "0")
        storage._redis.flushdb()


def test_redis_hung_is_storage_unavailable_within_a_bound(own_redis):
    process, url = own_redis
    storage = open_storage(url, connect_timeout_s=1.0, read_timeout_s=1.0)
    storage.put(result_key(JOB, 1), b"kept")
    os.kill(process.pid, signal.SIGSTOP)
    try:
        error, seconds = _timed(lambda: storage.get(result_key(JOB, 1)))
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert isinstance(error, StorageUnavailable) and seconds < BOUND_S
    assert storage.get(result_key(JOB, 1)) == b"kept"


def test_redis_gone_is_storage_unavailable_at_once():
    storage = open_storage(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=1.0, read_timeout_s=1.0)
    error, seconds = _timed(lambda: storage.put(result_key(JOB, 2), b"x"))
    assert isinstance(error, StorageUnavailable) and seconds < BOUND_S
