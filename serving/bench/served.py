"""Section ``served-vs-bare``: the same workload through the served graph and the bare pipeline.

(a) served: a local Ray cluster runs the app (every stage its own replica) and a closed loop of
gRPC clients (the load tester's) submits each job and follows WatchVideo to its end;
(b) bare: ``LTX2ImageToVideoPipeline`` in this process, called directly, then the same MP4
writer. Both run the same jobs (prompt, photo, size, length, steps, seeds), one at a time and at
concurrency 2 and 4. Latency is submission to the end of the job; throughput is jobs per
minute over the level's wall time. One untimed job warms each path first.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from cluster.config import parse_model_config, parse_size
from serving.bench.registry import BenchContext, SectionResult, markdown_table, register_section
from serving.loadtest.mix import SAMPLE_PHOTO, RequestShape
from serving.loadtest.report import percentiles
from serving.loadtest.runner import LoadTestSettings, measure

__all__ = ["served_vs_bare", "LevelResult"]


@dataclass
class LevelResult:
    """One path at one concurrency."""

    path: str  # served or bare
    concurrency: int
    jobs: int
    completed: int
    wall_s: float
    jobs_per_min: float
    p50_s: float | None
    p90_s: float | None
    max_s: float | None


@dataclass(frozen=True)
class Workload:
    """The jobs both paths run: same prompt, photo (already at the target size), seeds."""

    prompt: str
    photo_jpeg: bytes
    width: int
    height: int
    seconds: float
    fps: int
    steps: int
    seed: int

    def seeds(self, count: int, offset: int) -> list[int]:
        return [self.seed + offset + i for i in range(count)]


def _workload(profile) -> Workload:
    from serving.families.ltx2.stages import center_crop_to_aspect  # noqa: PLC0415 - torch only when this section runs

    width, height = parse_size(profile.size)
    with Image.open(SAMPLE_PHOTO) as source:
        # Cropped and resized up front, so both paths see the same pixels with no crop to make.
        photo = center_crop_to_aspect(source.convert("RGB"), width, height).resize((width, height), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=95)
    return Workload(profile.prompt, buffer.getvalue(), width, height, profile.seconds, profile.fps, profile.steps,
                    profile.seed)


@register_section("served-vs-bare", title="Served graph vs the bare diffusers pipeline")
def served_vs_bare(context: BenchContext) -> SectionResult:
    profile, log = context.profile, context.log
    workload = _workload(profile)
    model_config = _model_config(context)
    log(f"workload: {profile.size}, {profile.seconds:g} s at {profile.fps} fps, {profile.steps} steps")
    # The bare path runs here; the served cluster runs in a child process (see serving/bench/cluster.py).
    bare_path = _BarePath(context, workload, model_config)
    bare_path.warm_up()
    bare, served, offset = {}, {}, 0
    for concurrency in profile.concurrencies:
        count = profile.jobs_per_level[concurrency]
        bare[concurrency] = bare_path.level(concurrency, workload.seeds(count, offset))
        log(f"  bare   c={concurrency}: {bare[concurrency].jobs_per_min:g} jobs/min, p50 {bare[concurrency].p50_s} s")
        offset += count
    del bare_path
    with _ServedPath(context, workload, model_config) as served_path:
        served_path.warm_up()
        offset = 0
        for concurrency in profile.concurrencies:
            count = profile.jobs_per_level[concurrency]
            served[concurrency] = served_path.level(concurrency, workload.seed + offset, count)
            log(f"  served c={concurrency}: {served[concurrency].jobs_per_min:g} jobs/min, p50 {served[concurrency].p50_s} s")
            offset += count
    rows, ratios = [], []
    for concurrency in profile.concurrencies:
        b, s = bare[concurrency], served[concurrency]
        rows += [asdict(b), asdict(s)]
        ratios.append({
            "concurrency": concurrency,
            "throughput_ratio": round(s.jobs_per_min / b.jobs_per_min, 3) if b.jobs_per_min else None,
            "p50_overhead_s": round(s.p50_s - b.p50_s, 3) if s.p50_s is not None and b.p50_s is not None else None,
        })
    table = markdown_table(rows, [
        ("path", "path"), ("concurrency", "concurrency"), ("jobs", "jobs"), ("completed", "completed"),
        ("jobs_per_min", "jobs/min"), ("p50_s", "p50 s"), ("p90_s", "p90 s"), ("max_s", "max s"),
    ])
    ratio_table = markdown_table(ratios, [
        ("concurrency", "concurrency"), ("throughput_ratio", "served/bare throughput"),
        ("p50_overhead_s", "served − bare p50 (s)"),
    ])
    first = ratios[0]
    notes = [
        f"Goal at concurrency 1: served/bare throughput ≥ 0.9 (measured {first['throughput_ratio']}), "
        f"overhead ≤ 0.1 s p50 per job (measured {first['p50_overhead_s']} s).",
    ]
    markdown = (
        f"Workload: {profile.description}; image-to-video {profile.size}, {profile.seconds:g} s at {profile.fps} fps "
        f"({profile.steps} steps), the packaged photo, seeds from {profile.seed}. Bare: `LTX2ImageToVideoPipeline` "
        f"in one process (one pipeline copy per concurrent job) plus the same MP4 writer. Served: the app on a local "
        f"Ray cluster ({profile.cluster_cpus} logical CPUs; diffusion replica {profile.diffusion_cpus:g} CPUs), gRPC "
        f"CreateVideo + WatchVideo.\n\n{table}\n\n{ratio_table}\n"
    )
    return SectionResult(
        name="served-vs-bare", title="Served graph vs the bare diffusers pipeline",
        data={"levels": rows, "ratios": ratios, "workload": {k: v for k, v in asdict(workload).items() if k != "photo_jpeg"}},
        markdown=markdown, notes=notes,
    )


def _model_config(context: BenchContext):
    overrides = context.profile.model_overrides()
    return parse_model_config({"path": context.model_path, "name": "bench", **overrides})


def _level(path: str, concurrency: int, latencies: list[float], jobs: int, wall_s: float) -> LevelResult:
    stats = percentiles(latencies)
    return LevelResult(
        path=path, concurrency=concurrency, jobs=jobs, completed=len(latencies), wall_s=round(wall_s, 3),
        jobs_per_min=round(len(latencies) / wall_s * 60, 3) if wall_s else 0.0,
        p50_s=stats["p50"], p90_s=stats["p90"], max_s=stats["max"],
    )


# --------------------------------------------------------------------------- (b) the bare pipeline


class _BarePath:
    """``LTX2ImageToVideoPipeline`` in this process, one copy per concurrent job, then the MP4 writer."""

    def __init__(self, context: BenchContext, workload: Workload, config):
        import torch  # noqa: PLC0415 - torch and diffusers only when this section runs
        from diffusers import LTX2ImageToVideoPipeline  # noqa: PLC0415 - torch and diffusers only when this section runs

        from serving.devices import resolve_device, resolve_dtype  # noqa: PLC0415 - torch and diffusers only when this section runs

        self.context, self.workload, self.config = context, workload, config
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        self.photo = Image.open(io.BytesIO(workload.photo_jpeg)).convert("RGB")
        self.free = []
        for _ in range(max(context.profile.concurrencies)):  # a pipeline keeps per-call state
            pipeline = LTX2ImageToVideoPipeline.from_pretrained(context.model_path, dtype=dtype).to(self.device)
            pipeline.set_progress_bar_config(disable=True)
            self.free.append(pipeline)
        self.lock = threading.Lock()
        self.out_dir = Path(tempfile.mkdtemp(prefix="bench-bare-", dir=context.out_dir))
        context.machine["bare_torch_threads"] = torch.get_num_threads()

    def warm_up(self) -> None:
        for _ in range(self.context.profile.warmup_jobs):
            self.job(self.workload.seed - 1)

    def level(self, concurrency: int, seeds: list[int]) -> LevelResult:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            latencies = list(pool.map(self.job, seeds))
        return _level("bare", concurrency, latencies, len(seeds), time.perf_counter() - started)

    def job(self, seed: int) -> float:
        import torch  # noqa: PLC0415 - torch and diffusers only when this section runs

        from serving.media import write_mp4  # noqa: PLC0415 - torch and diffusers only when this section runs
        from serving.protocol import RenderPlan, VideoFrames, Waveform  # noqa: PLC0415 - torch and diffusers only when this section runs

        workload, config = self.workload, self.config
        with self.lock:
            pipeline = self.free.pop()
        started = time.perf_counter()
        try:
            plan = RenderPlan.build(
                width=workload.width, height=workload.height, fps=workload.fps, seconds=workload.seconds, seed=seed,
                num_inference_steps=workload.steps, frame_step=pipeline.vae_temporal_compression_ratio,
            )
            with torch.no_grad():
                video, audio = pipeline(
                    image=self.photo, prompt=workload.prompt, negative_prompt=config.negative_prompt,
                    width=plan.width, height=plan.height, num_frames=plan.generated_frames, frame_rate=float(plan.fps),
                    num_inference_steps=plan.num_inference_steps, guidance_scale=config.guidance_scale,
                    audio_guidance_scale=config.audio_guidance_scale, stg_scale=config.stg_scale,
                    audio_stg_scale=config.audio_stg_scale, spatio_temporal_guidance_blocks=list(config.stg_blocks),
                    modality_scale=config.modality_scale, audio_modality_scale=config.audio_modality_scale,
                    guidance_rescale=config.guidance_rescale, audio_guidance_rescale=config.guidance_rescale,
                    max_sequence_length=config.max_prompt_tokens,
                    generator=torch.Generator(self.device).manual_seed(seed), output_type="np", return_dict=False,
                )
            frames = VideoFrames.from_unit_float(video[0][: plan.output_frames], fps=plan.fps)
            rate = int(pipeline.vocoder.config.output_sampling_rate)
            write_mp4(self.out_dir / f"{seed}.mp4", frames, Waveform(samples=audio[0].float().cpu().numpy(), sample_rate=rate))
            return time.perf_counter() - started
        finally:
            with self.lock:
                self.free.append(pipeline)


# --------------------------------------------------------------------------- (a) the served graph


class _ServedPath:
    """The app on a local Ray cluster run by a child process; jobs through the load tester's gRPC closed loop."""

    def __init__(self, context: BenchContext, workload: Workload, config):
        self.context, self.workload, self.config = context, workload, config
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-served-", dir=context.out_dir))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> _ServedPath:
        profile, workload = self.context.profile, self.workload
        photo = self.scratch / "photo.jpg"
        photo.write_bytes(workload.photo_jpeg)
        app_config = {
            "app_name": "bench",
            "model": self.config.model_dump(),
            "jobs": {"backend": "sqlite", "sqlite_path": str(self.scratch / "jobs.sqlite3"),
                     "results_dir": str(self.scratch / "results"), "max_active_jobs": 16},
            "stages": {"diffusion": {"num_cpus": profile.diffusion_cpus, "max_ongoing_requests": 4,
                                     "max_queued_requests": 16}},
            "rewriter": {"enabled": False},
            "ingress": {"http_port": _free_port(), "grpc_port": _free_port()},
        }
        cluster = {"num_cpus": profile.cluster_cpus, "diffusion_cpus": profile.diffusion_cpus, "object_store_mb": 512}
        config_path, ready_path = self.scratch / "cluster.json", self.scratch / "ready.json"
        config_path.write_text(json.dumps({"app": app_config, "cluster": cluster}))
        log = open(self.scratch / "cluster.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.bench.cluster", str(config_path), str(ready_path)],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 900
        while not ready_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = (self.scratch / "cluster.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"the served cluster did not start: {tail[0] if tail else 'no output'}")
            time.sleep(0.5)
        ready = json.loads(ready_path.read_text())
        self.grpc = ready["grpc"]
        self.context.machine["served_diffusion_torch_threads"] = ready["diffusion_torch_threads"]
        self.context.log(f"  served graph deployed in {ready['deploy_seconds']:g} s")
        self.shape = RequestShape(name="bench", size=f"{workload.width}x{workload.height}", seconds=workload.seconds,
                                  photo=str(photo), enhance_prompt=False, prompt=workload.prompt)
        return self

    def warm_up(self) -> None:
        self._closed_loop(self.context.profile.warmup_jobs, 1, self.workload.seed - 1)

    def level(self, concurrency: int, first_seed: int, count: int) -> LevelResult:
        report = self._closed_loop(count, concurrency, first_seed)
        latencies = [t["latency_s"] for t in report["traces"] if t["outcome"] == "completed"]
        if report["errors_by_code"] or report["rejections_by_code"]:
            self.context.log(f"  served c={concurrency}: errors {report['errors_by_code']}, "
                             f"rejections {report['rejections_by_code']}")
        return _level("served", concurrency, latencies, count, report["wall_seconds"])

    def _closed_loop(self, count: int, concurrency: int, seed: int) -> dict:
        settings = LoadTestSettings(
            address=self.grpc, requests=count, concurrency=concurrency, mix=[self.shape],
            seed=seed, metrics_urls=[], quiet=True, timeout_s=600,
        )
        return asyncio.run(measure(settings))

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None  # opened with stdin=PIPE
            self.process.stdin.close()  # the cluster process shuts Serve and Ray down, then exits
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
