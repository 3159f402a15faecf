"""The ingress deployment: HTTP (OpenAI Videos API) and gRPC in one stateless class.

It validates, records the job and answers; orchestrator replicas run the
jobs. Routes only parse, call the service and map errors. Its health check
never touches the store: a store outage answers requests with 503 /
UNAVAILABLE, it does not restart the ingress.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on routes.
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.admission import AdmissionLimits
from cluster.auth_config import AuthConfig, CallbacksConfig, ReferencesConfig
from cluster.config import IngressConfig, JobsConfig, ModelConfig, RewriterConfig, StorageConfig
from serving.errors import InvalidRequest, NotFound
from serving.ingress.body_limits import BodySizeLimit
from serving.ingress.grpc import GrpcVideoMethods
from serving.ingress.http import CREATE_BODY_SCHEMA, OPENAI_FIELD_NAMES, error_response, parse_create_request
from serving.ingress.seedance import SeedanceTasks, task_answer, task_error_response
from serving.ingress.service import VideoService
from serving.tenancy.auth import Tenant
from serving.views import model_object, video_object

__all__ = ["VideoIngress", "http_app"]

http_app = FastAPI(title="reelserve", description="OpenAI-compatible Videos API: photo + prompt -> video with audio.")


# One place turns every error into the API's error shape: our own errors, unknown routes and methods, bad
# query parameters, and anything unexpected (a clean 500 that names nothing internal).
@http_app.exception_handler(Exception)
async def _any_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(error)


@http_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if error.status_code == 404:
        return error_response(NotFound(f"no route {request.method} {request.url.path}"))
    if error.status_code == 405:
        return error_response(InvalidRequest("method", f"{request.method} is not allowed on {request.url.path}"),
                              status=405)
    return error_response(InvalidRequest("request", str(error.detail)), status=error.status_code)


@http_app.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
    return error_response(InvalidRequest(field, first.get("msg", "is not valid")))


@serve.ingress(http_app)
class VideoIngress(GrpcVideoMethods):
    def __init__(
        self, model: ModelConfig, jobs: JobsConfig, rewriter: RewriterConfig, orchestrator=None,
        admission: AdmissionLimits | None = None, ingress: IngressConfig | None = None, auth: AuthConfig | None = None,
        callbacks: CallbacksConfig | None = None, storage: StorageConfig | None = None,
        references: ReferencesConfig | None = None,
    ):
        # Only the config sections it uses: scaling a stage (but diffusion, whose capacity admission reads)
        # changes none of them, so it does not restart this.
        self.model = model
        ingress = ingress or IngressConfig()
        self.service = VideoService(model, jobs, rewriter, orchestrator, admission, ingress, auth, callbacks, storage,
                                    references)
        self.tasks = SeedanceTasks(self.service)
        # The largest file one multipart part may carry: the photo cap, or the family's largest media cap.
        self._max_file_bytes = max(ingress.max_photo_bytes, *(
            getattr(model, name, 0) for name in ("max_image_reference_bytes", "max_video_reference_bytes")))
        # Before the first request: bodies over the cap are refused before they are read.
        if not any(middleware.cls is BodySizeLimit for middleware in http_app.user_middleware):
            http_app.add_middleware(BodySizeLimit, max_body_bytes=ingress.max_body_bytes)

    async def check_health(self) -> None:
        return None  # alive while the process answers; the store's health is not ours

    async def __del__(self):
        await self.service.close()

    def _tenant(self, request: Request) -> Tenant:
        return self.service.gate.authenticate(request.headers.get("authorization"))

    async def _video(self, record) -> JSONResponse:
        return JSONResponse(video_object(record, await self.service.queue_of(record)))

    # ------------------------------------------------------------------ HTTP

    @http_app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}  # open, and says nothing about jobs

    @http_app.get("/v1/models")
    async def list_models(self, request: Request):
        self._tenant(request)
        return JSONResponse({"object": "list", "data": [model_object(self.model, self.service.limits)]})

    @http_app.post("/v1/videos", openapi_extra={"requestBody": CREATE_BODY_SCHEMA})
    async def create_video(self, request: Request):
        tenant = self._tenant(request)
        fields = await parse_create_request(request, self._max_file_bytes)
        record = await self.service.create(
            tenant, field_names=OPENAI_FIELD_NAMES, idempotency_key=request.headers.get("idempotency-key"), **fields
        )
        return await self._video(record)

    @http_app.get("/v1/videos")
    async def list_videos(self, request: Request, after: str | None = None, limit: str = "20", order: str = "desc"):
        tenant = self._tenant(request)
        if re.fullmatch(r"[0-9]{1,6}", limit.strip()) is None:
            raise InvalidRequest("limit", f"'{limit}' is not a whole number; allowed: 1 to 100")
        records, has_more = await self.service.list(tenant, after, int(limit), order)
        data = [video_object(r, await self.service.queue_of(r)) for r in records]
        return JSONResponse({
            "object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
        })

    @http_app.get("/v1/videos/{video_id}")
    async def retrieve_video(self, request: Request, video_id: str):
        return await self._video(await self.service.get(video_id, self._tenant(request)))

    @http_app.get("/v1/videos/{video_id}/content")
    async def video_content(self, request: Request, video_id: str, variant: str = "video"):
        tenant = self._tenant(request)
        if variant != "video":
            raise InvalidRequest("variant", f"'{variant}' is not available; allowed: video")
        video = await self.service.content(video_id, tenant, sign=True)
        if video.url is not None:  # an object store: the client fetches it from there, not through Ray
            return RedirectResponse(video.url, status_code=307, headers={"Cache-Control": "no-store"})
        headers = {"Content-Length": str(video.size), "Content-Disposition": f'attachment; filename="{video_id}.mp4"'}
        return StreamingResponse(self.service.downloads.chunks(video), media_type="video/mp4", headers=headers)

    @http_app.post("/v1/videos/{video_id}/cancel")
    async def cancel_video(self, request: Request, video_id: str):
        return await self._video(await self.service.cancel(video_id, self._tenant(request)))

    @http_app.delete("/v1/videos/{video_id}")
    async def delete_video(self, request: Request, video_id: str):
        await self.service.delete(video_id, self._tenant(request))
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    # ------------------------------------------------------------------ the Seedance-compatible tasks API
    # Errors in Seedance's shape: its error codes (InvalidParameter, ...) beside our message and param.

    @http_app.post("/api/v3/contents/generations/tasks")
    async def create_task(self, request: Request):
        return await task_answer(lambda: self.tasks.create(self._tenant(request), request))

    @http_app.get("/api/v3/contents/generations/tasks")
    async def list_tasks(self, request: Request):
        return await task_answer(lambda: self.tasks.list(self._tenant(request), request))

    @http_app.get("/api/v3/contents/generations/tasks/{task_id}")
    async def retrieve_task(self, request: Request, task_id: str):
        return await task_answer(lambda: self.tasks.get(self._tenant(request), request, task_id))

    @http_app.get("/api/v3/contents/generations/tasks/{task_id}/last_frame")
    async def task_last_frame(self, request: Request, task_id: str):
        try:
            png = await self.tasks.last_frame_png(self._tenant(request), task_id)
        except Exception as error:  # noqa: BLE001 - every error in the API's shape
            return task_error_response(error)
        return Response(png, media_type="image/png")

    @http_app.delete("/api/v3/contents/generations/tasks/{task_id}")
    async def delete_task(self, request: Request, task_id: str):
        return await task_answer(lambda: self.tasks.delete(self._tenant(request), task_id))
