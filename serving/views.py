"""What clients read about a job: the video object of the HTTP API, also the body of its webhook."""

from __future__ import annotations

from typing import Any

from serving.families import get_family
from serving.jobs.record import JobRecord
from serving.protocol import JobStatus

__all__ = ["video_object", "api_status", "model_object"]


def api_status(status: JobStatus) -> str:
    """OpenAI's status names; a cancelled or expired job reads as failed (its error code says which)."""
    return "failed" if status in (JobStatus.CANCELLED, JobStatus.EXPIRED) else status.api_name


def video_object(record: JobRecord, queue: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAI video object plus reelserve's extensions; ``queue``: a queued job's position and start estimate."""
    error = None
    if record.status == JobStatus.CANCELLED:
        error = {"code": "cancelled", "message": "the job was cancelled"}
    elif record.error_code:
        error = {"code": record.error_code, "message": record.error_message or ""}
    queue = queue or {}
    return {
        "id": record.id,
        "object": "video",
        "status": api_status(record.status),
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
        "priority": ("low", "normal", "high")[max(0, min(record.priority, 2))],
        "queue_position": queue.get("queue_position"),
        "estimated_start_at": queue.get("estimated_start_at"),
    }


def model_object(config, limits=None) -> dict[str, Any]:
    """One served model in OpenAI's model list shape, with its family, workflows and request limits (``limits``: the
    checkpoint's ``ModelLimits``, whose size multiple a recipe may raise)."""
    family = get_family(config.family)
    described = family.describe(config) if family.describe is not None else {
        "workflows": ["t2v", "i2v"],  # text only, or one first frame (input_reference)
        "limits": {
            "max_seconds": config.max_seconds, "max_fps": config.max_fps,
            "size_multiple": limits.size_multiple if limits is not None else config.SPATIAL_COMPRESSION,
            "max_width": config.max_width, "max_height": config.max_height,
            "frames": f"{config.FRAME_STEP}n + {config.FRAME_OFFSET}",
            "max_inference_steps": config.max_inference_steps, "references": None,
        },
    }
    return {"id": config.name, "object": "model", "created": 0, "owned_by": "reelserve", "family": family.name,
            "default_size": config.default_size, "default_seconds": config.default_seconds, **described}
