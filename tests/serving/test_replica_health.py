"""A broken device loses the replica, out of memory does not; device faults strike where a broken GPU would."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cluster.config import FaultConfig, JobsConfig, StorageConfig
from serving.device_errors import device_failure, injected_device_error
from serving.errors import ReplicaLost, StageDead, StageOutOfMemory
from serving.jobs.faults import FaultInjector
from serving.jobs.job_storage import JobStorage
from serving.protocol import JobTicket
from serving.stages import health
from serving.stages._base import StageRunner

TICKET = JobTicket("video_0123456789abcdef01234567", "orchestrator-x", 1, "a prompt [poison]")


def _storage(directory):
    """The job's real storage over local directories (where fault counts are kept)."""
    return JobStorage(StorageConfig(results_url=str(directory / "results"), artifacts_url=str(directory / "artifacts")))


@pytest.mark.parametrize(
    "error, kind",
    [
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), "device"),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "device"),
        (RuntimeError("CUDA error: unspecified launch failure"), "device"),
        (RuntimeError("CUDA error: device-side assert triggered"), "device"),
        (RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:31337"), "group"),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"), "group"),
        (type("ActorDiedError", (Exception,), {})("the worker died"), "group"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), None),
        (RuntimeError("CUDA error: out of memory"), None),
        (ValueError("16 video tokens do not split over 3 ranks"), None),
    ],
)
def test_which_errors_lose_the_replica(error, kind):
    assert device_failure(error) == kind
    wrapped = RuntimeError("ray.exceptions.RayTaskError: ...")
    wrapped.cause = error
    assert device_failure(wrapped) == kind  # judged by its cause, as Ray wraps it


def test_a_broken_device_loses_the_replica_and_out_of_memory_does_not(tmp_path, monkeypatch):
    ended = []
    monkeypatch.setattr(health.ReplicaHealth, "_end", lambda self: ended.append(self.lost))
    runner = StageRunner("text_encoder", JobsConfig(results_dir=str(tmp_path)))

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory")

    def broken():
        raise injected_device_error("text_encoder")

    async def scenario():
        with pytest.raises(StageOutOfMemory):
            await runner.run(TICKET, out_of_memory)
        assert runner.health.lost is None  # serves on
        with pytest.raises(ReplicaLost) as lost:
            await runner.run(TICKET, broken)
        assert lost.value.blamed and "illegal memory access" in lost.value.reason
        with pytest.raises(ReplicaLost) as refused:  # the next call is handed on, not run
            await runner.run(TICKET, lambda: "never")
        assert not refused.value.blamed
        with pytest.raises(StageDead):
            runner.health.check()

    asyncio.run(scenario())

    time.sleep(0.1)
    assert len(ended) == 1  # the process would end now (once)


def test_device_faults_strike_inside_the_work_once_or_every_time(tmp_path):
    once = FaultInjector("diffusion", [FaultConfig(stage="diffusion", kind="device_error", prompt_contains="[poison]",
                                                   at_step=3)], _storage(tmp_path / "once"))
    once.in_pass(TICKET, 2)  # not yet
    with pytest.raises(torch.AcceleratorError):
        once.in_pass(TICKET, 3)
    once.in_pass(TICKET, 3)  # a resumed job is not hit again
    every = FaultInjector("diffusion", [FaultConfig(stage="diffusion", kind="poison_input", prompt_contains="[poison]",
                                                    at_step=2)], _storage(tmp_path / "every"))
    for _ in range(3):  # every run from step 2 on, resumed or not
        with pytest.raises(torch.AcceleratorError):
            every.in_pass(TICKET, 4)
    model = FaultInjector("video_decoder", [FaultConfig(stage="video_decoder", kind="poison_input",
                                                        prompt_contains="[poison]")], _storage(tmp_path / "model"))
    asyncio.run(model.on_entry(TICKET))  # not on entry: inside the model call
    with pytest.raises(torch.AcceleratorError):
        model.in_call(TICKET)
    with pytest.raises(ValueError, match="prompt_contains"):
        FaultConfig(stage="diffusion", kind="poison_input")
    FaultConfig(stage="video_decoder", kind="slow_warmup", stall_s=1)  # hits replicas, not jobs
