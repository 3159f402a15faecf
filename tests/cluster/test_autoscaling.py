"""The autoscaling policies: their math, and replays of job traces through Serve's own policy wrapper.

Traces run on a simulated clock (``scaling_sim``): the replica stats come from
the real ``DiffusionLoad`` tracker, the policy from the stage's real
``autoscaling_config``. Sizes and rates are LTX-2 19B on H100s: a default job
(1280x704, 5 s, 30 steps) is 14,080 tokens x 30 steps x 3.5e-4 s = 148 s.
"""

from __future__ import annotations

import pytest

from cluster.autoscaling import (
    DiffusionPolicySettings,
    DiffusionReplica,
    FollowerReplica,
    FollowerSettings,
    apply_delays,
    diffusion_replicas_wanted,
    follower_replicas_wanted,
    queue_wait_s,
)
from cluster.config import ReelserveConfig
from cluster.placement import stage_options
from serving.families.ltx2.config import LTX2ModelConfig
from tests.cluster.scaling_sim import DiffusionDeployment, Job

RATE = 3.5e-4
BIG = LTX2ModelConfig().latent_tokens(1280, 704, 5, 24)  # 14,080
SMALL = LTX2ModelConfig().latent_tokens(256, 256, 2, 24)  # 448
STEPS = 30
JOB_S = BIG * STEPS * RATE  # 147.8 s
SCALING = {"target_queue_wait_s": 120, "replica_start_s": 240, "upscale_delay_s": 15, "downscale_delay_s": 600}


def _config(max_replicas: int = 4, **scaling) -> ReelserveConfig:
    return ReelserveConfig(
        model={"path": "/models/LTX-2", "num_inference_steps": STEPS, "default_size": "1280x704", "default_seconds": 5},
        stages={"diffusion": {"num_replicas": None, "min_replicas": 1, "max_replicas": max_replicas,
                              "max_ongoing_requests": 1, "max_queued_requests": 64}},
        scaling={**SCALING, **scaling},
    )


def _deployment(
    report_stats: bool = True, max_replicas: int = 4, max_ongoing_requests: int = 1, replica_start_s: float = 240
) -> DiffusionDeployment:
    config = _config(max_replicas, replica_start_s=replica_start_s)
    return DiffusionDeployment(
        stage_options("diffusion", config)["autoscaling_config"], RATE, replica_start_s=replica_start_s,
        report_stats=report_stats, max_ongoing_requests=max_ongoing_requests,
    )


def _settings(**overrides) -> DiffusionPolicySettings:
    values = dict(target_queue_wait_s=120.0, replica_start_s=240.0, seconds_per_token_step=RATE,
                  default_request_token_steps=float(BIG * STEPS), upscale_delay_s=15.0, downscale_delay_s=600.0)
    values.update(overrides)
    return DiffusionPolicySettings(**values)


# ------------------------------------------------------------------ the math


def test_queue_wait_places_each_job_on_the_replica_that_frees_first():
    assert queue_wait_s([0.0], []) == 0.0
    assert queue_wait_s([0.0], [10, 10, 10]) == 20  # one replica: the third waits for two
    assert queue_wait_s([5.0, 0.0], [10, 10, 10]) == 10  # starts at 0, 5, 10
    assert queue_wait_s([], [1.0]) == float("inf")


def test_one_running_job_and_an_empty_queue_need_no_more_replicas():
    busy = DiffusionReplica(running_token_steps=BIG * STEPS, running_requests=1)
    assert diffusion_replicas_wanted([busy], 0, 1, 8, _settings())[0] == 1


def test_the_count_follows_gpu_seconds_not_requests():
    idle = [DiffusionReplica()]
    small = SMALL * STEPS
    four_small = [DiffusionReplica(queued_token_steps=4 * small, queued_requests=4)]
    four_big = [DiffusionReplica(queued_token_steps=4 * BIG * STEPS, queued_requests=4)]
    assert diffusion_replicas_wanted(four_small, 0, 1, 8, _settings())[0] == 1  # 4 x 4.7 s: no wait to speak of
    wanted, reason = diffusion_replicas_wanted(four_big, 0, 1, 8, _settings())
    assert wanted == 3, reason  # 4 x 148 s: the 4th would wait 443 s on one replica, 240 s (a start) on three
    # requests still at Serve's handle are sized at the mean request the replicas have seen
    seen = [DiffusionReplica(mean_request_token_steps=small)]
    assert diffusion_replicas_wanted(seen, 4, 1, 8, _settings())[0] == 1
    assert diffusion_replicas_wanted(idle, 4, 1, 8, _settings())[0] == 3  # nothing seen: the default request


