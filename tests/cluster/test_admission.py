"""Admission by expected queue wait at the maximum replica count."""

from __future__ import annotations

import pytest

from cluster.admission import AdmissionLimits, JobLoad, StepRate, admit, backlog_token_steps, estimated_queue_wait_s
from cluster.config import ReelserveConfig, load_config
from serving.families.ltx2.config import LTX2ModelConfig

RATE = 3.5e-4
BIG = LTX2ModelConfig().latent_tokens(1280, 704, 5, 24)  # 14,080 tokens: 148 s at 30 steps


def test_the_backlog_counts_only_the_steps_left():
    jobs = [JobLoad(BIG, 30), JobLoad(BIG, 30, finished_steps=20), JobLoad(448, 30, finished_steps=30)]
    assert backlog_token_steps(jobs) == BIG * 30 + BIG * 10
    assert backlog_token_steps([]) == 0


def test_the_wait_shares_the_backlog_across_the_maximum_replicas():
    backlog = 12 * BIG * 30  # twelve default jobs: 1,774 GPU-s
    assert estimated_queue_wait_s(backlog, RATE, 1) == pytest.approx(1774, abs=1)
    assert estimated_queue_wait_s(backlog, RATE, 6) == pytest.approx(296, abs=1)
    with pytest.raises(ValueError, match="max_replicas"):
        estimated_queue_wait_s(backlog, RATE, 0)


def test_admitted_under_the_bound_and_refused_over_it_with_retry_after_from_the_estimate():
    backlog = 12 * BIG * 30
    assert admit(backlog, RATE, max_replicas=6, max_queue_wait_s=600).admitted
    refused = admit(backlog, RATE, max_replicas=1, max_queue_wait_s=600)
    assert not refused.admitted
    assert refused.retry_after_s == 1774 - 600 + 1  # ceil(1774.08 - 600): the backlog drained at one replica
    assert refused.reason.startswith("the video queue is full: a new job would wait about 30 min")
    # after Retry-After, at the same rate, the wait is back to the bound
    drained = backlog - refused.retry_after_s / RATE
    assert admit(drained, RATE, 1, 600).admitted


def test_no_bound_never_refuses_and_retry_after_has_a_floor():
    assert admit(10**12, RATE, 1, None).admitted
    barely = admit(601 / RATE, 1.0 * RATE, 1, 600.5, min_retry_after_s=5)
    assert not barely.admitted and barely.retry_after_s == 5


def test_the_step_rate_moves_from_the_prior_to_what_finished_jobs_measured():
    rate = StepRate(prior=RATE, smoothing=0.5)
    assert rate.value == RATE and rate.measured == 0
    rate.observe(tokens=BIG, steps=30, diffusion_seconds=BIG * 30 * 2e-4)
    assert rate.value == pytest.approx(2e-4)  # the first measurement replaces the prior
    rate.observe(tokens=BIG, steps=30, diffusion_seconds=BIG * 30 * 4e-4)
    assert rate.value == pytest.approx(3e-4)
    rate.observe(tokens=BIG, steps=30, diffusion_seconds=0)  # a job cut before any step: ignored
    assert rate.measured == 2
    with pytest.raises(ValueError, match="prior"):
        StepRate(prior=0)


def test_the_default_bound_admits_a_full_default_queue_on_the_8x_h100_profile():
    config = load_config("cluster/profiles/8x-h100.yaml")
    jobs = [JobLoad(BIG, 30)] * config.jobs.max_active_jobs  # 64 default jobs queued
    answer = admit(backlog_token_steps(jobs), config.model.seconds_per_token_step,
                   config.stages["diffusion"].max_replicas, config.jobs.max_queue_wait_s)
    assert answer.estimated_wait_s == pytest.approx(64 * 147.84 / 6, rel=1e-3)  # 26 min at six replicas
    assert answer.admitted  # under the default 30 min: max_active_jobs still bounds first on this profile
    assert not admit(backlog_token_steps(jobs * 2), config.model.seconds_per_token_step,
                     config.stages["diffusion"].max_replicas, config.jobs.max_queue_wait_s).admitted


def _admit(config, jobs: list[JobLoad], rate: StepRate):
    """What the ingress does: the limits from the config, the backlog from the store's active jobs."""
    limits = AdmissionLimits.of(config)
    return admit(backlog_token_steps(jobs), rate.value, limits.diffusion_replicas, limits.max_queue_wait_s,
                 min_retry_after_s=limits.retry_after_s)


def test_admission_reads_the_bound_replicas_and_retry_floor_from_the_config():
    config = ReelserveConfig(
        stages={"diffusion": {"num_replicas": None, "max_replicas": 2}},
        jobs={"retry_after_s": 30, "max_queue_wait_s": 300},
    )
    rate = StepRate(prior=RATE)
    job = JobLoad.of(config.model, 1280, 704, 5, 24, steps=30)
    assert job == JobLoad(BIG, 30)
    assert _admit(config, [job] * 4, rate).admitted  # 591 GPU-s over 2 replicas: 296 s
    refused = _admit(config, [job] * 5, rate)  # 370 s
    assert not refused.admitted and refused.retry_after_s == 70
    barely = _admit(config, [job] * 4 + [JobLoad(BIG, 30, finished_steps=29)] * 2, rate)  # 306 s: floor of 30
    assert not barely.admitted and barely.retry_after_s == 30
    fixed = ReelserveConfig(stages={"diffusion": {"num_replicas": 3}}, jobs={"max_queue_wait_s": 300})
    assert _admit(fixed, [job] * 5, rate).admitted  # three fixed replicas: 246 s
