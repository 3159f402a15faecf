"""Every reelserve metric, defined once. Stats are data; one exporter turns them into Ray metrics.

Replicas call the small recording API below (``stage_request``, ``job_finished``, ...). Each call
builds ``Measurement`` values (plain data) and hands them to the process's exporter; the default one,
``RayMetricsExporter``, records them with ``ray.util.metrics``, so every node's Ray metrics endpoint
serves them for Prometheus. Ray prefixes every application metric with ``ray_`` on that endpoint;
the scrape configs in ``k8s/observability/`` strip it again, so Prometheus, the dashboard and the
alert rules see the names below.

Which metric is recorded where:

| metric | kind | labels | recorded by | where |
| --- | --- | --- | --- | --- |
| reelserve_stage_request_seconds | histogram | stage, model | stage_request | StageRunner.run; prompt_rewriter stage |
| reelserve_stage_queue_wait_seconds | histogram | stage, model | stage_request | StageRunner.run (wait for the replica's model) |
| reelserve_stage_requests_total | counter | stage, model, status | stage_request | StageRunner.run; prompt_rewriter stage |
| reelserve_stage_requests_in_flight | gauge | stage, model | stage_load | StageRunner.run; prompt_rewriter stage |
| reelserve_stage_requests_queued | gauge | stage, model | stage_load | StageRunner.run |
| reelserve_stage_handoff_bytes_total | counter | stage, model | bytes_handed | StageRunner.run (size of each stage's output) |
| reelserve_model_load_seconds | gauge | stage, model | model_loaded | every model stage's constructor (``LoadTimer``) |
| reelserve_component_load_seconds | gauge | stage, model, part | component_loaded | every model stage's constructor, per component it loads (``serving.weights``) |
| reelserve_model_warmup_seconds | gauge | stage, model | model_warmed_up | every model stage's constructor, after the load (``serving.stages.warmup``) |
| reelserve_replicas_lost_total | counter | stage, model, code | replica_lost | a stage whose device or rank group broke (``serving.stages.health``), before it ends |
| reelserve_gpu_memory_allocated_bytes | gauge | stage, model | gpu_memory | StageRunner.run, where CUDA is present |
| reelserve_gpu_memory_peak_bytes | gauge | stage, model | gpu_memory | StageRunner.run, where CUDA is present |
| reelserve_denoise_steps_total | counter | model | denoise_step | diffusion stage, after every step |
| reelserve_denoise_step_seconds | histogram | model, resolution | denoise_step | diffusion stage, after every step |
| reelserve_jobs_total | counter | model, status, code, tenant | job_finished | orchestrator, when a job ends |
| reelserve_job_duration_seconds | histogram | model, status | job_finished | orchestrator, when a job ends |
| reelserve_job_first_progress_seconds | histogram | model | first_progress | orchestrator, when a job first starts |
| reelserve_job_progress_updates_total | counter | model | job_progressed | orchestrator (each stage) and diffusion stage (each step) |
| reelserve_jobs_active | gauge | model, status | jobs_active | orchestrator: jobs it runs, and those it saw waiting for room |
| reelserve_admissions_refused_total | counter | model, code, tenant | admission_refused | ingress, on each refusal |
| reelserve_prompt_rewrite_fallbacks_total | counter | model, code | rewrite_fallback | prompt_rewriter stage; orchestrator (unavailable, overlong) |

Labels are only ``stage`` and ``model``, plus ``status``/``code`` for outcomes, ``tenant`` (a configured
tenant's name) for job outcomes and refusals, and ``resolution`` for step time; nothing carries a job id. Histograms share buckets from 10 ms to 30 min.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Protocol, cast

__all__ = [
    "StageStats",
    "MetricSpec",
    "Measurement",
    "METRICS",
    "METRICS_BY_NAME",
    "SECONDS_BUCKETS",
    "RAY_EXPORT_PREFIX",
    "Exporter",
    "RayMetricsExporter",
    "RecordingExporter",
    "set_exporter",
    "get_exporter",
    "resolution_bucket",
    "handoff_nbytes",
    "stage_request",
    "stage_load",
    "bytes_handed",
    "model_loaded",
    "component_loaded",
    "model_warmed_up",
    "replica_lost",
    "gpu_memory",
    "record_gpu_memory",
    "denoise_step",
    "job_finished",
    "first_progress",
    "job_progressed",
    "jobs_active",
    "admission_refused",
    "rewrite_fallback",
]

# What Ray puts in front of every application metric name on its metrics endpoint.
RAY_EXPORT_PREFIX = "ray_"

# 10 ms to 30 min: a text encoder call on a GPU up to a whole job at real size.
SECONDS_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, kind, meaning and the only labels it may carry."""

    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None

    def __post_init__(self):
        if not self.name.startswith("reelserve_"):
            raise ValueError(f"{self.name}: metric names start with reelserve_")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters, and only counters, end in _total")
        if (self.kind == "histogram") != (self.buckets is not None):
            raise ValueError(f"{self.name}: histograms, and only histograms, have buckets")


