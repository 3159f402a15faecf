"""A real S3 API server for tests: moto's server mode, run as a separate process on a free port.

The client under test (obstore) talks HTTP to it as to any S3-compatible
store. Two kinds of outage:

- ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT): the port stays open but
  nothing answers, as a hung or partitioned server; every object is kept.
- ``stop()`` / ``start()``: the port refuses connections. moto keeps its
  objects in memory only, so a stopped server loses them; ``stop(keep_data=True)``
  (the default) copies every bucket, object and lifecycle rule out first and
  ``start()`` puts them back, so a restart behaves like a durable store's.
  Writes attempted while it is down are lost, as they would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.helpers import free_port

__all__ = ["CREDENTIALS", "S3Server"]

# moto accepts any credentials; these are what every client in the tests uses.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "reelserve-test",
    "AWS_SECRET_ACCESS_KEY": "reelserve-test-secret",
    "AWS_REGION": "us-east-1",
}


@dataclass
class _Snapshot:
    objects: dict[str, dict[str, tuple[bytes, str]]] = field(default_factory=dict)  # bucket -> key -> (body, type)
    lifecycle: dict[str, list] = field(default_factory=dict)  # bucket -> rules


class S3Server:
    """One moto S3 server process; ``endpoint_url`` stays the same across restarts."""

    def __init__(self, port: int | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path or os.devnull
        self._process: subprocess.Popen | None = None
        self._snapshot: _Snapshot | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and wait until it answers; restore what ``stop(keep_data=True)`` kept."""
        assert self._process is None, "already running"
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **CREDENTIALS},
            )
        self._wait_until_up(timeout_s)
        if self._snapshot is not None:
            self._restore(self._snapshot)
            self._snapshot = None

    def stop(self, keep_data: bool = True) -> None:
        """Stop the process (connections are refused from now on), keeping its data for ``start`` if asked."""
        if self._process is None:
            return
        self.resume()
        if keep_data:
            self._snapshot = self._take_snapshot()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self, keep_data: bool = True) -> None:
        self.stop(keep_data=keep_data)
        self.start()

    def pause(self) -> None:
        """Freeze the server: connections open, nothing answers."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    @contextmanager
    def down(self, how: str = "pause"):
        """The server unreachable inside the block (``pause``: hung; ``stop``: refused), back after it."""
        if how == "pause":
            self.pause()
        else:
            self.stop(keep_data=True)
        try:
            yield
        finally:
            if how == "pause":
                self.resume()
            else:
                self.start()

    def client(self):
        """A boto3 S3 client for fixtures and for looking at what the code under test wrote."""
        import boto3  # noqa: PLC0415 - keeps collection of `make check` fast

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    # -- internals --------------------------------------------------------------------------------

    def _wait_until_up(self, timeout_s: float) -> None:
        import httpx  # noqa: PLC0415 - keeps collection of `make check` fast

        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            assert code is None, f"the moto server exited early with code {code} (see {self._log_path})"
            try:
                if httpx.get(f"{self.endpoint_url}/moto-api/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the moto server did not answer within {timeout_s:g} s"
            time.sleep(0.1)

    def _take_snapshot(self) -> _Snapshot:
        s3 = self.client()
        snapshot = _Snapshot()
        for bucket in s3.list_buckets()["Buckets"]:
            name = bucket["Name"]
            keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name) for o in page.get("Contents", [])]
            snapshot.objects[name] = {}
            for key in keys:
                got = s3.get_object(Bucket=name, Key=key)
                snapshot.objects[name][key] = (got["Body"].read(), got["ContentType"])
            try:
                snapshot.lifecycle[name] = s3.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]
            except s3.exceptions.ClientError:
                pass
        return snapshot

    def _restore(self, snapshot: _Snapshot) -> None:
        s3 = self.client()
        for bucket, objects in snapshot.objects.items():
            s3.create_bucket(Bucket=bucket)
            for key, (body, content_type) in objects.items():
                s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
            if bucket in snapshot.lifecycle:
                s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": snapshot.lifecycle[bucket]})
