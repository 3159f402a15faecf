"""The OpenAI Videos API shape: request parsing, video objects and error bodies.

The routes themselves live on the ingress deployment (``deployment.py``);
this module keeps them thin.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from serving.errors import Expired, InvalidRequest, NotFound, NotReady, Overloaded, StoreUnavailable
from serving.jobs.record import JobRecord
from serving.media import MAX_PHOTO_BYTES
from serving.protocol import JobStatus
from serving.storage.errors import StorageFull, StorageUnavailable

__all__ = ["parse_create_request", "video_object", "error_response", "OPENAI_FIELD_NAMES"]

logger = logging.getLogger("ray.serve.reelserve.http")

# What the OpenAI API calls our fields, so error messages name what the client sent.
OPENAI_FIELD_NAMES = {"image": "input_reference"}

_CREATE_FIELDS = ("prompt", "model", "seconds", "size", "seed", "fps", "negative_prompt", "enhance_prompt")


async def parse_create_request(request: Request) -> dict[str, Any]:
    """Fields of ``POST /v1/videos`` from JSON or multipart (``input_reference`` as the photo)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data") or content_type.startswith("application/x-www-form-urlencoded"):
        try:
            form = await request.form()
        except Exception:
            raise InvalidRequest("body", "is not a readable multipart/form-data or urlencoded form") from None
        fields = {name: form.get(name) for name in _CREATE_FIELDS if form.get(name) is not None}
        upload = form.get("input_reference")
        if upload is not None:
            if isinstance(upload, str):
                raise InvalidRequest("input_reference", "must be an uploaded image file (multipart file part)")
            fields["image"] = await upload.read(MAX_PHOTO_BYTES + 1)  # the cap check needs one byte more
            if len(fields["image"]) > MAX_PHOTO_BYTES:
                raise InvalidRequest("input_reference", f"the file is larger than {MAX_PHOTO_BYTES} bytes")
        return fields
    try:
        body = await request.json()
    except Exception:
        raise InvalidRequest("body", "must be JSON or multipart/form-data") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    if "input_reference" in body:
        raise InvalidRequest("input_reference", "send the photo as a multipart file upload, not inside JSON")
    unknown = sorted(set(body) - set(_CREATE_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field; allowed: {', '.join(_CREATE_FIELDS)}, input_reference")
    return {name: body[name] for name in _CREATE_FIELDS if name in body}


def _api_status(status: JobStatus) -> str:
    # The OpenAI shape has no "cancelled"; a cancelled job reads as failed with code "cancelled".
    return "failed" if status == JobStatus.CANCELLED else status.api_name


def video_object(record: JobRecord) -> dict[str, Any]:
    error = None
    if record.status == JobStatus.CANCELLED:
        error = {"code": "cancelled", "message": "the job was cancelled"}
    elif record.error_code:
        error = {"code": record.error_code, "message": record.error_message or ""}
    return {
        "id": record.id,
        "object": "video",
        "status": _api_status(record.status),
        "progress": record.progress,
        "created_at": int(record.created_at),
        "completed_at": int(record.completed_at) if record.completed_at else None,
        "expires_at": int(record.expires_at) if record.expires_at else None,
        "model": record.model,
        "prompt": record.prompt,
        "seconds": f"{record.seconds:g}",
        "size": record.size,
        "error": error,
        "remixed_from_video_id": None,
        # Extensions beyond the OpenAI shape:
        "stage": record.stage,
        "step": record.step,
        "total_steps": record.total_steps,
        "fps": record.fps,
        "seed": record.seed,
        "stage_seconds": record.stage_seconds,
        "enhance_prompt": record.enhance_prompt,
        "revised_prompt": record.revised_prompt,
        "prompt_rewrite_fallback": record.rewrite_fallback,
        "resumed_from_step": record.resumed_from_step,
        "attempts": record.attempts,
    }


def error_response(error: Exception, status: int | None = None) -> JSONResponse:
    """OpenAI-style error body with the matching status code (``status`` overrides it, e.g. 405)."""
    status_override = status
    headers = {}
    code = None
    if isinstance(error, InvalidRequest):
        status, kind, param, message = 400, "invalid_request_error", error.field, str(error)
    elif isinstance(error, Expired):
        status, kind, param, message, code = 410, "invalid_request_error", None, str(error), "expired"
    elif isinstance(error, NotFound):
        status, kind, param, message = 404, "not_found_error", None, str(error)
    elif isinstance(error, NotReady):
        status, kind, param, message = 409, "invalid_request_error", None, str(error)
    elif isinstance(error, Overloaded):
        status, kind, param, message = 429, "rate_limit_error", None, str(error)
        headers["Retry-After"] = str(error.retry_after_s)
    elif isinstance(error, StoreUnavailable):
        status, kind, param = 503, "service_unavailable", None
        message = "the job store is unreachable right now; retry shortly"
        if isinstance(error, StorageUnavailable):
            message = "storage is unreachable right now; retry shortly"
        headers["Retry-After"] = "5"
    elif isinstance(error, StorageFull):
        status, kind, param, message = 507, "server_error", None, "storage is full; retry later"
    else:
        logger.error("unexpected error in an HTTP call", exc_info=error)
        status, kind, param, message = 500, "server_error", None, "internal error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status_override or status, headers=headers)
