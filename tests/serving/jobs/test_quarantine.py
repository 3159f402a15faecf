"""Strikes against a job whose stage calls lose their replica; two strikes set it aside (the runner's side,
stage handles faked in-process)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster.config import JobsConfig, StorageConfig
from serving.errors import ReplicaLost
from serving.jobs import context as context_module
from serving.jobs.context import RunnerJobContext
from serving.jobs.failures import StageFailure, client_safe_error
from serving.jobs.job_storage import JobStorage
from serving.jobs.quarantine import STRIKES, StrikeCount, strike_of
from serving.metrics import StageStats
from serving.protocol import JobTicket


class ActorDiedError(Exception):
    """Named like Ray's: the replica's process died with the call in flight."""


JOB_ID = "video_0123456789abcdef01234567"
ATTEMPT = 2  # the context's attempt; an earlier one is 1


@pytest.fixture
def storage(tmp_path):
    """The job's real storage, over local directories."""
    return JobStorage(StorageConfig(results_url=str(tmp_path / "results"), artifacts_url=str(tmp_path / "artifacts")))


def _strikes(storage, job_id=JOB_ID):
    kept = storage.load_output(job_id, ATTEMPT, STRIKES)
    return None if kept is None else kept.strikes


class _Response:
    """What a handle call returns: awaitable, cancellable."""

    def __init__(self, outcome):
        self.outcome = outcome

    def __await__(self):
        async def result():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return result().__await__()

    def cancel(self):
        pass


def _context(storage, job_id=JOB_ID):
    async def io(method, *args, **kwargs):
        return method(*args, **kwargs)

    async def never(job_id, timeout):
        await asyncio.sleep(timeout)

    services = SimpleNamespace(
        jobs=JobsConfig(stage_retries=2), storage=storage, io=io, stats=StageStats(stage="orchestrator"),
        store=SimpleNamespace(is_cancel_requested=lambda job_id: False), events=SimpleNamespace(wait=never),
    )
    record = SimpleNamespace(id=job_id, done_stages=[], stage_seconds={})
    job = SimpleNamespace(job_id=job_id)
    return RunnerJobContext(services, record, job, JobTicket(job_id, "owner", ATTEMPT, "a prompt"), writer=None)


def _calls(context, outcomes):
    tickets = []

    def make_call():
        tickets.append(context.ticket)
        return _Response(outcomes.pop(0))

    return make_call, tickets


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(context_module, "LOST_REPLICA_BACKOFF_S", 0)


def test_a_job_whose_pass_breaks_two_replicas_is_set_aside(storage):
    context = _context(storage)
    make_call, tickets = _calls(context, [ReplicaLost("diffusion", "illegal memory access", blamed=True)] * 2)
    with pytest.raises(StageFailure) as failed:
        asyncio.run(context._attempt("diffusion", make_call))
    assert _strikes(storage) == 2
    assert [t.isolate for t in tickets] == [False, True]  # the retry ran apart from other jobs
    code, message = client_safe_error(failed.value.error, failed.value.stage)
    assert code == "poison_input" and "broke 2 diffusion replicas" in message


def test_a_batch_mate_is_struck_once_then_runs_apart_and_completes(storage):
    context = _context(storage)
    outcomes = [ReplicaLost("diffusion", "illegal memory access", blamed=True),  # shared the poisoned pass
                ReplicaLost("diffusion", "illegal memory access", blamed=False),  # the replica broke by another's pass
                "denoised"]
    make_call, tickets = _calls(context, outcomes)
    assert asyncio.run(context._attempt("diffusion", make_call)) == "denoised"
    assert _strikes(storage) == 1
    assert [t.isolate for t in tickets] == [False, True, True]


def test_strikes_outlive_the_attempt_and_a_silent_crash_counts(storage):
    storage.keep_output(JOB_ID, ATTEMPT - 1, STRIKES, StrikeCount(1))  # an earlier attempt was struck once
    context = _context(storage)
    make_call, tickets = _calls(context, [ActorDiedError("the replica died")])
    with pytest.raises(StageFailure):
        asyncio.run(context._attempt("diffusion", make_call))
    assert tickets[0].isolate  # a suspect from its first call
    assert _strikes(storage) == 2
    assert strike_of(ValueError("a bad request")) is None


def test_other_failures_strike_nothing(storage):
    context = _context(storage)
    make_call, _ = _calls(context, [ValueError("16 video tokens do not split over 3 ranks")])
    with pytest.raises(StageFailure):
        asyncio.run(context._attempt("diffusion", make_call))
    assert _strikes(storage) is None
