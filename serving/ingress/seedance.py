"""The Seedance-compatible tasks API (BytePlus ModelArk's ``/api/v3/contents/generations/tasks``) over the same jobs.

An app written for Seedance's API points its base URL at reelserve and works:

- ``POST .../tasks`` takes ``model`` and a ``content`` list (``text``, and
  ``image_url`` / ``video_url`` / ``audio_url`` items with a ``role``:
  first_frame, last_frame, reference_image, reference_video,
  reference_audio), plus ``resolution``, ``ratio``, ``duration``, ``seed``,
  ``generate_audio``, ``return_last_frame``, ``execution_expires_after``,
  ``service_tier`` and ``callback_url``; it answers ``{"id": ...}``.
- ``GET .../tasks/{id}`` answers the task with Seedance's status names
  (queued, running, succeeded, failed, cancelled, expired) and, once it
  succeeded, ``content.video_url`` (and ``last_frame_url`` when asked for).
- ``GET .../tasks`` lists the caller's tasks (``page_num``, ``page_size``,
  ``filter.status``, ``filter.task_ids``, ``filter.model``).
- ``DELETE .../tasks/{id}`` cancels a queued or running task and removes an
  ended one.

The text item may carry Seedance's inline commands (``--resolution 720p
--duration 5 --ratio 16:9 --seed 7``); top-level fields win over them.
``resolution`` also takes ``WIDTHxHEIGHT``. ``ratio: adaptive`` keeps the
model's default aspect.
"""

from __future__ import annotations

import builtins
import io
import json
import re
from typing import Any

import av
from fastapi import Request
from fastapi.responses import JSONResponse

from serving.errors import InvalidRequest, NotReady
from serving.ingress.client_media import ClientMedia, json_media
from serving.ingress.http import error_response
from serving.jobs.record import JobRecord
from serving.protocol import JobStatus
from serving.tenancy.auth import Tenant

__all__ = ["SeedanceTasks", "TASK_STATUS", "task_answer", "task_error_response", "task_size"]

