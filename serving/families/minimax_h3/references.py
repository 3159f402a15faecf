"""What a MiniMax-H3 request may carry besides its prompt, checked before any decode work.

The ingress calls these pure functions at admission (no torch, no diffusers):

- :func:`workflow_of` picks the workflow from the inputs' roles: none -> t2va,
  first/last frame -> fl2va, references -> ref2va; mixing the two is refused.
- :func:`inspect_reference` reads one file's header (Pillow for images, PyAV's
  container probe for video and audio): its format against the allow-list, its
  bytes, pixels and duration against the limits. Nothing is decoded.
- :func:`check_references` applies the request-wide rules on top (9 images,
  3 videos of 2 to 15 s in all, 3 audio clips of at most 15 s in all, 12 in all,
  audio never alone, keyframes and references not mixed).

Every refusal is an ``InvalidRequest`` naming the client's field (``references[2]``,
``first_frame``, ``references``) and the limit with its config field. Files that
pass here can still be corrupt inside; the stages find that when they decode
(``serving.families.minimax_h3.decoding``) and fail the job with
``InvalidReference``.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import av
from PIL import Image

from serving.errors import InvalidRequest
from serving.families.base import MEDIA_ROLES, MediaInput

__all__ = [
    "FIRST_FRAME",
    "KEYFRAME_ROLES",
    "LAST_FRAME",
    "REFERENCE_ROLES",
    "ROLE_KINDS",
    "InspectedReference",
    "ReferenceInput",
    "ReferenceLimits",
    "check_references",
    "client_field",
    "header_seconds",
    "inspect_reference",
    "reference_input_name",
    "reference_order",
    "workflow_of",
]

FIRST_FRAME = "first_frame"
LAST_FRAME = "last_frame"
KEYFRAME_ROLES = (FIRST_FRAME, LAST_FRAME)
REFERENCE_ROLES = ("reference_image", "reference_video", "reference_audio")
ROLE_KINDS = MEDIA_ROLES
_MAX_ASPECT_RATIO = 4.0  # the blocks refuse reference images and videos outside 1:4 .. 4:1
_REFERENCE_NAME = re.compile(r"ref-(\d+)")


@dataclass(frozen=True)
class ReferenceLimits:
    """The reference limits of one deployment (``ReferenceLimits.of(model_config)``)."""

    max_images: int = 9
    max_videos: int = 3
    max_audios: int = 3
    max_references: int = 12
    min_video_seconds_total: float = 2.0
    max_video_seconds_total: float = 15.0
    min_video_seconds: float = 0.6
    max_audio_seconds_total: float = 15.0
    max_image_bytes: int = 30_000_000
    max_video_bytes: int = 50_000_000
    max_audio_bytes: int = 15_000_000
    max_image_pixels: int = 36_000_000
    min_image_side: int = 16
    max_video_pixels: int = 1920 * 1080
    image_formats: tuple[str, ...] = ("jpeg", "png", "webp")
    video_formats: tuple[str, ...] = ("mp4", "mov", "webm")
    audio_formats: tuple[str, ...] = ("wav", "mp3", "aac", "m4a", "flac", "ogg")

    @classmethod
    def of(cls, config) -> ReferenceLimits:
        """The limits a ``MiniMaxH3ModelConfig`` sets."""
        return cls(
            max_images=config.max_reference_images,
            max_videos=config.max_reference_videos,
            max_audios=config.max_reference_audios,
            max_references=config.max_references,
            min_video_seconds_total=config.min_video_reference_seconds_total,
            max_video_seconds_total=config.max_video_reference_seconds_total,
            min_video_seconds=config.min_video_reference_seconds,
            max_audio_seconds_total=config.max_audio_reference_seconds_total,
            max_image_bytes=config.max_image_reference_bytes,
            max_video_bytes=config.max_video_reference_bytes,
            max_audio_bytes=config.max_audio_reference_bytes,
            max_image_pixels=config.max_image_reference_pixels,
            min_image_side=config.min_image_reference_side,
            max_video_pixels=config.max_video_reference_pixels,
            image_formats=tuple(config.image_formats),
            video_formats=tuple(config.video_formats),
            audio_formats=tuple(config.audio_formats),
        )


ReferenceInput = MediaInput  # one file a client sent: its field as the client named it, its role, its bytes


@dataclass(frozen=True)
class InspectedReference:
    """What the header of an accepted file says."""

    field: str
    role: str
    kind: str
    duration_s: float  # 0 for images
    width: int  # 0 for audio
    height: int


# --------------------------------------------------------------------------- names


def reference_input_name(index: int) -> str:
    """The name the ingress stores the ``index``-th reference under (the order the model reads them)."""
    return f"ref-{index}"


def client_field(input_name: str) -> str:
    """The field a stored input came from, as the client wrote it: ``ref-2`` -> ``references[2]``."""
    match = _REFERENCE_NAME.fullmatch(input_name)
    return f"references[{match.group(1)}]" if match else input_name


def reference_order(input_name: str) -> int:
    """Where a stored reference stands in the order the model reads them (keyframes first)."""
    match = _REFERENCE_NAME.fullmatch(input_name)
    return int(match.group(1)) if match else -1


# --------------------------------------------------------------------------- the workflow


def workflow_of(inputs: Iterable) -> str:
    """The workflow a request's inputs ask for (each input has a ``role``): t2va, fl2va or ref2va."""
    roles = [item.role for item in inputs]
    for role in roles:
        if role not in ROLE_KINDS:
            raise InvalidRequest("role", f"unknown role '{role}'; allowed: {', '.join(ROLE_KINDS)}")
    keyframes = [getattr(item, "field", item.role) for item in inputs if item.role in KEYFRAME_ROLES]
    references = [role for role in roles if role in REFERENCE_ROLES]
    if keyframes and references:
        raise InvalidRequest(
            keyframes[0],
            "a first or last frame cannot be combined with references: keyframes (fl2va) and references (ref2va) "
            "are separate workflows",
        )
    if references:
        return "ref2va"
    return "fl2va" if keyframes else "t2va"


