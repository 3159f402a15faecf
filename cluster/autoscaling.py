"""Autoscaling for minutes-long jobs: Ray Serve custom policies and the math behind them.

Serve's default policy counts requests per replica. For diffusion that is
wrong twice: a 256x256 2 s job and a 1280x704 10 s job differ by over 100x in
GPU time, and a job that waits behind one running job waits a whole
generation. Here:

- **diffusion** scales on its backlog in expected GPU-seconds. Each replica
  reports (``cluster.load.DiffusionLoad``) the latent token-steps of the
  requests it runs and holds, and its measured seconds per token-step.
  Requests still queued at Serve's handles are counted by Serve and sized at
  the mean request the replicas have seen. The policy places the queued jobs,
  in order, on the replica that frees first (a new replica frees after
  ``replica_start_s``, the time to start and load one) and picks the fewest
  replicas whose longest queue wait meets the target (the SLO); where none
  does, the fewest that reach the shortest wait possible.
- **every other stage** scales on its measured arrival rate times its measured
  service time, at a target utilisation, and on what it holds against a short
  wait. The decoders' and the muxer's arrivals are diffusion's completions;
  the text encoder's and the image conditioner's are the jobs arriving.
- **both** keep at least one warm replica (loads take minutes), scale up after
  a short delay and down after a long one (to the most replicas wanted during
  that delay: a stabilisation window, as in Kubernetes' HPA), and never ask
  for fewer replicas than hold work. Serve
  2.60 lets a policy choose how many replicas run, not which one stops; a busy
  replica chosen anyway drains (its ``graceful_shutdown_timeout_s`` fits the
  longest job, ``cluster.placement.drain_seconds``).

The delays live in the policy (Serve's own are set to 0), measured on the
context's clock, so the tests replay traces at any speed. Until replicas
report their stats the policies fall back on Serve's request counts, each
request sized at the config's default request.

Scope: deployment-level policies, because ``serve.run`` (``reelserve up``)
cannot carry an application-level policy in Ray 2.60, and because a
follower's own arrivals already are the completions it follows.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Any

from cluster.load import (
    ARRIVALS_PER_S,
    IN_FLIGHT,
    MEAN_REQUEST_TOKEN_STEPS,
    QUEUED_REQUESTS,
    QUEUED_TOKEN_STEPS,
    RUNNING_REQUESTS,
    RUNNING_TOKEN_STEPS,
    SECONDS_PER_TOKEN_STEP,
    SERVICE_SECONDS,
    STORE_QUEUED_REQUESTS,
    STORE_QUEUED_TOKEN_STEPS,
)
from cluster.sizes import parse_size

__all__ = [
    "DiffusionReplica",
    "DiffusionPolicySettings",
    "FollowerReplica",
    "FollowerSettings",
    "DiffusionBacklogPolicy",
    "FollowerPolicy",
    "queue_wait_s",
    "diffusion_replicas_wanted",
    "follower_replicas_wanted",
    "apply_delays",
    "autoscaling_config",
]

_STATE_PREFIX = "reelserve_"


# ------------------------------------------------------------------ what the policies read


@dataclass(frozen=True)
class DiffusionReplica:
    """One diffusion replica's latest report (``cluster.load.DiffusionLoad.report``)."""

    running_token_steps: float = 0.0
    queued_token_steps: float = 0.0
    running_requests: int = 0
    queued_requests: int = 0
    seconds_per_token_step: float = 0.0  # 0: not measured yet
    mean_request_token_steps: float = 0.0  # 0: no arrivals in the window
    store_queued_requests: int = 0  # jobs waiting in the job store for a slot, as this replica last read them
    store_queued_token_steps: float = 0.0

    @property
    def busy(self) -> bool:
        return self.running_requests + self.queued_requests > 0

    @classmethod
    def from_report(cls, report: dict[str, float]) -> DiffusionReplica:
        return cls(
            running_token_steps=report.get(RUNNING_TOKEN_STEPS, 0.0),
            queued_token_steps=report.get(QUEUED_TOKEN_STEPS, 0.0),
            running_requests=round(report.get(RUNNING_REQUESTS, 0.0)),
            queued_requests=round(report.get(QUEUED_REQUESTS, 0.0)),
            seconds_per_token_step=report.get(SECONDS_PER_TOKEN_STEP, 0.0),
            mean_request_token_steps=report.get(MEAN_REQUEST_TOKEN_STEPS, 0.0),
            store_queued_requests=round(report.get(STORE_QUEUED_REQUESTS, 0.0)),
            store_queued_token_steps=report.get(STORE_QUEUED_TOKEN_STEPS, 0.0),
        )