def test_a_measured_rate_replaces_the_prior():
    queued = DiffusionReplica(queued_token_steps=3 * BIG * STEPS, queued_requests=3)
    slow = DiffusionReplica(seconds_per_token_step=RATE * 2)
    fast = DiffusionReplica(seconds_per_token_step=RATE / 10)
    assert diffusion_replicas_wanted([queued, slow], 0, 1, 8, _settings())[0] == 3
    assert diffusion_replicas_wanted([queued, fast], 0, 1, 8, _settings())[0] == 1  # 15 s jobs: 30 s wait at most


def test_never_fewer_than_the_replicas_holding_work_and_never_below_one_warm():
    busy = [DiffusionReplica(running_token_steps=10, running_requests=1)] * 3 + [DiffusionReplica()]
    assert diffusion_replicas_wanted(busy, 0, 1, 8, _settings())[0] == 3
    assert diffusion_replicas_wanted([], 0, 0, 8, _settings())[0] == 1


def test_an_unreachable_target_takes_the_fewest_replicas_for_the_shortest_wait():
    # A start takes 240 s, over the 120 s target. Three 148 s jobs on one replica: the third waits 296 s; a second
    # replica takes it at 240 s; a third replica cannot do better.
    queued = [DiffusionReplica(queued_token_steps=3 * BIG * STEPS, queued_requests=3)]
    wanted, reason = diffusion_replicas_wanted(queued, 0, 1, 16, _settings())
    assert wanted == 2, reason
    two = [DiffusionReplica(queued_token_steps=2 * BIG * STEPS, queued_requests=2)]
    assert diffusion_replicas_wanted(two, 0, 1, 16, _settings())[0] == 1  # the 2nd waits 148 s either way


def test_followers_scale_on_arrivals_times_service_time():
    settings = FollowerSettings(target_utilization=0.5, target_wait_s=30, target_ongoing_requests=2,
                                upscale_delay_s=0, downscale_delay_s=0)
    measured = [FollowerReplica(arrivals_per_s=0.1, service_seconds=20, in_flight=1), FollowerReplica()]
    assert follower_replicas_wanted(measured, 1, 1, 8, settings)[0] == 4  # 0.1/s x 20 s at 50 %
    assert follower_replicas_wanted(measured, 12, 1, 8, settings)[0] == 8  # 12 held x 20 s in 30 s
    quiet = [FollowerReplica(arrivals_per_s=0.001, service_seconds=2, in_flight=1), FollowerReplica(in_flight=1)]
    assert follower_replicas_wanted(quiet, 2, 1, 8, settings)[0] == 2  # both hold a request
    unmeasured = [FollowerReplica()]
    assert follower_replicas_wanted(unmeasured, 7, 1, 8, settings)[0] == 4  # Serve's rule: 7 held / 2 per replica


def test_delays_scale_up_after_a_short_wait_and_down_after_a_long_one():
    state: dict = {}
    decisions = {}
    target = 1
    wanted_over_time = {t: 3 for t in range(0, 100)} | {t: 1 for t in range(100, 800)}
    for t, wanted in wanted_over_time.items():
        target, state = apply_delays(wanted, target, float(t), state, up_delay_s=15, down_delay_s=600)
        decisions[t] = target
    assert decisions[14] == 1 and decisions[15] == 3  # 15 s after the need appeared
    assert decisions[699] == 3 and decisions[700] == 1  # 600 s after it went


def test_a_short_spike_does_not_scale_up_and_a_short_dip_does_not_scale_down():
    state: dict = {}
    target = 2
    for t in range(0, 2000):
        wanted = 5 if t % 300 < 10 else (1 if t % 300 < 200 else 2)  # 10 s spikes, 190 s dips
        target, state = apply_delays(wanted, target, float(t), state, up_delay_s=15, down_delay_s=600)
        assert target == 2, t
    assert len(state["reelserve_history"]) < 40  # run-length, pruned to the longest window


# ------------------------------------------------------------------ replays


def test_burst_scales_to_max_after_the_up_delay_and_back_to_one_after_the_down_delay():
    deployment = _deployment()
    jobs = [Job(f"burst-{i}", 0.0, BIG, STEPS) for i in range(8)]
    timeline = deployment.run(jobs, until_s=1600)

    changes = timeline.target_changes()
    assert changes[0] == (0.0, 1)
    assert changes[1] == (15.0, 4)  # the up delay, then straight to max
    assert timeline.target_at(255.0) == 4 and dict(timeline.running)[255.0] == 4  # after a 240 s start
    assert len(deployment.done) == 8
    last_finish = max(job.finished_s for job in deployment.done)
    downs = [(t, n) for t, n in changes[2:]]
    assert downs and all(n < before for (_, n), (_, before) in zip(downs, changes[1:]))  # only down after the burst
    assert downs[0][0] >= 15 + 600  # nothing removed within a down delay of the scale-up
    assert downs[-1][1] == 1 and last_finish + 600 <= downs[-1][0] <= last_finish + 600 + 20  # push interval
    _assert_never_below_busy(timeline)


