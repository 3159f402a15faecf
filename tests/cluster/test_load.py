"""What replicas report for autoscaling: the trackers, on a clock the test moves."""

from __future__ import annotations

import pytest

from cluster import load
from cluster.load import DiffusionLoad, StageLoad


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_diffusion_reports_its_backlog_in_token_steps_and_its_measured_rate():
    clock = Clock()
    tracker = DiffusionLoad(rate_window_s=60, smoothing=0.5, clock=clock)
    assert tracker.report()[load.RUNNING_TOKEN_STEPS] == 0 and tracker.report()[load.SECONDS_PER_TOKEN_STEP] == 0

    tracker.queued("a", tokens=100, steps=10)
    tracker.queued("b", tokens=50, steps=4)
    tracker.queued("resumed", tokens=10, steps=8, finished_steps=6)  # taken over from a checkpoint at step 6
    tracker.started("a")
    tracker.stepped("a", seconds=2.0)  # 0.02 s per token-step
    tracker.stepped("a", seconds=4.0)  # 0.04: the mean moves half way
    report = tracker.report()
    assert report[load.RUNNING_TOKEN_STEPS] == 100 * 8
    assert report[load.QUEUED_TOKEN_STEPS] == 50 * 4 + 10 * 2
    assert (report[load.RUNNING_REQUESTS], report[load.QUEUED_REQUESTS], report[load.IN_FLIGHT]) == (1, 2, 3)
    assert report[load.SECONDS_PER_TOKEN_STEP] == pytest.approx(0.03)
    assert report[load.MEAN_REQUEST_TOKEN_STEPS] == pytest.approx((1000 + 200 + 80) / 3)
    assert report[load.ARRIVALS_PER_S] == pytest.approx(3 / 60)

    tracker.started("b")
    tracker.stepped(["a", "b"], seconds=3.0)  # a batched step: 150 tokens in 3 s
    assert tracker.seconds_per_token_step == pytest.approx(0.5 * 0.03 + 0.5 * 0.02)
    tracker.finished("a")
    tracker.finished("b", completed=False)  # cancelled: leaves, but is no completion
    report = tracker.report()
    assert report[load.RUNNING_TOKEN_STEPS] == 0 and report[load.QUEUED_TOKEN_STEPS] == 20
    assert report[load.COMPLETIONS_PER_S] == pytest.approx(1 / 60)

    clock.now += 61  # everything left the window
    report = tracker.report()
    assert report[load.ARRIVALS_PER_S] == report[load.COMPLETIONS_PER_S] == report[load.MEAN_REQUEST_TOKEN_STEPS] == 0
    assert report[load.SECONDS_PER_TOKEN_STEP] > 0  # the measured rate stays


def test_every_reported_value_is_a_float_under_its_own_prefix():
    # Serve keeps its own counts in the same store under plain names ("running_requests"); ours must not collide,
    # and Serve disables a replica's stats whose values are not numbers.
    reports = [DiffusionLoad().report(), StageLoad().report()]
    for report in reports:
        assert all(key.startswith("reelserve_") for key in report)
        assert all(isinstance(value, float) for value in report.values())


def test_bad_requests_are_refused_by_name():
    tracker = DiffusionLoad()
    with pytest.raises(ValueError, match="request x: tokens and steps must be positive"):
        tracker.queued("x", tokens=0, steps=3)
    tracker.queued("y", tokens=1, steps=1)
    with pytest.raises(ValueError, match="request y is already tracked"):
        tracker.queued("y", tokens=1, steps=1)
    with pytest.raises(ValueError, match="rate_window_s"):
        DiffusionLoad(rate_window_s=0)


def test_a_stage_reports_arrivals_service_time_and_what_it_holds():
    clock = Clock()
    tracker = StageLoad(rate_window_s=10, smoothing=1.0, clock=clock)
    for _ in range(3):
        tracker.arrived()
    tracker.done(busy_seconds=2.0)
    tracker.done(busy_seconds=None)  # failed before any work: no service time
    report = tracker.report()
    assert report[load.ARRIVALS_PER_S] == pytest.approx(0.3)
    assert report[load.COMPLETIONS_PER_S] == pytest.approx(0.2)
    assert report[load.SERVICE_SECONDS] == 2.0
    assert report[load.IN_FLIGHT] == 1
    clock.now += 11
    assert tracker.report()[load.ARRIVALS_PER_S] == 0
