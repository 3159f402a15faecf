"""How far along a job is, as the API's 0-100 ``progress``.

Denoising dominates the run time, so it gets most of the range; the other
stages get fixed marks. Every mark is higher than the one before.
"""

from __future__ import annotations

__all__ = ["STAGE_PROGRESS", "diffusion_progress"]

_DIFFUSION_START, _DIFFUSION_END = 5, 90

STAGE_PROGRESS = {
    "queued": 0,
    "prompt_rewriter": 1,
    "text_encoder": 2,
    "image_conditioner": 3,
    "diffusion": _DIFFUSION_START,
    "decoders": _DIFFUSION_END,
    "muxer": 95,
    "completed": 100,
}


def diffusion_progress(finished_steps: int, total_steps: int) -> int:
    span = _DIFFUSION_END - _DIFFUSION_START
    return _DIFFUSION_START + (span * finished_steps) // max(total_steps, 1)