# --------------------------------------------------------------------------- one file's header


def inspect_reference(kind: str, data: bytes, limits: ReferenceLimits, field: str = "reference") -> tuple[float, int, int]:
    """``(duration_s, width, height)`` from the file's header alone; ``InvalidRequest(field, ...)`` when the file is
    not an allowed ``kind`` (image, video, audio) or breaks a limit."""
    if kind == "image":
        return _inspect_image(data, limits, field)
    if kind in ("video", "audio"):
        return _inspect_stream(kind, data, limits, field)
    raise InvalidRequest(field, f"unknown kind '{kind}'; allowed: image, video, audio")


def _check_bytes(data: bytes, cap: int, kind: str, field: str, setting: str) -> None:
    if not data:
        raise InvalidRequest(field, f"the {kind} is empty")
    if len(data) > cap:
        raise InvalidRequest(field, f"the {kind} is {len(data)} bytes; at most {cap} (model.{setting})")


def _inspect_image(data: bytes, limits: ReferenceLimits, field: str) -> tuple[float, int, int]:
    _check_bytes(data, limits.max_image_bytes, "image", field, "max_image_reference_bytes")
    allowed = ", ".join(limits.image_formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel cap below is lower
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                image_format, (width, height) = (image.format or "").lower(), image.size
                image_format = "jpeg" if image_format == "mpo" else image_format  # a phone camera's multi-picture JPEG
    except Image.DecompressionBombError:
        raise InvalidRequest(field, f"the image has too many pixels; at most {limits.max_image_pixels} "
                                    "(model.max_image_reference_pixels)") from None
    except (OSError, SyntaxError, ValueError):
        raise InvalidRequest(field, f"not an image of an allowed format ({allowed})") from None
    if image_format not in limits.image_formats:
        raise InvalidRequest(field, f"image format '{image_format}' is not allowed; allowed: {allowed} (model.image_formats)")
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(field, f"the image is {width}x{height} = {width * height} pixels; at most "
                                    f"{limits.max_image_pixels} (model.max_image_reference_pixels)")
    if min(width, height) < limits.min_image_side:
        raise InvalidRequest(field, f"the image is {width}x{height}; its shortest side must be at least "
                                    f"{limits.min_image_side} pixels (model.min_image_reference_side)")
    return 0.0, width, height


_CONTAINER_OPTIONS = {"probesize": "5000000", "analyzeduration": "5000000"}  # bound what the probe reads


def _inspect_stream(kind: str, data: bytes, limits: ReferenceLimits, field: str) -> tuple[float, int, int]:
    cap, setting = ((limits.max_video_bytes, "max_video_reference_bytes") if kind == "video"
                    else (limits.max_audio_bytes, "max_audio_reference_bytes"))
    _check_bytes(data, cap, kind, field, setting)
    allowed = limits.video_formats if kind == "video" else limits.audio_formats
    try:
        with av.open(io.BytesIO(data), options=_CONTAINER_OPTIONS, metadata_errors="replace") as container:
            format_name = container.format.name
            names = set(format_name.split(","))
            streams = container.streams.video if kind == "video" else container.streams.audio
            if not streams:
                raise InvalidRequest(field, f"the file has no {kind} stream")
            stream = streams[0]
            duration = header_seconds(container, stream)
            codec: Any = stream.codec_context  # a video stream's, when kind is video
            if codec is None:  # a stream of a codec FFmpeg does not know
                raise InvalidRequest(field, f"the {kind} stream's codec cannot be read")
            width = int(codec.width or 0) if kind == "video" else 0
            height = int(codec.height or 0) if kind == "video" else 0
    except (av.FFmpegError, UnicodeDecodeError, ValueError, AttributeError, TypeError):  # whatever a broken header
        raise InvalidRequest(field, f"not a {kind} file of an allowed format ({', '.join(allowed)})") from None
    if not names & set(allowed):
        raise InvalidRequest(
            field, f"{kind} container '{format_name}' is not allowed; allowed: {', '.join(allowed)} "
                   f"(model.{kind}_formats)")
    if duration is None or duration <= 0:
        raise InvalidRequest(field, f"the {kind}'s duration cannot be read from its header")
    if kind == "video":
        _check_video_frame(width, height, limits, field)
        if duration > limits.max_video_seconds_total:
            raise InvalidRequest(field, f"the video lasts {duration:.1f} s; video references may last at most "
                                        f"{limits.max_video_seconds_total:g} s in all "
                                        "(model.max_video_reference_seconds_total)")
        if duration < limits.min_video_seconds:
            raise InvalidRequest(field, f"the video lasts {duration:.2f} s; a video reference needs at least "
                                        f"{limits.min_video_seconds:g} s (model.min_video_reference_seconds)")
    elif duration > limits.max_audio_seconds_total:
        raise InvalidRequest(field, f"the audio lasts {duration:.1f} s; audio references may last at most "
                                    f"{limits.max_audio_seconds_total:g} s in all "
                                    "(model.max_audio_reference_seconds_total)")
    return duration, width, height


def header_seconds(container, stream) -> float | None:
    """A stream's duration as its container's header states it (None when it does not)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_video_frame(width: int, height: int, limits: ReferenceLimits, field: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidRequest(field, "the video's frame size cannot be read from its header")
    if width * height > limits.max_video_pixels:
        raise InvalidRequest(field, f"the video is {width}x{height} = {width * height} pixels a frame; at most "
                                    f"{limits.max_video_pixels} (model.max_video_reference_pixels)")
    if max(width / height, height / width) > _MAX_ASPECT_RATIO:
        raise InvalidRequest(field, f"the video is {width}x{height}; its aspect ratio must lie between 1:4 and 4:1")


# --------------------------------------------------------------------------- the whole request


def check_references(inputs: Sequence[ReferenceInput], limits: ReferenceLimits) -> tuple[InspectedReference, ...]:
    """Every request-wide rule, then each file's header: the accepted files, in order, or ``InvalidRequest``.

    Counts and roles are checked before any header is read, so a request with ten images costs no parsing.
    """
    workflow_of(inputs)  # unknown roles; keyframes mixed with references
    _check_keyframes(inputs)
    _check_counts(inputs, limits)
    inspected = []
    for item in inputs:
        kind = ROLE_KINDS[item.role]
        duration, width, height = inspect_reference(kind, item.data, limits, item.field)
        if item.role == "reference_image" and max(width / height, height / width) > _MAX_ASPECT_RATIO:
            raise InvalidRequest(item.field, f"the image is {width}x{height}; a reference image's aspect ratio must "
                                             "lie between 1:4 and 4:1")
        inspected.append(InspectedReference(item.field, item.role, kind, duration, width, height))
    _check_totals(inspected, limits)
    return tuple(inspected)


def _check_keyframes(inputs: Sequence[ReferenceInput]) -> None:
    for role in KEYFRAME_ROLES:
        given = [item for item in inputs if item.role == role]
        if len(given) > 1:
            raise InvalidRequest(given[1].field, f"one {role} at most, got {len(given)}")


def _check_counts(inputs: Sequence[ReferenceInput], limits: ReferenceLimits) -> None:
    roles = [item.role for item in inputs]
    counts = {kind: roles.count(f"reference_{kind}") for kind in ("image", "video", "audio")}
    caps = {"image": (limits.max_images, "max_reference_images"), "video": (limits.max_videos, "max_reference_videos"),
            "audio": (limits.max_audios, "max_reference_audios")}
    for kind, (cap, setting) in caps.items():
        if counts[kind] > cap:
            raise InvalidRequest("references", f"{counts[kind]} {kind} references; at most {cap} (model.{setting})")
    total = sum(counts.values())
    if total > limits.max_references:
        raise InvalidRequest("references", f"{total} references; at most {limits.max_references} in all "
                                           "(model.max_references)")
    if counts["audio"] and not counts["image"] and not counts["video"]:
        raise InvalidRequest("references", "audio references need at least one image or video reference beside them")


def _check_totals(inspected: Sequence[InspectedReference], limits: ReferenceLimits) -> None:
    videos = [item for item in inspected if item.role == "reference_video"]
    if videos:
        total = sum(item.duration_s for item in videos)
        if total > limits.max_video_seconds_total:
            raise InvalidRequest("references", f"the video references last {total:.1f} s in all; at most "
                                               f"{limits.max_video_seconds_total:g} s "
                                               "(model.max_video_reference_seconds_total)")
        if total < limits.min_video_seconds_total:
            raise InvalidRequest("references", f"the video references last {total:.1f} s in all; at least "
                                               f"{limits.min_video_seconds_total:g} s "
                                               "(model.min_video_reference_seconds_total)")
    audio = sum(item.duration_s for item in inspected if item.role == "reference_audio")
    if audio > limits.max_audio_seconds_total:
        raise InvalidRequest("references", f"the audio references last {audio:.1f} s in all; at most "
                                           f"{limits.max_audio_seconds_total:g} s "
                                           "(model.max_audio_reference_seconds_total)")
