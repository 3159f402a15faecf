"""Submitting a job and following it to its end, over gRPC (WatchVideo) or HTTP (polling).

Both clients are asyncio-native (grpc.aio, httpx), so one process drives hundreds of
concurrent jobs without threads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from serving.client import api_key_metadata
from serving.loadtest.mix import RequestShape

__all__ = ["Refused", "SubmitFailed", "Outcome", "GrpcJobClient", "HttpJobClient", "make_client"]


class Refused(Exception):
    """The server refused the job by backpressure (gRPC RESOURCE_EXHAUSTED / HTTP 429)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class SubmitFailed(Exception):
    """Creating the job failed for another reason; ``code`` names it (e.g. invalid_argument, unavailable)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class Outcome:
    """How a followed job ended."""

    status: str  # completed, failed, cancelled, unfinished
    code: str | None = None  # error code when not completed
    stage_seconds: dict[str, float] = field(default_factory=dict)
    first_progress_at: float | None = None  # monotonic time of the first progress event


ProgressListener = Callable[[], None]


class GrpcJobClient:
    """CreateVideo, then WatchVideo until the last event (GetVideo polling if the stream breaks)."""

    def __init__(self, address: str):
        import grpc  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for the gRPC client)

        from serving.proto import video_pb2_grpc  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for the gRPC client)

        self._grpc = grpc
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = video_pb2_grpc.VideoServiceStub(self._channel)
        self._metadata = api_key_metadata()

    async def submit(self, shape: RequestShape, seed: int) -> str:
        from serving.proto import video_pb2  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for the gRPC client)

        fields: dict[str, Any] = dict(prompt=shape.prompt, seed=seed)
        if shape.size:
            fields["size"] = shape.size
        if shape.seconds:
            fields["seconds"] = shape.seconds
        if shape.enhance_prompt is not None:
            fields["enhance_prompt"] = shape.enhance_prompt
        photo = shape.photo_bytes()
        if photo is not None:
            fields["image"] = photo
        if shape.model:
            fields["model"] = shape.model
        for name, kind, data in shape.media_files():
            if name == "last_frame":
                fields["last_frame"] = data
            else:
                fields.setdefault("references", []).append(
                    video_pb2.Reference(kind=video_pb2.Reference.Kind.Value(kind.upper()), data=data))
        try:
            video = await self._stub.CreateVideo(video_pb2.CreateVideoRequest(**fields), timeout=60,
                                                metadata=self._metadata)
        except self._grpc.aio.AioRpcError as error:
            code = error.code().name.lower()
            if error.code() == self._grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Refused(code) from None
            raise SubmitFailed(code, error.details() or "") from None
        return video.id

    async def follow(self, job_id: str, deadline: float) -> Outcome:
        from serving.proto import video_pb2  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for the gRPC client)

        first_progress = None
        last = None
        try:
            stream = self._stub.WatchVideo(
                video_pb2.WatchVideoRequest(id=job_id), timeout=max(1.0, deadline - time.monotonic()),
                metadata=self._metadata,
            )
            async for event in stream:
                last = event.video
                if first_progress is None and _started(last.status, last.progress):
                    first_progress = time.monotonic()
        except self._grpc.aio.AioRpcError:
            pass  # stream cut or deadline: look at the job directly below
        while last is None or not _grpc_terminal(last.status):
            if time.monotonic() >= deadline:
                return Outcome("unfinished", "unfinished", first_progress_at=first_progress)
            try:
                last = await self._stub.GetVideo(video_pb2.GetVideoRequest(id=job_id), timeout=30,
                                                 metadata=self._metadata)
            except self._grpc.aio.AioRpcError as error:
                return Outcome("failed", error.code().name.lower(), first_progress_at=first_progress)
            if first_progress is None and _started(last.status, last.progress):
                first_progress = time.monotonic()
            if not _grpc_terminal(last.status):
                await asyncio.sleep(0.5)
        status = video_pb2.VideoStatus.Name(last.status).lower()
        code = None if status == "completed" else (last.error.code or status)
        return Outcome(status, code, dict(last.stage_seconds), first_progress)

    async def cancel(self, job_id: str) -> None:
        from serving.proto import video_pb2  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for the gRPC client)

        try:
            await self._stub.CancelVideo(video_pb2.CancelVideoRequest(id=job_id), timeout=10,
                                           metadata=self._metadata)
        except self._grpc.aio.AioRpcError:
            pass

    async def close(self) -> None:
        await self._channel.close()


def _started(status: int, progress: int) -> bool:
    from serving.proto import video_pb2  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for the gRPC client)

    return progress > 0 or status != video_pb2.QUEUED


def _grpc_terminal(status: int) -> bool:
    from serving.proto import video_pb2  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for the gRPC client)

    return status in (video_pb2.COMPLETED, video_pb2.FAILED, video_pb2.CANCELLED, video_pb2.EXPIRED)


class HttpJobClient:
    """``POST /v1/videos`` (multipart with the photo), then ``GET /v1/videos/{id}`` every ``poll_s``."""

    def __init__(self, address: str, poll_s: float = 0.5):
        import httpx  # noqa: PLC0415 - httpx is not a declared dependency; only this client needs it

        self._httpx = httpx
        base = address if address.startswith(("http://", "https://")) else f"http://{address}"
        key = dict(api_key_metadata()).get("authorization")
        self._client = httpx.AsyncClient(base_url=base.rstrip("/"), timeout=60, limits=httpx.Limits(max_connections=None),
                                         headers={"Authorization": key} if key else None)
        self._poll_s = poll_s

    async def submit(self, shape: RequestShape, seed: int) -> str:
        fields = {"prompt": shape.prompt, "seed": str(seed)}
        if shape.size:
            fields["size"] = shape.size
        if shape.seconds:
            fields["seconds"] = f"{shape.seconds:g}"
        if shape.enhance_prompt is not None:
            fields["enhance_prompt"] = "true" if shape.enhance_prompt else "false"
        if shape.model:
            fields["model"] = shape.model
        photo = shape.photo_bytes()
        files = [("input_reference", ("photo.jpg", photo, "image/jpeg"))] if photo is not None else []
        files += [(name, (f"{name}-{index}", data, "application/octet-stream"))
                  for index, (name, _, data) in enumerate(shape.media_files())]
        try:
            if files:
                response = await self._client.post("/v1/videos", data=fields, files=files)
            else:
                response = await self._client.post("/v1/videos", json=fields)
        except self._httpx.HTTPError as error:
            raise SubmitFailed("connection_error", str(error)) from None
        if response.status_code == 429:
            raise Refused("http_429")
        if response.status_code != 200:
            raise SubmitFailed(f"http_{response.status_code}", response.text[:200])
        return response.json()["id"]

    async def follow(self, job_id: str, deadline: float) -> Outcome:
        first_progress = None
        while True:
            try:
                response = await self._client.get(f"/v1/videos/{job_id}")
            except self._httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                video = response.json()
                if first_progress is None and (video["progress"] > 0 or video["status"] != "queued"):
                    first_progress = time.monotonic()
                if video["status"] in ("completed", "failed"):
                    error = video.get("error") or {}
                    status = "cancelled" if error.get("code") == "cancelled" else video["status"]
                    code = None if status == "completed" else (error.get("code") or status)
                    return Outcome(status, code, dict(video.get("stage_seconds") or {}), first_progress)
            elif response is not None and response.status_code == 404:
                return Outcome("failed", "not_found", first_progress_at=first_progress)
            if time.monotonic() >= deadline:
                return Outcome("unfinished", "unfinished", first_progress_at=first_progress)
            await asyncio.sleep(self._poll_s)

    async def cancel(self, job_id: str) -> None:
        try:
            await self._client.delete(f"/v1/videos/{job_id}")
        except self._httpx.HTTPError:
            pass

    async def close(self) -> None:
        await self._client.aclose()


def make_client(protocol: str, address: str):
    if protocol == "grpc":
        return GrpcJobClient(address)
    if protocol == "http":
        return HttpJobClient(address)
    raise ValueError(f"--protocol: '{protocol}' is not allowed; use grpc or http")
