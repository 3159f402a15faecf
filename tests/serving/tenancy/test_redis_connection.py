"""The job store's Redis password comes from the environment; a server that wants one refuses clients without it."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from serving.errors import StoreUnavailable
from serving.tenancy.redis_connection import connect_redis, redis_auth_options, unavailable_on_redis_errors
from tests.helpers import free_port


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--requirepass", "s3cret", "--dir", str(tmp_path_factory.mktemp("r"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url, password="s3cret").ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_the_password_comes_from_the_environment_unless_the_url_holds_one(monkeypatch):
    monkeypatch.setenv("REELSERVE_REDIS_PASSWORD", "s3cret")
    assert redis_auth_options("redis://host:6380/1") == {"password": "s3cret"}
    assert redis_auth_options("redis://:other@host:6380/1") == {}
    monkeypatch.delenv("REELSERVE_REDIS_PASSWORD")
    assert redis_auth_options("redis://host:6380/1") == {}


def test_a_client_with_the_password_gets_in_and_one_without_gets_store_unavailable(monkeypatch, redis_with_password):
    monkeypatch.delenv("REELSERVE_REDIS_PASSWORD", raising=False)
    ping = unavailable_on_redis_errors(lambda client: client.ping())
    with pytest.raises(StoreUnavailable, match="the job store \\(Redis\\) is unreachable: AuthenticationError"):
        ping(connect_redis(redis_with_password))
    monkeypatch.setenv("REELSERVE_REDIS_PASSWORD", "s3cret")
    assert ping(connect_redis(redis_with_password)) is True
    with pytest.raises(ValueError, match="jobs.redis_url: required for the redis backend"):
        connect_redis(None)
