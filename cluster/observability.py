"""The Grafana dashboard, built in code; ``k8s/observability/reelserve-dashboard.json`` is its output.

Regenerate after editing: ``python -m cluster.observability`` (``make dashboard``). A test fails
when the checked-in JSON and this generator disagree.

Every query reads the names Prometheus stores after the scrape configs in ``k8s/observability/``
strip Ray's ``ray_`` prefix from reelserve's metrics (``reelserve_*``); Ray Serve's own metrics keep
theirs (``ray_serve_*``). ``$model`` and ``$datasource`` are dashboard variables.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.config import all_stage_names

__all__ = ["Query", "Panel", "build_dashboard", "dashboard_queries", "DASHBOARD_PATH", "render", "main"]

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "k8s" / "observability" / "reelserve-dashboard.json"
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_WINDOW = "$__rate_interval"
_MODEL = 'model=~"$model"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    stacked: bool = False


def _quantiles(metric: str, selector: str, by: str, quantiles=(0.5, 0.95)) -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{selector}}}[{_WINDOW}])))",
            f"p{round(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in quantiles
    )


def stage_panels(stage: str) -> list[Panel]:
    """Latency, queue wait, in-flight and queued, replicas and GPU memory of one stage."""
    selector = f'stage="{stage}", {_MODEL}'
    return [
        Panel(
            "request latency", "s", _quantiles("reelserve_stage_request_seconds", selector, ""),
            "Time a request spends in a replica: waiting for the model plus running on it.",
        ),
        Panel(
            "queue wait", "s", _quantiles("reelserve_stage_queue_wait_seconds", selector, ""),
            "Time a request waits inside a replica before the model takes it.",
        ),
        Panel(
            "in flight and queued", "short",
            (
                Query(f"sum(reelserve_stage_requests_in_flight{{{selector}}})", "in flight"),
                Query(f"sum(reelserve_stage_requests_queued{{{selector}}})", "queued in replicas"),
                Query(f'sum(ray_serve_deployment_queued_queries{{deployment="{stage}"}})', "queued in Serve"),
                Query(f'sum(rate(reelserve_stage_requests_total{{{selector}, status="error"}}[{_WINDOW}]))', "errors/s"),
            ),
        ),
        Panel(
            "replicas", "short",
            (
                Query(f"count(reelserve_stage_requests_in_flight{{{selector}}})", "running"),
                Query(f'max(ray_serve_autoscaling_target_replicas{{deployment="{stage}"}})', "target"),
                Query(f'max(ray_serve_autoscaling_desired_replicas{{deployment="{stage}"}})', "wanted (before min/max)"),
            ),
            "Replicas reporting their load, Ray Serve's target, and what the autoscaler would want unbounded.",
        ),
        Panel(
            "GPU memory", "bytes",
            (
                Query(f"sum(reelserve_gpu_memory_allocated_bytes{{{selector}}})", "allocated"),
                Query(f"max(reelserve_gpu_memory_peak_bytes{{{selector}}})", "peak (largest replica)"),
            ),
            "Torch allocator figures of the stage's replicas (empty without a GPU).",
        ),
    ]


def job_panels() -> list[Panel]:
    window = _WINDOW
    return [
        Panel(
            "throughput", "short",
            (Query(f"sum by (status) (rate(reelserve_jobs_total{{{_MODEL}}}[{window}])) * 60", "{{status}} jobs/min"),),
            stacked=True,
        ),
        Panel(
            "end-to-end latency", "s",
            _quantiles("reelserve_job_duration_seconds", f'{_MODEL}, status="completed"', "", (0.5, 0.9, 0.99)),
        ),
        Panel(
            "errors by code", "short",
            (
                Query(
                    f'sum by (code) (rate(reelserve_jobs_total{{{_MODEL}, status!="completed"}}[{window}])) * 60',
                    "{{code}} /min",
                ),
            ),
            stacked=True,
        ),
        Panel(
            "rejections", "short",
            (
                Query(f"sum by (code) (rate(reelserve_admissions_refused_total{{{_MODEL}}}[{window}])) * 60", "{{code}} /min"),
            ),
            "Requests refused by backpressure (HTTP 429 / RESOURCE_EXHAUSTED).",
            stacked=True,
        ),
        Panel(
            "time to first progress", "s",
            _quantiles("reelserve_job_first_progress_seconds", _MODEL, "", (0.5, 0.9, 0.99)),
        ),
        Panel(
            "active jobs", "short",
            (Query(f"sum by (status) (reelserve_jobs_active{{{_MODEL}}})", "{{status}}"),),
        ),
        Panel(
            "denoising", "short",
            (Query(f"sum(rate(reelserve_denoise_steps_total{{{_MODEL}}}[{window}]))", "steps/s"),),
        ),
        Panel(
            "seconds per step", "s",
            _quantiles("reelserve_denoise_step_seconds", _MODEL, "resolution", (0.5,)),
        ),
        Panel(
            "prompt rewrite fallbacks", "short",
            (
                Query(
                    f"sum by (code) (rate(reelserve_prompt_rewrite_fallbacks_total{{{_MODEL}}}[{window}])) * 60",
                    "{{code}} /min",
                ),
            ),
        ),
        Panel(
            "bytes handed between stages", "Bps",
            (Query(f"sum by (stage) (rate(reelserve_stage_handoff_bytes_total{{{_MODEL}}}[{window}]))", "{{stage}}"),),
        ),
        Panel(
            "model load and warm-up time", "s",
            (Query(f"max by (stage) (reelserve_model_load_seconds{{{_MODEL}}})", "{{stage}} load"),
             Query(f"max by (stage) (reelserve_model_warmup_seconds{{{_MODEL}}})", "{{stage}} warm-up")),
            "Slowest replica load and warm-up per stage: a replica takes traffic only after both.",
        ),
        Panel(
            "replica restarts", "short",
            (Query(f"sum by (deployment) (increase(ray_serve_deployment_replica_starts_total[{window}]))", "{{deployment}}"),),
        ),
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": True}
    if panel.stacked:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": _DATASOURCE,
        "gridPos": {"h": 7, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"datasource": _DATASOURCE, "expr": q.expr, "legendFormat": q.legend, "refId": chr(ord("A") + i)}
            for i, q in enumerate(panel.queries)
        ],
    }


def _rows() -> list[tuple[str, list[Panel], int]]:
    """(row title, panels, panels per line); the jobs row first, then one row per stage in request order."""
    rows = [("jobs", job_panels(), 4)]
    rows += [(f"stage: {stage}", stage_panels(stage), 5) for stage in all_stage_names()]
    return rows


def build_dashboard() -> dict:
    panels: list[dict] = []
    panel_id, y = 1, 0
    for title, row_panels, per_line in _rows():
        panels.append({
            "id": panel_id, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": [],
        })
        panel_id, y = panel_id + 1, y + 1
        width = 24 // per_line
        for index, panel in enumerate(row_panels):
            x = (index % per_line) * width
            if index and index % per_line == 0:
                y += 7
            panels.append(_panel_json(panel, panel_id, x, y, width))
            panel_id += 1
        y += 7
    return {
        "uid": "reelserve",
        "title": "reelserve",
        "description": "Jobs and every stage of a reelserve deployment (Prometheus).",
        "tags": ["reelserve", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "graphTooltip": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                    "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
                },
                {
                    "name": "model", "label": "model", "type": "query", "datasource": _DATASOURCE,
                    "query": {"query": "label_values(reelserve_stage_requests_total, model)", "refId": "model"},
                    "definition": "label_values(reelserve_stage_requests_total, model)",
                    "includeAll": True, "allValue": ".*", "multi": True, "current": {}, "hide": 0, "refresh": 2,
                    "regex": "", "sort": 1, "options": [],
                },
            ]
        },
        "panels": panels,
    }


def dashboard_queries(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression in the dashboard (its variables left in)."""
    dashboard = dashboard or build_dashboard()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the dashboard JSON (to the path given, or the checked-in one)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else DASHBOARD_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
