"""The HTTP body cap: 413 before a body is read, and as soon as a chunked body grows past the cap.

``BodySizeLimit`` wraps the FastAPI app (``app.add_middleware(BodySizeLimit, max_body_bytes=...)``):

- a ``Content-Length`` over the cap is answered 413 at once; not one body byte is read;
- a body without a length (chunked) is counted as it arrives: when it passes the cap the
  client gets 413, the app sees a disconnect, and nothing beyond the cap plus one chunk
  was ever held. The server then closes the connection (the rest of the upload is not read).

The answer is the OpenAI error shape the API uses elsewhere. gRPC has its own knob: the
server's maximum receive size should be set from the same cap (``grpc_max_receive_bytes``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["BodySizeLimit", "too_large_body", "grpc_max_receive_bytes", "DEFAULT_MAX_BODY_BYTES"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a 25 MB photo plus the form around it


def too_large_body(max_body_bytes: int) -> bytes:
    """The 413 body: OpenAI's error shape, naming the limit."""
    return json.dumps({"error": {
        "message": f"body: the request body is larger than {max_body_bytes} bytes, the server's limit",
        "type": "invalid_request_error",
        "param": "body",
        "code": "request_too_large",
    }}).encode()


def grpc_max_receive_bytes(max_body_bytes: int) -> int:
    """The gRPC server's ``grpc.max_receive_message_length`` for the same cap (a message carries the same photo)."""
    return max_body_bytes


class BodySizeLimit:
    """ASGI middleware capping request bodies at ``max_body_bytes``."""

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: {max_body_bytes}; must be at least 1")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send)  # answered on the headers alone
            return
        await _LimitedRequest(self, receive, send).run(scope)

    async def _refuse(self, send: Send) -> None:
        body = too_large_body(self.max_body_bytes)
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})


class _LimitedRequest:
    """One request whose body is counted as the app reads it."""

    def __init__(self, limit: BodySizeLimit, receive: Receive, send: Send):
        self.limit, self._receive, self._send = limit, receive, send
        self.received = 0
        self.refused = False  # we answered 413: the app's own answer is dropped
        self.app_started = False

    async def run(self, scope: Scope) -> None:
        try:
            await self.limit.app(scope, self.receive, self.send)
        except Exception:
            if not self.refused:
                raise
            # The app failed on the disconnect we gave it after answering 413; the client has its answer.

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.max_body_bytes:
                self.refused = True
                if not self.app_started:
                    await self.limit._refuse(self._send)
                return {"type": "http.disconnect"}  # the app stops reading: the body is never held whole
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.app_started = True
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before the app runs
    return None
