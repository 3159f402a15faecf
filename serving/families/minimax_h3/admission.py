"""What MiniMax-H3 admits: a request's media checked on their headers, named for storage, its workflow served.

The ingress calls :func:`admit_inputs` before a job exists (no torch, no
decode); :func:`describe` is what ``GET /v1/models`` says of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.errors import InvalidRequest
from serving.families.base import MediaInput
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.families.minimax_h3.references import (
    FIRST_FRAME,
    LAST_FRAME,
    ROLE_KINDS,
    ReferenceLimits,
    check_references,
    reference_input_name,
    workflow_of,
)
from serving.protocol import InputSpec

__all__ = ["admit_inputs", "describe"]


def admit_inputs(config: MiniMaxH3ModelConfig, inputs: Sequence[MediaInput]) -> tuple[InputSpec, ...]:
    """The specs to store ``inputs`` under (keyframes by role, references as ``ref-0``, ``ref-1``... in the order the
    model reads them); ``InvalidRequest`` naming the client's field for any broken rule or an unserved workflow."""
    check_references(inputs, ReferenceLimits.of(config))
    workflow = workflow_of(inputs)
    if workflow not in config.workflows:
        field = inputs[0].field if inputs else "references"
        raise InvalidRequest(
            field, f"this request asks for the {workflow} workflow ({_WORKFLOW_INPUTS[workflow]}); this deployment "
                   f"serves {', '.join(config.workflows)} (model.workflows)")
    specs, references = [], 0
    for item in inputs:
        if item.role in (FIRST_FRAME, LAST_FRAME):
            name = item.role
        else:
            name, references = reference_input_name(references), references + 1
        specs.append(InputSpec(name=name, kind=ROLE_KINDS[item.role], role=item.role))
    return tuple(specs)


_WORKFLOW_INPUTS = {"t2va": "text only", "fl2va": "a first and/or last frame", "ref2va": "references"}


def describe(config: MiniMaxH3ModelConfig) -> dict:
    limits = ReferenceLimits.of(config)
    return {
        "workflows": list(config.workflows),
        "limits": {
            "fps": config.default_fps, "min_seconds": config.min_seconds, "max_seconds": config.max_seconds,
            "size_multiple": config.SPATIAL_COMPRESSION, "max_width": config.max_width,
            "max_height": config.max_height, "max_pixels": config.max_pixels,
            "frames": f"{config.FRAME_STEP}n + {config.FRAME_OFFSET}",
            "max_inference_steps": config.max_inference_steps,
            "references": {
                "max_images": limits.max_images, "max_videos": limits.max_videos, "max_audios": limits.max_audios,
                "max_total": limits.max_references, "video_seconds_total": [limits.min_video_seconds_total,
                                                                          limits.max_video_seconds_total],
                "max_audio_seconds_total": limits.max_audio_seconds_total,
                "image_formats": list(limits.image_formats), "video_formats": list(limits.video_formats),
                "audio_formats": list(limits.audio_formats),
            },
        },
    }
