"""The diffusion engine's benchmark: step batching, the recipes end to end, checkpoints, step caches.

``run(profile, out_dir)`` builds a checkpoint with the real LTX-2 transformer's
structure (48 blocks, split RoPE, 128 latent channels, 128 audio features, the
real scheduler) at small widths and random weights (speed depends on shapes,
not on weight values), then measures in one run:

- throughput at 1, 2 and 4 concurrent jobs of one shape, step batching off and on;
- the dev, distilled and two_stage recipes end to end at the same size;
- what a checkpoint costs per step;
- each step cache's speed and its deviation from the uncached output.

It writes ``engine.json`` and ``engine.md`` into ``out_dir`` and returns the
same dict. ``python -m serving.bench.engine --profile cpu --out DIR`` runs it.
"""

from __future__ import annotations

import argparse
import datetime
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

import torch

from serving.bench.registry import BenchContext, SectionResult, register_section
from serving.engine.core import RequestFailed, RequestFinished, StepFinished
from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig
from serving.jobs.job_storage import register_stored_types
from serving.protocol import HostTensor, PromptEmbeddings, RenderPlan, TextEmbeddings
from serving.storage.codec import codec

__all__ = ["run", "PROFILES", "BenchProfile", "engine_section"]


@dataclass(frozen=True)
class BenchProfile:
    """Widths of the benchmark checkpoint and the shape of its jobs."""

    heads: int  # video attention heads (x head_dim); the real model has 32 x 128
    head_dim: int
    audio_heads: int  # the real model has 32 x 64
    audio_head_dim: int
    caption_channels: int  # the text connectors' width (real: 3840)
    num_layers: int  # real: 48
    upsampler_channels: int  # the latent upsampler's middle width (real: 1024)
    prompt_tokens: int  # real: 1024
    width: int
    height: int
    seconds: float
    fps: int
    dev_steps: int  # the dev recipe's steps (the default config's 30)
    batching_steps: int  # steps per job in the batching runs
    repeats: int  # each timing is the best of this many runs (the machine is shared)


PROFILES = {
    # The real proportions at small widths: 48 blocks; text tokens about 7% of the video tokens (real: 1024
    # for 14080 at 1280x704 x 121). One dev step (3 guidance rows of 498 tokens) takes 0.5-1 s on 2 CPU cores.
    "cpu": BenchProfile(
        heads=4, head_dim=32, audio_heads=4, audio_head_dim=16, caption_channels=128, num_layers=48,
        upsampler_channels=64, prompt_tokens=32, width=512, height=320, seconds=16 / 24, fps=24,
        dev_steps=30, batching_steps=4, repeats=2,
    ),
    # Seconds, for a smoke test of this module.
    "smoke": BenchProfile(
        heads=2, head_dim=8, audio_heads=2, audio_head_dim=4, caption_channels=16, num_layers=2,
        upsampler_channels=32, prompt_tokens=16, width=128, height=128, seconds=8 / 24, fps=24,
        dev_steps=2, batching_steps=2, repeats=1,
    ),
}

CONCURRENCY = (1, 2, 4)
GUIDANCE_OFF = dict(
    guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0
)


