"""A small gRPC client for ``reelserve generate --address``: create, watch, download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import grpc

from serving.proto import video_pb2, video_pb2_grpc

__all__ = ["RemoteGenerator", "RemoteError", "API_KEY_ENV", "api_key_metadata"]

_MAX_MESSAGE = 8 * 1024 * 1024
API_KEY_ENV = "REELSERVE_API_KEY"  # the API key clients send (when the server has `auth:`), never a flag


def api_key_metadata(environ=None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``$REELSERVE_API_KEY`` as a bearer token (empty when unset)."""
    key = (os.environ if environ is None else environ).get(API_KEY_ENV, "").strip()
    return (("authorization", f"Bearer {key}"),) if key else ()


class RemoteError(Exception):
    """The server refused or failed the job; ``code`` is the gRPC status (or None for a failed job)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class RemoteGenerator:
    def __init__(self, address: str):
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", _MAX_MESSAGE)])
        self._stub = video_pb2_grpc.VideoServiceStub(self._channel)
        self._metadata = api_key_metadata()
        self.address = address

    def wait_ready(self, timeout_s: float = 10) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise RemoteError(f"cannot reach a reelserve gRPC server at {self.address}") from None

    def create(self, **fields) -> video_pb2.Video:
        request = video_pb2.CreateVideoRequest(**{k: v for k, v in fields.items() if v is not None})
        return self._call(self._stub.CreateVideo, request)

    def watch(self, job_id: str, on_event: Callable[[video_pb2.Video], None]) -> video_pb2.Video:
        last = None
        try:
            for event in self._stub.WatchVideo(video_pb2.WatchVideoRequest(id=job_id), metadata=self._metadata):
                last = event.video
                on_event(last)
        except grpc.RpcError as error:
            raise RemoteError(error.details() or str(error.code()), error.code()) from None
        return last

    def download(self, job_id: str, out: Path) -> int:
        partial = out.with_name(out.name + ".partial")
        written = 0
        try:
            with open(partial, "wb") as handle:
                for chunk in self._stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=job_id),
                                                       metadata=self._metadata):
                    handle.write(chunk.data)
                    written += len(chunk.data)
        except grpc.RpcError as error:
            partial.unlink(missing_ok=True)
            raise RemoteError(error.details() or str(error.code()), error.code()) from None
        partial.replace(out)
        return written

    def cancel(self, job_id: str) -> None:
        self._call(self._stub.CancelVideo, video_pb2.CancelVideoRequest(id=job_id))

    def _call(self, method, request):
        try:
            return method(request, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RemoteError(error.details() or str(error.code()), error.code()) from None

    def close(self) -> None:
        self._channel.close()
