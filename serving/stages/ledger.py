"""One record of a stage replica's requests, read three ways.

Every request a replica takes is entered here once: when it arrives, when the
model takes it, when it leaves. The same entries feed the replica's
``stats()`` snapshot (``StageStats``), the Prometheus exporter
(``serving.metrics``) and the autoscaling tracker (``cluster.load``), so the
three can never disagree about what the replica did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.load import StageLoad
from serving import metrics
from serving.metrics import StageStats

__all__ = ["StageLedger", "LedgerEntry"]


@dataclass
class LedgerEntry:
    """One request, as the ledger follows it."""

    arrived: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when the model took it (None: still waiting, or it never got there)


class StageLedger:
    def __init__(self, stage: str, model: str, load: StageLoad | None = None):
        self.stats = StageStats(stage=stage, model=model)
        self.load = load  # the autoscaling tracker, for stages that report to reelserve's policies
        self.publish()  # every replica reports from its start (the dashboard counts replicas by it)

    @property
    def stage(self) -> str:
        return self.stats.stage

    def arrived(self) -> LedgerEntry:
        self.stats.queued += 1
        if self.load is not None:
            self.load.arrived()
        self.publish()
        return LedgerEntry()

    def started(self, entry: LedgerEntry) -> None:
        """The model took the request (it waited ``started - arrived`` for it)."""
        entry.started = time.perf_counter()
        self.stats.queued -= 1
        self.stats.in_flight += 1
        self.publish()

    def left(self, entry: LedgerEntry, ok: bool) -> None:
        """The request left the replica, however it ended."""
        now = time.perf_counter()
        busy = None
        if entry.started is None:  # cancelled or failed before the model took it
            self.stats.queued -= 1
        else:
            self.stats.in_flight -= 1
            busy = now - entry.started
            self.stats.record(busy, ok=ok, queue_wait_s=entry.started - entry.arrived)
            metrics.stage_request(self.stage, self.stats.model, entry.started - entry.arrived, now - entry.arrived, ok)
            metrics.record_gpu_memory(self.stage, self.stats.model)
        if self.load is not None:
            self.load.done(busy)
        self.publish()

    def handed(self, nbytes: int) -> None:
        """The replica handed ``nbytes`` on to the next stage."""
        self.stats.handed_bytes_total += nbytes
        metrics.bytes_handed(self.stage, self.stats.model, nbytes)

    def publish(self) -> None:
        metrics.stage_load(self.stage, self.stats.model, self.stats.in_flight, self.stats.queued)
