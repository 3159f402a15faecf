"""Storage fixtures: a real S3 API server process (moto) for the session, and one store per backend.

Every S3 test gets a bucket of its own on the one server, so tests never see
each other's objects. Credentials reach the client the way they do in
production: through the standard AWS environment variables
(``aws_environment`` and ``s3_server`` live in ``tests/serving/conftest.py``).
"""

from __future__ import annotations

import pytest

from serving.storage.opening import open_storage
from serving.storage.store import Storage
from tests.serving.conftest import new_bucket


@pytest.fixture
def s3_storage(s3_server) -> Storage:
    """An S3 store under a prefix of a fresh bucket."""
    return open_storage(f"s3://{new_bucket(s3_server)}/reelserve", s3_endpoint_url=s3_server.endpoint_url)


@pytest.fixture(params=["local", "memory", "s3", "redis"])
def storage(request, tmp_path) -> Storage:
    """Each backend in turn: what every backend must do alike."""
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    if request.param == "memory":
        return open_storage("memory://")
    if request.param == "redis":
        storage = open_storage(request.getfixturevalue("redis_url"))  # a real redis-server for the module
        storage._redis.flushdb()
        return storage
    return request.getfixturevalue("s3_storage")
