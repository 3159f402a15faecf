"""The load test's PNGs: latency over time, time per stage, queue depth and replicas per stage over time."""

from __future__ import annotations

from pathlib import Path

__all__ = ["draw_plots"]

_COLORS = {"completed": "tab:green", "failed": "tab:red", "rejected": "tab:gray"}


def draw_plots(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415 - matplotlib only when plots are drawn

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415 - matplotlib only when plots are drawn

    paths = [
        _latency_over_time(plt, report, out_dir / "latency.png"),
        _stage_time(plt, report, out_dir / "stage_time.png"),
        _queue_and_replicas(plt, report, out_dir / "queue_replicas.png"),
    ]
    plt.close("all")
    return paths


def _latency_over_time(plt, report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for outcome, color in _COLORS.items():
        traces = [t for t in report["traces"] if t["outcome"] == outcome]
        if not traces:
            continue
        if outcome == "rejected":
            ax.scatter([t["submitted_at"] for t in traces], [0] * len(traces), marker="x", color=color, label=outcome)
        else:
            ax.scatter([t["submitted_at"] for t in traces], [t["latency_s"] for t in traces], s=14, color=color,
                       label=outcome)
    slo = (report.get("goodput") or {}).get("slo_seconds")
    if slo is not None:
        ax.axhline(slo, color="tab:orange", linestyle="--", linewidth=1, label=f"SLO {slo:g} s")
    ax.set_xlabel("submitted at (s since start)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("Job latency over time")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _stage_time(plt, report: dict, path: Path) -> Path:
    """One stacked bar per completed job: seconds in each stage, from the job records."""
    traces = [t for t in report["traces"] if t["outcome"] == "completed"]
    stages: list[str] = []
    for trace in traces:
        for stage in trace["stage_seconds"]:
            if stage not in stages:
                stages.append(stage)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    bottoms = [0.0] * len(traces)
    positions = list(range(len(traces)))
    cmap = plt.get_cmap("tab10")
    for index, stage in enumerate(stages):
        heights = [t["stage_seconds"].get(stage, 0.0) for t in traces]
        ax.bar(positions, heights, bottom=bottoms, color=cmap(index % 10), label=stage, width=0.8)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xlabel("completed job (in order of submission)")
    ax.set_ylabel("seconds")
    ax.set_title("Time per stage (job records)")
    ax.grid(alpha=0.3, axis="y")
    if stages:
        ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _queue_and_replicas(plt, report: dict, path: Path) -> Path:
    samples = report["metrics"]["samples"]
    stages = sorted({name for sample in samples for name in sample["stages"]})
    rows = max(1, len(stages))
    fig, axes = plt.subplots(rows, 1, figsize=(8, 1.5 + 1.4 * rows), dpi=100, sharex=True, squeeze=False)
    for ax, stage in zip(axes[:, 0], stages):
        times = [s["t"] for s in samples if stage in s["stages"]]
        queued = [s["stages"][stage]["queued"] for s in samples if stage in s["stages"]]
        replicas = [s["stages"][stage]["replicas"] for s in samples if stage in s["stages"]]
        ax.step(times, queued, where="post", color="tab:blue", label="queued")
        ax.set_ylim(0, max(queued + [1]) * 1.15)
        ax.set_ylabel(stage, fontsize=8)
        twin = ax.twinx()
        twin.step(times, replicas, where="post", color="tab:red", linestyle="--", label="replicas")
        twin.set_ylim(0, max(replicas + [1]) + 1)
        twin.tick_params(labelsize=7, colors="tab:red")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if not stages:
        axes[0, 0].text(0.5, 0.5, "no metrics samples (endpoint unreachable?)", ha="center", va="center")
    axes[0, 0].set_title("Queue depth (blue) and replicas (red, dashed) per stage")
    axes[-1, 0].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path)
    return path
