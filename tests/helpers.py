"""Small helpers shared by test modules."""

from __future__ import annotations

import socket
import subprocess
import time

import redis

__all__ = ["free_port", "wait_for_redis"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_redis(process: subprocess.Popen, url: str, timeout_s: float = 15) -> None:
    """Until the redis-server ``process`` answers PING at ``url``; fails if it exits or stays silent."""
    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            assert process.poll() is None, f"redis-server exited early with code {process.returncode}"
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"redis-server did not answer PING within {timeout_s:g} s"
            time.sleep(0.05)
    finally:
        client.close()
