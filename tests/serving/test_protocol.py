"""RenderPlan frame arithmetic and JobStatus ordering."""

from __future__ import annotations

import numpy as np
import pytest

from serving.protocol import JobStatus, RenderPlan, VideoFrames, Waveform


def _plan(seconds: float, fps: int, temporal_compression: int = 8) -> RenderPlan:
    return RenderPlan.build(
        width=96,
        height=64,
        fps=fps,
        seconds=seconds,
        seed=3,
        num_inference_steps=4,
        frame_step=temporal_compression,
    )


@pytest.mark.parametrize(
    ("seconds", "fps", "output_frames", "generated_frames"),
    [
        (1, 24, 24, 25),  # 24 frames need 3 blocks of 8 (+1)
        (2, 24, 48, 49),
        (5, 24, 120, 121),
        (0.375, 24, 9, 9),  # exactly 8k+1: nothing extra
        (25 / 24, 24, 25, 25),
        (1, 25, 25, 25),
        (1, 30, 30, 33),
        (0.5, 30, 15, 17),
        (4, 8, 32, 33),
        (0.01, 24, 1, 1),  # rounds to 0 frames: at least one frame
        (0.05, 24, 1, 1),  # 1.2 -> 1
        (0.1, 24, 2, 9),  # 2.4 -> 2
        (20, 60, 1200, 1201),
    ],
)
def test_build_frame_math(seconds, fps, output_frames, generated_frames):
    plan = _plan(seconds, fps)
    assert plan.output_frames == output_frames
    assert plan.generated_frames == generated_frames
    assert plan.duration_s == pytest.approx(output_frames / fps)


@pytest.mark.parametrize("temporal_compression", [1, 4, 8])
@pytest.mark.parametrize("fps", [1, 7, 24, 25, 30, 60])
@pytest.mark.parametrize("seconds", [0.2, 0.5, 1, 1.5, 2, 3.3, 5, 7.25, 10])
def test_build_invariants(seconds, fps, temporal_compression):
    plan = _plan(seconds, fps, temporal_compression)
    # Output frames: the requested duration rounded to whole frames (never zero).
    assert plan.output_frames == max(1, round(seconds * fps))
    if seconds * fps >= 0.5:  # below half a frame the one-frame floor applies
        assert abs(plan.duration_s - seconds) <= 0.5 / fps + 1e-9
    # Generated frames: of the form k * temporal_compression + 1 ...
    assert (plan.generated_frames - 1) % temporal_compression == 0
    # ... covering the output ...
    assert plan.generated_frames >= plan.output_frames
    # ... and the smallest such count.
    assert plan.generated_frames - temporal_compression < plan.output_frames


def test_build_keeps_the_other_fields():
    plan = RenderPlan.build(
        width=768, height=512, fps=24, seconds=2.5, seed=1234, num_inference_steps=30, frame_step=8
    )
    assert (plan.width, plan.height, plan.fps, plan.seconds, plan.seed, plan.num_inference_steps) == (
        768,
        512,
        24,
        2.5,
        1234,
        30,
    )
    with pytest.raises(AttributeError):
        plan.width = 32  # frozen: a plan is fixed before any stage runs


def test_terminal_states_sort_after_in_progress():
    terminal = [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED]
    for status in terminal:
        assert status > JobStatus.IN_PROGRESS > JobStatus.QUEUED
        assert status.is_terminal
    assert not JobStatus.QUEUED.is_terminal
    assert not JobStatus.IN_PROGRESS.is_terminal
    assert {s for s in JobStatus if s.is_terminal} == set(terminal)
    assert sorted(JobStatus, key=int)[:2] == [JobStatus.QUEUED, JobStatus.IN_PROGRESS]
    assert max(JobStatus.IN_PROGRESS, JobStatus.COMPLETED) is JobStatus.COMPLETED


def test_api_names():
    assert [s.api_name for s in JobStatus] == ["queued", "in_progress", "completed", "failed", "cancelled", "expired"]


def test_video_frames_from_unit_float_rounds_and_clips():
    frames = np.array([-0.5, 0.0, 0.5 / 255, 0.5, 1.0, 1.7], dtype=np.float32).reshape(1, 1, 6, 1).repeat(3, axis=3)
    video = VideoFrames.from_unit_float(frames, fps=24)
    assert video.pixels.dtype == np.uint8
    assert video.pixels[0, 0, :, 0].tolist() == [0, 0, 0, 128, 255, 255]
    assert video.fps == 24


def test_waveform_duration():
    assert Waveform(samples=np.zeros((2, 8000), np.float32), sample_rate=16000).duration_s == pytest.approx(0.5)