TASK_STATUS = {JobStatus.QUEUED: "queued", JobStatus.IN_PROGRESS: "running", JobStatus.COMPLETED: "succeeded",
               JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled", JobStatus.EXPIRED: "expired"}
_STATUS_NAMES = {name: status for status, name in TASK_STATUS.items()}
_FIELDS = ("model", "content", "resolution", "ratio", "duration", "seed", "generate_audio", "return_last_frame",
           "execution_expires_after", "service_tier", "callback_url", "watermark", "camera_fixed", "priority")
_MEDIA_TYPES = {"image_url": ("first_frame", "last_frame", "reference_image"), "video_url": ("reference_video",),
                "audio_url": ("reference_audio",)}
_RESOLUTIONS = {"480p": 480, "720p": 720, "1080p": 1080}
_RATIOS = ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive")
_COMMAND = re.compile(r"--(resolution|rs|ratio|rt|duration|dur|seed|camerafixed|cf|watermark|wm)\s+(\S+)")
_COMMAND_NAMES = {"rs": "resolution", "rt": "ratio", "dur": "duration", "cf": "camera_fixed",
                  "camerafixed": "camera_fixed", "wm": "watermark"}
_MAX_EXPIRES_S = 259_200  # Seedance's own bound: 72 hours
_MAX_PAGE_SIZE = 500
_SCAN_LIMIT = 1000  # most recent tasks a list looks through


def task_size(resolution: str | None, ratio: str, default_size: str, multiple: int) -> str:
    """``WIDTHxHEIGHT`` for Seedance's ``resolution`` (480p/720p/1080p: the short side; unset: the model's default
    size's) and ``ratio``, each side rounded down to the model's size multiple; ``WIDTHxHEIGHT`` passes as it is."""
    if resolution is not None and re.fullmatch(r"\d{1,5}x\d{1,5}", resolution):
        return resolution
    if resolution is not None and resolution not in _RESOLUTIONS:
        raise InvalidRequest("resolution", f"'{resolution}' is not allowed; allowed: 480p, 720p, 1080p or WIDTHxHEIGHT")
    if ratio not in _RATIOS:
        raise InvalidRequest("ratio", f"'{ratio}' is not allowed; allowed: {', '.join(_RATIOS)}")
    if ratio == "adaptive":
        width, height = (int(side) for side in default_size.split("x"))
    else:
        width, height = (int(side) for side in ratio.split(":"))
    short = _RESOLUTIONS[resolution] if resolution is not None else min(int(side) for side in default_size.split("x"))
    scale = short / min(width, height)
    return f"{_round_down(width * scale, multiple)}x{_round_down(height * scale, multiple)}"


# Seedance's error codes by HTTP status
_ERROR_CODES = {400: "InvalidParameter", 401: "AuthenticationError", 404: "ResourceNotFound", 405: "InvalidParameter",
                409: "InvalidParameter", 410: "ResourceNotFound", 429: "RateLimitExceeded",
                503: "ServiceUnavailable", 507: "InternalServiceError", 500: "InternalServiceError"}


def task_error_response(error: Exception) -> JSONResponse:
    """The API's error for ``error``, its code in Seedance's words (a quota's own code stays)."""
    response = error_response(error)
    body = json.loads(bytes(response.body))
    body["error"]["code"] = body["error"]["code"] or _ERROR_CODES.get(response.status_code, "InternalServiceError")
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return JSONResponse(body, status_code=response.status_code, headers=headers)


async def task_answer(call) -> JSONResponse:
    try:
        return JSONResponse(await call())
    except Exception as error:  # noqa: BLE001 - every error in the API's shape
        return task_error_response(error)


def _round_down(value: float, multiple: int) -> int:
    return max(multiple, int(value) // multiple * multiple)


class SeedanceTasks:
    """The tasks API over the ingress's ``VideoService``."""

    def __init__(self, service):
        self.service = service

    async def create(self, tenant: Tenant, request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        prompt, commands, media = _read_content(body.get("content"))
        settings = {**commands, **{name: body[name] for name in _FIELDS if name in body and name != "content"}}
        model = self.service.model
        if settings.get("generate_audio", True) is not True:
            raise InvalidRequest("generate_audio", "this deployment always generates the soundtrack: send true or "
                                                   "leave it out")
        if settings.get("camera_fixed") not in (None, False, "false"):
            raise InvalidRequest("camera_fixed", "a fixed camera is not served: send false or leave it out")
        size = None
        if "resolution" in settings or "ratio" in settings:
            resolution = settings.get("resolution")
            size = task_size(None if resolution is None else str(resolution), str(settings.get("ratio", "adaptive")),
                             model.default_size, self.service.limits.size_multiple)
        duration = settings.get("duration")
        if duration in (-1, "-1"):
            duration = None  # Seedance's "let the model choose": the model's default length
        seed = settings.get("seed")
        if seed in (-1, "-1"):
            seed = None  # Seedance's "random seed"
        record = await self.service.create(
            tenant, field_names={"seconds": "duration", "size": "resolution", "image": "content"}, prompt=prompt,
            model=settings.get("model"), seconds=duration, size=size, seed=seed,
            priority=_priority(settings), callback_url=settings.get("callback_url"), media=media,
            max_queue_wait_s=_expires_after(settings.get("execution_expires_after")),
            return_last_frame=_flag(settings.get("return_last_frame", False), "return_last_frame"),
            idempotency_key=request.headers.get("idempotency-key"),
        )
        return {"id": record.id}

    async def get(self, tenant: Tenant, request: Request, task_id: str) -> dict[str, Any]:
        record = await self.service.get(task_id, tenant)
        return await self._task(record, request)

    async def list(self, tenant: Tenant, request: Request) -> dict[str, Any]:
        query = request.query_params
        page_num = _page_number(query.get("page_num", "1"), "page_num", 1, 500)
        page_size = _page_number(query.get("page_size", "10"), "page_size", 1, _MAX_PAGE_SIZE)
        status = query.get("filter.status")
        if status is not None and status not in _STATUS_NAMES:
            raise InvalidRequest("filter.status", f"'{status}' is not a task status; allowed: "
                                                  f"{', '.join(_STATUS_NAMES)}")
        task_ids = set(query.getlist("filter.task_ids"))
        model = query.get("filter.model")
        matched = [record for record in await self._recent(tenant)
                   if (status is None or record.status == _STATUS_NAMES[status])
                   and (not task_ids or record.id in task_ids) and (model is None or record.model == model)]
        page = matched[(page_num - 1) * page_size:page_num * page_size]
        return {"items": [await self._task(record, request) for record in page], "total": len(matched)}

    async def delete(self, tenant: Tenant, task_id: str) -> dict[str, Any]:
        """A queued or running task is cancelled (it stops within a step); an ended one is removed."""
        record = await self.service.get(task_id, tenant)
        if record.status.is_terminal:
            await self.service.delete(task_id, tenant)
        else:
            await self.service.cancel(task_id, tenant)
        return {}

    async def last_frame_png(self, tenant: Tenant, task_id: str) -> bytes:
        """The finished video's last frame as PNG (for ``return_last_frame``)."""
        record = await self.service.get(task_id, tenant)
        if record.status != JobStatus.COMPLETED:
            raise NotReady(f"task '{task_id}' has not succeeded; its last frame exists once it has")
        data = b"".join([chunk async for _, chunk, _ in self.service.read_chunks(task_id, tenant)])
        return await self.service._blocking(_last_frame_png, data)

    async def _recent(self, tenant: Tenant) -> builtins.list[JobRecord]:
        records: builtins.list[JobRecord] = []
        after: str | None = None
        while len(records) < _SCAN_LIMIT:
            page, has_more, last_id = await self.service.list_page(tenant, after, 100)
            records.extend(page)
            if not has_more or last_id is None:
                break
            after = last_id  # the store's own last id: a page whose records were all filtered out goes on
        return records

    async def _task(self, record: JobRecord, request: Request) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        content = None
        if record.status == JobStatus.COMPLETED:
            video_url = await self.service.download_url(record) or f"{base}/v1/videos/{record.id}/content"
            content = {"video_url": video_url}
            if record.return_last_frame:
                content["last_frame_url"] = f"{base}/api/v3/contents/generations/tasks/{record.id}/last_frame"
        error = None
        if record.status in (JobStatus.FAILED, JobStatus.EXPIRED) and record.error_code:
            error = {"code": record.error_code, "message": record.error_message or ""}
        tokens = int(record.width * record.height * record.fps * record.seconds / 1024)
        return {
            "id": record.id, "model": record.model, "status": TASK_STATUS[record.status], "content": content,
            "error": error, "created_at": int(record.created_at),
            "updated_at": int(record.completed_at or record.started_at or record.created_at),
            "seed": record.seed, "resolution": record.size, "ratio": _ratio_of(record.width, record.height),
            "duration": record.seconds, "framespersecond": record.fps, "generate_audio": True,
            "execution_expires_after": int(record.max_queue_wait_s) if record.max_queue_wait_s else None,
            "service_tier": "flex" if record.priority == 0 else "default",
            "usage": {"completion_tokens": tokens, "total_tokens": tokens},
            # reelserve's own progress, beyond Seedance's shape
            "progress": record.progress,
        }


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - any unreadable body is the client's error
        raise InvalidRequest("body", "must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field; allowed: {', '.join(_FIELDS)}")
    return body


def _read_content(content: Any) -> tuple[str, dict[str, str], list[ClientMedia]]:
    """The prompt (its inline ``--commands`` taken out), the commands, and the media in the order given."""
    if not isinstance(content, list) or not content:
        raise InvalidRequest("content", "must be a non-empty list of {type: text | image_url | video_url | "
                                        "audio_url, ...} items")
    texts, media = [], []
    images = sum(1 for item in content if isinstance(item, dict) and item.get("type") == "image_url")
    for index, item in enumerate(content):
        field = f"content[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise InvalidRequest(field, "must be an object with a type: text, image_url, video_url or audio_url")
        kind = item["type"]
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise InvalidRequest(f"{field}.text", "must be text")
            texts.append(item["text"])
            continue
        if kind not in _MEDIA_TYPES:
            raise InvalidRequest(f"{field}.type", f"'{kind}' is not allowed; allowed: text, image_url, video_url, "
                                                  "audio_url")
        role = item.get("role") or ("first_frame" if kind == "image_url" and images == 1 else None)
        if role not in _MEDIA_TYPES[kind]:
            raise InvalidRequest(f"{field}.role", f"'{role}' is not a role of {kind}; allowed: "
                                                  f"{', '.join(_MEDIA_TYPES[kind])}")
        if kind not in item:
            raise InvalidRequest(f"{field}.{kind}", 'is required: {"url": "data:...;base64,..." or an allowed URL}')
        media.append(json_media({kind: item[kind]}, field, role))
    commands = {}
    prompt = " ".join(texts)
    for name, value in _COMMAND.findall(prompt):
        commands[_COMMAND_NAMES.get(name, name)] = value
    prompt = _COMMAND.sub("", prompt).strip()
    # keyframes first, references after in the order given (the order the model reads them)
    media.sort(key=lambda m: {"first_frame": 0, "last_frame": 1}.get(m.role, 2))
    return prompt, commands, media


def _ratio_of(width: int, height: int) -> str:
    best = min(_RATIOS[:-1], key=lambda r: abs(int(r.split(":")[0]) / int(r.split(":")[1]) - width / height))
    return best


def _priority(settings: dict[str, Any]) -> Any:
    tier = settings.get("service_tier", "default")
    if tier not in ("default", "flex"):
        raise InvalidRequest("service_tier", f"'{tier}' is not allowed; allowed: default, flex")
    if settings.get("priority") is not None:
        return settings["priority"]
    return "low" if tier == "flex" else None


def _expires_after(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= _MAX_EXPIRES_S:
        raise InvalidRequest("execution_expires_after", f"must be a number of seconds from 1 to {_MAX_EXPIRES_S}")
    return float(value)


def _flag(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidRequest(field, "must be true or false")


def _page_number(text: str, field: str, low: int, high: int) -> int:
    if re.fullmatch(r"[0-9]{1,6}", text.strip()) is None or not low <= int(text) <= high:
        raise InvalidRequest(field, f"'{text}' is not allowed; use a whole number from {low} to {high}")
    return int(text)


def _last_frame_png(mp4: bytes) -> bytes:
    last = None
    with av.open(io.BytesIO(mp4), mode="r") as container:
        for frame in container.decode(video=0):
            last = frame
    if last is None:
        raise InvalidRequest("task", "the video holds no frame")
    out = io.BytesIO()
    last.to_image().save(out, format="PNG")
    return out.getvalue()
