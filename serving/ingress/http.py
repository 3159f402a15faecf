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
from serving.media import MAX_PHOTO_BYTES
from serving.storage.errors import StorageFull, StorageUnavailable
from serving.tenancy.errors import IdempotencyConflict, QuotaExceeded, Unauthenticated

__all__ = ["parse_create_request", "error_response", "OPENAI_FIELD_NAMES", "CREATE_BODY_SCHEMA"]

logger = logging.getLogger("ray.serve.reelserve.http")

# What the OpenAI API calls our fields, so error messages name what the client sent.
OPENAI_FIELD_NAMES = {"image": "input_reference"}

_CREATE_FIELDS = (
    "prompt", "model", "seconds", "size", "seed", "fps", "negative_prompt", "enhance_prompt", "priority", "callback_url",
)


_TEXT = {"type": "string"}
_NUMBER_OR_TEXT = {"anyOf": [{"type": "number"}, {"type": "string"}]}
# The create body as the OpenAPI document describes it (the route parses it itself: JSON or multipart).
CREATE_BODY_SCHEMA = {
    "required": True,
    "content": {
        "application/json": {"schema": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                "prompt": _TEXT, "model": _TEXT, "seconds": _NUMBER_OR_TEXT, "size": _TEXT,
                "seed": {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "fps": _NUMBER_OR_TEXT,
                "negative_prompt": _TEXT, "enhance_prompt": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
                "priority": {"type": "string", "enum": ["low", "normal", "high"]}, "callback_url": _TEXT,
            },
        }},
        "multipart/form-data": {"schema": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                "prompt": _TEXT, "model": _TEXT, "seconds": _TEXT, "size": _TEXT, "seed": _TEXT, "fps": _TEXT,
                "negative_prompt": _TEXT, "enhance_prompt": _TEXT, "priority": _TEXT, "callback_url": _TEXT,
                "input_reference": {"type": "string", "format": "binary"},
            },
        }},
    },
}


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


def error_response(error: Exception, status: int | None = None) -> JSONResponse:
    """OpenAI-style error body with the matching status code (``status`` overrides it, e.g. 405)."""
    headers, code = {}, None
    if isinstance(error, InvalidRequest):
        answer, kind, param, message = 400, "invalid_request_error", error.field, str(error)
    elif isinstance(error, Unauthenticated):
        answer, kind, param, message = 401, "authentication_error", None, str(error)
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(error, Expired):
        answer, kind, param, message, code = 410, "invalid_request_error", None, str(error), "expired"
    elif isinstance(error, NotFound):
        answer, kind, param, message = 404, "not_found_error", None, str(error)
    elif isinstance(error, (NotReady, IdempotencyConflict)):
        answer, kind, param, message = 409, "invalid_request_error", None, str(error)
        if isinstance(error, IdempotencyConflict):
            kind, param = "conflict_error", "Idempotency-Key"
    elif isinstance(error, Overloaded):
        answer, kind, param, message = 429, "rate_limit_error", None, str(error)
        headers["Retry-After"] = str(error.retry_after_s)
        code = error.code if isinstance(error, QuotaExceeded) else None
    elif isinstance(error, StoreUnavailable):
        answer, kind, param = 503, "service_unavailable", None
        message = "the job store is unreachable right now; retry shortly"
        if isinstance(error, StorageUnavailable):
            message = "storage is unreachable right now; retry shortly"
        headers["Retry-After"] = "5"
    elif isinstance(error, StorageFull):
        answer, kind, param, message = 507, "server_error", None, "storage is full; retry later"
    else:
        logger.error("unexpected error in an HTTP call", exc_info=error)
        answer, kind, param, message = 500, "server_error", None, "internal error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status or answer, headers=headers)
