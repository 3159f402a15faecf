"""MiniMax-H3's diffusion engine on the CPU: one step per workflow, step batching, checkpoint cost.

``run(profile, out_dir)`` builds an H3 checkpoint with the released
transformer's structure (50 blocks and 2 text-refiner blocks; attention 4/3 as
wide as the residual stream, the SwiGLU 8/3; 24 video and 32 audio latent
channels; the real schedulers) at small widths and random weights (speed
depends on shapes, not on weight values), encodes a prompt, two keyframes and
a set of references with the family's own stages, then measures in one run:

- one denoising step of each workflow (t2va, fl2va, ref2va) at the same canvas:
  how much longer the conditioning rows make the packed sequence, and the step;
- step batching: 1, 2 and 4 concurrent t2va jobs of one layout, batched into one
  transformer pass per step, against the same jobs one by one;
- what a resumable checkpoint costs beside a step (a host copy of the rows).

It writes ``engine-h3.json`` and ``engine-h3.md`` into ``out_dir``.
``python -m serving.bench.engine_h3 --out DIR`` runs it; ``reelserve bench
--section engine_h3`` runs it as a section.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import platformdirs
import torch
from PIL import Image

from serving.bench.registry import (
    BenchContext,
    SectionResult,
    markdown_table,
    register_section,
)
from serving.engine.core import RequestFinished
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.families.minimax_h3.diffusion import DenoiseRequest, MiniMaxH3Diffusion
from serving.families.minimax_h3.stages import (
    MiniMaxH3ReferenceEncoder,
    MiniMaxH3TextEncoder,
)
from serving.families.minimax_h3.tiny import (
    TransformerWidths,
    build_key,
    ensure_tiny_minimax_h3,
)
from serving.protocol import InputSpec, RenderPlan

__all__ = ["PROFILES", "H3EngineProfile", "engine_h3_section", "main", "markdown", "run"]

CONCURRENCY = (1, 2, 4)


@dataclass(frozen=True)
class H3EngineProfile:
    """Widths of the benchmark transformer and the shape of its jobs."""

    widths: TransformerWidths
    width: int
    height: int
    seconds: float  # H3 generates 5 to 15 s
    steps: int  # transformer passes per job in the batching runs
    repeats: int  # each timing is the best of this many runs (the machine is shared)


PROFILES = {
    # The released block count and width ratios (hidden 5376 : attention 7168 : SwiGLU 14336 = 3 : 4 : 8) at
    # 96 : 128 : 256, on a 16:9 canvas of 192x96 for 5 s: 666 video tokens, 414 audio rows, 30 text rows.
    "cpu": H3EngineProfile(
        widths=TransformerWidths(num_layers=50, num_refiner_layers=2, num_attention_heads=4, attention_head_dim=32,
                                 hidden_size=96, ffn_dim=256, rope_freq_dim=4, freq_dim=64, time_embed_hidden_dim=96,
                                 time_embed_dim=48),
        width=192, height=96, seconds=5.0, steps=3, repeats=3,
    ),
    # Seconds, for a smoke test of this module.
    "smoke": H3EngineProfile(widths=TransformerWidths(), width=64, height=32, seconds=5.0, steps=2, repeats=1),
}
_PROMPT = "A tabby cat looks around, blinks and purrs; warm light."


def run(profile: str = "cpu", out_dir: Path = Path("bench-out"), *, threads: int | None = None,
        command: str | None = None) -> dict:
    """Every measurement on ``profile``; writes ``engine-h3.json`` and ``engine-h3.md`` into ``out_dir``."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not known; profiles: {', '.join(PROFILES)}")
    settings = PROFILES[profile]
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    bench = _Bench(settings)
    results: dict[str, Any] = {
        "profile": profile,
        "settings": {**asdict(settings), "widths": asdict(settings.widths)},
        "machine": _machine(),
        "date": datetime.date.today().isoformat(),
        "command": command or f"python -m serving.bench.engine_h3 --profile {profile}",
        "note": "random weights at small widths with the released transformer's structure; speed depends on shapes",
    }
    for section in ("workflows", "batching", "checkpoint"):
        print(f"engine-h3 bench: {section} ...", file=sys.stderr, flush=True)
        results[section] = getattr(bench, section)()
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["wall_s"] = round(time.time() - started, 1)
    (out_dir / "engine-h3.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "engine-h3.md").write_text(markdown(results))
    return results


# --------------------------------------------------------------------------- measurements


class _Bench:
    def __init__(self, settings: H3EngineProfile):
        self.settings = settings
        canvas = {"canvas_short_edge": settings.height, "canvas_max_pixels": settings.width * settings.height,
                  "reference_image_short_edge": settings.height}
        cache = Path(platformdirs.user_cache_dir("reelserve")) / "bench"
        path = ensure_tiny_minimax_h3(cache / f"minimax-h3-{build_key(settings.widths, canvas)}", settings.widths, canvas)
        self.config = MiniMaxH3ModelConfig.tiny(path=str(path), device="cpu", dtype="float32",
                                                num_inference_steps=settings.steps + 1)
        self.text_encoder = MiniMaxH3TextEncoder(self.config)
        self.reference_encoder = MiniMaxH3ReferenceEncoder(self.config)
        self.engines = {on: self._diffusion(batching=on) for on in (False, True)}

    def _diffusion(self, **loop) -> MiniMaxH3Diffusion:
        update = {"diffusion": self.config.diffusion.model_copy(update=loop)}
        return MiniMaxH3Diffusion(self.config.model_copy(update=update))

    def plan(self, seed: int, steps: int | None = None) -> RenderPlan:
        s = self.settings
        return RenderPlan.build(width=s.width, height=s.height, fps=24, seconds=s.seconds, seed=seed,
                                num_inference_steps=(steps or s.steps) + 1, frame_step=17, frame_offset=5)

    def conditioning(self, workflow: str):
        """The encoders' hand-offs for one request of ``workflow`` (made with the family's own stages)."""
        media = _media(self.settings)
        inputs = {
            "t2va": [],
            "fl2va": [("first_frame", "image", "first_frame", media["image"]),
                      ("last_frame", "image", "last_frame", media["image"])],
            "ref2va": [("ref-0", "image", "reference_image", media["image"]),
                       ("ref-1", "image", "reference_image", media["image"]),
                       ("ref-2", "video", "reference_video", media["video"]),
                       ("ref-3", "audio", "reference_audio", media["audio"])],
        }[workflow]
        specs = tuple(InputSpec(name, kind, role) for name, kind, role, _ in inputs)
        data = [item[3] for item in inputs]
        plan = self.plan(0)
        text = self.text_encoder.encode(_PROMPT, plan, specs, *data)
        references = self.reference_encoder.encode(plan, specs, *data) if inputs else None
        return text, references

    # ------------------------------------------------------------------ one step per workflow

    def workflows(self) -> dict:
        engine = self.engines[False].engine
        rows = {}
        for workflow in ("t2va", "fl2va", "ref2va"):
            text, references = self.conditioning(workflow)
            state = engine.model.start(DenoiseRequest("probe", text, references, self.plan(0)), None)
            walls, cpus = [], []
            for repeat in range(self.settings.repeats + 1):  # the first run warms up
                request = DenoiseRequest(f"{workflow}-{repeat}", text, references, self.plan(repeat, steps=3))
                engine.add(request)
                engine.step()  # the request's start (layout, noise) and its first step
                wall, cpu = _timed(engine.step)  # one step alone
                _drain(engine)
                if repeat:
                    walls.append(wall)
                    cpus.append(cpu)
            rows[workflow] = {
                "packed_rows": state.sequence_length,
                "text_rows": int(text.tokens),
                "condition_rows": state.geometry["num_condition_video_rows"] + state.geometry["num_condition_audio_rows"],
                "step_ms": round(1e3 * min(walls), 1),
                "step_cpu_ms": round(1e3 * min(cpus), 1),
            }
        base = rows["t2va"]
        for row in rows.values():  # CPU time: the work itself, whatever else the machine runs
            row["vs_t2va"] = round(row["step_cpu_ms"] / base["step_cpu_ms"], 2)
        return {"size": f"{self.settings.width}x{self.settings.height}, {self.settings.seconds:g} s", "rows": rows}

    # ------------------------------------------------------------------ batching

    def batching(self) -> dict:
        steps = self.settings.steps
        text, _ = self.conditioning("t2va")
        for on, diffusion in self.engines.items():  # warm both engines up
            _run(diffusion.engine, [DenoiseRequest(f"warm-{on}", text, None, self.plan(1))])
        best: dict[tuple[int, bool], tuple[float, float, int]] = {}
        for repeat in range(self.settings.repeats):
            for count in CONCURRENCY:
                for on, diffusion in self.engines.items():
                    model = diffusion.engine.model
                    requests = [DenoiseRequest(f"r{repeat}-{count}-{on}-{i}", text, None, self.plan(100 + i))
                                for i in range(count)]
                    passes_before = model.forwards
                    wall, cpu = _timed(lambda engine=diffusion.engine, jobs=requests: _run(engine, jobs))
                    if (count, on) not in best or wall < best[(count, on)][0]:
                        best[(count, on)] = (wall, cpu, model.forwards - passes_before)
        rows = []
        for count in CONCURRENCY:
            alone_wall, alone_cpu, _ = best[(count, False)]
            for on in (False, True):
                wall, cpu, passes = best[(count, on)]
                rows.append({
                    "concurrent_jobs": count, "batching": "on" if on else "off", "transformer_passes": passes,
                    "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                    "request_steps_per_s": round(count * steps / wall, 3),
                    "vs_one_by_one": round(alone_wall / wall, 3), "vs_one_by_one_cpu": round(alone_cpu / cpu, 3),
                })
        return {"steps_per_job": steps, "packed_rows": self._rows(text), "rows": rows}

    def _rows(self, text) -> int:
        return self.config.sequence_tokens(self.settings.width, self.settings.height,
                                           self.plan(0).generated_frames, text.tokens)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> dict:
        engine = self.engines[False].engine
        text, references = self.conditioning("ref2va")
        engine.add(DenoiseRequest("ckpt", text, references, self.plan(5, steps=6)))
        step_times, checkpoint_times, size = [], [], 0
        while engine.has_work:
            _, cpu = _timed(engine.step)
            step_times.append(cpu)
            if "ckpt" in engine.active_requests:
                wall, _ = _timed(lambda: engine.checkpoint("ckpt"))
                checkpoint_times.append(wall)
                size = engine.checkpoint("ckpt").nbytes
        # The first step also prepares the request (layout, noise), the last one also unpacks it: the middle ones.
        step_ms, checkpoint_ms = 1e3 * statistics.median(step_times[1:-1]), 1e3 * statistics.median(checkpoint_times)
        return {"workflow": "ref2va", "step_cpu_ms": round(step_ms, 1), "checkpoint_ms": round(checkpoint_ms, 3),
                    "checkpoint_share_of_step": round(checkpoint_ms / step_ms, 5), "checkpoint_bytes": size}


def _timed(work) -> tuple[float, float]:
    """Wall and process CPU seconds of ``work`` (CPU time resists a busy shared machine)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - started, time.process_time() - cpu_started


def _run(engine, requests) -> dict:
    for request in requests:
        engine.add(request)
    return _drain(engine)


def _drain(engine) -> dict:
    finished = {}
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, RequestFinished):
                finished[event.request_id] = event.output
    return finished


def _media(settings: H3EngineProfile) -> dict[str, bytes]:
    """A reference image, a 2 s reference video with its soundtrack, and a 1 s audio clip, made in code."""
    rng = np.random.default_rng(0)
    image = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (settings.height, settings.width, 3), dtype=np.uint8)).save(image, "PNG")
    handle, path = tempfile.mkstemp(suffix=".mp4")
    os.close(handle)
    try:
        with av.open(path, "w", format="mp4") as container:
            video = container.add_stream("libx264", rate=24)
            video.width, video.height, video.pix_fmt = settings.width, settings.height, "yuv420p"
            audio = container.add_stream("aac", rate=32000)
            audio.layout = "stereo"
            for _ in range(48):
                pixels = rng.integers(0, 255, (settings.height, settings.width, 3), dtype=np.uint8)
                container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(video.encode(None))
            _tone(container, audio, 2.0)
        clip = io.BytesIO()
        with av.open(clip, "w", format="wav") as container:
            _tone(container, container.add_stream("pcm_f32le", rate=32000, layout="stereo"), 1.0, planar=False)
        return {"image": image.getvalue(), "video": Path(path).read_bytes(), "audio": clip.getvalue()}
    finally:
        os.remove(path)


def _tone(container, stream, seconds: float, planar: bool = True) -> None:
    times = np.arange(round(seconds * 32000)) / 32000
    samples = (0.3 * np.stack([np.sin(2 * np.pi * 440 * times), np.sin(2 * np.pi * 660 * times)])).astype(np.float32)
    for start in range(0, samples.shape[1], 1024):
        chunk = np.ascontiguousarray(samples[:, start : start + 1024])
        if not planar:
            chunk = np.ascontiguousarray(chunk.T.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp" if planar else "flt", layout="stereo")
        frame.sample_rate = 32000
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


# --------------------------------------------------------------------------- report


def _machine() -> str:
    processor = platform.processor() or platform.machine()
    return f"{processor}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def markdown(results: dict) -> str:
    """The results as the tables BENCHMARKS.md quotes."""
    s = results["settings"]
    widths = s["widths"]
    workflows, batching, checkpoint = results["workflows"], results["batching"], results["checkpoint"]
    lines = [
        (f"MiniMax-H3 engine, profile `{results['profile']}` ({results['machine']}), {results['date']}; "
        f"{results['note']}: {widths['num_layers']} blocks, hidden {widths['hidden_size']}, attention "
        f"{widths['num_attention_heads']} x {widths['attention_head_dim']}, SwiGLU {widths['ffn_dim']}. "
        f"Load average before/after: {results['load_average']['before'][0]:.1f} / "
        f"{results['load_average']['after'][0]:.1f}."),
        "",
        (f"One denoising step per workflow at {workflows['size']} (best of {s['repeats']}; fl2va: two keyframes; "
        "ref2va: two images, a 2 s video with its soundtrack, a 1 s audio clip):"),
        "",
        markdown_table(
            [{"workflow": name, **row} for name, row in workflows["rows"].items()],
            [("workflow", "workflow"), ("packed_rows", "packed rows"), ("text_rows", "text rows"),
             ("condition_rows", "conditioning rows"), ("step_ms", "step ms"), ("step_cpu_ms", "CPU ms"),
             ("vs_t2va", "vs t2va (CPU)")],
        ),
        "",
        (f"Step batching: t2va jobs of one packed layout ({batching['packed_rows']} rows), "
        f"{batching['steps_per_job']} steps each, one pass per step for all of them (on) or one pass per job (off):"),
        "",
        markdown_table(
            batching["rows"],
            [("concurrent_jobs", "concurrent jobs"), ("batching", "batching"), ("transformer_passes", "passes"),
             ("wall_s", "wall s"), ("cpu_s", "CPU s"), ("request_steps_per_s", "request-steps/s"),
             ("vs_one_by_one", "vs one by one (wall)"), ("vs_one_by_one_cpu", "(CPU)")],
        ),
        "",
        (f"Checkpoint ({checkpoint['workflow']}): {checkpoint['checkpoint_ms']} ms for a host copy of the rows against "
        f"a step of {checkpoint['step_cpu_ms']} CPU ms ({100 * checkpoint['checkpoint_share_of_step']:.3f}% of a step), "
        f"{checkpoint['checkpoint_bytes']} bytes of rows."),
    ]
    return "\n".join(lines) + "\n"


@register_section("engine_h3", title="MiniMax-H3 diffusion engine: workflows, step batching, checkpoints")
def engine_h3_section(context: BenchContext) -> SectionResult:
    """``reelserve bench --section engine_h3``: the ``cpu`` profile of this module."""
    results = run("cpu", Path(context.out_dir) / "engine-h3")
    return SectionResult(name="engine_h3", title="MiniMax-H3 diffusion engine", data=results,
                         markdown=markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench.engine_h3", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="benchmark profile (default: cpu)")
    parser.add_argument("--out", default="bench-out", help="directory for engine-h3.json and engine-h3.md")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    command = "python -m serving.bench.engine_h3 " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(args.profile, Path(args.out), threads=args.threads, command=command.strip())
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
