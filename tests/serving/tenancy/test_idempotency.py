"""Idempotency keys: fingerprints, and reservations that stay race-safe on a real redis-server and SQLite."""

from __future__ import annotations

import threading
import time

import pytest

from serving.errors import InvalidRequest
from serving.tenancy.errors import IdempotencyConflict
from serving.tenancy.idempotency import (
    RedisIdempotencyStore,
    SQLiteIdempotencyStore,
    check_idempotency_key,
    request_fingerprint,
    reserve_or_raise,
)
from serving.tenancy.quotas import Priority

REQUEST = {"prompt": "a cat", "seconds": 5, "size": "768x512", "seed": None, "priority": Priority.HIGH}


def test_the_fingerprint_is_canonical_over_fields_and_input_bytes():
    base = request_fingerprint(REQUEST, {"image": b"\xff\xd8photo"})
    assert len(base) == 64
    reordered = dict(reversed(list(REQUEST.items())))
    assert request_fingerprint(reordered, {"image": b"\xff\xd8photo"}) == base
    assert request_fingerprint({**REQUEST, "seconds": 5.0}, {"image": b"\xff\xd8photo"}) == base  # 5 == 5.0
    assert request_fingerprint({k: v for k, v in REQUEST.items() if v is not None}, {"image": b"\xff\xd8photo"}) == base
    assert request_fingerprint({**REQUEST, "priority": 2}, {"image": b"\xff\xd8photo", "audio": None}) == base
    for changed in ({**REQUEST, "prompt": "a dog"}, {**REQUEST, "seconds": 5.5}, {**REQUEST, "seed": 0}):
        assert request_fingerprint(changed, {"image": b"\xff\xd8photo"}) != base
    assert request_fingerprint(REQUEST, {"image": b"\xff\xd8photO"}) != base
    assert request_fingerprint(REQUEST, {"reference": b"\xff\xd8photo"}) != base  # the input's name counts
    assert request_fingerprint({"content": [{"type": "text", "text": "x"}]}) != request_fingerprint({"content": []})


def test_bytes_belong_in_inputs_and_numbers_must_be_finite():
    with pytest.raises(TypeError, match="image: bytes cannot be fingerprinted as a field; pass bytes as inputs"):
        request_fingerprint({"image": b"x"})
    with pytest.raises(ValueError, match="seconds: a fingerprint needs finite numbers"):
        request_fingerprint({"seconds": float("nan")})


def test_idempotency_keys_are_checked_naming_the_header_or_field():
    assert check_idempotency_key(None) is None and check_idempotency_key("") is None
    assert check_idempotency_key("7f0c2a8e-1b2c-4d5e-8f90-a1b2c3d4e5f6") == "7f0c2a8e-1b2c-4d5e-8f90-a1b2c3d4e5f6"
    with pytest.raises(InvalidRequest, match="Idempotency-Key: must be 1 to 255 printable ASCII characters"):
        check_idempotency_key("k" * 256)
    with pytest.raises(InvalidRequest, match="^idempotency_key: must be"):
        check_idempotency_key("line\nbreak", field="idempotency_key")


@pytest.fixture(params=["redis", "sqlite"])
def open_store(request, redis_url, tmp_path):
    """``open_store(**options)``: a new handle on one shared store (a second replica), per test."""
    made = []

    def open_(**options):
        if request.param == "redis":
            store = RedisIdempotencyStore(redis_url, prefix=f"test:{request.node.name}:", **options)
        else:
            store = SQLiteIdempotencyStore(str(tmp_path / "idempotency.sqlite3"), **options)
        made.append(store)
        return store

    yield open_
    for store in made:
        store.close()


def test_new_then_same_then_conflict_per_tenant(open_store):
    store = open_store()
    assert store.reserve("team-a", "k1", "fp1", "video_1").outcome == "new"
    retry = store.reserve("team-a", "k1", "fp1", "video_2")
    assert (retry.outcome, retry.job_id) == ("same", "video_1")
    conflict = store.reserve("team-a", "k1", "fp-other", "video_3")
    assert (conflict.outcome, conflict.job_id) == ("conflict", "video_1")
    with pytest.raises(IdempotencyConflict, match="already used with a different request in the last 24 h"):
        reserve_or_raise(store, "team-a", "k1", "fp-other", "video_3")
    assert store.reserve("team-b", "k1", "fp-other", "video_4").outcome == "new"  # keys are per tenant


def test_a_failed_create_releases_only_its_own_binding(open_store):
    store = open_store()
    assert store.reserve("team-a", "k", "fp", "video_1").outcome == "new"
    assert not store.release("team-a", "k", "video_other")
    assert store.release("team-a", "k", "video_1")
    assert store.reserve("team-a", "k", "fp", "video_2").outcome == "new"


def test_keys_expire_after_their_time_to_live(open_store):
    store = open_store(ttl_s=1)
    assert store.reserve("team-a", "k", "fp", "video_1").outcome == "new"
    time.sleep(1.1)
    assert store.reserve("team-a", "k", "fp-new", "video_2").outcome == "new"


def test_the_default_time_to_live_is_a_day(redis_url):
    store = RedisIdempotencyStore(redis_url, prefix="test:ttl:")
    store.reserve("team-a", "k", "fp", "video_1")
    (name,) = store._redis.keys("test:ttl:*")
    assert 86_390 < store._redis.ttl(name) <= 86_400
    store.close()


@pytest.mark.parametrize("fingerprints", [["same"], ["one", "other"]])
def test_replicas_receiving_one_key_at_once_bind_it_once(open_store, fingerprints):
    replicas = [open_store() for _ in range(8)]
    barrier = threading.Barrier(16)
    answers = []

    def create(index):
        barrier.wait()
        fingerprint = fingerprints[index % len(fingerprints)]
        reservation = replicas[index % 8].reserve("team-a", "retry-key", fingerprint, f"video_{index}")
        answers.append((fingerprint, reservation))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    new = [(fp, r) for fp, r in answers if r.outcome == "new"]
    assert len(answers) == 16 and len(new) == 1
    winner_fp, winner = new[0]
    for fingerprint, reservation in answers:
        assert reservation.job_id == winner.job_id
        assert reservation.outcome in (("new", "same") if fingerprint == winner_fp else ("conflict",))
