"""Keys come only from checked parts; anything else is refused with ValueError."""

from __future__ import annotations

import pytest

from serving.jobs.record import new_job_id
from serving.storage.keys import (
    area_prefix,
    artifact_key,
    attempt_prefix,
    check_attempt,
    check_job_id,
    check_prefix,
    checkpoint_key,
    input_key,
    job_prefix,
    parse_key,
    result_key,
)

JOB = "video_" + "0123456789abcdef01234567"
TASK = "cgt-" + "0123456789abcdef01234567"

BAD_JOB_IDS = [
    "",
    "video_",
    JOB + "0",  # too long
    JOB[:-1],  # too short
    JOB.upper(),
    JOB[:-1] + "g",
    JOB + "\n",  # a trailing newline ($ in a careless regex lets it through)
    JOB + "\x00",
    "\x00" + JOB,
    "../" + JOB,
    JOB + "/..",
    "/" + JOB,
    "/etc/passwd",
    "..",
    "video_0123456789abcdef0123456/",
    "video_0123456789abcdef012345\u0660\u0661",  # Arabic-Indic digits: \d would take them
    "vid\u0435o_0123456789abcdef01234567",  # Cyrillic e
    "video_0123456789abcdef01234567\u200b",  # zero-width space
    "video\uff3f0123456789abcdef01234567",  # fullwidth low line
    "video_0123456789abcdef0123456\uff0f",  # fullwidth solidus
    "video_0123456789abcdef0123456\u0301",  # combining accent
    "cgt-" + "0123456789abcdef0123456",
    "cgt_0123456789abcdef01234567",
]


def test_job_ids_the_project_makes_pass():
    for _ in range(20):
        assert check_job_id(new_job_id())
    assert check_job_id(TASK) == TASK


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_other_job_ids_are_refused(job_id):
    with pytest.raises(ValueError, match="not a job id"):
        check_job_id(job_id)
    with pytest.raises(ValueError):
        result_key(job_id, 1)
    with pytest.raises(ValueError):
        input_key(job_id, "photo")


@pytest.mark.parametrize("job_id", [None, 7, b"video_0123456789abcdef01234567", ["video_"]])
def test_job_ids_that_are_not_strings_are_refused(job_id):
    with pytest.raises(ValueError):
        check_job_id(job_id)


@pytest.mark.parametrize("attempt", [0, -1, 1_000_000, True, 1.0, "1", None])
def test_attempts_are_positive_ints(attempt):
    with pytest.raises(ValueError):
        check_attempt(attempt)
    with pytest.raises(ValueError):
        artifact_key(JOB, attempt, "video_latents")


def test_the_layout():
    assert input_key(JOB, "photo") == f"inputs/{JOB}/photo"
    assert input_key(TASK, "ref-12") == f"inputs/{TASK}/ref-12"
    assert result_key(JOB, 3) == f"results/{JOB}/3/video.mp4"
    assert result_key(JOB, 3, "last_frame.png") == f"results/{JOB}/3/last_frame.png"
    assert artifact_key(JOB, 2, "prompt_embeddings") == f"artifacts/{JOB}/2/prompt_embeddings.safetensors"
    assert checkpoint_key(JOB, 2, 17) == f"artifacts/{JOB}/2/checkpoint-000017.safetensors"
    assert area_prefix("results") == "results/"
    assert job_prefix("inputs", JOB) == f"inputs/{JOB}/"
    assert attempt_prefix("artifacts", JOB, 2) == f"artifacts/{JOB}/2/"


def test_every_built_key_parses_back():
    parsed = parse_key(checkpoint_key(JOB, 4, 250))
    assert (parsed.area, parsed.job_id, parsed.attempt, parsed.checkpoint_step) == ("artifacts", JOB, 4, 250)
    parsed = parse_key(input_key(TASK, "last_frame"))
    assert (parsed.area, parsed.job_id, parsed.attempt, parsed.name) == ("inputs", TASK, None, "last_frame")
    assert parse_key(result_key(JOB, 1)).checkpoint_step is None
    assert parse_key(artifact_key(JOB, 1, "video_latents")).checkpoint_step is None


@pytest.mark.parametrize(
    "name",
    ["", "image", "photo/../x", "../photo", "photo\x00", "ref-100", "ref-01", "ref--1", "PHOTO", "ph\u043eto", "photo "],
)
def test_input_names_come_from_a_fixed_set(name):
    with pytest.raises(ValueError):
        input_key(JOB, name)


@pytest.mark.parametrize(
    "name", ["", "Video", "9lives", "a/b", "..", "a.b", "x" * 49, "latents\x00", "lat\u0435nts", "_x", "checkpoint-000001"]
)
def test_stage_output_names_are_plain(name):
    with pytest.raises(ValueError):
        artifact_key(JOB, 1, name)


@pytest.mark.parametrize("name", ["video.mp4/..", "../video.mp4", "video.mkv", "video.mp4\x00", "/video.mp4"])
def test_result_names_come_from_a_fixed_set(name):
    with pytest.raises(ValueError):
        result_key(JOB, 1, name)


@pytest.mark.parametrize("step", [-1, 1_000_000, True, 2.0])
def test_checkpoint_steps_are_bounded_ints(step):
    with pytest.raises(ValueError):
        checkpoint_key(JOB, 1, step)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/",
        f"/results/{JOB}/1/video.mp4",  # absolute
        f"results/{JOB}/1/video.mp4/",
        f"results//{JOB}/1/video.mp4",
        f"results/{JOB}/../{JOB}/1/video.mp4",
        f"results/{JOB}/01/video.mp4",  # a second spelling of attempt 1
        f"results/{JOB}/0/video.mp4",
        f"results/{JOB}/video.mp4",  # no attempt
        f"inputs/{JOB}/1/photo",  # inputs have no attempt
        f"artifacts/{JOB}/1/prompt_embeddings",  # no extension
        f"artifacts/{JOB}/1/prompt_embeddings.pkl",
        f"artifacts/{JOB}/1/checkpoint-17.safetensors",
        f"results\\{JOB}\\1\\video.mp4",
        f"results/{JOB}/1/video.mp4\x00.png",
        f"results/{JOB}/1/video.mp4#1",  # a local staging file
        f"results/{JOB}/1/video.mp4\n",
        f"other/{JOB}/1/video.mp4",
        f"results\uff0f{JOB}\uff0f1\uff0fvideo.mp4",
        "file:///etc/passwd",
        "s3://bucket/results",
    ],
)
def test_keys_not_of_the_layout_are_refused(key):
    with pytest.raises(ValueError, match="not an object key"):
        parse_key(key)


def test_prefixes():
    for prefix in ["", "results/", f"inputs/{JOB}/", f"artifacts/{JOB}/3/", f"results/{TASK}/1/"]:
        assert check_prefix(prefix) == prefix
    for prefix in ["results", "/", "../", f"inputs/{JOB}/1/", f"results/{JOB}", "x/", f"artifacts/{JOB}/0/", None]:
        with pytest.raises(ValueError):
            check_prefix(prefix)
    with pytest.raises(ValueError):
        attempt_prefix("inputs", JOB, 1)
    with pytest.raises(ValueError):
        area_prefix("../results")
