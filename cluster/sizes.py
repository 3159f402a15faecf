"""Size arithmetic shared by the config, the request checks and the planner."""

from __future__ import annotations

import math
import re

__all__ = ["SPATIAL_COMPRESSION", "TEMPORAL_COMPRESSION", "parse_size", "latent_tokens", "parse_shape_bucket"]

# LTX-2's video VAE: 32x in space, 8x in time (the tiny checkpoint keeps the same rules).
SPATIAL_COMPRESSION = 32
TEMPORAL_COMPRESSION = 8


def latent_tokens(
    width: int, height: int, seconds: float, fps: int,
    spatial: int = SPATIAL_COMPRESSION, temporal: int = TEMPORAL_COMPRESSION,
) -> int:
    """Latent tokens of one request: the unit of the request budget (and of diffusion's cost per step)."""
    output_frames = max(1, round(seconds * fps))
    latent_frames = math.ceil(max(output_frames - 1, 0) / temporal) + 1
    return latent_frames * (height // spatial) * (width // spatial)


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> ``(768, 512)``; raises ``ValueError`` with the accepted form."""
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", str(text))
    if match is None:
        raise ValueError(f"'{text}' is not a size; write WIDTHxHEIGHT in pixels, e.g. 768x512")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise ValueError(f"'{text}' has a zero dimension; both width and height must be positive")
    return width, height




def parse_shape_bucket(text: str) -> tuple[int, int, int]:
    """``"1280x704x121"`` -> ``(1280, 704, 121)``; raises ``ValueError`` with the accepted form."""
    match = re.fullmatch(r"\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,4})\s*", str(text))
    if match is None or 0 in (values := tuple(int(g) for g in match.groups())):
        raise ValueError(f"'{text}' is not a shape bucket; write WIDTHxHEIGHTxFRAMES, e.g. 1280x704x121")
    width, height, frames = values
    return width, height, frames
