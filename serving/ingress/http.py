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
from serving.ingress.client_media import REFERENCE_FILE_FIELDS, ClientMedia, json_media, json_references
from serving.media import MAX_PHOTO_BYTES
from serving.storage.errors import StorageFull, StorageUnavailable
from serving.tenancy.errors import IdempotencyConflict, QuotaExceeded, Unauthenticated

__all__ = ["parse_create_request", "error_response", "OPENAI_FIELD_NAMES", "CREATE_BODY_SCHEMA"]

logger = logging.getLogger("ray.serve.reelserve.http")

# What the OpenAI API calls our fields, so error messages name what the client sent.
OPENAI_FIELD_NAMES = {"image": "input_reference"}

_CREATE_FIELDS = (
    "prompt", "model", "seconds", "size", "seed", "fps", "negative_prompt", "enhance_prompt", "priority", "callback_url",
    # what the convention's other servers (SGLang, vllm-omni) accept, within this deployment's bounds
    "num_inference_steps", "guidance_scale", "num_frames",
)
_MEDIA_FIELDS = ("input_reference", "last_frame", "references")


_TEXT = {"type": "string"}
_NUMBER_OR_TEXT = {"anyOf": [{"type": "number"}, {"type": "string"}]}
_URL_OR_OBJECT = {"anyOf": [_TEXT, {"type": "object", "properties": {
    "image_url": {"anyOf": [_TEXT, {"type": "object", "properties": {"url": _TEXT}}]}}}]}
_FILE = {"type": "string", "format": "binary"}
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
                "num_inference_steps": _NUMBER_OR_TEXT, "guidance_scale": _NUMBER_OR_TEXT, "num_frames": _NUMBER_OR_TEXT,
                "input_reference": _URL_OR_OBJECT, "last_frame": _URL_OR_OBJECT,
                "references": {"type": "array", "items": {"type": "object", "required": ["type", "url"], "properties": {
                    "type": {"type": "string", "enum": ["image", "video", "audio"]}, "url": _TEXT}}},
            },
        }},
        "multipart/form-data": {"schema": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                "prompt": _TEXT, "model": _TEXT, "seconds": _TEXT, "size": _TEXT, "seed": _TEXT, "fps": _TEXT,
                "negative_prompt": _TEXT, "enhance_prompt": _TEXT, "priority": _TEXT, "callback_url": _TEXT,
                "num_inference_steps": _TEXT, "guidance_scale": _TEXT, "num_frames": _TEXT,
                "input_reference": _FILE, "last_frame": _FILE,
                **{name: {"type": "array", "items": _FILE} for name in REFERENCE_FILE_FIELDS},
            },
        }},
    },
}


async def parse_create_request(request: Request, max_file_bytes: int = MAX_PHOTO_BYTES) -> dict[str, Any]:
    """Fields of ``POST /v1/videos`` from JSON or multipart; the files (first frame, last frame, references) as
    ``media``, a list of ``ClientMedia`` in the order the model reads them."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data") or content_type.startswith("application/x-www-form-urlencoded"):
        return await _parse_form(request, max_file_bytes)
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - any unreadable body is the client's error
        raise InvalidRequest("body", "must be JSON or multipart/form-data") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    unknown = sorted(set(body) - set(_CREATE_FIELDS) - set(_MEDIA_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field; allowed: {', '.join(_CREATE_FIELDS + _MEDIA_FIELDS)}")
    fields: dict[str, Any] = {name: body[name] for name in _CREATE_FIELDS if name in body}
    media = []
    for name, role in (("input_reference", "first_frame"), ("last_frame", "last_frame")):
        if body.get(name) is not None:
            media.append(json_media(body[name], name, role))
    if body.get("references") is not None:
        media.extend(json_references(body["references"]))
    fields["media"] = media
    return fields


async def _parse_form(request: Request, max_file_bytes: int) -> dict[str, Any]:
    try:
        form = await request.form()
    except Exception:  # noqa: BLE001 - any unreadable form is the client's error
        raise InvalidRequest("body", "is not a readable multipart/form-data or urlencoded form") from None
    known = set(_CREATE_FIELDS) | {"input_reference", "last_frame"} | set(REFERENCE_FILE_FIELDS)
    unknown = sorted(set(form.keys()) - known)
    if unknown:  # e.g. a list an SDK flattened into form fields: refused, never silently dropped
        raise InvalidRequest(unknown[0], f"unknown form field; allowed: {', '.join(sorted(known))} (references as a "
                                         "list need a JSON body)")
    fields: dict[str, Any] = {name: form.get(name) for name in _CREATE_FIELDS if form.get(name) is not None}
    media, counts = [], dict.fromkeys(REFERENCE_FILE_FIELDS, 0)
    for name, value in form.multi_items():
        if name in ("input_reference", "last_frame"):
            field, role = name, "first_frame" if name == "input_reference" else "last_frame"
        elif name in REFERENCE_FILE_FIELDS:
            field, role = f"{name}[{counts[name]}]", REFERENCE_FILE_FIELDS[name]
            counts[name] += 1
        else:
            continue
        if isinstance(value, str):
            raise InvalidRequest(field, "must be an uploaded file (multipart file part)")
        data = await value.read(max_file_bytes + 1)  # the cap check needs one byte more
        if len(data) > max_file_bytes:
            raise InvalidRequest(field, f"the file is larger than {max_file_bytes} bytes")
        media.append(ClientMedia(field, role, data=data))
    # first and last frames before references, as the model reads them; references keep the order they came in
    media.sort(key=lambda item: {"first_frame": 0, "last_frame": 1}.get(item.role, 2))
    fields["media"] = media
    return fields


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