@dataclass(frozen=True)
class FollowerReplica:
    """One encoder / decoder / muxer replica's latest report (``cluster.load.StageLoad.report``)."""

    arrivals_per_s: float = 0.0
    service_seconds: float = 0.0  # 0: not measured yet
    in_flight: int = 0

    @classmethod
    def from_report(cls, report: dict[str, float]) -> FollowerReplica:
        return cls(
            arrivals_per_s=report.get(ARRIVALS_PER_S, 0.0),
            service_seconds=report.get(SERVICE_SECONDS, 0.0),
            in_flight=round(report.get(IN_FLIGHT, 0.0)),
        )


@dataclass(frozen=True)
class DiffusionPolicySettings:
    """The diffusion policy's knobs (``policy_kwargs``; built from the config by ``autoscaling_config``)."""

    target_queue_wait_s: float
    replica_start_s: float
    seconds_per_token_step: float  # prior until replicas measure theirs
    default_request_token_steps: float  # prior size of a request nobody has measured
    upscale_delay_s: float
    downscale_delay_s: float
    warm_replicas: int = 1


@dataclass(frozen=True)
class FollowerSettings:
    """The follower policy's knobs."""

    target_utilization: float
    target_wait_s: float
    target_ongoing_requests: float  # Serve's count per replica, used until service times are measured
    upscale_delay_s: float
    downscale_delay_s: float
    warm_replicas: int = 1


# ------------------------------------------------------------------ diffusion: backlog in GPU-seconds


def queue_wait_s(free_at: list[float], queued_costs: list[float]) -> float:
    """Longest wait of the queued jobs when each, in order, goes to the replica that frees first.

    ``free_at``: seconds from now until each replica can start a new job;
    ``queued_costs``: expected GPU-seconds of each queued job, first in line first.
    """
    if not queued_costs:
        return 0.0
    if not free_at:
        return math.inf
    heap = list(free_at)
    heapq.heapify(heap)
    longest = 0.0
    for cost in queued_costs:
        start = heapq.heappop(heap)
        longest = max(longest, start)
        heapq.heappush(heap, start + cost)
    return longest


def diffusion_replicas_wanted(
    replicas: list[DiffusionReplica],
    handle_queued: float,
    lowest: int,
    highest: int,
    settings: DiffusionPolicySettings,
) -> tuple[int, str]:
    """How many diffusion replicas the backlog needs, and why (a line for logs and tests)."""
    rate = _measured_rate(replicas) or settings.seconds_per_token_step
    request_size = _mean_request_size(replicas) or settings.default_request_token_steps
    free_at = sorted((r.running_token_steps * rate for r in replicas), reverse=True)
    queued = []
    for replica in replicas:  # requests waiting on a replica, each at that replica's mean queued size
        for _ in range(replica.queued_requests):
            queued.append(replica.queued_token_steps / replica.queued_requests * rate)
    queued += [request_size * rate] * max(round(handle_queued), 0)
    # Jobs waiting in the job store for a slot: every replica reads the same store, so the newest-looking (largest)
    # report counts once.
    store = max(replicas, key=lambda r: r.store_queued_requests, default=None)
    if store is not None and store.store_queued_requests > 0:
        each = store.store_queued_token_steps / store.store_queued_requests * rate
        queued += [each] * store.store_queued_requests

    def wait_with(count: int) -> float:
        # Fewer replicas: the busiest stay (the pessimistic case). More: the new ones start after replica_start_s.
        servers = free_at[:count] + [settings.replica_start_s] * max(count - len(free_at), 0)
        return queue_wait_s(servers, queued)

    lowest = max(lowest, settings.warm_replicas, 1)
    highest = max(highest, lowest)
    waits = {count: wait_with(count) for count in range(lowest, highest + 1)}
    meeting = [count for count, wait in waits.items() if wait <= settings.target_queue_wait_s]
    if meeting:
        wanted = meeting[0]
    else:  # the target is out of reach: the fewest replicas that get as close as possible
        best = min(waits.values())
        wanted = min(count for count, wait in waits.items() if wait <= best + max(1.0, 0.01 * best))
    busy = sum(r.busy for r in replicas)
    decided = min(max(wanted, busy), highest)
    reason = (
        f"{len(queued)} queued ({sum(queued):.0f} GPU-s), {sum(free_at):.0f} GPU-s running on {busy} busy "
        f"replica(s), {rate:.3g} s/token-step: wait {waits[wanted]:.0f} s at {wanted}, "
        f"target {settings.target_queue_wait_s:g} s -> {decided}"
    )
    return decided, reason


