"""A small replay of a Serve deployment under a trace of jobs, on a simulated clock.

What is real: the replicas' stats come from ``cluster.load.DiffusionLoad`` (the
tracker a diffusion replica keeps), the policy is the one Serve loads from the
stage's ``autoscaling_config`` (``cluster.placement.stage_options``), wrapped by
Ray Serve's own ``_apply_autoscaling_config`` and fed real ``AutoscalingContext``
objects. What is modelled: Serve's routing (a request goes to the least-loaded
running replica with room, else waits at the handle), its metric push interval,
how it picks the replica to stop (not yet running first, then the newest) and
graceful drains, and a replica's start time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.load import DiffusionLoad


@dataclass
class Job:
    id: str
    arrival_s: float
    tokens: int
    steps: int
    started_s: float | None = None
    finished_s: float | None = None
    steps_done: int = 0

    @property
    def wait_s(self) -> float:
        return self.started_s - self.arrival_s


@dataclass
class Replica:
    id: ReplicaID
    ready_at: float
    load: DiffusionLoad
    jobs: list[Job] = field(default_factory=list)  # assigned: the first runs, the rest wait on the replica
    step_left_s: float = 0.0
    draining: bool = False
    stopped_at: float | None = None


@dataclass
class Timeline:
    """What happened: target and running replicas per second, and every stop."""

    targets: list[tuple[float, int]] = field(default_factory=list)
    running: list[tuple[float, int]] = field(default_factory=list)
    stops: list[tuple[float, int]] = field(default_factory=list)  # (time, requests the stopped replica still held)
    reasons: list[tuple[float, str]] = field(default_factory=list)
    wanted: list[tuple[float, int]] = field(default_factory=list)  # the policy's count before its delays
    busy: list[tuple[float, int]] = field(default_factory=list)  # running replicas holding requests

    def target_changes(self) -> list[tuple[float, int]]:
        changes, last = [], None
        for t, target in self.targets:
            if target != last:
                changes.append((t, target))
                last = target
        return changes

    def target_at(self, t: float) -> int:
        return [target for when, target in self.targets if when <= t][-1]


class DiffusionDeployment:
    """One diffusion deployment: replicas, the handle queue, the policy, driven second by second."""

    def __init__(
        self,
        autoscaling: dict,
        true_seconds_per_token_step: float,
        replica_start_s: float,
        max_ongoing_requests: int = 1,
        push_interval_s: float = 10.0,
        report_stats: bool = True,
    ):
        self.config = AutoscalingConfig(**autoscaling)
        self.policy = _apply_autoscaling_config(self.config.policy.get_policy()(**self.config.policy.policy_kwargs))
        self.spts = true_seconds_per_token_step
        self.start_s = replica_start_s
        self.max_ongoing = max_ongoing_requests
        self.push_interval_s = push_interval_s
        self.report_stats = report_stats
        self.now = 0.0
        self.deployment = DeploymentID(name="diffusion", app_name="reelserve")
        self.replicas: list[Replica] = []
        self.handle_queue: list[Job] = []
        self.done: list[Job] = []
        self.target = self.config.min_replicas
        self.state: dict = {}
        self.pushed: dict[ReplicaID, dict[str, float]] = {}
        self.timeline = Timeline()
        self._serial = 0
        for _ in range(self.target):
            self._add_replica(ready_at=0.0)

    # ------------------------------------------------------------ Serve's side

    def _add_replica(self, ready_at: float) -> None:
        self._serial += 1
        replica_id = ReplicaID(unique_id=f"r{self._serial}", deployment_id=self.deployment)
        self.replicas.append(Replica(replica_id, ready_at, DiffusionLoad(clock=lambda: self.now)))

    def _running(self) -> list[Replica]:
        return [r for r in self.replicas if r.stopped_at is None and not r.draining and r.ready_at <= self.now]

    def _route(self) -> None:
        while self.handle_queue:
            room = [r for r in self._running() if len(r.jobs) < self.max_ongoing]
            if not room:
                return
            replica = min(room, key=lambda r: len(r.jobs))
            job = self.handle_queue.pop(0)
            replica.jobs.append(job)
            replica.load.queued(job.id, job.tokens, job.steps)

    def _push_metrics(self) -> None:
        for replica in self._running():
            self.pushed[replica.id] = replica.load.report() if self.report_stats else {}

    def _context(self) -> AutoscalingContext:
        running = self._running()
        held = sum(len(r.jobs) for r in running)
        raw = {}
        for replica in running:
            for name, value in self.pushed.get(replica.id, {}).items():
                raw.setdefault(name, {})[replica.id] = [TimeStampedValue(self.now, value)]
        return AutoscalingContext(
            deployment_id=self.deployment, deployment_name="diffusion", app_name="reelserve",
            current_num_replicas=len(running), target_num_replicas=self.target,
            running_replicas=[r.id for r in running],
            total_num_requests=float(held + len(self.handle_queue)),
            total_queued_requests=float(len(self.handle_queue)),
            aggregated_metrics={}, raw_metrics=raw,
            capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas,
            policy_state=dict(self.state), last_scale_up_time=None, last_scale_down_time=None,
            current_time=self.now, config=self.config,
        )

    def _autoscale(self) -> None:
        decision, self.state = self.policy(self._context())
        decision = max(self.config.min_replicas, min(self.config.max_replicas, decision))
        self.timeline.reasons.append((self.now, self.state.get("reelserve_reason", "")))
        self.timeline.wanted.append((self.now, self.state.get("reelserve_wanted", decision)))
        self.timeline.busy.append((self.now, sum(bool(r.jobs) for r in self._running())))
        if decision > self.target:
            for _ in range(decision - self.target):
                self._add_replica(ready_at=self.now + self.start_s)
        elif decision < self.target:
            self._stop(self.target - decision)
        self.target = decision

    def _stop(self, count: int) -> None:
        """Serve's order: replicas not running yet first, then the newest; a stopped replica drains."""
        live = [r for r in self.replicas if r.stopped_at is None and not r.draining]
        starting = [r for r in live if r.ready_at > self.now]
        ready = [r for r in live if r.ready_at <= self.now]
        for replica in (starting + list(reversed(ready)))[:count]:
            replica.draining = True
            self.timeline.stops.append((self.now, len(replica.jobs)))
            if not replica.jobs:
                replica.stopped_at = self.now

    # ------------------------------------------------------------ the replicas' side

    def _work(self, seconds: float) -> None:
        for replica in self.replicas:
            if replica.stopped_at is not None or replica.ready_at > self.now:
                continue
            budget = seconds
            while replica.jobs and budget > 0:
                job = replica.jobs[0]
                if job.started_s is None:
                    job.started_s = self.now
                    replica.load.started(job.id)
                    replica.step_left_s = job.tokens * self.spts
                spent = min(budget, replica.step_left_s)
                budget -= spent
                replica.step_left_s -= spent
                if replica.step_left_s <= 1e-9:
                    replica.load.stepped(job.id, job.tokens * self.spts)
                    job.steps_done += 1
                    if job.steps_done >= job.steps:
                        replica.load.finished(job.id)
                        job.finished_s = self.now
                        self.done.append(replica.jobs.pop(0))
                    else:
                        replica.step_left_s = job.tokens * self.spts
            if replica.draining and not replica.jobs:
                replica.stopped_at = self.now

    # ------------------------------------------------------------ the replay

    def run(self, jobs: list[Job], until_s: float, tick_s: float = 1.0) -> Timeline:
        pending = sorted(jobs, key=lambda j: j.arrival_s)
        next_push = 0.0
        while self.now <= until_s:
            while pending and pending[0].arrival_s <= self.now:
                self.handle_queue.append(pending.pop(0))
            self._route()
            if self.now >= next_push:
                self._push_metrics()
                next_push += self.push_interval_s
            self._autoscale()
            self.timeline.targets.append((self.now, self.target))
            self.timeline.running.append((self.now, len(self._running())))
            self._work(tick_s)
            self.now += tick_s
        return self.timeline