def run(profile: str = "cpu", out_dir: Path = Path("bench-out"), *, threads: int | None = None) -> dict:
    """Run every engine measurement on ``profile``; write ``engine.json`` and ``engine.md`` into ``out_dir``."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not known; profiles: {', '.join(PROFILES)}")
    settings = PROFILES[profile]
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="reelserve-bench-") as scratch:
        checkpoint = _build_checkpoint(Path(scratch), settings)
        bench = _Bench(checkpoint, settings)
        results: dict[str, Any] = {
            "profile": profile,
            "settings": asdict(settings),
            "machine": _machine(),
            "date": datetime.date.today().isoformat(),
            "note": "random weights at small widths with the real transformer's structure; speed depends on shapes only",
        }
        for section in ("batching", "recipes", "checkpoint_cost", "step_caches"):
            print(f"engine bench: {section} ...", file=sys.stderr, flush=True)
            results[section.removesuffix("_cost")] = getattr(bench, section)()
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["wall_s"] = round(time.time() - started, 1)
    (out_dir / "engine.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "engine.md").write_text(markdown(results))
    return results


# --------------------------------------------------------------------------- measurements


class _Bench:
    def __init__(self, checkpoint: Path, settings: BenchProfile):
        self.settings = settings
        self.base = LTX2ModelConfig(
            path=str(checkpoint),
            device="cpu",
            dtype="float32",
            num_inference_steps=settings.dev_steps,
            max_prompt_tokens=max(8, settings.prompt_tokens),
            stg_blocks=[min(28, settings.num_layers - 1)],
            default_size="256x256",
        )
        self.embeddings = _random_embeddings(settings)

    def _config(self, recipe: str = "dev", steps: int | None = None, guidance_off: bool = False, **diffusion):
        update: dict[str, Any] = {"diffusion": self.base.diffusion.model_copy(update={"recipe": recipe, **diffusion})}
        if steps is not None:
            update["num_inference_steps"] = steps
        if guidance_off:
            update.update(GUIDANCE_OFF)
        return self.base.model_copy(update=update)

    def _plan(self, seed: int, steps: int):
        s = self.settings
        return RenderPlan.build(
            width=s.width, height=s.height, fps=s.fps, seconds=s.seconds, seed=seed, num_inference_steps=steps,
            frame_step=8,
        )

    def _requests(self, count: int, steps: int, prefix: str):
        from serving.families.ltx2.diffusion import DenoiseRequest  # noqa: PLC0415 - torch and diffusers only when this section runs

        return [DenoiseRequest(f"{prefix}-{i}", self.embeddings, None, self._plan(100 + i, steps)) for i in range(count)]

    # ------------------------------------------------------------------ batching

    def batching(self) -> dict:
        from serving.families.ltx2.diffusion import LTX2Engine  # noqa: PLC0415 - torch and diffusers only when this section runs

        steps = self.settings.batching_steps
        engines = {on: LTX2Engine(self._config(steps=steps, batching=on)) for on in (False, True)}
        for on, engine in engines.items():
            _drain_timed(engine, self._requests(1, 2, f"warm-{on}"))
        rows = []
        best: dict[tuple[int, bool], tuple[float, float, int]] = {}
        for repeat in range(self.settings.repeats):
            for count in CONCURRENCY:
                for on in (False, True):
                    engine = engines[on]
                    passes_before = engine.model.forwards
                    wall, cpu = _drain_timed(engine, self._requests(count, steps, f"r{repeat}-{count}-{on}"))
                    key = (count, on)
                    if key not in best or wall < best[key][0]:
                        best[key] = (wall, cpu, engine.model.forwards - passes_before)
        # Request-steps per second (and per CPU second) of one job at a time: the baseline.
        one_wall, one_cpu, _ = best[(1, False)]
        for count in CONCURRENCY:
            for on in (False, True):
                wall, cpu, passes = best[(count, on)]
                throughput = count * steps / wall
                rows.append(
                    dict(
                        concurrent_jobs=count,
                        batching=on,
                        wall_s=round(wall, 3),
                        cpu_s=round(cpu, 3),
                        transformer_passes=passes,
                        request_steps_per_s=round(throughput, 3),
                        jobs_per_min=round(60 * count / wall, 2),
                        vs_one_at_a_time=round(throughput / (steps / one_wall), 3),
                        vs_one_at_a_time_cpu=round((count * steps / cpu) / (steps / one_cpu), 3),
                    )
                )
        return {"steps_per_job": steps, "rows": rows, "target": "4 concurrent, batching on: >= 1.1x one at a time"}

    # ------------------------------------------------------------------ recipes

    def recipes(self) -> dict:
        from serving.families.ltx2.diffusion import LTX2Engine  # noqa: PLC0415 - torch and diffusers only when this section runs

        configs = {
            "dev": self._config("dev"),
            "distilled": self._config("distilled", guidance_off=True),
            "two_stage": self._config("two_stage"),
            "two_stage (distilled first stage)": self._config("two_stage", guidance_off=True, first_stage="distilled"),
        }
        rows = {}
        for name, config in configs.items():
            engine = LTX2Engine(config)
            _drain_timed(engine, self._requests(1, 2, f"warm-{name}"))
            walls = []
            for repeat in range(self.settings.repeats):
                passes, transformer_rows = engine.model.forwards, engine.model.rows_run
                walls.append(_drain_timed(engine, self._requests(1, self.settings.dev_steps, f"{name}-{repeat}")))
            wall, cpu = min(walls)
            plan = self._plan(0, self.settings.dev_steps)
            rows[name] = dict(
                steps=engine.total_steps(plan),
                transformer_passes=engine.model.forwards - passes,
                transformer_rows=engine.model.rows_run - transformer_rows,
                wall_s=round(wall, 3),
                cpu_s=round(cpu, 3),
            )
        for row in rows.values():
            row["vs_dev"] = round(row["wall_s"] / rows["dev"]["wall_s"], 3)
            row["vs_dev_cpu"] = round(row["cpu_s"] / rows["dev"]["cpu_s"], 3)
        return {
            "size": f"{self.settings.width}x{self.settings.height}",
            "rows": rows,
            "target": "distilled end to end <= 1/5 of dev",
        }

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_cost(self) -> dict:
        from serving.families.ltx2.diffusion import LTX2Engine  # noqa: PLC0415 - torch and diffusers only when this section runs

        register_stored_types(get_family("ltx2"))
        engine = LTX2Engine(self._config())
        engine.add(self._requests(1, self.settings.dev_steps, "ckpt")[0])
        step_times, checkpoint_times, size = [], [], 0
        while engine.has_work:
            started = time.perf_counter()
            events = engine.step()
            step_times.append(time.perf_counter() - started)
            if any(isinstance(e, StepFinished) for e in events) and engine.active_requests:
                started = time.perf_counter()
                checkpoint = engine.checkpoint("ckpt-0")
                checkpoint_times.append(time.perf_counter() - started)
                size = len(codec.encode(checkpoint))  # what the artifacts store keeps
        step_ms = 1e3 * statistics.median(step_times)
        checkpoint_ms = 1e3 * statistics.median(checkpoint_times)
        return dict(
            step_ms=round(step_ms, 2),
            checkpoint_ms=round(checkpoint_ms, 4),
            checkpoint_share_of_step=round(checkpoint_ms / step_ms, 6),
            stored_bytes=size,
        )

    # ------------------------------------------------------------------ step caches

    def step_caches(self) -> dict:
        from serving.families.ltx2.diffusion import LTX2Engine  # noqa: PLC0415 - torch and diffusers only when this section runs
        from serving.families.ltx2.recipes import MagRatioRecorder  # noqa: PLC0415 - torch and diffusers only when this section runs

        steps = self.settings.dev_steps
        request = self._requests(1, steps, "cache")[0]
        uncached_engine = LTX2Engine(self._config(batching=False))
        with MagRatioRecorder(uncached_engine.model.transformer) as recorder:
            started, cpu_started = time.perf_counter(), time.process_time()
            reference = _drain(uncached_engine, [request])[request.request_id]
            uncached = (time.perf_counter() - started, time.process_time() - cpu_started)
        variants: dict[str, dict[str, Any]] = {
            "first_block (threshold 0.05)": dict(step_cache="first_block"),
            "first_block (threshold 0.2)": dict(step_cache="first_block", step_cache_threshold=0.2),
            "mag (calibrated ratios)": dict(step_cache="mag", mag_ratios=recorder.ratios),
            "taylorseer": dict(step_cache="taylorseer"),
        }
        rows = {
            "none": dict(
                wall_s=round(uncached[0], 3), cpu_s=round(uncached[1], 3), block_passes=steps, **_deviation(reference, reference)
            )
        }
        for name, options in variants.items():
            engine = LTX2Engine(self._config(batching=False, **options))
            calls = _count_calls(engine.model.transformer.transformer_blocks[-1].attn1.to_q)
            started, cpu_started = time.perf_counter(), time.process_time()
            output = _drain(engine, [request])[request.request_id]
            rows[name] = dict(
                wall_s=round(time.perf_counter() - started, 3),
                cpu_s=round(time.process_time() - cpu_started, 3),
                block_passes=calls[0],
                **_deviation(output, reference),
            )
        for row in rows.values():
            row["speedup"] = round(rows["none"]["wall_s"] / row["wall_s"], 3)
            row["speedup_cpu"] = round(rows["none"]["cpu_s"] / row["cpu_s"], 3)
        return {"steps": steps, "rows": rows}


def _deviation(output, reference) -> dict:
    """Max and mean absolute deviation of the latents, and the mean relative to the reference's mean magnitude."""
    found = {}
    for part in ("video", "audio"):
        ours = getattr(output, part).latents.to()
        theirs = getattr(reference, part).latents.to()
        error = (ours - theirs).abs()
        found[f"{part}_max_abs"] = float(error.max())
        found[f"{part}_mean_abs"] = float(error.mean())
        found[f"{part}_mean_rel"] = float(error.mean() / theirs.abs().mean())
    return found


