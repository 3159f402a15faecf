"""Fair-share claim order: examples, estimates, and properties over random backlogs (hypothesis)."""

from __future__ import annotations

import heapq
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.tenancy.fair_share import QueuedJob, RunningJob, TenantState, claim_order, estimate_queue
from serving.tenancy.quotas import Priority


def _jobs(tenant: str, count: int, start: float = 0.0, priority: int = Priority.NORMAL) -> list[QueuedJob]:
    return [QueuedJob(f"{tenant}{i + 1}", tenant, priority, start + i * 0.001) for i in range(count)]


def simulate(arrivals: list[tuple[float, QueuedJob]], shares: dict[str, float], slots: int,
             service_s: float = 1.0, caps: dict[str, int] | None = None) -> dict[str, float]:
    """Start time of every job when runners claim ``claim_order(...)[0]`` whenever a slot is free."""
    caps = caps or {}
    pending = sorted(arrivals, key=lambda item: item[0])
    queued: list[QueuedJob] = []
    running: dict[str, int] = {}
    last: dict[str, float] = {}
    ends: list[tuple[float, str]] = []
    starts: dict[str, float] = {}
    free, index = slots, 0
    while index < len(pending) or ends or queued:
        times = ([pending[index][0]] if index < len(pending) else []) + ([ends[0][0]] if ends else [])
        if not times:
            break  # only capped tenants' jobs are left and none of theirs runs
        clock = min(times)
        while index < len(pending) and pending[index][0] <= clock:
            queued.append(pending[index][1])
            index += 1
        while ends and ends[0][0] <= clock:
            running[heapq.heappop(ends)[1]] -= 1
            free += 1
        while free:
            states = {name: TenantState(share, running.get(name, 0), last.get(name), caps.get(name))
                      for name, share in shares.items()}
            order = claim_order(queued, states)
            if not order:
                break
            job = order[0]
            queued.remove(job)
            starts[job.job_id] = clock
            running[job.tenant] = running.get(job.tenant, 0) + 1
            last[job.tenant] = clock
            heapq.heappush(ends, (clock + service_s, job.tenant))
            free -= 1
    return starts


# ------------------------------------------------------------------ examples


def test_the_issues_scenario_b_starts_before_as_third():
    arrivals = [(0.0, job) for job in _jobs("a", 8)] + [(0.1, QueuedJob("b1", "b", created_at=0.1))]
    starts = simulate(arrivals, {"a": 1, "b": 1}, slots=2, service_s=10)
    assert starts["a1"] == starts["a2"] == 0.0
    assert starts["b1"] == 10.0 and starts["a3"] == 10.0  # B takes the first slot that frees, A the other
    order = sorted(starts, key=lambda job: (starts[job], job))
    assert order.index("b1") < order.index("a4")


def test_a_backlog_interleaves_and_a_new_tenant_goes_first():
    order = claim_order(_jobs("a", 4) + _jobs("b", 1, start=5.0), {})
    assert [j.job_id for j in order] == ["a1", "b1", "a2", "a3", "a4"]
    busy = {"a": TenantState(running=2)}
    assert [j.job_id for j in claim_order(_jobs("a", 2) + _jobs("b", 2, start=5.0), busy)] == ["b1", "b2", "a1", "a2"]


def test_shares_weigh_running_jobs():
    tenants = {"a": TenantState(share=3), "b": TenantState(share=1)}
    order = [j.tenant for j in claim_order(_jobs("a", 6) + _jobs("b", 6), tenants)]
    assert order[:9] == ["a", "b", "a", "a", "b", "a", "a", "a", "b"]


def test_with_one_slot_tenants_take_turns_instead_of_the_first_name_winning():
    arrivals = [(0.0, job) for job in _jobs("a", 6)] + [(0.0, job) for job in _jobs("b", 3, start=0.5)]
    starts = simulate(arrivals, {"a": 1, "b": 1}, slots=1, service_s=1)
    order = sorted(starts, key=starts.get)
    assert order[:6] == ["a1", "b1", "a2", "b2", "a3", "b3"]


def test_within_a_tenant_priority_then_age():
    jobs = [QueuedJob("old-low", "a", Priority.LOW, 0), QueuedJob("new-high", "a", Priority.HIGH, 9),
            QueuedJob("old-normal", "a", Priority.NORMAL, 1), QueuedJob("new-normal", "a", Priority.NORMAL, 5)]
    assert [j.job_id for j in claim_order(jobs, {})] == ["new-high", "old-normal", "new-normal", "old-low"]


def test_a_tenant_at_its_cap_is_skipped_until_a_job_of_its_ends():
    tenants = {"a": TenantState(running=1, max_concurrent=2)}
    assert [j.job_id for j in claim_order(_jobs("a", 3) + _jobs("b", 2, start=9), tenants)] == ["b1", "a1", "b2"]
    arrivals = [(0.0, job) for job in _jobs("a", 4)]
    starts = simulate(arrivals, {"a": 1}, slots=4, service_s=1, caps={"a": 2})
    assert sorted(starts.values()) == [0, 0, 1, 1]