_STAGE = ("stage", "model")

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "reelserve_stage_request_seconds", "histogram",
        "Time a stage request spent in its replica: waiting for the model plus running on it.",
        _STAGE, SECONDS_BUCKETS,
    ),
    MetricSpec(
        "reelserve_stage_queue_wait_seconds", "histogram",
        "Time a stage request waited inside its replica before the model took it.", _STAGE, SECONDS_BUCKETS,
    ),
    MetricSpec(
        "reelserve_stage_requests_total", "counter",
        "Stage requests finished, by outcome (status ok or error).", _STAGE + ("status",),
    ),
    MetricSpec("reelserve_stage_requests_in_flight", "gauge", "Stage requests running on the model now.", _STAGE),
    MetricSpec(
        "reelserve_stage_requests_queued", "gauge",
        "Stage requests inside a replica waiting for its model now (Serve's own queue is ray_serve_deployment_queued_queries).",
        _STAGE,
    ),
    MetricSpec(
        "reelserve_stage_handoff_bytes_total", "counter",
        "Bytes of tensors, arrays and raw data a stage handed on as its output.", _STAGE,
    ),
    MetricSpec("reelserve_model_load_seconds", "gauge", "Seconds this replica took to load its model.", _STAGE),
    MetricSpec(
        "reelserve_component_load_seconds", "gauge",
        "Seconds this replica took to load one component's weights onto its device (reading included).",
        _STAGE + ("part",),  # not "component": Ray labels every metric with Component (its process kind)
    ),
    MetricSpec(
        "reelserve_model_warmup_seconds", "gauge",
        "Seconds this replica warmed up after loading (shape buckets and compilation for diffusion), before it took traffic.",
        _STAGE,
    ),
    MetricSpec(
        "reelserve_replicas_lost_total", "counter",
        "Replicas that ended because their device (code device) or their rank group (code group) broke.",
        _STAGE + ("code",),
    ),
    MetricSpec("reelserve_gpu_memory_allocated_bytes", "gauge", "GPU memory held by this replica's tensors.", _STAGE),
    MetricSpec(
        "reelserve_gpu_memory_peak_bytes", "gauge", "Most GPU memory this replica's tensors have held.", _STAGE
    ),
    MetricSpec("reelserve_denoise_steps_total", "counter", "Denoising steps finished.", ("model",)),
    MetricSpec(
        "reelserve_denoise_step_seconds", "histogram",
        "Seconds per denoising step, by resolution bucket of the video.", ("model", "resolution"), SECONDS_BUCKETS,
    ),
    MetricSpec(
        "reelserve_jobs_total", "counter",
        "Jobs that ended, by terminal status and error code (code none when completed), per tenant.",
        ("model", "status", "code", "tenant"),
    ),
    MetricSpec(
        "reelserve_job_duration_seconds", "histogram",
        "Seconds from a job's acceptance to its end (end-to-end latency).", ("model", "status"), SECONDS_BUCKETS,
    ),
    MetricSpec(
        "reelserve_job_first_progress_seconds", "histogram",
        "Seconds from a job's acceptance to its first progress event.", ("model",), SECONDS_BUCKETS,
    ),
    MetricSpec(
        "reelserve_job_progress_updates_total", "counter", "Times a running job's progress rose.", ("model",)
    ),
    MetricSpec(
        "reelserve_jobs_active", "gauge", "Jobs owned by this orchestrator, by status (queued, in_progress).",
        ("model", "status"),
    ),
    MetricSpec(
        "reelserve_admissions_refused_total", "counter",
        "Requests refused by backpressure or a tenant's quota, by reason (code), per tenant.", ("model", "code", "tenant"),
    ),
    MetricSpec(
        "reelserve_prompt_rewrite_fallbacks_total", "counter",
        "Prompt rewrites that fell back to the user's prompt, by reason (code).", ("model", "code"),
    ),
)

