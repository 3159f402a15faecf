"""The ingress deployment: HTTP (OpenAI Videos API) and gRPC in one class.

Each replica runs a ``VideoService`` whose orchestrator drives accepted jobs
through the stage deployments. Routes only parse, call the service and map
errors.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on routes.
import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from ray import serve

from cluster.config import ReelserveConfig
from serving.errors import InvalidRequest, StageDead
from serving.ingress.grpc import GrpcVideoMethods
from serving.ingress.http import OPENAI_FIELD_NAMES, error_response, parse_create_request, video_object
from serving.jobs.orchestrator import StageHandles

__all__ = ["VideoIngress", "http_app"]

http_app = FastAPI(title="reelserve", description="OpenAI-compatible Videos API: photo + prompt -> video with audio.")


@serve.ingress(http_app)
class VideoIngress(GrpcVideoMethods):
    def __init__(
        self, config: dict, text_encoder, image_conditioner, diffusion, video_decoder, audio_decoder, muxer,
        prompt_rewriter=None,
    ):
        from serving.ingress.service import VideoService

        self.config = ReelserveConfig.model_validate(config)
        stages = StageHandles(
            text_encoder, image_conditioner, diffusion, video_decoder, audio_decoder, muxer, prompt_rewriter
        )
        self.service = VideoService(self.config, stages)
        self._started = False

    def _ensure_started(self) -> None:
        # The orchestrator needs the replica's event loop, which __init__ may not run on.
        if not self._started:
            self.service.start()
            self._started = True

    async def check_health(self) -> None:
        self._ensure_started()
        try:
            await asyncio.to_thread(self.service.store.count_active)
        except Exception as error:  # noqa: BLE001
            raise StageDead(f"job store unreachable: {type(error).__name__}") from None

    async def __del__(self):
        await self.service.stop()

    # ------------------------------------------------------------------ HTTP

    @http_app.get("/healthz")
    async def healthz(self) -> dict:
        self._ensure_started()
        return {"status": "ok", "model": self.config.model.name}

    @http_app.post("/v1/videos")
    async def create_video(self, request: Request):
        self._ensure_started()
        try:
            fields = await parse_create_request(request)
            record = self.service.create(field_names=OPENAI_FIELD_NAMES, **fields)
            return JSONResponse(video_object(record))
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.get("/v1/videos")
    async def list_videos(self, after: str | None = None, limit: str = "20", order: str = "desc"):
        self._ensure_started()
        try:
            if not limit.strip().isdigit():
                raise InvalidRequest("limit", f"'{limit}' is not a whole number; allowed: 1 to 100")
            records, has_more = self.service.list(after, int(limit), order)
            data = [video_object(r) for r in records]
            return JSONResponse({
                "object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
            })
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.get("/v1/videos/{video_id}")
    async def retrieve_video(self, video_id: str):
        self._ensure_started()
        try:
            return JSONResponse(video_object(self.service.get(video_id)))
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.get("/v1/videos/{video_id}/content")
    async def video_content(self, video_id: str, variant: str = "video"):
        self._ensure_started()
        try:
            if variant != "video":
                raise InvalidRequest("variant", f"'{variant}' is not available; allowed: video")
            path = self.service.result_path(video_id)
            return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str):
        self._ensure_started()
        try:
            self.service.delete(video_id)
            return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})
        except Exception as error:  # noqa: BLE001
            return error_response(error)