def test_estimates_fill_the_slots_in_claim_order():
    estimates = estimate_queue(_jobs("a", 4) + _jobs("b", 1, start=1), {}, now=100, slots=2, service_s=10)
    assert {job: (e.queue_position, e.estimated_start_at) for job, e in estimates.items()} == {
        "a1": (1, 100), "b1": (2, 100), "a2": (3, 110), "a3": (4, 110), "a4": (5, 120)}


def test_estimates_count_the_running_jobs_ends_and_caps():
    running = [RunningJob("a", 104), RunningJob("a", 107)]
    estimates = estimate_queue(_jobs("a", 2) + _jobs("b", 1, start=1), {"a": TenantState(max_concurrent=2)},
                               now=100, slots=3, service_s=10, running=running)
    got = {job: (e.queue_position, e.estimated_start_at) for job, e in estimates.items()}
    assert got == {"b1": (1, 100), "a1": (2, 104), "a2": (3, 107)}
    stuck = estimate_queue(_jobs("a", 1) + _jobs("b", 1), {"a": TenantState(max_concurrent=0)}, now=0, slots=1,
                           service_s=1)
    assert (stuck["b1"].estimated_start_at, stuck["a1"].estimated_start_at, stuck["a1"].queue_position) == (0, None, 2)


def test_estimates_take_each_jobs_own_service_time():
    jobs = [QueuedJob("long", "a", created_at=0), QueuedJob("short", "b", created_at=1), QueuedJob("next", "a", created_at=2)]
    took = {"long": 100, "short": 5, "next": 10}
    estimates = estimate_queue(jobs, {}, now=0, slots=2, service_s=lambda job: took[job.job_id])
    assert {job: e.estimated_start_at for job, e in estimates.items()} == {"long": 0, "short": 0, "next": 5}


def test_estimates_need_a_slot():
    with pytest.raises(ValueError, match="slots: 0; at least 1 job must be able to run"):
        estimate_queue([], {}, now=0, slots=0, service_s=1)


# ------------------------------------------------------------------ properties

_TENANTS = ["ann", "bob", "cat", "dan", "eve"]
queued_jobs = st.lists(
    st.tuples(st.sampled_from(_TENANTS), st.sampled_from(list(Priority)), st.floats(0, 100, allow_nan=False)),
    max_size=40,
).map(lambda rows: [QueuedJob(f"j{i}", tenant, int(p), created) for i, (tenant, p, created) in enumerate(rows)])
tenant_states = st.dictionaries(
    st.sampled_from(_TENANTS),
    st.builds(TenantState, share=st.sampled_from([0.5, 1.0, 2.0, 3.0]), running=st.integers(0, 5),
              last_started_at=st.none() | st.floats(0, 100, allow_nan=False)),
)


@settings(max_examples=200, deadline=None)
@given(queued_jobs, tenant_states)
def test_the_order_is_a_permutation_with_priority_then_age_within_each_tenant(jobs, tenants):
    order = claim_order(jobs, tenants)
    assert sorted(j.job_id for j in order) == sorted(j.job_id for j in jobs)
    for tenant in _TENANTS:
        mine = [j for j in order if j.tenant == tenant]
        assert mine == sorted(mine, key=lambda j: (-j.priority, j.created_at, j.job_id))


@settings(max_examples=100, deadline=None)
@given(queued_jobs, tenant_states, st.integers(1, 6))
def test_estimates_give_every_job_a_distinct_position_and_starts_that_never_go_back(jobs, tenants, slots):
    estimates = estimate_queue(jobs, tenants, now=0, slots=slots, service_s=1)
    assert sorted(e.queue_position for e in estimates.values()) == list(range(1, len(jobs) + 1))
    by_position = sorted(estimates.values(), key=lambda e: e.queue_position)
    starts = [e.estimated_start_at for e in by_position]
    assert starts == sorted(starts) and all(s is not None for s in starts)
    assert starts[:slots] == [0] * min(slots, len(jobs))


@settings(max_examples=150, deadline=None)
@given(
    roles=st.permutations(_TENANTS),
    flood=st.integers(5, 30),
    victim_at=st.floats(0, 5, allow_nan=False),
    others=st.lists(st.tuples(st.integers(0, 2), st.floats(0, 5, allow_nan=False)), max_size=8),
    shares=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=5, max_size=5),
    slots=st.integers(1, 4),
)
def test_a_flooding_tenant_delays_another_tenants_job_by_at_most_one_service_time(
    roles, flood, victim_at, others, shares, slots
):
    flooder, victim, *bystanders = roles
    service_s = 1.0
    background = [(at, QueuedJob(f"o{i}", bystanders[which], created_at=at)) for i, (which, at) in enumerate(others)]
    victim_job = (victim_at, QueuedJob("victim", victim, created_at=victim_at))
    flood_jobs = [(0.0, QueuedJob(f"f{i}", flooder, created_at=i * 1e-6)) for i in range(flood)]
    weights = dict(zip(roles, shares))

    alone = simulate(background + [victim_job], weights, slots, service_s)["victim"]
    flooded = simulate(background + [victim_job] + flood_jobs, weights, slots, service_s)["victim"]
    assert flooded - alone <= service_s + 1e-9, (alone, flooded)
    assert not math.isnan(flooded)
