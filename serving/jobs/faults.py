"""Injected faults (``faults`` in the config): a chosen stage, for a chosen job, runs out of memory,
stalls, kills its own replica, or breaks its device (a CUDA error other than out of memory: once, or
every time the job runs, as a poisoned input would). Replicas added by scaling can be made slow to
warm up. Off unless configured; for tests here and chaos runs in staging.

A fault fires at most ``times_per_job`` times per job, counted in the job's artifacts before it
fires (each attempt keeps the running total), so a job resumed after a replica was killed is not
killed again (``poison_input`` always fires).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from cluster.config import FaultConfig
from serving.device_errors import injected_device_error
from serving.protocol import JobTicket
from serving.storage.codec import codec

__all__ = ["FaultCount", "FaultInjector", "InjectedOutOfMemory"]

_DEVICE_KINDS = ("device_error", "poison_input")  # strike inside the model's work (a pass, a call)

logger = logging.getLogger("ray.serve.reelserve.faults")


class InjectedOutOfMemory(RuntimeError):
    """Stands for the framework's out-of-memory error where torch is not the one raising it."""


@codec.register
@dataclass(frozen=True)
class FaultCount:
    """How often a fault fired for a job, over its attempts so far."""

    fired: int


class FaultInjector:
    def __init__(self, stage: str, faults: list[FaultConfig], storage):
        """``storage``: a ``serving.jobs.job_storage.JobStorage``, where the counts are kept."""
        self._stage = stage
        self._faults = [(index, f) for index, f in enumerate(faults) if f.stage == stage]
        self._storage = storage

    @property
    def armed(self) -> bool:
        return bool(self._faults)

    async def on_entry(self, ticket: JobTicket) -> None:
        """Faults that strike when the stage starts the job's work (all but diffusion's step faults)."""
        for index, fault in self._matching(ticket):
            if fault.kind == "stall" or (fault.kind == "slow" and self._stage != "diffusion"):
                if self._take(ticket, index, fault):
                    logger.warning("injected fault: %s stalls %.0f s for job %s", self._stage, fault.stall_s, ticket.job_id)
                    await asyncio.sleep(fault.stall_s)
            elif fault.kind not in _DEVICE_KINDS and self._stage != "diffusion" and self._take(ticket, index, fault):
                self._strike(fault, ticket)

    def in_call(self, ticket: JobTicket) -> None:
        """Device faults of a model stage, inside its model call (the thread that runs it)."""
        for index, fault in self._matching(ticket):
            if fault.kind == "poison_input" or (fault.kind == "device_error" and self._take(ticket, index, fault)):
                self._break_device(fault, ticket)

    def in_pass(self, ticket: JobTicket, finished_steps: int) -> None:
        """Diffusion's device faults, inside the pass of a batch holding the job (its batch-mates fail with it)."""
        for index, fault in self._matching(ticket):
            if fault.kind == "poison_input" and finished_steps >= fault.at_step:
                self._break_device(fault, ticket)
            elif fault.kind == "device_error" and finished_steps == fault.at_step and self._take(ticket, index, fault):
                self._break_device(fault, ticket)

    def at_warmup(self) -> None:
        """``slow_warmup``: replicas added by scaling (Serve replica rank 1 and up) warm up ``stall_s`` longer."""
        stalls = [f.stall_s for _, f in self._faults if f.kind == "slow_warmup"]
        if stalls and _replica_rank() >= 1:
            logger.warning("injected fault: %s warms up %.0f s longer", self._stage, max(stalls))
            time.sleep(max(stalls))

    def _break_device(self, fault: FaultConfig, ticket: JobTicket) -> None:
        logger.warning("injected fault: %s %s for job %s", self._stage, fault.kind, ticket.job_id)
        raise injected_device_error(self._stage)

    def at_step(self, ticket: JobTicket, finished_steps: int) -> None:
        """Diffusion's faults, after ``finished_steps`` denoising steps (called from the denoising thread)."""
        for index, fault in self._matching(ticket):
            if fault.kind == "slow":
                time.sleep(fault.stall_s)  # holds the engine like a slow GPU would
            elif fault.kind in ("out_of_memory", "kill_replica") and finished_steps == fault.at_step and self._take(
                ticket, index, fault
            ):
                self._strike(fault, ticket)

    def _matching(self, ticket: JobTicket):
        return [(i, f) for i, f in self._faults if f.prompt_contains is not None and f.prompt_contains in ticket.prompt]

    def _take(self, ticket: JobTicket, index: int, fault: FaultConfig) -> bool:
        name = f"fault_{self._stage}_{index}"
        count = self._storage.load_output(ticket.job_id, ticket.attempt, name)
        fired = count.fired if isinstance(count, FaultCount) else 0
        if fired >= fault.times_per_job:
            return False
        # Counted before it strikes: a kill forgets nothing.
        self._storage.keep_output(ticket.job_id, ticket.attempt, name, FaultCount(fired + 1))
        return True

    def _strike(self, fault: FaultConfig, ticket: JobTicket) -> None:
        logger.warning("injected fault: %s %s for job %s", self._stage, fault.kind, ticket.job_id)
        if fault.kind == "kill_replica":
            os._exit(1)
        try:
            import torch  # noqa: PLC0415 - the fallback below covers an install without torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected fault in {self._stage})")
        except ImportError:  # pragma: no cover - torch is always installed with reelserve
            raise InjectedOutOfMemory(f"out of memory (injected fault in {self._stage})") from None


def _replica_rank() -> int:
    """This replica's Serve rank (0 for the first; outside Serve, 0)."""
    try:
        from ray import serve  # noqa: PLC0415 - inside a replica only

        return int(serve.get_replica_context().rank.rank)
    except Exception:  # noqa: BLE001 - not a Serve replica
        return 0
