"""What a load test measured: one trace per submitted request, summed up into the JSON report."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import cast

from serving.loadtest.sampler import MetricsSample

__all__ = ["JobTrace", "percentiles", "build_report"]


@dataclass
class JobTrace:
    """One submitted request, from submission to its end (times are seconds since the test started)."""

    index: int
    shape: str
    submitted_at: float
    job_id: str | None = None
    outcome: str = "pending"  # completed, failed, rejected (cancelled and unfinished count as failed)
    code: str | None = None  # error or refusal code
    finished_at: float | None = None
    first_progress_s: float | None = None  # from submission to the first progress event
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted_at


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean (nearest-rank); ``None`` for each when there are no values."""
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered) - 1e-9) - 1))
        return round(ordered[index], 4)

    return {
        "count": len(ordered), "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99),
        "max": round(ordered[-1], 4), "mean": round(sum(ordered) / len(ordered), 4),
    }


def build_report(
    traces: list[JobTrace],
    settings: dict,
    wall_seconds: float,
    slo_seconds: float | None,
    samples: list[MetricsSample],
    metrics_info: dict,
) -> dict:
    completed = [t for t in traces if t.outcome == "completed"]
    failed = [t for t in traces if t.outcome == "failed"]
    rejected = [t for t in traces if t.outcome == "rejected"]
    latencies = [cast(float, t.latency_s) for t in completed]  # a completed job has one
    minutes = max(wall_seconds, 1e-9) / 60
    report = {
        "settings": settings,
        "wall_seconds": round(wall_seconds, 3),
        "jobs": {
            "submitted": len(traces),
            "completed": len(completed),
            "failed": len(failed),
            "rejected": len(rejected),
            "all_accounted_for": len(completed) + len(failed) + len(rejected) == len(traces),
        },
        "throughput_jobs_per_min": round(len(completed) / minutes, 3),
        "latency_seconds": percentiles(latencies),
        "first_progress_seconds": percentiles([t.first_progress_s for t in traces if t.first_progress_s is not None]),
        "stage_seconds": _stage_times(completed),
        "errors_by_code": dict(Counter(t.code or "unknown" for t in failed)),
        "rejections_by_code": dict(Counter(t.code or "unknown" for t in rejected)),
        "by_shape": _by_shape(traces),
        "metrics": {**metrics_info, "samples": [_sample_json(s) for s in samples]},
        "traces": [{**asdict(t), "latency_s": None if t.latency_s is None else round(t.latency_s, 4)} for t in traces],
    }
    if slo_seconds is not None:
        within = [t for t in completed if cast(float, t.latency_s) <= slo_seconds]
        report["goodput"] = {
            "slo_seconds": slo_seconds,
            "within_slo": len(within),
            "share_of_submitted": round(len(within) / len(traces), 4) if traces else None,
            "jobs_per_min": round(len(within) / minutes, 3),
        }
    return report


def _stage_times(completed: list[JobTrace]) -> dict[str, dict]:
    stages: dict[str, list[float]] = {}
    for trace in completed:
        for stage, seconds in trace.stage_seconds.items():
            stages.setdefault(stage, []).append(seconds)
    return {stage: percentiles(values) for stage, values in stages.items()}


def _by_shape(traces: list[JobTrace]) -> dict[str, dict]:
    shapes: dict[str, dict] = {}
    for trace in traces:
        entry = shapes.setdefault(trace.shape, {"submitted": 0, "completed": 0, "failed": 0, "rejected": 0, "pending": 0, "latencies": []})
        entry["submitted"] += 1
        entry[trace.outcome] += 1
        if trace.outcome == "completed":
            entry["latencies"].append(trace.latency_s)
    for entry in shapes.values():
        entry["latency_seconds"] = percentiles(entry.pop("latencies"))
    return shapes


def _sample_json(sample: MetricsSample) -> dict:
    return {"t": sample.t, "stages": {name: asdict(stage) for name, stage in sorted(sample.stages.items())}}
