"""The HTTP body cap, in process (Starlette's TestClient) and on a real uvicorn server with a 200 MB upload."""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from serving.ingress.body_limits import BodySizeLimit, grpc_max_receive_bytes, too_large_body
from serving.ingress.http import error_response, parse_create_request

CAP = 1024 * 1024  # 1 MiB
OVERSIZED = 200 * 1024 * 1024  # what a hostile client sends
CHUNK = 64 * 1024


def make_app() -> tuple[FastAPI, dict]:
    """The ingress's create route as it is today (it catches every error), behind the cap; counts what it read."""
    seen = {"bytes_read": 0, "calls": 0}
    app = FastAPI()
    app.add_middleware(BodySizeLimit, max_body_bytes=CAP)

    @app.post("/v1/videos")
    async def create(request: Request):
        seen["calls"] += 1
        try:
            fields = await parse_create_request(request)
            return JSONResponse({"fields": sorted(fields)})
        except Exception as error:  # noqa: BLE001 -- as the real route does
            return error_response(error)
        finally:
            seen["bytes_read"] += len(getattr(request, "_body", b"") or b"")

    @app.post("/echo-length")
    async def echo(request: Request):
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            seen["bytes_read"] = total
        return {"length": total}

    return app, seen


def _expect_413(response) -> None:
    assert response.status_code == 413
    assert response.json() == {"error": {
        "message": f"body: the request body is larger than {CAP} bytes, the server's limit",
        "type": "invalid_request_error", "param": "body", "code": "request_too_large"}}


def test_a_body_under_the_cap_reaches_the_route_whole():
    app, _ = make_app()
    with TestClient(app) as client:
        assert client.post("/v1/videos", json={"prompt": "a cat", "seconds": 4}).json() == {"fields": ["media", "prompt", "seconds"]}
        assert client.post("/echo-length", content=b"x" * CAP).json() == {"length": CAP}
        assert client.get("/v1/videos").status_code == 405  # other requests untouched


def test_a_declared_length_over_the_cap_is_refused_before_the_route_runs():
    app, seen = make_app()
    with TestClient(app) as client:
        _expect_413(client.post("/v1/videos", content=b"{" + b" " * CAP + b"}", headers={"content-type": "application/json"}))
    assert seen == {"bytes_read": 0, "calls": 0}


def test_a_chunked_body_is_cut_as_it_passes_the_cap_and_the_routes_own_answer_is_dropped():
    app, seen = make_app()

    def chunks():
        for _ in range(40):  # 2.5 MiB with no Content-Length
            yield b"x" * CHUNK

    with TestClient(app) as client:
        _expect_413(client.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"}))
        _expect_413(client.post("/echo-length", content=chunks()))
    # The create route ran, read into the cap and answered 400 on the disconnect: the client got the 413 instead.
    assert seen["calls"] == 1 and seen["bytes_read"] <= CAP + CHUNK


def test_the_body_and_grpc_limit_come_from_one_number():
    assert json.loads(too_large_body(10))["error"]["param"] == "body"
    assert grpc_max_receive_bytes(CAP) == CAP
    with pytest.raises(ValueError, match="max_body_bytes: 0; must be at least 1"):
        BodySizeLimit(make_app()[0], max_body_bytes=0)


# ------------------------------------------------------------------ a real server, a 200 MB upload


@pytest.fixture(scope="module")
def server():
    app, seen = make_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield sock.getsockname(), seen
    instance.should_exit = True
    thread.join(timeout=10)


def _upload(address, head: bytes, body_chunks) -> dict:
    """Send ``head`` then the chunks until the server answers or hangs up; what the client saw, and when."""
    started = time.perf_counter()
    sent = 0
    answer = b""
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(head)
        for chunk in body_chunks:
            if select.select([client], [], [], 0)[0]:
                break  # the server answered (or hung up) while we were still sending
            try:
                client.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        try:
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 150:
                part = client.recv(65536)
                if not part:
                    break
                answer += part
        except (ConnectionResetError, TimeoutError):
            pass
    return {"seconds": time.perf_counter() - started, "sent": sent, "answer": answer}


def _lazy_chunked(total: int):
    frame = f"{CHUNK:x}\r\n".encode() + b"x" * CHUNK + b"\r\n"  # made once: the 200 MB never exists in memory
    for _ in range(total // CHUNK):
        yield frame
    yield b"0\r\n\r\n"


def test_a_200_mb_streamed_body_is_refused_after_the_cap_without_reading_it(server):
    address, seen = server
    head = (b"POST /echo-length HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    result = _upload(address, head, _lazy_chunked(OVERSIZED))
    assert result["sent"] < OVERSIZED / 10, "the client could send most of the body: the server kept reading"
    assert seen["bytes_read"] <= CAP + CHUNK
    assert result["seconds"] < 5
    if result["answer"]:  # the 413 normally arrives; a reset racing it is the only other outcome
        assert result["answer"].startswith(b"HTTP/1.1 413 ")
        assert b'"code": "request_too_large"' in result["answer"]


def test_a_200_mb_declared_body_is_refused_on_its_headers(server):
    address, seen = server
    before = seen["calls"]
    head = (b"POST /v1/videos HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {OVERSIZED}\r\n\r\n".encode())
    result = _upload(address, head, (b"x" * CHUNK for _ in range(OVERSIZED // CHUNK)))
    assert result["answer"].startswith(b"HTTP/1.1 413 ") and seen["calls"] == before
    assert result["sent"] < OVERSIZED / 10 and result["seconds"] < 5
