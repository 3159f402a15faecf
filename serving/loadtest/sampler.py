"""Sampling the cluster's metrics endpoints while a load test runs: queue depth and replicas per stage.

Reads Ray's endpoints as they are (metric names ``ray_reelserve_*`` and ``ray_serve_*``) with
prometheus_client's text parser; names already relabeled to ``reelserve_*`` are read too.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["StageSample", "MetricsSample", "MetricsSampler", "stage_load_from_text", "canonical_name"]


@dataclass
class StageSample:
    queued: float = 0.0  # waiting inside replicas (ours) + waiting in Serve's queue for a replica
    in_flight: float = 0.0
    replicas: int = 0  # replicas reporting their load


@dataclass
class MetricsSample:
    t: float  # seconds since the load test started
    stages: dict[str, StageSample] = field(default_factory=dict)


def canonical_name(name: str) -> str:
    """``ray_reelserve_x`` -> ``reelserve_x`` (what Prometheus stores after our relabeling)."""
    return name[len("ray_"):] if name.startswith("ray_reelserve_") else name


def stage_load_from_text(texts: list[str]) -> dict[str, StageSample]:
    """Queue depth, in-flight requests and replica count per stage, from metrics endpoint texts."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415 - keeps `reelserve --help` fast

    stages: dict[str, StageSample] = defaultdict(StageSample)
    replicas: dict[str, set] = defaultdict(set)
    for text in texts:
        for family in text_string_to_metric_families(text):
            name = canonical_name(family.name)
            for sample in family.samples:
                labels = sample.labels
                if name == "reelserve_stage_requests_queued":
                    stages[labels["stage"]].queued += sample.value
                elif name == "reelserve_stage_requests_in_flight":
                    stages[labels["stage"]].in_flight += sample.value
                    replicas[labels["stage"]].add((labels.get("NodeAddress"), labels.get("WorkerId")))
                elif name == "ray_serve_deployment_queued_queries" and labels.get("deployment") != "ingress":
                    stages[labels["deployment"]].queued += sample.value
    for stage, workers in replicas.items():
        stages[stage].replicas = len(workers)
    return dict(stages)


class MetricsSampler:
    """Fetches every endpoint each ``interval_s`` into ``samples``; failures are counted, never fatal."""

    def __init__(self, urls: list[str], interval_s: float, started: float):
        self.urls = urls
        self.interval_s = interval_s
        self.samples: list[MetricsSample] = []
        self.errors = 0
        self.last_error: str | None = None
        self._started = started

    async def run(self, stop: asyncio.Event) -> None:
        import httpx  # noqa: PLC0415 - httpx is not a declared dependency; only this sampler needs it

        if not self.urls:
            return
        async with httpx.AsyncClient(timeout=max(1.0, self.interval_s)) as client:
            while not stop.is_set():
                await self._sample_once(client)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
                except asyncio.TimeoutError:
                    pass
            await self._sample_once(client)  # the state at the end

    async def _sample_once(self, client) -> None:
        texts = []
        for url in self.urls:
            try:
                response = await client.get(url)
                response.raise_for_status()
                texts.append(response.text)
            except Exception as error:  # noqa: BLE001 - an unreachable endpoint is reported, not fatal
                self.errors += 1
                self.last_error = f"{url}: {type(error).__name__}"
        if texts:
            # Parsing a node's endpoint (~1 MB with Ray's own metrics) takes a moment: not on the loop.
            stages = await asyncio.to_thread(stage_load_from_text, texts)
            self.samples.append(MetricsSample(t=round(time.monotonic() - self._started, 3), stages=stages))
