"""The ingress deployment: HTTP (OpenAI Videos API) and gRPC in one stateless class.

It validates, records the job and answers; orchestrator replicas run the
jobs. Routes only parse, call the service and map errors. Its health check
never touches the store: a store outage answers requests with 503 /
UNAVAILABLE, it does not restart the ingress.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on routes.
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from ray import serve

from cluster.admission import AdmissionLimits
from cluster.config import JobsConfig, ModelConfig, RewriterConfig
from serving.errors import InvalidRequest
from serving.ingress.grpc import GrpcVideoMethods
from serving.ingress.http import OPENAI_FIELD_NAMES, error_response, parse_create_request, video_object

__all__ = ["VideoIngress", "http_app"]

http_app = FastAPI(title="reelserve", description="OpenAI-compatible Videos API: photo + prompt -> video with audio.")


@serve.ingress(http_app)
class VideoIngress(GrpcVideoMethods):
    def __init__(
        self, model: ModelConfig, jobs: JobsConfig, rewriter: RewriterConfig, orchestrator=None,
        admission: AdmissionLimits | None = None,
    ):
        # Only the config sections it uses: scaling a stage (but diffusion, whose capacity admission reads)
        # changes none of them, so it does not restart this.
        from serving.ingress.service import VideoService

        self.model = model
        self.service = VideoService(model, jobs, rewriter, orchestrator, admission)

    async def check_health(self) -> None:
        return None  # alive while the process answers; the store's health is not ours

    async def __del__(self):
        await self.service.close()

    # ------------------------------------------------------------------ HTTP

    @http_app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model.name}

    @http_app.post("/v1/videos")
    async def create_video(self, request: Request):
        try:
            fields = await parse_create_request(request)
            record = await self.service.create(field_names=OPENAI_FIELD_NAMES, **fields)
            return JSONResponse(video_object(record))
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.get("/v1/videos")
    async def list_videos(self, after: str | None = None, limit: str = "20", order: str = "desc"):
        try:
            if not limit.strip().isdigit():
                raise InvalidRequest("limit", f"'{limit}' is not a whole number; allowed: 1 to 100")
            records, has_more = await self.service.list(after, int(limit), order)
            data = [video_object(r) for r in records]
            return JSONResponse({
                "object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
            })
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.get("/v1/videos/{video_id}")
    async def retrieve_video(self, video_id: str):
        try:
            return JSONResponse(video_object(await self.service.get(video_id)))
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.get("/v1/videos/{video_id}/content")
    async def video_content(self, video_id: str, variant: str = "video"):
        try:
            if variant != "video":
                raise InvalidRequest("variant", f"'{variant}' is not available; allowed: video")
            path = await self.service.result_path(video_id)
            return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.post("/v1/videos/{video_id}/cancel")
    async def cancel_video(self, video_id: str):
        try:
            return JSONResponse(video_object(await self.service.cancel(video_id)))
        except Exception as error:  # noqa: BLE001
            return error_response(error)

    @http_app.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str):
        try:
            await self.service.delete(video_id)
            return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})
        except Exception as error:  # noqa: BLE001
            return error_response(error)