METRICS_BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


# --------------------------------------------------------------------------- stats as data


@dataclass
class StageStats:
    """Counters and current load of one stage replica (what its ``stats()`` method returns)."""

    stage: str
    model: str = "unknown"
    requests_total: int = 0
    failures_total: int = 0
    busy_seconds_total: float = 0.0
    queue_wait_seconds_total: float = 0.0
    handed_bytes_total: int = 0
    in_flight: int = 0
    queued: int = 0
    load_seconds: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def record(self, seconds: float, ok: bool, queue_wait_s: float = 0.0) -> None:
        self.requests_total += 1
        self.busy_seconds_total += seconds
        self.queue_wait_seconds_total += queue_wait_s
        if not ok:
            self.failures_total += 1

    def bump(self, name: str, amount: float = 1.0) -> None:
        self.extra[name] = self.extra.get(name, 0.0) + amount

    def snapshot(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    """One value for one metric with its labels: what the recording API hands to the exporter."""

    metric: str
    labels: dict[str, str]
    value: float


# --------------------------------------------------------------------------- exporters


class Exporter(Protocol):
    def export(self, measurements: Iterable[Measurement]) -> None: ...


def _checked(measurement: Measurement) -> MetricSpec:
    spec = METRICS_BY_NAME.get(measurement.metric)
    if spec is None:
        raise KeyError(f"{measurement.metric} is not a reelserve metric; define it in METRICS first")
    if set(measurement.labels) != set(spec.labels):
        raise ValueError(f"{spec.name} takes labels {spec.labels}, got {tuple(measurement.labels)}")
    return spec


class RayMetricsExporter:
    """Records measurements with ``ray.util.metrics`` (served on each node's metrics endpoint).

    Ray metric objects are created on first use, once per process. Outside a Ray worker the
    records go nowhere, so the same code runs in ``reelserve generate``.

    Ray 2.60 drops a gauge from its endpoint when nobody set it for two report intervals (at
    least 2 s), so a value set once (a model's load time, an idle replica's queue of 0) would
    vanish. This exporter therefore sets every gauge's last value again each ``gauge_refresh_s``
    from one daemon thread, started with the first gauge.
    """

    def __init__(self, gauge_refresh_s: float = 1.0):
        self._metrics: dict[str, Any] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauge_refresh_s = gauge_refresh_s
        self._refresher: threading.Thread | None = None
        self._lock = threading.Lock()

    def export(self, measurements: Iterable[Measurement]) -> None:
        for measurement in measurements:
            spec = _checked(measurement)
            metric = self._metric(spec)
            if spec.kind == "counter":
                if measurement.value > 0:  # Ray refuses increments of 0
                    metric.inc(measurement.value, tags=measurement.labels)
            elif spec.kind == "gauge":
                metric.set(measurement.value, tags=measurement.labels)
                self._remember_gauge(spec.name, measurement)
            else:
                metric.observe(measurement.value, tags=measurement.labels)

    def _metric(self, spec: MetricSpec):
        with self._lock:
            metric = self._metrics.get(spec.name)
            if metric is None:
                from ray.util import metrics as ray_metrics  # noqa: PLC0415 - Ray only inside a replica

                if spec.kind == "counter":
                    metric = ray_metrics.Counter(spec.name, spec.description, spec.labels)
                elif spec.kind == "gauge":
                    metric = ray_metrics.Gauge(spec.name, spec.description, spec.labels)
                else:
                    metric = ray_metrics.Histogram(spec.name, spec.description, list(cast(tuple, spec.buckets)), spec.labels)
                self._metrics[spec.name] = metric
            return metric

    def _remember_gauge(self, name: str, measurement: Measurement) -> None:
        with self._lock:
            self._gauges[(name, tuple(sorted(measurement.labels.items())))] = measurement.value
            if self._refresher is None:
                self._refresher = threading.Thread(
                    target=self._refresh_gauges_forever, name="reelserve-gauge-refresh", daemon=True
                )
                self._refresher.start()

    def _refresh_gauges_forever(self) -> None:
        while True:
            time.sleep(self._gauge_refresh_s)
            with self._lock:
                gauges = list(self._gauges.items())
            for (name, labels), value in gauges:
                self._metrics[name].set(value, tags=dict(labels))


class RecordingExporter:
    """Keeps every measurement in a list (checked like the Ray exporter); for tests and tools."""

    def __init__(self):
        self.measurements: list[Measurement] = []

    def export(self, measurements: Iterable[Measurement]) -> None:
        for measurement in measurements:
            _checked(measurement)
            self.measurements.append(measurement)

    def named(self, metric: str) -> list[Measurement]:
        return [m for m in self.measurements if m.metric == metric]


_exporter: Exporter | None = None


def get_exporter() -> Exporter:
    global _exporter
    if _exporter is None:
        _exporter = RayMetricsExporter()
    return _exporter


def set_exporter(exporter: Exporter | None) -> Exporter | None:
    """Swap this process's exporter (``None``: back to the Ray one on next use); returns the old one."""
    global _exporter
    previous, _exporter = _exporter, exporter
    return previous


def _export(*measurements: Measurement) -> None:
    get_exporter().export(measurements)


# --------------------------------------------------------------------------- helpers


def resolution_bucket(width: int, height: int) -> str:
    """The ``resolution`` label: the frame's short side, named like video formats.

    Sizes are multiples of 32, so each name covers the nearest such sizes: 1280x704 is 720p,
    1920x1088 is 1080p, 768x512 is 480p.
    """
    short = min(width, height)
    for limit, name in ((384, "360p"), (544, "480p"), (640, "576p"), (736, "720p"), (1088, "1080p"), (1472, "1440p")):
        if short <= limit:
            return name
    return "2160p"


def handoff_nbytes(value: Any, _depth: int = 0) -> int:
    """Bytes of tensors, numpy arrays and raw bytes inside a stage output (dataclasses, lists, dicts)."""
    if value is None or _depth > 4:
        return 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):  # numpy arrays, torch tensors
        return nbytes
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.element_size() * value.numel())
    if isinstance(value, dict):
        return sum(handoff_nbytes(item, _depth + 1) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(handoff_nbytes(item, _depth + 1) for item in value)
    fields = getattr(value, "__dataclass_fields__", None)
    if fields:
        return sum(handoff_nbytes(getattr(value, name, None), _depth + 1) for name in fields)
    return 0


# --------------------------------------------------------------------------- the recording API


def stage_request(stage: str, model: str, queue_wait_s: float, seconds: float, ok: bool) -> None:
    """One finished stage request: time in the replica (``seconds``, waiting included) and its outcome."""
    labels = {"stage": stage, "model": model}
    _export(
        Measurement("reelserve_stage_request_seconds", labels, seconds),
        Measurement("reelserve_stage_queue_wait_seconds", labels, queue_wait_s),
        Measurement("reelserve_stage_requests_total", {**labels, "status": "ok" if ok else "error"}, 1),
    )


def stage_load(stage: str, model: str, in_flight: int, queued: int) -> None:
    """A replica's current load: requests on the model and requests waiting for it."""
    labels = {"stage": stage, "model": model}
    _export(
        Measurement("reelserve_stage_requests_in_flight", labels, in_flight),
        Measurement("reelserve_stage_requests_queued", labels, queued),
    )


def bytes_handed(stage: str, model: str, nbytes: int) -> None:
    """A stage handed ``nbytes`` on to the next one."""
    _export(Measurement("reelserve_stage_handoff_bytes_total", {"stage": stage, "model": model}, nbytes))


def model_loaded(stage: str, model: str, seconds: float) -> None:
    """This replica finished loading its model in ``seconds``."""
    _export(Measurement("reelserve_model_load_seconds", {"stage": stage, "model": model}, seconds))


def component_loaded(stage: str, model: str, component: str, seconds: float) -> None:
    """This replica loaded ``component`` (e.g. transformer, text_encoder) onto its device in ``seconds``."""
    _export(Measurement("reelserve_component_load_seconds", {"stage": stage, "model": model, "part": component}, seconds))


def model_warmed_up(stage: str, model: str, seconds: float) -> None:
    """This replica finished its warm-up in ``seconds``; it takes traffic from now on."""
    _export(Measurement("reelserve_model_warmup_seconds", {"stage": stage, "model": model}, seconds))


def replica_lost(stage: str, model: str, code: str) -> None:
    """This replica is ending: its device (``device``) or its rank group (``group``) broke."""
    _export(Measurement("reelserve_replicas_lost_total", {"stage": stage, "model": model, "code": code}, 1))


def gpu_memory(stage: str, model: str, allocated: int, peak: int) -> None:
    labels = {"stage": stage, "model": model}
    _export(
        Measurement("reelserve_gpu_memory_allocated_bytes", labels, allocated),
        Measurement("reelserve_gpu_memory_peak_bytes", labels, peak),
    )


def record_gpu_memory(stage: str, model: str) -> None:
    """``gpu_memory`` from torch's allocator, when this process uses CUDA; nothing otherwise."""
    torch = sys.modules.get("torch")  # never import torch just to find out there is no GPU
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    gpu_memory(stage, model, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated())


def denoise_step(model: str, resolution: str, seconds: float) -> None:
    """One denoising step finished in ``seconds``; ``resolution`` from ``resolution_bucket``."""
    _export(
        Measurement("reelserve_denoise_steps_total", {"model": model}, 1),
        Measurement("reelserve_denoise_step_seconds", {"model": model, "resolution": resolution}, seconds),
    )


def job_finished(model: str, status: str, code: str | None, seconds: float, tenant: str = "default") -> None:
    """A job ended (``status`` completed/failed/cancelled/expired; ``code`` its error code, None when completed).

    ``tenant`` is a configured tenant's name (or default): the label's values are bounded by the config."""
    _export(
        Measurement("reelserve_jobs_total", {"model": model, "status": status, "code": code or "none", "tenant": tenant}, 1),
        Measurement("reelserve_job_duration_seconds", {"model": model, "status": status}, seconds),
    )


def first_progress(model: str, seconds: float) -> None:
    """A job's first progress event came ``seconds`` after it was accepted."""
    _export(Measurement("reelserve_job_first_progress_seconds", {"model": model}, seconds))


def job_progressed(model: str) -> None:
    """A running job's progress rose (what the no-progress alert watches)."""
    _export(Measurement("reelserve_job_progress_updates_total", {"model": model}, 1))


def jobs_active(model: str, queued: int, in_progress: int) -> None:
    """Jobs this orchestrator owns right now."""
    _export(
        Measurement("reelserve_jobs_active", {"model": model, "status": "queued"}, queued),
        Measurement("reelserve_jobs_active", {"model": model, "status": "in_progress"}, in_progress),
    )


def admission_refused(model: str, reason: str, tenant: str = "default") -> None:
    """A request was refused by backpressure or a quota (e.g. reason max_active_jobs, queue_wait, tenant_rate)."""
    _export(Measurement("reelserve_admissions_refused_total", {"model": model, "code": reason, "tenant": tenant}, 1))


def rewrite_fallback(model: str, reason: str) -> None:
    """A prompt rewrite fell back to the user's prompt (timeout, engine_error, empty, overlong, unavailable)."""
    _export(Measurement("reelserve_prompt_rewrite_fallbacks_total", {"model": model, "code": reason}, 1))
