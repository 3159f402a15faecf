"""Stats are data; exporters are separate.

Stages record what they did into small dataclasses; an exporter (Prometheus,
Ray metrics) reads them. Metric names follow ``reelserve_<what>_<unit>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["StageStats"]


@dataclass
class StageStats:
    """Counters of one stage replica."""

    stage: str
    requests_total: int = 0
    failures_total: int = 0
    busy_seconds_total: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def record(self, seconds: float, ok: bool) -> None:
        self.requests_total += 1
        self.busy_seconds_total += seconds
        if not ok:
            self.failures_total += 1

    def bump(self, name: str, amount: float = 1.0) -> None:
        self.extra[name] = self.extra.get(name, 0.0) + amount

    def snapshot(self) -> dict:
        return asdict(self)