def _measured_rate(replicas: list[DiffusionReplica]) -> float:
    measured = [r.seconds_per_token_step for r in replicas if r.seconds_per_token_step > 0]
    return sum(measured) / len(measured) if measured else 0.0


def _mean_request_size(replicas: list[DiffusionReplica]) -> float:
    seen = [r.mean_request_token_steps for r in replicas if r.mean_request_token_steps > 0]
    return sum(seen) / len(seen) if seen else 0.0


# ------------------------------------------------------------------ followers: arrivals x service time


def follower_replicas_wanted(
    replicas: list[FollowerReplica],
    requests_held: float,
    lowest: int,
    highest: int,
    settings: FollowerSettings,
) -> tuple[int, str]:
    """How many replicas a stage needs for its arrival rate and what it holds, and why.

    ``requests_held``: Serve's count of requests running and queued for the stage.
    """
    lowest = max(lowest, settings.warm_replicas, 1)
    highest = max(highest, lowest)
    service = [r.service_seconds for r in replicas if r.service_seconds > 0]
    arrivals = sum(r.arrivals_per_s for r in replicas)
    if service:
        seconds = sum(service) / len(service)
        for_rate = arrivals * seconds / settings.target_utilization
        for_backlog = requests_held * seconds / settings.target_wait_s
        wanted = math.ceil(max(for_rate, for_backlog) - 1e-9)
        how = f"{arrivals:.3g}/s x {seconds:.3g} s at {settings.target_utilization:g}, {requests_held:.1f} held"
    else:  # nothing measured yet: Serve's own rule on request counts
        wanted = math.ceil(requests_held / settings.target_ongoing_requests - 1e-9)
        how = f"no service time measured; {requests_held:.1f} held / {settings.target_ongoing_requests:g}"
    busy = sum(r.in_flight > 0 for r in replicas)
    decided = min(max(wanted, busy, lowest), highest)
    return decided, f"{how} -> {decided}"


# ------------------------------------------------------------------ delays


def apply_delays(
    wanted: int, target: int, now: float, state: dict[str, Any], up_delay_s: float, down_delay_s: float
) -> tuple[int, dict[str, Any]]:
    """Stabilisation windows over the wanted counts (as Kubernetes' HPA does).

    Up: to the fewest replicas wanted throughout the last ``up_delay_s`` (a need
    that lasted), when that is above ``target``. Down: to the most replicas
    wanted at any time in the last ``down_delay_s``, when that is below
    ``target``. A window counts only once the policy has watched that long.
    Returns the decision and the new state (a run-length history of ``wanted``).
    """
    since = state.get(f"{_STATE_PREFIX}since", now)
    history = [list(point) for point in state.get(f"{_STATE_PREFIX}history", [])]
    if not history or history[-1][1] != wanted:
        history.append([now, wanted])
    horizon = now - max(up_delay_s, down_delay_s)
    while len(history) > 1 and history[1][0] <= horizon:  # the first point still holds at the horizon
        history.pop(0)

    def over_last(seconds: float) -> list[int]:
        return [count for i, (t, count) in enumerate(history) if i + 1 == len(history) or history[i + 1][0] > now - seconds]

    decision = target
    sustained = min(over_last(up_delay_s))
    peak = max(over_last(down_delay_s))
    if sustained > target and now - since >= up_delay_s - 1e-9:
        decision = sustained
    elif peak < target and now - since >= down_delay_s - 1e-9:
        decision = peak
    return decision, {f"{_STATE_PREFIX}since": since, f"{_STATE_PREFIX}history": history}


# ------------------------------------------------------------------ Ray Serve policies


def _latest_reports(ctx) -> list[dict[str, float]]:
    """Each running replica's latest custom metrics (the newest point of each series), in running order."""
    raw = ctx.raw_metrics or {}
    reports: dict[Any, dict[str, float]] = {}
    for name, per_replica in raw.items():
        for replica_id, series in per_replica.items():
            if series:
                reports.setdefault(replica_id, {})[name] = float(series[-1].value)
    return [reports[r] for r in ctx.running_replicas if r in reports]


