"""Priority, queued/running caps, and jobs per minute on a real redis-server, SQLite and in process."""

from __future__ import annotations

import threading
import time

import pytest

from serving.errors import InvalidRequest, Overloaded, StoreUnavailable
from serving.tenancy.auth import Tenant
from serving.tenancy.errors import QuotaExceeded
from serving.tenancy.quotas import (
    InProcessRateLimiter,
    Priority,
    RedisRateLimiter,
    SQLiteRateLimiter,
    TenantJobCounts,
    check_job_caps,
    check_rate,
    parse_priority,
)

# ------------------------------------------------------------------ priority


def test_priorities_sort_low_normal_high_and_parse_in_any_case():
    assert Priority.LOW < Priority.NORMAL < Priority.HIGH
    assert parse_priority("HIGH", "high") is Priority.HIGH and parse_priority(" low ", "normal") is Priority.LOW


def test_no_priority_is_normal_or_the_tenants_maximum_when_lower():
    assert parse_priority(None, "high") is Priority.NORMAL
    assert parse_priority("", "normal") is Priority.NORMAL
    assert parse_priority(None, "low") is Priority.LOW


@pytest.mark.parametrize("value, maximum, message", [
    ("high", "normal", "priority: 'high' is above your maximum 'normal'; allowed: low, normal"),
    ("normal", "low", "priority: 'normal' is above your maximum 'low'; allowed: low"),
    ("urgent", "high", "priority: 'urgent' is not a priority; allowed: low, normal, high"),
    ("x" * 500, "high", "priority: 'xxxxxxxxxxxxxxxxxxxx...' is not a priority"),
])
def test_priorities_outside_the_allowed_are_refused_naming_the_field(value, maximum, message):
    with pytest.raises(InvalidRequest) as caught:
        parse_priority(value, maximum)
    assert str(caught.value) == message or str(caught.value).startswith(message)
    assert caught.value.field == "priority"


# ------------------------------------------------------------------ queued and running caps


def test_a_tenant_under_its_caps_is_admitted():
    tenant = Tenant("team-a", max_concurrent_jobs=4, max_queued_jobs=120)
    assert check_job_caps(tenant, TenantJobCounts(queued=119, running=4), 60).admitted
    # Queued jobs that fit under the running cap are not waiting on the tenant: 2 free slots, 121 queued.
    assert check_job_caps(tenant, TenantJobCounts(queued=121, running=2), 60).admitted
    assert not check_job_caps(tenant, TenantJobCounts(queued=122, running=2), 60).admitted
    assert check_job_caps(Tenant("default"), TenantJobCounts(queued=10_000, running=500), 60).admitted


def test_a_full_queue_is_refused_with_retry_after_from_the_running_jobs():
    tenant = Tenant("team-a", max_concurrent_jobs=4, max_queued_jobs=120)
    answer = check_job_caps(tenant, TenantJobCounts(queued=120, running=4), expected_service_s=60)
    assert (answer.admitted, answer.code, answer.retry_after_s) == (False, "tenant_queue_full", 15)
    assert answer.message == "tenant 'team-a' has 120 jobs waiting, its max_queued_jobs; retry after 15 s"
    with pytest.raises(QuotaExceeded) as caught:
        answer.raise_if_refused()
    assert isinstance(caught.value, Overloaded) and caught.value.retry_after_s == 15  # 429 through today's mapping
    assert caught.value.code == "tenant_queue_full"


def test_running_at_the_cap_queues_unless_the_tenant_may_not_queue():
    may_queue = Tenant("team-a", max_concurrent_jobs=2, max_queued_jobs=5)
    assert check_job_caps(may_queue, TenantJobCounts(queued=0, running=2), 30).admitted
    no_queue = Tenant("team-b", max_concurrent_jobs=2, max_queued_jobs=0)
    answer = check_job_caps(no_queue, TenantJobCounts(queued=0, running=2), 30)
    assert (answer.admitted, answer.code, answer.retry_after_s) == (False, "tenant_concurrency", 15)
    assert check_job_caps(no_queue, TenantJobCounts(queued=0, running=1), 30).admitted
    assert not check_job_caps(no_queue, TenantJobCounts(queued=1, running=1), 30).admitted  # that one takes the slot


def test_retry_after_stays_between_one_second_and_ten_minutes():
    tenant = Tenant("t", max_queued_jobs=1)
    assert check_job_caps(tenant, TenantJobCounts(1, 50), 0.2).retry_after_s == 1
    assert check_job_caps(tenant, TenantJobCounts(1, 0), 5000).retry_after_s == 600
    assert check_job_caps(Tenant("t", max_queued_jobs=None), TenantJobCounts(10**6, 0), 1).admitted  # open mode


# ------------------------------------------------------------------ jobs per minute, three backends


@pytest.fixture(params=["redis", "sqlite", "in_process"])
def make_limiter(request, redis_url, tmp_path):
    made = []

    def make(window_s: float = 60.0):
        if request.param == "redis":
            limiter = RedisRateLimiter(redis_url, prefix=f"test:{request.node.name}:{len(made)}:", window_s=window_s)
        elif request.param == "sqlite":
            limiter = SQLiteRateLimiter(str(tmp_path / f"rate{len(made)}.sqlite3"), window_s=window_s)
        else:
            limiter = InProcessRateLimiter(window_s=window_s)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        limiter.close()


def test_the_window_allows_exactly_the_limit_then_answers_when_to_retry(make_limiter):
    limiter = make_limiter()
    answers = [limiter.acquire("team-a", 3) for _ in range(4)]
    assert [a.allowed for a in answers] == [True, True, True, False]
    assert [a.remaining for a in answers] == [2, 1, 0, 0]
    assert 59 < answers[3].retry_after_s <= 60
    assert limiter.acquire("team-b", 3).allowed  # windows are per tenant


def test_creates_leave_the_window_after_it_passes(make_limiter):
    limiter = make_limiter(window_s=0.4)
    assert limiter.acquire("team-a", 1).allowed
    refused = limiter.acquire("team-a", 1)
    assert not refused.allowed and 0 < refused.retry_after_s <= 0.4
    time.sleep(0.45)
    assert limiter.acquire("team-a", 1).allowed


def test_check_rate_refuses_with_the_field_and_skips_tenants_without_a_cap(make_limiter):
    limiter = make_limiter()
    capped = Tenant("team-a", jobs_per_minute=1)
    assert check_rate(limiter, capped).admitted
    answer = check_rate(limiter, capped)
    assert (answer.admitted, answer.code, answer.retry_after_s) == (False, "tenant_rate", 60)
    assert "created 1 jobs in the last minute, its jobs_per_minute; retry after 60 s" in answer.message
    assert all(check_rate(limiter, Tenant("open")).admitted for _ in range(100))


def test_two_replicas_hammering_redis_share_one_window(redis_url):
    replicas = [RedisRateLimiter(redis_url, prefix="test:shared:") for _ in range(2)]
    allowed = []

    def hammer(limiter):
        for _ in range(40):
            allowed.append(limiter.acquire("team-a", 50).allowed)

    threads = [threading.Thread(target=hammer, args=(replicas[i % 2],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 240 and sum(allowed) == 50
    for limiter in replicas:
        limiter.close()


def test_a_redis_that_is_down_answers_store_unavailable():
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable, match="the job store \\(Redis\\) is unreachable: ConnectionError"):
        limiter.acquire("team-a", 1)
