"""The job store contract, run against both real backends.

SQLite runs on a temporary file; Redis runs against a real ``redis-server``
started once for this module on a free port. Nothing is mocked.
"""

from __future__ import annotations

import threading

import pytest

from serving.jobs.record import JobRecord, new_job_id
from serving.jobs.sqlite_store import SQLiteJobStore
from serving.protocol import JobStatus

MAX_SEED = 2**63 - 1  # the largest seed a request may carry (serving.requests.MAX_SEED)


# ---------------------------------------------------------------------------------------------- fixtures


def _open(backend: str, request, tmp_path):
    if backend == "sqlite":
        return SQLiteJobStore(str(tmp_path / "jobs.sqlite3"))
    import redis

    from serving.jobs.redis_store import RedisJobStore

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
        result_path=None,
        result_bytes=0,
        stage_seconds={"text_encoder": 0.25, "image_conditioner": 1.5},
        cancel_requested=False,
        delete_requested=False,
        owner="orchestrator-1",
        lease_until=1712345690.75,
        attempts=2,
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
        error_code="timeout", error_message="ran too long", result_path="/results/x.mp4", result_bytes=12345,
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
    assert got.error_code is None and got.error_message is None and got.result_path is None
    assert got.stage_seconds == {}


def test_get_unknown_is_none(store):
    assert store.get("video_does_not_exist") is None


# ---------------------------------------------------------------------------------------------- update / finish


def test_update_changes_fields_and_returns_true(store):
    record = make_record(total_steps=8)
    store.create(record)
    assert store.update(
        record.id, status=JobStatus.IN_PROGRESS, progress=40, stage="diffusion", step=3,
        started_at=1001.5, stage_seconds={"text_encoder": 0.5},
    ) is True
    got = store.get(record.id)
    assert got.status is JobStatus.IN_PROGRESS
    assert (got.progress, got.stage, got.step, got.started_at) == (40, "diffusion", 3, 1001.5)
    assert got.stage_seconds == {"text_encoder": 0.5}
    # fields not named in the update keep their values
    assert (got.prompt, got.negative_prompt, got.model, got.seed) == (record.prompt, "blurry", "ltx-2-tiny", 1234)
    assert (got.width, got.height, got.fps, got.seconds, got.total_steps) == (256, 192, 24, 2.5, 8)
    assert got.completed_at is None and got.owner is None
    assert store.count_active() == 1


def test_update_unknown_job_returns_false(store):
    assert store.update("video_missing", progress=5) is False
    assert store.finish("video_missing", status=JobStatus.COMPLETED) is False
    assert store.get("video_missing") is None


def test_writes_keep_untouched_numbers_exact(store):
    """A job's seed and creation time survive every kind of write unchanged.

    Seeds go up to 2**63 - 1 (serving.requests.MAX_SEED) and the orchestrator
    rebuilds the render plan from the *stored* seed after claim(); created_at
    is shown to clients.
    """
    record = make_record(seed=MAX_SEED, created_at=1712345678.123456)
    store.create(record)
    assert store.claim(record.id, "orchestrator-1", 10.0, now=2000.0)
    assert store.update(record.id, status=JobStatus.IN_PROGRESS, progress=5)
    assert store.request_cancel(record.id) is not None
    got = store.get(record.id)
    assert type(got.seed) is int
    assert got.seed == MAX_SEED
    assert got.created_at == 1712345678.123456


def test_late_update_cannot_resurrect_finished_job(store):
    record = make_record()
    store.create(record)
    assert store.update(record.id, status=JobStatus.IN_PROGRESS, progress=50, stage="diffusion")
    assert store.finish(
        record.id, status=JobStatus.COMPLETED, progress=100, stage="completed", completed_at=1100.0,
        result_path="/r/x.mp4", result_bytes=999,
    ) is True
    finished = store.get(record.id)
    assert finished.status is JobStatus.COMPLETED and finished.progress == 100
    # a late progress write from a stage that had not noticed the end
    assert store.update(record.id, status=JobStatus.IN_PROGRESS, progress=60, stage="diffusion", step=4) is False
    assert store.get(record.id) == finished
    assert store.count_active() == 0