class _DelayedPolicy:
    """Shared by both policies: the context's clock, bounds and delays."""

    upscale_delay_s: float
    downscale_delay_s: float

    def _decide(self, ctx, wanted: int, reason: str) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        mine = {k: v for k, v in (ctx.policy_state or {}).items() if k.startswith(_STATE_PREFIX)}
        decision, state = apply_delays(
            wanted, ctx.target_num_replicas, now, mine, self.upscale_delay_s, self.downscale_delay_s
        )
        state[f"{_STATE_PREFIX}wanted"] = wanted
        state[f"{_STATE_PREFIX}reason"] = reason
        return decision, state


class DiffusionBacklogPolicy(_DelayedPolicy):
    """Serve policy for the diffusion deployment (``policy_function: cluster.autoscaling:DiffusionBacklogPolicy``)."""

    def __init__(self, **kwargs: Any):
        self.settings = DiffusionPolicySettings(**kwargs)
        self.upscale_delay_s = self.settings.upscale_delay_s
        self.downscale_delay_s = self.settings.downscale_delay_s

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        reports = _latest_reports(ctx)
        lowest, highest = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        if any(RUNNING_TOKEN_STEPS in report for report in reports):
            replicas = [DiffusionReplica.from_report(report) for report in reports]
            handle_queued = ctx.total_queued_requests or 0.0
        else:
            replicas, handle_queued = self._from_request_counts(ctx)
        wanted, reason = diffusion_replicas_wanted(replicas, handle_queued, lowest, highest, self.settings)
        return self._decide(ctx, wanted, reason)

    def _from_request_counts(self, ctx) -> tuple[list[DiffusionReplica], float]:
        """No replica reports its load yet: Serve's counts, every request of the default size, running ones half
        done, each on its own replica."""
        size = self.settings.default_request_token_steps
        running = min(round(ctx.total_running_requests), ctx.current_num_replicas)
        replicas = [DiffusionReplica(running_token_steps=size / 2, running_requests=1) for _ in range(running)]
        replicas += [DiffusionReplica() for _ in range(ctx.current_num_replicas - running)]
        return replicas, ctx.total_queued_requests or 0.0


class FollowerPolicy(_DelayedPolicy):
    """Serve policy for the encoders, decoders and the muxer (``cluster.autoscaling:FollowerPolicy``)."""

    def __init__(self, **kwargs: Any):
        self.settings = FollowerSettings(**kwargs)
        self.upscale_delay_s = self.settings.upscale_delay_s
        self.downscale_delay_s = self.settings.downscale_delay_s

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        replicas = [FollowerReplica.from_report(report) for report in _latest_reports(ctx)]
        lowest, highest = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        wanted, reason = follower_replicas_wanted(replicas, ctx.total_num_requests, lowest, highest, self.settings)
        return self._decide(ctx, wanted, reason)


# ------------------------------------------------------------------ config -> Serve's autoscaling_config


def autoscaling_config(name: str, config) -> dict:
    """``autoscaling_config`` for the autoscaled stage ``name`` of ``config`` (a ``ReelserveConfig``)."""
    stage = config.stages[name]
    base = {
        "min_replicas": stage.min_replicas,
        "max_replicas": stage.max_replicas,
        "target_ongoing_requests": stage.target_ongoing_requests,
    }
    scaling = config.scaling
    if not scaling.enabled:
        return base
    warm = max(stage.min_replicas, 1)
    delays = {"upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s}
    if name == "diffusion":
        model = config.model
        width, height = parse_size(model.default_size)
        tokens = model.latent_tokens(width, height, model.default_seconds, model.default_fps)
        policy = {
            "policy_function": "cluster.autoscaling:DiffusionBacklogPolicy",
            "policy_kwargs": {
                "target_queue_wait_s": scaling.target_queue_wait_s,
                "replica_start_s": scaling.replica_start_s,
                "seconds_per_token_step": model.seconds_per_token_step,
                "default_request_token_steps": float(tokens * model.num_inference_steps),
                "warm_replicas": warm,
                **delays,
            },
        }
    else:
        policy = {
            "policy_function": "cluster.autoscaling:FollowerPolicy",
            "policy_kwargs": {
                "target_utilization": scaling.follower_utilization,
                "target_wait_s": scaling.follower_wait_s,
                "target_ongoing_requests": stage.target_ongoing_requests,
                "warm_replicas": warm,
                **delays,
            },
        }
    return {
        **base,
        "min_replicas": warm,
        # The policy applies the delays on the context's clock; Serve's own would add to them.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": scaling.metrics_window_s,
        "policy": policy,
    }
