"""The job store contract, run against both real backends.

SQLite runs on a temporary file; Redis runs against a real ``redis-server``
started once for this module on a free port. Nothing is mocked.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import redis

from serving.errors import StoreUnavailable
from serving.jobs.record import RECORD_KEPT_AFTER_EXPIRY_S, JobRecord, new_job_id
from serving.jobs.redis_store import RedisJobStore
from serving.jobs.sqlite_store import SQLiteJobStore
from serving.jobs.store import Fence
from serving.protocol import JobStatus
from serving.tenancy.errors import QuotaExceeded
from tests.helpers import free_port

MAX_SEED = 2**63 - 1  # the largest seed a request may carry (serving.requests.MAX_SEED)


# ---------------------------------------------------------------------------------------------- fixtures


def _open(backend: str, request, tmp_path):
    if backend == "sqlite":
        return SQLiteJobStore(str(tmp_path / "jobs.sqlite3"))

    url = request.getfixturevalue("redis_url")
    flusher = redis.Redis.from_url(url)
    flusher.flushdb()
    flusher.close()
    return RedisJobStore(url)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    opened = _open(request.param, request, tmp_path)
    yield opened
    opened.close()


def make_record(job_id: str | None = None, **overrides) -> JobRecord:
    values = dict(
        id=job_id or new_job_id(),
        model="ltx-2-tiny",
        prompt="a red fox running through snow",
        negative_prompt="blurry",
        seconds=2.5,
        width=256,
        height=192,
        fps=24,
        seed=1234,
        has_image=False,
        created_at=1000.0,
    )
    values.update(overrides)
    return JobRecord(**values)


# ---------------------------------------------------------------------------------------------- create / get


def test_create_get_round_trips_every_field(store):
    record = make_record(
        status=JobStatus.IN_PROGRESS,
        progress=42,
        stage="diffusion",
        step=3,
        total_steps=8,
        created_at=1712345678.25,
        started_at=1712345679.5,
        completed_at=None,
        error_code=None,
        error_message=None,
        result_attempt=None,
        result_bytes=0,
        expires_at=None,
        stage_seconds={"text_encoder": 0.25, "image_conditioner": 1.5},
        cancel_requested=False,
        delete_requested=False,
        owner="orchestrator-1",
        lease_until=1712345690.75,
        attempts=2,
        takeovers=1,
        deadline_at=1712347478.25,
        done_stages=["text_encoder", "image_conditioner"],
        resumed_from_step=4,
        has_image=True,
        prompt='unicode 🦊 東京 "quotes" \\ and\nnewline',
    )
    store.create(record)
    got = store.get(record.id)
    assert got == record
    assert type(got.status) is JobStatus and got.status is JobStatus.IN_PROGRESS
    assert got.stage_seconds == {"text_encoder": 0.25, "image_conditioner": 1.5}
    assert got.size == "256x192"


def test_create_get_round_trips_terminal_record_with_none_and_set_optionals(store):
    failed = make_record(
        status=JobStatus.FAILED, progress=57, stage="failed", completed_at=1500.5, started_at=None,
        error_code="timeout", error_message="ran too long", result_attempt=2, result_bytes=12345,
        expires_at=1500.5 + 604800,
        cancel_requested=True, delete_requested=True, owner=None, lease_until=0.0,
    )
    fresh = make_record()  # all defaults: None fields, empty stage_seconds, QUEUED
    store.create(failed)
    store.create(fresh)
    assert store.get(failed.id) == failed
    got = store.get(fresh.id)
    assert got == fresh
    assert got.status is JobStatus.QUEUED
    assert got.started_at is None and got.completed_at is None and got.owner is None
    assert got.error_code is None and got.error_message is None and got.result_attempt is None
    assert got.stage_seconds == {}


def test_get_unknown_is_none(store):
    assert store.get("video_does_not_exist") is None


# ---------------------------------------------------------------------------------------------- helpers


def _claim(store, record: JobRecord, owner: str = "alpha", lease_s: float = 30.0) -> Fence:
    claimed = store.claim(record.id, owner, lease_s)
    assert claimed is not None, f"{owner} could not claim {record.id}"
    return Fence(record.id, owner, claimed.attempts)


SHORT = 0.05  # a lease that runs out at once


def _expire(store, record: JobRecord, owner: str = "dead") -> Fence:
    """Claim with a lease that runs out at once and let its grace pass too (the owner 'crashed')."""
    fence = _claim(store, record, owner, lease_s=SHORT)
    time.sleep(3 * SHORT)
    return fence


# ---------------------------------------------------------------------------------------------- fenced writes


def test_update_changes_fields_and_returns_true(store):
    record = make_record(total_steps=8)
    store.create(record)
    fence = _claim(store, record)
    assert store.update(
        fence, status=JobStatus.IN_PROGRESS, progress=40, stage="diffusion", step=3,
        started_at=1001.5, stage_seconds={"text_encoder": 0.5}, done_stages=["text_encoder"],
    ) is True
    got = store.get(record.id)
    assert got.status is JobStatus.IN_PROGRESS
    assert (got.progress, got.stage, got.step, got.started_at) == (40, "diffusion", 3, 1001.5)
    assert got.stage_seconds == {"text_encoder": 0.5} and got.done_stages == ["text_encoder"]
    # fields not named in the update keep their values
    assert (got.prompt, got.negative_prompt, got.model, got.seed) == (record.prompt, "blurry", "ltx-2-tiny", 1234)
    assert (got.width, got.height, got.fps, got.seconds, got.total_steps) == (256, 192, 24, 2.5, 8)
    assert got.completed_at is None and got.owner == "alpha" and got.attempts == 1
    assert store.count_active() == 1


def test_writes_to_unknown_jobs_return_false(store):
    fence = Fence("video_missing", "alpha", 1)
    assert store.update(fence, progress=5) is False
    assert store.finish(fence, status=JobStatus.COMPLETED) is False
    assert store.renew(fence, 10.0) is False and store.release(fence) is False
    assert store.claim("video_missing", "alpha", 10.0) is None
    assert store.get("video_missing") is None


def test_a_stale_owners_writes_are_refused(store):
    """An owner whose lease ran out and whose job was taken over can write nothing, not even its outcome."""
    record = make_record()
    store.create(record)
    stale = _expire(store, record, owner="alpha")
    assert store.update(stale, status=JobStatus.IN_PROGRESS, stage="diffusion", progress=30)
    current = _claim(store, record, owner="beta", lease_s=SHORT)
    assert current.attempt == stale.attempt + 1
    before = store.get(record.id)
    assert before.owner == "beta" and before.takeovers == 1

    assert store.update(stale, stage="decoders", progress=90, step=7) is False
    assert store.renew(stale, 30.0) is False
    assert store.release(stale) is False
    assert store.finish(stale, status=JobStatus.CANCELLED, stage="cancelled") is False  # its JobCancelled
    assert store.get(record.id) == before

    # The same owner name in an older attempt is just as stale (a replica that restarted under its name).
    assert store.update(Fence(record.id, "beta", stale.attempt), progress=95) is False
    assert store.update(current, progress=60) is True
    assert store.finish(current, status=JobStatus.COMPLETED, progress=100) is True
    finished = store.get(record.id)
    assert finished.status is JobStatus.COMPLETED and finished.owner is None


def test_progress_never_goes_back(store):
    record = make_record()
    store.create(record)
    fence = _claim(store, record)
    assert store.update(fence, progress=50, stage="diffusion")
    assert store.update(fence, progress=5, stage="diffusion", step=1)  # a retried stage starts low
    got = store.get(record.id)
    assert got.progress == 50 and got.step == 1


def test_writes_keep_untouched_numbers_exact(store):
    """A job's seed and creation time survive every kind of write unchanged.

    Seeds go up to 2**63 - 1 (serving.requests.MAX_SEED) and the orchestrator
    rebuilds the render plan from the *stored* seed after claim(); created_at
    is shown to clients.
    """
    record = make_record(seed=MAX_SEED, created_at=1712345678.123456)
    store.create(record)
    fence = _claim(store, record)
    assert store.update(fence, status=JobStatus.IN_PROGRESS, progress=5)
    assert store.renew(fence, 10.0)
    assert store.request_cancel(record.id) is not None
    got = store.get(record.id)
    assert type(got.seed) is int
    assert got.seed == MAX_SEED
    assert got.created_at == 1712345678.123456


def test_late_update_cannot_resurrect_finished_job(store):
    record = make_record()
    store.create(record)
    fence = _claim(store, record)
    assert store.update(fence, status=JobStatus.IN_PROGRESS, progress=50, stage="diffusion")
    assert store.finish(
        fence, status=JobStatus.COMPLETED, progress=100, stage="completed", completed_at=1100.0,
        result_attempt=fence.attempt, result_bytes=999,
    ) is True
    finished = store.get(record.id)
    assert finished.status is JobStatus.COMPLETED and finished.progress == 100
    # a late progress write from a stage that had not noticed the end
    assert store.update(fence, status=JobStatus.IN_PROGRESS, progress=60, stage="diffusion", step=4) is False
    assert store.get(record.id) == finished
    assert store.count_active() == 0
    assert store.claim(record.id, "beta", 10.0) is None


@pytest.mark.parametrize("terminal", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_finish_twice_second_returns_false_and_changes_nothing(store, terminal):
    record = make_record()
    store.create(record)
    fence = _claim(store, record)
    assert store.finish(fence, status=terminal, stage="done", completed_at=1200.0) is True
    first = store.get(record.id)
    assert first.status is terminal and first.completed_at == 1200.0
    other = JobStatus.FAILED if terminal is not JobStatus.FAILED else JobStatus.CANCELLED
    assert store.finish(fence, status=other, error_code="late", completed_at=9999.0) is False
    assert store.get(record.id) == first


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.IN_PROGRESS, 0, 1])
def test_finish_requires_terminal_status(store, status):
    record = make_record()
    store.create(record)
    fence = _claim(store, record)
    before = store.get(record.id)
    with pytest.raises(ValueError, match="terminal"):
        store.finish(fence, status=status, progress=77)
    assert store.get(record.id) == before  # nothing changed
    assert store.count_active() == 1


def test_finish_accepts_plain_int_status(store):
    record = make_record()
    store.create(record)
    assert store.finish(_claim(store, record), status=int(JobStatus.CANCELLED), stage="cancelled") is True
    assert store.get(record.id).status is JobStatus.CANCELLED
    assert store.count_active() == 0


# ---------------------------------------------------------------------------------------------- cancel / delete


def test_request_cancel_flags_active_job(store):
    record = make_record()
    store.create(record)
    assert store.is_cancel_requested(record.id) is False
    returned = store.request_cancel(record.id)
    assert isinstance(returned, JobRecord)
    assert returned.id == record.id
    assert returned.cancel_requested is True and returned.delete_requested is False
    assert returned.status is JobStatus.CANCELLED  # never claimed: it ends at once, no orchestrator needed
    assert store.is_cancel_requested(record.id) is True
    got = store.get(record.id)
    assert got.cancel_requested is True and got.delete_requested is False
    assert got.status is JobStatus.CANCELLED and got.completed_at is not None and store.count_active() == 0

    running = make_record()
    store.create(running)
    _claim(store, running)
    flagged = store.request_cancel(running.id)
    assert flagged.status is JobStatus.QUEUED and flagged.cancel_requested  # claimed: its owner stops it


def test_request_cancel_with_delete_on_terminal_job(store):
    record = make_record()
    store.create(record)
    assert store.finish(_claim(store, record), status=JobStatus.COMPLETED, progress=100, completed_at=1300.0)
    returned = store.request_cancel(record.id, delete=True)
    assert returned is not None
    assert returned.cancel_requested is True and returned.delete_requested is True
    assert returned.status is JobStatus.COMPLETED and returned.progress == 100
    got = store.get(record.id)
    assert got.cancel_requested is True and got.delete_requested is True
    assert got.status is JobStatus.COMPLETED and got.completed_at == 1300.0
    assert store.is_cancel_requested(record.id) is True
    assert store.count_active() == 0  # flagging did not make it active again


def test_request_cancel_unknown_is_none(store):
    assert store.request_cancel("video_missing") is None
    assert store.request_cancel("video_missing", delete=True) is None
    assert store.get("video_missing") is None


def test_is_cancel_requested_true_for_unknown_or_deleted(store):
    record = make_record()
    store.create(record)
    assert store.is_cancel_requested(record.id) is False
    assert store.is_cancel_requested("video_never_existed") is True
    assert store.delete(record.id) is True
    assert store.is_cancel_requested(record.id) is True


def test_delete_removes_job(store):
    keep, gone = make_record(created_at=1.0), make_record(created_at=2.0)
    store.create(keep)
    store.create(gone)
    assert store.count_active() == 2
    assert store.delete(gone.id) is True
    assert store.get(gone.id) is None
    page, more = store.list(after=None, limit=10, order="asc")
    assert [r.id for r in page] == [keep.id] and more is False
    assert store.count_active() == 1
    assert store.delete(gone.id) is False  # already gone
    assert store.claim(gone.id, "o", 10.0) is None
    assert store.get(keep.id) == keep


# ---------------------------------------------------------------------------------------------- list


def _paginate(store, order: str, limit: int):
    pages, after = [], None
    while True:
        page, more = store.list(after=after, limit=limit, order=order)
        pages.append(([r.id for r in page], more))
        if not more:
            return pages
        assert page, "has_more with an empty page would loop forever"
        after = page[-1].id


def test_list_paginates_by_creation_time(store):
    # ids are random, so their order differs from creation order
    records = [make_record(created_at=100.0 + i) for i in range(7)]
    for record in reversed(records):
        store.create(record)
    ids = [r.id for r in records]

    asc = _paginate(store, "asc", 3)
    assert asc == [(ids[0:3], True), (ids[3:6], True), (ids[6:7], False)]
    desc = _paginate(store, "desc", 3)
    backwards = ids[::-1]
    assert desc == [(backwards[0:3], True), (backwards[3:6], True), (backwards[6:7], False)]

    for pages in (asc, desc):
        visited = [job_id for page, _ in pages for job_id in page]
        assert sorted(visited) == sorted(ids) and len(visited) == len(set(visited)) == 7

    page, more = store.list(after=None, limit=7, order="asc")
    assert [r.id for r in page] == ids and more is False
    page, more = store.list(after=None, limit=6, order="desc")
    assert [r.id for r in page] == backwards[:6] and more is True
    assert store.list(after=ids[-1], limit=3, order="asc") == ([], False)
    assert store.list(after=ids[0], limit=3, order="desc") == ([], False)
    # whole records come back, not just ids
    page, _ = store.list(after=ids[2], limit=1, order="asc")
    assert page == [records[3]]


def test_list_pages_through_jobs_with_equal_creation_times(store):
    records = [make_record(created_at=500.0) for _ in range(5)] + [make_record(created_at=400.0)]
    for record in records:
        store.create(record)
    for order in ("asc", "desc"):
        pages = _paginate(store, order, 2)
        visited = [job_id for page, _ in pages for job_id in page]
        assert len(visited) == len(set(visited)) == 6
        assert set(visited) == {r.id for r in records}
        first = records[-1].id
        assert (visited[0] if order == "asc" else visited[-1]) == first
        assert [more for _, more in pages] == [True, True, False]


def test_list_after_unknown_id(store):
    store.create(make_record())
    assert store.list(after="video_unknown", limit=3, order="asc") == ([], False)
    assert store.list(after="video_unknown", limit=3, order="desc") == ([], False)


def test_list_empty_store(store):
    assert store.list(after=None, limit=5, order="asc") == ([], False)
    assert store.list(after=None, limit=5, order="desc") == ([], False)


# ---------------------------------------------------------------------------------------------- claims, leases, one clock


def test_leases_run_on_the_stores_clock(store):
    record = make_record()
    store.create(record)
    before = store.now()
    claimed = store.claim(record.id, "alpha", 10.0)
    after = store.now()
    assert claimed.owner == "alpha" and claimed.attempts == 1 and claimed.takeovers == 0
    assert before + 10.0 <= store.get(record.id).lease_until <= after + 10.0
    # another orchestrator cannot take it while the lease is valid
    assert store.claim(record.id, "beta", 10.0) is None
    assert record.id not in store.claimable(10.0)
    # the owner renews: the lease moves forward
    fence = Fence(record.id, "alpha", 1)
    time.sleep(0.05)
    assert store.renew(fence, 20.0)
    assert store.get(record.id).lease_until >= after + 20.0


def test_a_crashed_owners_job_is_taken_over_and_counted(store):
    record = make_record()
    store.create(record)
    _expire(store, record, owner="alpha")
    assert record.id in store.claimable(SHORT)
    taken = store.claim(record.id, "beta", SHORT)
    assert (taken.owner, taken.attempts, taken.takeovers) == ("beta", 2, 1)
    assert store.claim(record.id, "alpha", SHORT) is None  # the old owner cannot get it back
    assert record.id not in store.claimable(SHORT)


def test_an_expired_lease_stays_with_its_owner_for_one_more_lease(store):
    """After a store outage the owner renews before anyone may take the job over: an outage is no crash."""
    record = make_record()
    store.create(record)
    fence = _claim(store, record, "alpha", lease_s=0.3)
    time.sleep(0.4)  # the lease ran out (the store was unreachable, say) ...
    assert record.id not in store.claimable(0.3)
    assert store.claim(record.id, "beta", 0.3) is None  # ... but its grace has not
    assert store.renew(fence, 0.3)  # the owner is back in time
    assert store.get(record.id).takeovers == 0


def test_a_released_job_is_claimed_at_once_and_not_counted_as_a_takeover(store):
    record = make_record(progress=33, stage="diffusion", done_stages=["text_encoder"])
    store.create(record)
    fence = _claim(store, record, "alpha", lease_s=600.0)
    assert store.release(fence) is True
    released = store.get(record.id)
    assert released.owner is None and released.lease_until == 0.0
    assert record.id in store.claimable(10.0)
    taken = store.claim(record.id, "beta", 10.0)
    assert (taken.owner, taken.attempts, taken.takeovers) == ("beta", 2, 0)
    # a claim changes nothing else
    assert (taken.progress, taken.stage, taken.done_stages, taken.status) == (33, "diffusion", ["text_encoder"], JobStatus.QUEUED)
    assert store.update(fence, progress=99) is False  # the hand-over ended alpha's attempt


@pytest.mark.parametrize("terminal", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_terminal_jobs_cannot_be_claimed(store, terminal):
    finished = make_record()
    store.create(finished)
    fence = _claim(store, finished)
    assert store.finish(fence, status=terminal)
    assert store.claim(finished.id, "beta", 10.0) is None
    assert store.get(finished.id).owner is None
    assert store.renew(fence, 10.0) is False  # the previous owner cannot renew a finished job

    born_terminal = make_record(status=terminal)
    store.create(born_terminal)
    assert store.claim(born_terminal.id, "alpha", 10.0) is None
    assert born_terminal.id not in store.claimable(10.0)


def test_concurrent_claims_have_one_winner(store):
    record = make_record()
    store.create(record)
    contenders = 8
    barrier = threading.Barrier(contenders)
    results: dict[str, bool] = {}
    errors: list[BaseException] = []

    def contend(owner: str) -> None:
        try:
            barrier.wait(timeout=10)
            results[owner] = store.claim(record.id, owner, 10.0) is not None
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=contend, args=(f"owner-{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(results) == contenders
    winners = [owner for owner, won in results.items() if won]
    assert len(winners) == 1
    assert store.get(record.id).owner == winners[0] and store.get(record.id).attempts == 1


def test_claimable_lists_queued_released_and_expired_jobs_oldest_first(store):
    queued = make_record(created_at=1.0)
    expired = make_record(created_at=2.0)
    live = make_record(created_at=3.0)
    done = make_record(created_at=4.0)
    released = make_record(created_at=5.0)
    for record in (queued, expired, live, done, released):
        store.create(record)
    _expire(store, expired)
    _claim(store, live, "alive", lease_s=600.0)
    store.finish(_claim(store, done), status=JobStatus.COMPLETED)
    store.release(_claim(store, released))
    assert store.claimable(SHORT) == [queued.id, expired.id, released.id]
    assert store.claimable(SHORT, limit=2) == [queued.id, expired.id]


def test_an_endless_grace_leaves_lapsed_owners_their_jobs(store):
    # Right after a store outage every lease has lapsed; an orchestrator then claims only unowned jobs.
    queued = make_record(created_at=1.0)
    lapsed = make_record(created_at=2.0)
    for record in (queued, lapsed):
        store.create(record)
    fence = _expire(store, lapsed, owner="cut-off")
    assert store.claimable(math.inf) == [queued.id]
    assert store.claim(lapsed.id, "eager", 30.0, grace_s=math.inf) is None
    assert store.renew(fence, 30.0)  # the owner is back first and keeps its job
    assert store.claim(lapsed.id, "eager", 30.0) is None
    assert store.claim(queued.id, "eager", 30.0, grace_s=math.inf) is not None


def test_count_active_counts_queued_and_in_progress_only(store):
    assert store.count_active() == 0
    queued = make_record()
    running = make_record()
    store.create(queued)
    store.create(running)
    assert store.update(_claim(store, running), status=JobStatus.IN_PROGRESS)
    for terminal in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
        store.create(make_record(status=terminal))
    finished = make_record()
    store.create(finished)
    assert store.count_active() == 3
    assert store.finish(_claim(store, finished), status=JobStatus.COMPLETED)
    assert store.count_active() == 2
    assert store.request_cancel(running.id) is not None  # flagged, still active until its owner finishes it
    assert store.count_active() == 2
    assert store.request_cancel(queued.id).status is JobStatus.CANCELLED  # never claimed: ends at once
    assert store.count_active() == 1
    assert store.delete(running.id)
    assert store.count_active() == 0


# ---------------------------------------------------------------------------------------------- SQLite, shared file


def test_sqlite_two_stores_on_one_file_see_each_other(tmp_path):
    path = str(tmp_path / "shared" / "jobs.sqlite3")  # the parent folder is created on open
    first, second = SQLiteJobStore(path), SQLiteJobStore(path)
    try:
        record = make_record()
        first.create(record)
        assert second.get(record.id) == record
        fence = _claim(first, record, "first")
        assert second.update(fence, status=JobStatus.IN_PROGRESS, progress=20)
        assert first.get(record.id).progress == 20
        assert second.claim(record.id, "second", 10.0) is None
        assert second.request_cancel(record.id) is not None
        assert first.is_cancel_requested(record.id) is True
        assert first.finish(fence, status=JobStatus.CANCELLED)
        assert second.update(fence, progress=99) is False
        assert second.get(record.id).status is JobStatus.CANCELLED
        assert second.count_active() == 0
        other = make_record(created_at=2000.0)
        second.create(other)
        page, more = first.list(after=None, limit=10, order="desc")
        assert [r.id for r in page] == [other.id, record.id] and more is False
        assert first.delete(other.id)
        assert second.get(other.id) is None
    finally:
        first.close()
        second.close()


def test_sqlite_changes_are_numbered_for_watchers(tmp_path):
    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite3"))
    try:
        start = store.latest_seq()
        first, second = make_record(), make_record()
        store.create(first)
        store.create(second)
        seq, changed = store.changed_since(start)
        assert changed == [first.id, second.id]
        store.update(_claim(store, first), progress=10)
        seq, changed = store.changed_since(seq)
        assert changed == [first.id]  # the claim and the update, one entry for the job's latest write
        assert store.changed_since(seq) == (seq, [])
    finally:
        store.close()


def test_sqlite_threads_claiming_through_two_stores_one_winner(tmp_path):
    path = str(tmp_path / "jobs.sqlite3")
    stores = [SQLiteJobStore(path), SQLiteJobStore(path)]
    try:
        records = [make_record() for _ in range(3)]
        for record in records:
            stores[0].create(record)
        contenders = 6
        for record in records:
            barrier = threading.Barrier(contenders)
            results: dict[str, bool] = {}
            errors: list[BaseException] = []

            def contend(index: int, barrier=barrier, record=record, results=results, errors=errors) -> None:
                try:
                    barrier.wait(timeout=10)
                    won = stores[index % 2].claim(record.id, f"owner-{index}", 10.0) is not None
                    results[f"owner-{index}"] = won
                except BaseException as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert not errors
            winners = [owner for owner, won in results.items() if won]
            assert len(results) == contenders and len(winners) == 1
            assert stores[1].get(record.id).owner == winners[0]
    finally:
        for opened in stores:
            opened.close()


def test_the_redis_store_answers_unavailable_when_redis_is_down():
    store = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        for call in (lambda: store.get("video_x"), store.count_active, lambda: store.claimable(1.0), store.now,
                     lambda: store.create(make_record()), lambda: store.request_cancel("video_x")):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                call()
    finally:
        store.close()


def test_admission_is_atomic_under_concurrent_creates(store):
    """Many ingress threads creating at once never admit more than max_active (the count and the insert are one step)."""
    contenders, limit = 12, 5
    barrier = threading.Barrier(contenders)
    admitted: list[bool] = []

    def create() -> None:
        barrier.wait(timeout=10)
        admitted.append(store.create(make_record(), max_active=limit))

    threads = [threading.Thread(target=create) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(admitted) == contenders
    assert sum(admitted) == limit == store.count_active()


# ---------------------------------------------------------------------------------------------- tenants and the queue


def test_the_tenant_check_sees_its_tenants_counts_inside_create_and_can_refuse(store):
    seen = []

    def at_most_one_queued(queued, running):
        seen.append((queued, running))
        if queued >= 1:
            raise QuotaExceeded("tenant_queue_full", "full", 5)

    first, second = make_record(tenant="a"), make_record(tenant="a")
    assert store.create(first, check_tenant=at_most_one_queued)
    store.create(make_record(tenant="b"))  # another tenant's job counts for b only
    _claim(store, first)  # running now: the queue is empty again
    assert store.create(second, check_tenant=at_most_one_queued)
    with pytest.raises(QuotaExceeded):
        store.create(make_record(tenant="a"), check_tenant=at_most_one_queued)
    assert seen == [(0, 0), (0, 1), (1, 1)]
    assert {r.id for r in store.list(after=None, limit=10, order="asc", tenant="a")[0]} == {first.id, second.id}


def test_the_queue_snapshot_has_queued_orphaned_running_and_expired_jobs(store):
    now = store.now()
    waiting = make_record(tenant="a", priority=2, created_at=now - 5)
    late = make_record(tenant="b", created_at=now - 100, max_queue_wait_s=30)
    running = make_record(tenant="a", created_at=now - 50)
    orphan = make_record(tenant="b", created_at=now - 40)
    for record in (waiting, late, running, orphan):
        store.create(record)
    _claim(store, running)
    _expire(store, orphan)
    snapshot = store.queue_snapshot(grace_s=0.0)
    assert [(job.job_id, job.tenant, job.priority) for job in snapshot.queued] == [(waiting.id, "a", 2)]
    assert snapshot.expired == [late.id] and snapshot.orphaned == [orphan.id]
    assert snapshot.tenants["a"].running == 1 and snapshot.tenants["b"].running == 1 and snapshot.running == 2

    expired = store.expire(late.id)
    assert (expired.status, expired.error_code, expired.stage) == (JobStatus.EXPIRED, "queue_timeout", "expired")
    assert store.expire(waiting.id) is None  # it has not waited past its bound
    assert store.queue_snapshot(grace_s=0.0).expired == []


def test_heartbeats_list_live_replicas_until_they_lapse(store):
    store.heartbeat("diffusion", "r1", {"seconds_per_token_step": 0.5}, ttl_s=30)
    store.heartbeat("diffusion", "r2", {"seconds_per_token_step": 0.25}, ttl_s=SHORT)
    store.heartbeat("text_encoder", "r3", {}, ttl_s=30)
    time.sleep(3 * SHORT)
    assert store.live_replicas("diffusion") == [{"seconds_per_token_step": 0.5}]
    store.heartbeat("diffusion", "r1", {"seconds_per_token_step": 0.75}, ttl_s=30)  # a renewal replaces the info
    assert store.live_replicas("diffusion") == [{"seconds_per_token_step": 0.75}]


def test_a_callback_is_leased_to_one_deliverer_and_recorded_once(store):
    record = make_record(callback_url="https://hooks.example/done")
    store.create(record)
    assert store.webhooks_pending() == []  # not ended yet
    fence = _claim(store, record)
    store.finish(fence, status=JobStatus.COMPLETED)
    assert store.webhooks_pending() == [record.id]
    assert store.lease_webhook(record.id, "runner-a", lease_s=30) is not None
    assert store.lease_webhook(record.id, "runner-b", lease_s=30) is None  # runner-a holds it
    assert not store.record_webhook(record.id, "runner-b", {"delivered": True, "done": True})
    assert store.record_webhook(record.id, "runner-a", {"delivered": True, "attempts": 3, "done": True})
    assert store.webhooks_pending() == []
    assert store.get(record.id).webhook["attempts"] == 3
    assert store.lease_webhook(record.id, "runner-b", lease_s=30) is None  # delivered: never again


# ---------------------------------------------------------------------------------------------- retention


def test_a_record_written_before_per_attempt_results_still_reads():
    """Old records carry ``result_path`` and no ``result_attempt`` / ``expires_at``: they load, the path is dropped."""
    old = make_record(status=JobStatus.COMPLETED, completed_at=1100.0).to_dict()
    del old["result_attempt"], old["expires_at"]
    old["result_path"] = "/results/video_x.mp4"
    loaded = JobRecord.from_dict(old)
    assert loaded.result_attempt is None and loaded.expires_at is None and not hasattr(loaded, "result_path")


def test_an_ended_jobs_redis_record_expires_a_day_after_its_video(request, tmp_path):
    store = _open("redis", request, tmp_path)
    record = make_record()
    store.create(record)
    fence = _claim(store, record)
    assert store.update(fence, stage="diffusion", progress=10)
    key = f"reelserve:job:{record.id}"
    assert store._redis.ttl(key) == -1  # a running job's record never expires
    expires = time.time() + 3600
    assert store.finish(fence, status=JobStatus.COMPLETED, stage="completed", completed_at=time.time(),
                        expires_at=expires, result_attempt=fence.attempt)
    assert 3600 + RECORD_KEPT_AFTER_EXPIRY_S - 5 <= store._redis.ttl(key) <= 3600 + RECORD_KEPT_AFTER_EXPIRY_S + 1
    assert store.get(record.id).expires_at == expires
    store.close()


def test_a_listing_drops_the_ids_of_records_that_expired(request, tmp_path):
    store = _open("redis", request, tmp_path)
    records = [make_record(created_at=1000.0 + i) for i in range(3)]
    for record in records:
        store.create(record)
    store._redis.delete(f"reelserve:job:{records[0].id}")  # as its TTL does
    listed, _ = store.list(after=None, limit=10, order="asc")
    assert [r.id for r in listed] == [r.id for r in records[1:]]
    assert store._redis.zrank("reelserve:jobs", records[0].id) is None
    store.close()


def test_a_replica_that_stops_is_forgotten_at_once(store):
    store.heartbeat("diffusion", "r1", {"seconds_per_token_step": 0.5}, ttl_s=30)
    store.heartbeat("diffusion", "r2", {"seconds_per_token_step": 0.25}, ttl_s=30)
    store.forget_replica("diffusion", "r1")
    assert store.live_replicas("diffusion") == [{"seconds_per_token_step": 0.25}]