def test_steady_load_settles_without_flapping():
    for gap_s, replicas in [(300.0, 1), (100.0, 2), (60.0, 3), (45.0, 4)]:  # 0.5, 1.5, 2.5, 3.3 replicas of work
        deployment = _deployment()
        jobs = [Job(f"steady-{i}", i * gap_s, BIG, STEPS) for i in range(int(3600 / gap_s))]
        timeline = deployment.run(jobs, until_s=3600)
        ups = [n for _, n in timeline.target_changes()]
        assert ups == list(range(1, replicas + 1)), (gap_s, ups)  # rises once to its level and stays
        waits = sorted(job.wait_s for job in deployment.done)
        assert waits[len(waits) // 2] <= SCALING["target_queue_wait_s"], (gap_s, waits)


def test_a_mix_of_sizes_scales_on_gpu_seconds():
    # Twelve requests at once in every trace, each replica holding them all (their sizes known): Serve's default
    # policy would treat the traces alike; here the count follows their GPU-seconds. Twelve small ones (4.7 s
    # each) stay on one replica. Replicas start in 30 s here (warm nodes, weights cached), so that each extra
    # replica shortens the wait; the first decision, 15 s in, is compared.
    decisions = []
    for large_every in (0, 6, 4, 2, 1):  # none, 2, 3, 6, 12 of the twelve are large
        deployment = _deployment(max_replicas=8, max_ongoing_requests=16, replica_start_s=30)
        jobs = [Job(f"job-{i}", 0.0, BIG if large_every and i % large_every == 0 else SMALL, STEPS) for i in range(12)]
        deployment.run(jobs, until_s=20)
        decisions.append(deployment.timeline.target_at(15.0))
    assert decisions[0] == 1
    assert decisions == sorted(decisions) and len(set(decisions)) >= 4, decisions  # 1, 3, 4, 6, 6


def test_drain_a_busy_replica_chosen_for_removal_finishes_its_job():
    deployment = _deployment(max_replicas=2)
    # two long jobs: the second lands on the newer replica; the first ends sooner, the count may drop to one,
    # and Serve stops the newest replica, which still runs the second job
    # Three jobs: two default ones and a long one. A second replica comes for them; the long one lands on it.
    # The first replica ends its two, the count may drop to one, and Serve stops the newest replica, which
    # still runs the long job.
    jobs = [Job("a", 0.0, BIG, STEPS), Job("b", 0.0, BIG, STEPS), Job("long", 0.5, BIG * 8, STEPS)]
    deployment.run(jobs, until_s=1800)
    assert {job.id for job in deployment.done} == {"a", "b", "long"}
    stops = deployment.timeline.stops
    assert [held for _, held in stops] == [1]  # the stopped replica held the long job ...
    long = next(job for job in deployment.done if job.id == "long")
    stopped = next(r for r in deployment.replicas if r.stopped_at is not None)
    assert stops[0][0] < long.finished_s <= stopped.stopped_at  # ... and stopped only once it had finished it
    _assert_never_below_busy(deployment.timeline)


def test_without_replica_stats_the_policy_falls_back_on_serves_counts():
    deployment = _deployment(report_stats=False)
    deployment.run([Job(f"burst-{i}", 0.0, BIG, STEPS) for i in range(8)], until_s=400)
    # one running (taken as half done) and seven queued, all of the default size
    assert deployment.timeline.target_changes()[:2] == [(0.0, 1), (15.0, 3)]
    assert "GPU-s" in deployment.timeline.reasons[-1][1]


def _assert_never_below_busy(timeline) -> None:
    busy = dict(timeline.busy)
    for t, target in timeline.targets:
        assert target >= busy[t], (t, target, busy[t])


@pytest.mark.parametrize("stage", ["text_encoder", "video_decoder", "muxer"])
def test_followers_get_the_follower_policy_and_diffusion_its_own(stage):
    config = ReelserveConfig(stages={stage: {"num_replicas": None, "max_replicas": 3},
                                     "diffusion": {"num_replicas": None, "max_replicas": 2}})
    follower = stage_options(stage, config)["autoscaling_config"]
    assert follower["policy"]["policy_function"] == "cluster.autoscaling:FollowerPolicy"
    diffusion = stage_options("diffusion", config)["autoscaling_config"]
    assert diffusion["policy"]["policy_function"] == "cluster.autoscaling:DiffusionBacklogPolicy"
    assert diffusion["upscale_delay_s"] == diffusion["downscale_delay_s"] == 0.0  # the policy owns the delays
    off = ReelserveConfig(stages={stage: {"num_replicas": None, "max_replicas": 3}}, scaling={"enabled": False})
    assert "policy" not in stage_options(stage, off)["autoscaling_config"]