@pytest.mark.parametrize("terminal", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_finish_twice_second_returns_false_and_changes_nothing(store, terminal):
    record = make_record()
    store.create(record)
    assert store.finish(record.id, status=terminal, stage="done", completed_at=1200.0) is True
    first = store.get(record.id)
    assert first.status is terminal and first.completed_at == 1200.0
    other = JobStatus.FAILED if terminal is not JobStatus.FAILED else JobStatus.CANCELLED
    assert store.finish(record.id, status=other, error_code="late", completed_at=9999.0) is False
    assert store.get(record.id) == first


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.IN_PROGRESS, 0, 1])
def test_finish_requires_terminal_status(store, status):
    record = make_record()
    store.create(record)
    with pytest.raises(ValueError, match="terminal"):
        store.finish(record.id, status=status, progress=77)
    got = store.get(record.id)
    assert got == record  # nothing changed
    assert store.count_active() == 1


def test_finish_accepts_plain_int_status(store):
    record = make_record()
    store.create(record)
    assert store.finish(record.id, status=int(JobStatus.CANCELLED), stage="cancelled") is True
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
    assert returned.status is JobStatus.QUEUED  # cancelling only flags; the orchestrator finishes it
    assert store.is_cancel_requested(record.id) is True
    got = store.get(record.id)
    assert got.cancel_requested is True and got.delete_requested is False


def test_request_cancel_with_delete_on_terminal_job(store):
    record = make_record()
    store.create(record)
    assert store.finish(record.id, status=JobStatus.COMPLETED, progress=100, completed_at=1300.0)
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
    assert store.update(gone.id, progress=3) is False
    assert store.claim(gone.id, "o", 10.0, now=5.0) is False
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


# ---------------------------------------------------------------------------------------------- claim / leases


def test_claim_unowned_then_lease_rules(store):
    record = make_record()
    store.create(record)
    now = 1000.0
    assert store.claim(record.id, "alpha", 10.0, now=now) is True
    got = store.get(record.id)
    assert got.owner == "alpha" and got.lease_until == pytest.approx(now + 10.0)

    # another orchestrator cannot take it while the lease is valid, even at its last instant
    assert store.claim(record.id, "beta", 10.0, now=now + 5.0) is False
    assert store.claim(record.id, "beta", 10.0, now=now + 10.0) is False
    assert store.get(record.id).owner == "alpha"

    # the owner renews: the lease moves forward
    assert store.claim(record.id, "alpha", 10.0, now=now + 8.0) is True
    assert store.get(record.id).lease_until == pytest.approx(now + 18.0)
    assert store.claim(record.id, "beta", 10.0, now=now + 15.0) is False

    # once it expires, another orchestrator takes over
    assert store.claim(record.id, "beta", 30.0, now=now + 18.5) is True
    got = store.get(record.id)
    assert got.owner == "beta" and got.lease_until == pytest.approx(now + 48.5)
    assert store.claim(record.id, "alpha", 10.0, now=now + 20.0) is False


def test_claim_does_not_touch_other_fields(store):
    record = make_record(progress=33, stage="diffusion", attempts=1)
    store.create(record)
    assert store.claim(record.id, "alpha", 10.0, now=50.0)
    got = store.get(record.id)
    assert (got.progress, got.stage, got.attempts, got.status) == (33, "diffusion", 1, JobStatus.QUEUED)
    assert (got.prompt, got.seed, got.width) == (record.prompt, record.seed, record.width)


