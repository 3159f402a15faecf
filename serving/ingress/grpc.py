"""The gRPC ``reelserve.v1.VideoService`` methods, served through Ray Serve's gRPC proxy.

Every error maps to a status code and a clean message; nothing uncaught
escapes (Ray would send the traceback as the details).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from serving.errors import InvalidRequest, NotFound, NotReady, Overloaded, StoreUnavailable
from serving.ingress.client_media import ClientMedia
from serving.jobs.record import JobRecord
from serving.proto import video_pb2
from serving.storage.errors import StorageFull, StorageUnavailable
from serving.tenancy.auth import Tenant
from serving.tenancy.errors import IdempotencyConflict, Unauthenticated

if TYPE_CHECKING:
    from serving.ingress.service import VideoService

__all__ = ["GrpcVideoMethods", "to_proto"]

logger = logging.getLogger("ray.serve.reelserve.grpc")

_STATUS = {0: video_pb2.QUEUED, 1: video_pb2.IN_PROGRESS, 2: video_pb2.COMPLETED, 3: video_pb2.FAILED,
           4: video_pb2.CANCELLED, 5: video_pb2.EXPIRED}
_PRIORITY = ("low", "normal", "high")


def to_proto(record: JobRecord, queue: dict | None = None) -> video_pb2.Video:
    queue = queue or {}
    video = video_pb2.Video(
        id=record.id, status=_STATUS[int(record.status)], progress=record.progress, stage=record.stage,
        step=record.step, total_steps=record.total_steps, model=record.model, prompt=record.prompt,
        seconds=record.seconds, size=record.size, fps=record.fps, seed=record.seed, created_at=record.created_at,
        completed_at=record.completed_at or 0.0, result_bytes=record.result_bytes,
        enhance_prompt=record.enhance_prompt, revised_prompt=record.revised_prompt or "",
        prompt_rewrite_fallback=record.rewrite_fallback or "", attempts=record.attempts,
        priority=_PRIORITY[max(0, min(record.priority, 2))], expires_at=record.expires_at or 0.0,
    )
    if queue.get("queue_position") is not None:
        video.queue_position = queue["queue_position"]
    if queue.get("estimated_start_at") is not None:
        video.estimated_start_at = queue["estimated_start_at"]
    if record.resumed_from_step is not None:
        video.resumed_from_step = record.resumed_from_step
    if record.error_code:
        video.error.code = record.error_code
        video.error.message = record.error_message or ""
    video.stage_seconds.update(record.stage_seconds)
    return video


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    if isinstance(error, IdempotencyConflict):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, NotReady):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error} (retry after {error.retry_after_s} s)"
    if isinstance(error, StorageUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "storage is unreachable right now; retry shortly"
    if isinstance(error, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "the job store is unreachable right now; retry shortly"
    if isinstance(error, StorageFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "storage is full; retry later"
    logger.exception("unexpected error in a gRPC call")
    return grpc.StatusCode.INTERNAL, "internal error"


class _Fail(Exception):
    """Raised after the status is set on the context, so a stream ends with that status."""


def _set_error(grpc_context, error: Exception) -> None:
    code, details = _status_of(error)
    grpc_context.set_code(code)
    grpc_context.set_details(details)


class GrpcVideoMethods:
    """Mixed into the ingress deployment; expects ``self.service`` (a ``VideoService``)."""

    service: VideoService

    def _grpc_tenant(self, grpc_context) -> Tenant:
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else None
        return self.service.gate.authenticate_grpc(metadata)

    async def _proto(self, record: JobRecord) -> video_pb2.Video:
        return to_proto(record, await self.service.queue_of(record))

    async def CreateVideo(self, request: video_pb2.CreateVideoRequest, grpc_context=None) -> video_pb2.Video:
        try:
            tenant = self._grpc_tenant(grpc_context)
            record = await self.service.create(
                tenant,
                prompt=request.prompt,
                image=request.image or None,
                seconds=request.seconds or None,
                size=request.size or None,
                fps=request.fps or None,
                seed=request.seed if request.HasField("seed") else None,
                negative_prompt=request.negative_prompt if request.HasField("negative_prompt") else None,
                model=request.model or None,
                enhance_prompt=request.enhance_prompt if request.HasField("enhance_prompt") else None,
                priority=request.priority or None,
                callback_url=request.callback_url or None,
                idempotency_key=request.idempotency_key or None,
                media=_media_of(request),
                num_inference_steps=request.num_inference_steps if request.HasField("num_inference_steps") else None,
                guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
                num_frames=request.num_frames if request.HasField("num_frames") else None,
            )
            return await self._proto(record)
        except Exception as error:  # noqa: BLE001
            _set_error(grpc_context, error)
            return video_pb2.Video()

    async def GetVideo(self, request: video_pb2.GetVideoRequest, grpc_context=None) -> video_pb2.Video:
        try:
            record = await self.service.get(request.id, self._grpc_tenant(grpc_context))
            video = await self._proto(record)
            video.download_url = await self.service.download_url(record)
            return video
        except Exception as error:  # noqa: BLE001
            _set_error(grpc_context, error)
            return video_pb2.Video()

    async def CancelVideo(self, request: video_pb2.CancelVideoRequest, grpc_context=None) -> video_pb2.Video:
        try:
            return await self._proto(await self.service.cancel(request.id, self._grpc_tenant(grpc_context)))
        except Exception as error:  # noqa: BLE001
            _set_error(grpc_context, error)
            return video_pb2.Video()

    async def ListVideos(self, request: video_pb2.ListVideosRequest, grpc_context=None) -> video_pb2.ListVideosResponse:
        try:
            tenant = self._grpc_tenant(grpc_context)
            records, has_more = await self.service.list(
                tenant, request.after or None, request.limit or 20, request.order or "desc"
            )
            return video_pb2.ListVideosResponse(videos=[await self._proto(r) for r in records], has_more=has_more)
        except Exception as error:  # noqa: BLE001
            _set_error(grpc_context, error)
            return video_pb2.ListVideosResponse()

    async def WatchVideo(self, request: video_pb2.WatchVideoRequest, grpc_context=None):
        try:
            async for record, heartbeat in self.service.watch(request.id, self._grpc_tenant(grpc_context)):
                yield video_pb2.VideoEvent(video=await self._proto(record), heartbeat=heartbeat)
        except Exception as error:  # noqa: BLE001
            _set_error(grpc_context, error)
            raise _Fail() from None  # a stream must raise after setting the code, or the client sees OK

    async def DownloadVideo(self, request: video_pb2.DownloadVideoRequest, grpc_context=None):
        try:
            async for offset, data, total in self.service.read_chunks(request.id, self._grpc_tenant(grpc_context)):
                yield video_pb2.VideoChunk(data=data, offset=offset, total_bytes=total)
        except Exception as error:  # noqa: BLE001
            _set_error(grpc_context, error)
            raise _Fail() from None


_REFERENCE_ROLES = {video_pb2.Reference.IMAGE: "reference_image", video_pb2.Reference.VIDEO: "reference_video",
                    video_pb2.Reference.AUDIO: "reference_audio"}


def _media_of(request: video_pb2.CreateVideoRequest) -> list[ClientMedia]:
    """The last frame and the references of a create request (the photo, ``image``, is the first frame)."""
    media = [ClientMedia("last_frame", "last_frame", data=request.last_frame)] if request.last_frame else []
    for index, reference in enumerate(request.references):
        field = f"references[{index}]"
        role = _REFERENCE_ROLES.get(reference.kind)
        if role is None:
            raise InvalidRequest(f"{field}.kind", "must be IMAGE, VIDEO or AUDIO")
        media.append(ClientMedia(field, role, data=reference.data))
    return media