def _count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _drain(engine, requests) -> dict:
    for request in requests:
        engine.add(request)
    results = {}
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, RequestFinished):
                results[event.request_id] = event.output
            elif isinstance(event, RequestFailed):
                raise RuntimeError(f"{event.request_id} failed: {event.error}") from event.error
    return results


def _drain_timed(engine, requests) -> tuple[float, float]:
    """Wall and process CPU seconds to run ``requests`` to the end (CPU time resists a busy shared machine)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    _drain(engine, requests)
    return time.perf_counter() - started, time.process_time() - cpu_started


def _random_embeddings(settings: BenchProfile):
    generator = torch.Generator().manual_seed(0)

    def text():
        shape = (1, settings.prompt_tokens, settings.caption_channels)
        mask = torch.zeros(1, settings.prompt_tokens, dtype=torch.int64)
        mask[:, -settings.prompt_tokens // 4 :] = 1  # a prompt a quarter as long as the padded length
        return TextEmbeddings(
            video=HostTensor.of(torch.randn(shape, generator=generator)),
            audio=HostTensor.of(torch.randn(shape, generator=generator)),
            mask=HostTensor.of(mask),
        )

    return PromptEmbeddings(prompt=text(), negative=text())


# --------------------------------------------------------------------------- the checkpoint


def _build_checkpoint(directory: Path, settings: BenchProfile) -> Path:
    """Transformer, scheduler, VAE configs with latent statistics, and the latent upsampler; random weights."""
    from diffusers import (  # noqa: PLC0415 - torch and diffusers only when this section runs
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel  # noqa: PLC0415 - torch and diffusers only when this section runs

    torch.manual_seed(0)
    video_width = settings.heads * settings.head_dim
    audio_width = settings.audio_heads * settings.audio_head_dim
    LTX2VideoTransformer3DModel(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
        num_attention_heads=settings.heads, attention_head_dim=settings.head_dim, cross_attention_dim=video_width,
        audio_in_channels=128, audio_out_channels=128,
        audio_num_attention_heads=settings.audio_heads, audio_attention_head_dim=settings.audio_head_dim,
        audio_cross_attention_dim=audio_width, num_layers=settings.num_layers, qk_norm="rms_norm_across_heads",
        caption_channels=settings.caption_channels, rope_type="split", rope_double_precision=True,
    ).save_pretrained(directory / "transformer")
    FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1,
    ).save_pretrained(directory / "scheduler")
    # Only the configs and the latent statistics are read: the smallest VAEs with the real latent layout.
    AutoencoderKLLTX2Video(
        latent_channels=128, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2), patch_size=4, patch_size_t=1, spatial_compression_ratio=32,
        temporal_compression_ratio=8, decoder_causal=False,
    ).save_pretrained(directory / "vae")
    AutoencoderKLLTX2Audio(
        base_channels=128, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=8, mel_bins=64, sample_rate=16000, mel_hop_length=160, is_causal=True,
        mid_block_add_attention=False,
    ).save_pretrained(directory / "audio_vae")
    LTX2LatentUpsamplerModel(
        in_channels=128, mid_channels=settings.upsampler_channels, num_blocks_per_stage=4, dims=3,
    ).save_pretrained(directory / "latent_upsampler")
    return directory


# --------------------------------------------------------------------------- report


def _machine() -> str:
    cores = os.cpu_count()
    processor = platform.processor() or platform.machine()
    return f"{processor}, {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def markdown(results: dict) -> str:
    """The results as markdown tables (what BENCHMARKS.md quotes)."""
    lines = [
        f"Engine benchmark, profile `{results['profile']}` ({results['machine']}), {results['date']}; "
        f"{results['note']}. Load average before/after: {results['load_average']['before'][0]:.1f} / "
        f"{results['load_average']['after'][0]:.1f}.",
        "",
        f"Step batching ({results['batching']['steps_per_job']} steps a job, dev guidance, best of "
        f"{results['settings']['repeats']}):",
        "",
        "| concurrent jobs | batching | wall s | CPU s | transformer passes | request-steps/s | vs one at a time "
        "(wall) | (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["batching"]["rows"]:
        lines.append(
            f"| {row['concurrent_jobs']} | {'on' if row['batching'] else 'off'} | {row['wall_s']} | {row['cpu_s']} | "
            f"{row['transformer_passes']} | {row['request_steps_per_s']} | {row['vs_one_at_a_time']}x | "
            f"{row['vs_one_at_a_time_cpu']}x |"
        )
    recipes = results["recipes"]
    lines += [
        "",
        f"Recipes end to end at {recipes['size']} (one job):",
        "",
        "| recipe | steps | transformer passes | rows | wall s | CPU s | vs dev (wall) | (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in recipes["rows"].items():
        lines.append(
            f"| {name} | {row['steps']} | {row['transformer_passes']} | {row['transformer_rows']} | {row['wall_s']} | "
            f"{row['cpu_s']} | {row['vs_dev']} | {row['vs_dev_cpu']} |"
        )
    cost = results["checkpoint"]
    lines += [
        "",
        f"Checkpoint: {cost['checkpoint_ms']} ms per checkpoint against a {cost['step_ms']} ms dev step "
        f"({100 * cost['checkpoint_share_of_step']:.3f}% of a step), {cost['stored_bytes']} bytes stored.",
        "",
        f"Step caches (dev, {results['step_caches']['steps']} steps, batching off; deviation of the final latents "
        "from the uncached run):",
        "",
        "| cache | wall s | CPU s | speedup (wall) | (CPU) | last-block passes | video max / mean abs | video mean rel "
        "| audio max / mean abs | audio mean rel |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results["step_caches"]["rows"].items():
        lines.append(
            f"| {name} | {row['wall_s']} | {row['cpu_s']} | {row['speedup']}x | {row['speedup_cpu']}x | "
            f"{row['block_passes']} | "
            f"{row['video_max_abs']:.3g} / {row['video_mean_abs']:.3g} | {row['video_mean_rel']:.3g} | "
            f"{row['audio_max_abs']:.3g} / {row['audio_mean_abs']:.3g} | {row['audio_mean_rel']:.3g} |"
        )
    return "\n".join(lines) + "\n"


@register_section("engine", title="Diffusion engine: step batching, recipes, checkpoints, step caches")
def engine_section(context: BenchContext) -> SectionResult:
    """``reelserve bench``'s engine section: the ``cpu`` engine profile on a CPU, alongside any bench profile."""
    results = run("cpu", Path(context.out_dir) / "engine")
    return SectionResult(name="engine", title="Diffusion engine", data=results, markdown=markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="benchmark profile (default: cpu)")
    parser.add_argument("--out", default="bench-out", help="directory for engine.json and engine.md")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    results = run(args.profile, Path(args.out), threads=args.threads)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