@pytest.mark.parametrize("terminal", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_terminal_jobs_cannot_be_claimed(store, terminal):
    finished = make_record()
    store.create(finished)
    assert store.finish(finished.id, status=terminal)
    assert store.claim(finished.id, "alpha", 10.0, now=1.0) is False
    assert store.get(finished.id).owner is None

    born_terminal = make_record(status=terminal)
    store.create(born_terminal)
    assert store.claim(born_terminal.id, "alpha", 10.0, now=1.0) is False

    # the previous owner cannot renew once the job is finished either
    owned = make_record()
    store.create(owned)
    assert store.claim(owned.id, "alpha", 10.0, now=1.0)
    assert store.finish(owned.id, status=terminal)
    assert store.claim(owned.id, "alpha", 10.0, now=2.0) is False


def test_claim_unknown_job(store):
    assert store.claim("video_missing", "alpha", 10.0, now=1.0) is False


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
            results[owner] = store.claim(record.id, owner, 10.0, now=1000.0)
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
    assert store.get(record.id).owner == winners[0]


def test_orphans_are_active_jobs_with_expired_leases(store):
    now = 5000.0
    unowned = make_record(created_at=1.0)  # queued, never claimed: lease 0
    expired = make_record(created_at=2.0)
    live = make_record(created_at=3.0)
    done = make_record(created_at=4.0)
    failed_expired = make_record(created_at=5.0)
    for record in (unowned, expired, live, done, failed_expired):
        store.create(record)
    assert store.claim(expired.id, "dead", 10.0, now=now - 100.0)
    assert store.update(expired.id, status=JobStatus.IN_PROGRESS)
    assert store.claim(live.id, "alive", 10.0, now=now - 1.0)
    assert store.update(live.id, status=JobStatus.IN_PROGRESS)
    assert store.finish(done.id, status=JobStatus.COMPLETED)
    assert store.claim(failed_expired.id, "dead", 10.0, now=now - 100.0)
    assert store.finish(failed_expired.id, status=JobStatus.FAILED)

    assert sorted(store.orphans(now)) == sorted([unowned.id, expired.id])
    # after the live lease runs out it is an orphan too; finished jobs never are
    assert sorted(store.orphans(now + 20.0)) == sorted([unowned.id, expired.id, live.id])
    limited = store.orphans(now + 20.0, limit=2)
    assert len(limited) == 2 and set(limited) <= {unowned.id, expired.id, live.id}

    # claiming an orphan takes it off the list
    assert store.claim(expired.id, "rescuer", 10.0, now=now)
    assert sorted(store.orphans(now)) == [unowned.id]


def test_count_active_counts_queued_and_in_progress_only(store):
    assert store.count_active() == 0
    queued = make_record()
    running = make_record()
    store.create(queued)
    store.create(running)
    assert store.update(running.id, status=JobStatus.IN_PROGRESS)
    for terminal in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
        store.create(make_record(status=terminal))
    finished = make_record()
    store.create(finished)
    assert store.count_active() == 3
    assert store.finish(finished.id, status=JobStatus.COMPLETED)
    assert store.count_active() == 2
    assert store.request_cancel(queued.id) is not None  # flagged, still active until finished
    assert store.count_active() == 2
    assert store.finish(queued.id, status=JobStatus.CANCELLED)
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
        assert second.update(record.id, status=JobStatus.IN_PROGRESS, progress=20)
        assert first.get(record.id).progress == 20
        assert first.claim(record.id, "first", 10.0, now=100.0)
        assert second.claim(record.id, "second", 10.0, now=105.0) is False
        assert second.request_cancel(record.id) is not None
        assert first.is_cancel_requested(record.id) is True
        assert first.finish(record.id, status=JobStatus.CANCELLED)
        assert second.update(record.id, progress=99) is False
        assert second.finish(record.id, status=JobStatus.FAILED) is False
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

            def contend(index: int) -> None:
                try:
                    barrier.wait(timeout=10)
                    won = stores[index % 2].claim(record.id, f"owner-{index}", 10.0, now=1000.0)
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
