"""``reelserve loadtest``: drive a deployment with a closed or open loop and report what happened.

Closed loop (``--requests N --concurrency C``): C workers each submit a job, follow it to its end,
and submit the next, until N were submitted. Open loop (``--rate R --duration S``): arrivals
follow a Poisson process at R jobs/s for S seconds, whatever the server does. Every submitted
request ends as completed, failed (cancelled and unfinished included, by code) or rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from serving.loadtest.clients import Refused, SubmitFailed, make_client
from serving.loadtest.mix import MixError, RequestShape, default_mix, load_mix, pick
from serving.loadtest.plots import draw_plots
from serving.loadtest.report import JobTrace, build_report
from serving.loadtest.sampler import MetricsSampler

__all__ = ["LoadTestSettings", "run_loadtest", "measure", "add_arguments", "settings_from_args", "SettingsError", "LIMITS"]

# Bounds: a load test always stops by itself.
LIMITS = {"requests": 10_000, "concurrency": 1_000, "rate": 100.0, "duration": 3_600.0, "timeout": 7_200.0}


@dataclass
class LoadTestSettings:
    address: str
    protocol: str = "grpc"
    requests: int | None = None
    concurrency: int | None = None
    rate: float | None = None
    duration: float | None = None
    mix: list[RequestShape] = field(default_factory=default_mix)
    mix_file: str | None = None
    slo_seconds: float | None = None
    out_dir: Path = Path("loadtest-out")
    metrics_urls: list[str] = field(default_factory=list)
    sample_interval_s: float = 2.0
    timeout_s: float = 1800.0  # longest wait for one job; jobs still running then are cancelled (unfinished)
    seed: int = 0
    quiet: bool = False

    @property
    def mode(self) -> str:
        return "closed" if self.requests is not None else "open"

    def describe(self) -> dict:
        return {
            "address": self.address, "protocol": self.protocol, "mode": self.mode, "requests": self.requests,
            "concurrency": self.concurrency, "rate": self.rate, "duration": self.duration, "mix_file": self.mix_file,
            "mix": [shape.model_dump() for shape in self.mix], "slo_seconds": self.slo_seconds,
            "metrics_urls": self.metrics_urls, "timeout_s": self.timeout_s, "seed": self.seed,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, help="HOST:PORT of the gRPC (default) or HTTP front door")
    parser.add_argument("--protocol", default="grpc", help="grpc (WatchVideo) or http (OpenAI API, polling)")
    parser.add_argument("--requests", help=f"closed loop: jobs to submit (1-{LIMITS['requests']})")
    parser.add_argument("--concurrency", help=f"closed loop: jobs in flight at once (1-{LIMITS['concurrency']})")
    parser.add_argument("--rate", help=f"open loop: mean arrivals per second, Poisson (up to {LIMITS['rate']:g})")
    parser.add_argument("--duration", help=f"open loop: seconds of arrivals (up to {LIMITS['duration']:g})")
    parser.add_argument("--model", help="the served model id every request asks for (a mix entry's model wins)")
    parser.add_argument("--mix", help="YAML/JSON list of request shapes with weights (default: image-to-video at the server's defaults)")
    parser.add_argument("--slo-seconds", help="end-to-end latency goal; the report's goodput counts jobs within it")
    parser.add_argument("--out", default="loadtest-out", help="folder for report.json and the PNGs (default: loadtest-out)")
    parser.add_argument(
        "--metrics-url", action="append",
        help="a Ray node's metrics endpoint to sample (repeatable; default: http://HOST:8080/metrics of --address)",
    )
    parser.add_argument("--sample-interval", default="2", help="seconds between metrics samples (default 2)")
    parser.add_argument("--timeout", default="1800", help="longest wait for one job, seconds; still running then: cancelled")
    parser.add_argument("--seed", default="0", help="seed of the mix choice, the arrivals and the request seeds")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


class SettingsError(ValueError):
    """A flag is missing, conflicting or out of range; the message starts with the flag."""


def _number(text: str | None, flag: str, kind, low, high):
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"{flag}: '{text}' is not a {'whole ' if kind is int else ''}number") from None
    if not (low <= value <= high) or (kind is float and not math.isfinite(value)):
        raise SettingsError(f"{flag}: {text} is out of range; allowed: {low:g} to {high:g}")
    return value


def settings_from_args(args: argparse.Namespace) -> LoadTestSettings:
    """Check the flags (cheap checks, no network) and build the settings; raises ``SettingsError``."""
    if args.protocol not in ("grpc", "http"):
        raise SettingsError(f"--protocol: '{args.protocol}' is not allowed; use grpc or http")
    if ":" not in args.address.split("//")[-1]:
        raise SettingsError(f"--address: '{args.address}' needs a port, e.g. 127.0.0.1:9000")
    closed = args.requests is not None or args.concurrency is not None
    opened = args.rate is not None or args.duration is not None
    if closed == opened:
        raise SettingsError("--requests/--concurrency: give either --requests N --concurrency C or --rate R --duration S")
    if closed and (args.requests is None or args.concurrency is None):
        raise SettingsError("--requests/--concurrency: a closed loop needs both")
    if opened and (args.rate is None or args.duration is None):
        raise SettingsError("--rate/--duration: an open loop needs both")
    try:
        mix = load_mix(args.mix) if args.mix else default_mix()
    except MixError as error:
        raise SettingsError(f"--mix: {error}") from None
    if args.model:
        mix = [shape if shape.model else shape.model_copy(update={"model": args.model}) for shape in mix]
    host = args.address.split("//")[-1].rsplit(":", 1)[0]
    return LoadTestSettings(
        address=args.address,
        protocol=args.protocol,
        requests=_number(args.requests, "--requests", int, 1, LIMITS["requests"]),
        concurrency=_number(args.concurrency, "--concurrency", int, 1, LIMITS["concurrency"]),
        rate=_number(args.rate, "--rate", float, 0.001, LIMITS["rate"]),
        duration=_number(args.duration, "--duration", float, 1, LIMITS["duration"]),
        mix=mix,
        mix_file=args.mix,
        slo_seconds=_number(args.slo_seconds, "--slo-seconds", float, 0.001, 1e6),
        out_dir=Path(args.out),
        metrics_urls=args.metrics_url or [f"http://{host}:8080/metrics"],
        sample_interval_s=_number(args.sample_interval, "--sample-interval", float, 0.2, 60),
        timeout_s=_number(args.timeout, "--timeout", float, 1, LIMITS["timeout"]),
        seed=_number(args.seed, "--seed", int, 0, 2**62),
        quiet=args.quiet,
    )


# --------------------------------------------------------------------------- the run


class _Run:
    """State of one load test: the traces, the client, progress on stderr."""

    def __init__(self, settings: LoadTestSettings):
        self.settings = settings
        self.client = make_client(settings.protocol, settings.address)
        self.rng = random.Random(settings.seed)
        self.started = time.monotonic()
        self.traces: list[JobTrace] = []
        self.planned = settings.requests or None  # unknown up front in an open loop

    def now(self) -> float:
        return time.monotonic() - self.started

    async def one_job(self) -> None:
        shape = pick(self.settings.mix, self.rng)
        trace = JobTrace(index=len(self.traces), shape=shape.name, submitted_at=self.now())
        self.traces.append(trace)
        submitted = time.monotonic()
        try:
            trace.job_id = await self.client.submit(shape, seed=self.settings.seed + trace.index)
        except Refused as refusal:
            trace.outcome, trace.code, trace.finished_at = "rejected", refusal.code, self.now()
            return
        except SubmitFailed as failure:
            trace.outcome, trace.code, trace.finished_at = "failed", failure.code, self.now()
            return
        outcome = await self.client.follow(trace.job_id, deadline=submitted + self.settings.timeout_s)
        if outcome.status == "unfinished":
            await self.client.cancel(trace.job_id)
        trace.finished_at = self.now()
        trace.outcome = "completed" if outcome.status == "completed" else "failed"
        trace.code = outcome.code
        trace.stage_seconds = outcome.stage_seconds
        if outcome.first_progress_at is not None:
            trace.first_progress_s = round(outcome.first_progress_at - submitted, 4)

    async def closed_loop(self) -> None:
        # A closed loop has both (settings_from_args).
        concurrency, requests = cast(int, self.settings.concurrency), cast(int, self.settings.requests)
        remaining = requests

        async def worker():
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self.one_job()

        await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))

    async def open_loop(self) -> None:
        tasks: list[asyncio.Future] = []
        end = cast(float, self.settings.duration)
        rate = cast(float, self.settings.rate)  # an open loop has one (settings_from_args)
        next_at = self.rng.expovariate(rate)
        while next_at < end and len(tasks) < LIMITS["requests"]:
            await asyncio.sleep(max(0.0, next_at - self.now()))
            tasks.append(asyncio.ensure_future(self.one_job()))
            next_at += self.rng.expovariate(rate)
        self.planned = len(tasks)
        await asyncio.gather(*tasks)

    async def report_progress(self, stop: asyncio.Event, every_s: float = 5.0) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=every_s)
            except asyncio.TimeoutError:
                self.print_progress()

    def print_progress(self) -> None:
        if self.settings.quiet:
            return
        counts = {"completed": 0, "failed": 0, "rejected": 0, "pending": 0}
        for trace in self.traces:
            counts[trace.outcome] += 1
        planned = f"/{self.planned}" if self.planned else ""
        print(
            f"[{self.now():7.1f} s] submitted {len(self.traces)}{planned}  completed {counts['completed']}  "
            f"failed {counts['failed']}  rejected {counts['rejected']}  in flight {counts['pending']}",
            file=sys.stderr, flush=True,
        )


async def measure(settings: LoadTestSettings) -> dict:
    """Run the test and return its report (nothing written)."""
    run = _Run(settings)
    sampler = MetricsSampler(settings.metrics_urls, settings.sample_interval_s, run.started)
    stop = asyncio.Event()
    background = [asyncio.ensure_future(sampler.run(stop)), asyncio.ensure_future(run.report_progress(stop))]
    try:
        await (run.closed_loop() if settings.mode == "closed" else run.open_loop())
    finally:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await run.client.close()
    run.print_progress()
    metrics_info = {
        "endpoints": settings.metrics_urls, "sample_interval_s": settings.sample_interval_s,
        "failed_fetches": sampler.errors, "last_error": sampler.last_error,
    }
    return build_report(run.traces, settings.describe(), run.now(), settings.slo_seconds, sampler.samples, metrics_info)


def run_loadtest(settings: LoadTestSettings) -> dict:
    """Run the test, write ``report.json`` and the PNGs under ``settings.out_dir``; return the report."""
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(measure(settings))
    report["plots"] = [str(path) for path in draw_plots(report, settings.out_dir)]
    (settings.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
