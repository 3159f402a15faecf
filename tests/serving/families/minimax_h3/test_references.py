"""Admission's reference checks: pure functions over the files' headers, each refusal naming the field and the
limit, no decode work spent."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from serving.errors import InvalidRequest
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.families.minimax_h3.references import (
    ReferenceInput,
    ReferenceLimits,
    check_references,
    client_field,
    inspect_reference,
    reference_input_name,
    workflow_of,
)
from serving.protocol import InputSpec
from tests.conftest import png_with_claimed_size
from tests.serving.families.minimax_h3.conftest import encode_mp4

LIMITS = ReferenceLimits.of(MiniMaxH3ModelConfig())
GARBAGE = b"\x00not a media file\x00" * 4  # counts are refused before any header is read


def refs(role: str, count: int, data: bytes = GARBAGE, start: int = 0) -> list[ReferenceInput]:
    return [ReferenceInput(f"references[{start + i}]", role, data) for i in range(count)]


@pytest.fixture(scope="module")
def files(media):
    return {
        "image": media.reference_png,
        "video": encode_mp4(2.5, 24, 64, 48, audio_rate=None),
        "audio": media.audio_wav,
        "short_video": encode_mp4(1.5, 24, 64, 48, audio_rate=None),
        "long_video": encode_mp4(20.0, 2, 32, 32, audio_rate=None, seed=2),  # 20 s at 2 fps: cheap to build
        "eight_seconds": encode_mp4(8.0, 2, 32, 32, audio_rate=None, seed=3),
    }


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        (lambda f: refs("reference_image", 10), "references", r"10 image references; at most 9 \(model.max_reference_images\)"),
        (lambda f: refs("reference_video", 4), "references", r"4 video references; at most 3 \(model.max_reference_videos\)"),
        (lambda f: refs("reference_image", 1) + refs("reference_audio", 4, start=1), "references",
         r"4 audio references; at most 3 \(model.max_reference_audios\)"),
        (lambda f: refs("reference_image", 9) + refs("reference_video", 3, start=9) + refs("reference_audio", 1, start=12),
         "references", r"13 references; at most 12 in all \(model.max_references\)"),
        (lambda f: refs("reference_audio", 2), "references", "audio references need at least one image or video"),
        (lambda f: [ReferenceInput("first_frame", "first_frame", f["image"]), *refs("reference_image", 1)],
         "first_frame", "cannot be combined with references"),
        (lambda f: [ReferenceInput("references[0]", "reference_video", f["long_video"])], "references[0]",
         r"the video lasts 20.0 s; video references may last at most 15 s in all \(model.max_video_reference_seconds_total\)"),
        (lambda f: [ReferenceInput("references[0]", "reference_image", png_with_claimed_size(8000, 5000))],
         "references[0]", r"8000x5000 = 40000000 pixels; at most 36000000 \(model.max_image_reference_pixels\)"),
        (lambda f: [ReferenceInput("references[0]", "reference_image", f["image"]),
                    ReferenceInput("references[1]", "reference_video", b"just some text, sent as a video\n" * 50)],
         "references[1]", r"not a video file of an allowed format \(mp4, mov, webm\)"),
        (lambda f: [ReferenceInput("references[0]", "reference_image", f["image"]),
                    ReferenceInput("references[1]", "reference_audio", f["image"])],
         "references[1]", "the file has no audio stream"),
        (lambda f: [ReferenceInput("references[0]", "reference_video", f["short_video"])], "references",
         r"the video references last 1.5 s in all; at least 2 s \(model.min_video_reference_seconds_total\)"),
        (lambda f: [ReferenceInput(f"references[{i}]", "reference_video", f["eight_seconds"]) for i in range(2)],
         "references", r"the video references last 16.0 s in all; at most 15 s \(model.max_video_reference_seconds_total\)"),
        (lambda f: [ReferenceInput("x", "style_reference", f["image"])], "role", "unknown role 'style_reference'"),
        (lambda f: [ReferenceInput("references[0]", "reference_image", f["image"][:0])], "references[0]", "the image is empty"),
    ],
    ids=["10-images", "4-videos", "4-audio", "13-in-all", "audio-alone", "keyframe-and-references", "20s-video",
         "40MP-image", "text-as-video", "image-as-audio", "videos-under-2s", "videos-over-15s", "unknown-role", "empty"],
)
def test_each_rule_names_the_field_and_the_limit(files, inputs, field, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        check_references(inputs(files), LIMITS)
    assert caught.value.field == field


def test_an_omni_reference_request_passes_with_what_its_headers_say(files):
    accepted = check_references(
        [ReferenceInput("references[0]", "reference_image", files["image"]),
         ReferenceInput("references[1]", "reference_video", files["video"]),
         ReferenceInput("references[2]", "reference_audio", files["audio"])],
        LIMITS,
    )
    assert [(item.kind, item.width, item.height) for item in accepted] == [("image", 80, 48), ("video", 64, 48), ("audio", 0, 0)]
    assert accepted[1].duration_s == pytest.approx(2.5, abs=0.1) and accepted[2].duration_s == pytest.approx(1.0, abs=0.05)


def test_inspect_reference_reads_headers_only(files):
    assert inspect_reference("image", png_with_claimed_size(6000, 6000), LIMITS) == (0.0, 6000, 6000)  # never decoded
    duration, width, height = inspect_reference("video", files["long_video"], ReferenceLimits(max_video_seconds_total=30))
    assert (round(duration), width, height) == (20, 32, 32)
    with pytest.raises(InvalidRequest, match="image format 'gif' is not allowed") as caught:
        inspect_reference("image", _gif(), LIMITS, field="last_frame")
    assert caught.value.field == "last_frame"


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_the_workflow_follows_the_roles():
    assert workflow_of([]) == "t2va"
    assert workflow_of([InputSpec("last_frame", "image", "last_frame")]) == "fl2va"
    assert workflow_of([InputSpec(reference_input_name(0), "audio", "reference_audio"),
                        InputSpec(reference_input_name(1), "image", "reference_image")]) == "ref2va"
    assert client_field(reference_input_name(2)) == "references[2]" and client_field("first_frame") == "first_frame"
