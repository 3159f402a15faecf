"""The GPU benchmark: LTX-2 19B at real size with random weights, on one GPU (and two where present).

    python -m serving.bench.gpu --profile ltx2-19b-random --out DIR [--sections step,kernels,...]

Sections (each can run alone, e.g. to fit one command in a time limit):

- ``machine``: the GPU, versions, its bf16 peak and the matmul rate it reaches.
- ``step``: seconds per transformer pass at the main shape (1280x704 x 121):
  one pass, and one step with LTX-2's default guidance (conditional +
  unconditional in one batch of 2, a spatio-temporal guidance pass, a
  modality-isolation pass); MFU from FLOPs computed from the config.
- ``kernels``: the same pass with the speed switches (attention backend
  chosen by probe, regional compile, FP8, CUDA graphs), each on a fresh model.
- ``recipes``: end to end for the dev, distilled and two-stage recipes. The
  engine that runs whole recipes is not part of this benchmark, so each recipe
  is the sum of the measured passes that make it up: text encoder, connectors,
  the transformer steps, the latent upsampler, video and audio decoding (H.264
  muxing on the CPU is left out).
- ``throughput``: jobs/hour at 1, 2 and 4 concurrent jobs of the smaller shape
  (distilled recipe), with step batching on (one transformer pass for all jobs)
  and off (one pass per job), from measured pass times.
- ``diffusers``: the same workload through the bare ``LTX2Pipeline`` (one job
  at a time), timed whole, and the ratio to ours.
- ``multi_gpu``: one pass at the main shape sequence-parallel over 2 GPUs
  (NCCL), against one GPU; skipped with fewer than 2 GPUs.

Every figure says how it was obtained. Output: ``gpu-bench.json`` and
``gpu-bench.md`` in ``--out``. Needs torch and diffusers (transformers for
the text encoder and the pipeline); not Ray, not PyAV.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch

from serving.bench.gpu_kernels import kernel_variants
from serving.bench.gpu_multi import sequence_parallel_seconds
from serving.bench.gpu_pipeline import bare_pipeline_seconds
from serving.bench.gpu_profiles import BenchProfile, get_profile
from serving.bench.registry import SectionResult, register_section
from serving.families.ltx2 import flops as flops
from serving.families.ltx2 import reference as ref

__all__ = ["run", "main", "SECTIONS"]

SECTIONS = ("machine", "step", "kernels", "recipes", "throughput", "diffusers", "multi_gpu")
_DEFAULT_SECTIONS = ("machine", "step", "recipes", "throughput", "diffusers", "multi_gpu", "kernels")


def run(
    profile: str,
    out_dir: Path,
    *,
    sections: list[str] | None = None,
    repeats: int | None = None,
    command: str | None = None,
) -> dict:
    """Run the chosen sections (all by default) and write ``gpu-bench.json`` and ``gpu-bench.md``; return the report."""
    settings = get_profile(profile)
    if settings.family != "ltx2":
        raise ValueError(f"--profile: {profile} is a {settings.family} profile; run it with serving.bench.gpu_h3")
    chosen = list(_DEFAULT_SECTIONS if not sections else sections)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; sections are {list(SECTIONS)}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"profile {profile} needs a CUDA GPU and none is visible; the CPU profile is 'tiny'")
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    bench = _Bench(settings, repeats or settings.repeats)
    report: dict[str, Any] = {
        "profile": settings.name,
        "description": settings.description,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sections": {},
    }
    for name in [s for s in _DEFAULT_SECTIONS if s in chosen]:
        started = time.perf_counter()
        try:
            report["sections"][name] = getattr(bench, name)()
        except Exception as error:  # noqa: BLE001 - one failed section is reported; the others still run
            report["sections"][name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        report["sections"][name]["section_seconds"] = round(time.perf_counter() - started, 2)
        bench.models.clear()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "gpu-bench.md").write_text(render_markdown(report))
    return report


# --------------------------------------------------------------------------- measuring


class _Models:
    """Components built on first use, dropped to make room (one 19B model at a time)."""

    def __init__(self, profile: BenchProfile, device: torch.device, dtype: torch.dtype):
        self.profile, self.device, self.dtype = profile, device, dtype
        self._built: dict[str, Any] = {}  # diffusers and transformers models: callers read their configs

    def get(self, name: str) -> Any:
        if name not in self._built:
            self._built[name] = self.build(name)
        return self._built[name]

    def build(self, name: str) -> Any:
        return ref.build_component(name, device=self.device, dtype=self.dtype, overrides=self.profile.overrides.get(name))

    def drop(self, *names: str) -> None:
        for name in names:
            self._built.pop(name, None)
        _free(self.device)

    def clear(self) -> None:
        self.drop(*list(self._built))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Bench:
    def __init__(self, profile: BenchProfile, repeats: int):
        self.profile = profile
        self.repeats = repeats
        self.device = torch.device(profile.device)
        self.dtype = getattr(torch, profile.dtype)
        self.models = _Models(profile, self.device, self.dtype)
        self.peak = flops.bf16_peak_flops(torch.cuda.get_device_name()) if self.device.type == "cuda" else None
        self._pass_cache: dict[tuple, float] = {}

    # ------------------------------------------------------------------ helpers

    def timed(self, work: Callable[[], object]) -> float:
        """Median seconds of ``repeats`` runs after one warm-up run."""
        with torch.no_grad():
            work()
            samples = []
            for _ in range(self.repeats):
                self._sync()
                start = time.perf_counter()
                work()
                self._sync()
                samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def inputs(self, shape, batch: int = 1, **extra) -> dict:
        width, height, frames = shape
        config = self.models.get("transformer").config
        kwargs = ref.random_transformer_inputs(
            config, width, height, frames, fps=self.profile.fps, text_tokens=self.profile.text_tokens,
            batch=batch, device=self.device, dtype=self.dtype,
        )
        return dict(kwargs, return_dict=False, **extra)

    def pass_seconds(self, shape, batch: int = 1, **extra) -> float:
        key = (shape, batch, tuple(sorted((k, str(v)) for k, v in extra.items())))
        if key not in self._pass_cache:
            transformer, kwargs = self.models.get("transformer"), self.inputs(shape, batch, **extra)
            self._pass_cache[key] = self.timed(lambda: transformer(**kwargs))
        return self._pass_cache[key]

    def guided_step_seconds(self, shape) -> dict:
        """The passes one step of default guidance runs, timed each."""
        cfg = self.pass_seconds(shape, batch=2)
        stg = self.pass_seconds(shape, spatio_temporal_guidance_blocks=list(self.profile.stg_blocks))
        modality = self.pass_seconds(shape, isolate_modalities=True)
        return {"cfg_pass_batch_2": cfg, "stg_pass": stg, "modality_pass": modality, "step": cfg + stg + modality}

    def pass_shape(self, shape, batch: int = 1) -> flops.PassShape:
        width, height, frames = shape
        return flops.PassShape(
            video_tokens=ref.video_token_count(width, height, frames),
            audio_tokens=ref.audio_latent_frames(frames, self.profile.fps),
            text_tokens=self.profile.text_tokens,
            batch=batch,
        )

    def mfu(self, flop_count: float, seconds: float) -> float | None:
        return round(flops.model_flops_utilization(flop_count, seconds, self.peak), 4) if self.peak else None

    # ------------------------------------------------------------------ sections

    def machine(self) -> dict:
        info = {
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu",
            "device_count": torch.cuda.device_count() if self.device.type == "cuda" else 0,
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "python": platform.python_version(),
            "bf16_dense_peak_tflops": self.peak / 1e12 if self.peak else None,
        }
        size = 8192 if self.device.type == "cuda" else 512
        a, b = (torch.randn(size, size, device=self.device, dtype=self.dtype) for _ in range(2))
        seconds = self.timed(lambda: a @ b)
        info["matmul_tflops"] = round(2 * size**3 / seconds / 1e12, 2)
        info["matmul_how"] = f"{size}x{size}x{size} {self.profile.dtype} matmul, median of {self.repeats}"
        return info

    def step(self) -> dict:
        shape, config = self.profile.main_shape, self.models.get("transformer").config
        one = self.pass_seconds(shape)
        guided = self.guided_step_seconds(shape)
        shape_flops = self.pass_shape(shape)
        pass_flops = sum(flops.transformer_pass_flops(config, shape_flops).values())
        guidance = flops.GuidancePasses(cfg=True, stg_blocks=len(self.profile.stg_blocks), modality=True)
        step_flops = flops.guided_step_flops(config, shape_flops, guidance)
        return {
            "shape": _shape_name(shape),
            "video_tokens": shape_flops.video_tokens,
            "audio_tokens": shape_flops.audio_tokens,
            "pass_seconds": round(one, 4),
            "pass_tflop": round(pass_flops / 1e12, 2),
            "pass_mfu": self.mfu(pass_flops, one),
            "guided_step_seconds": round(guided["step"], 4),
            "guided_step_passes": {k: round(v, 4) for k, v in guided.items() if k != "step"},
            "guided_step_tflop": round(step_flops / 1e12, 2),
            "guided_step_mfu": self.mfu(step_flops, guided["step"]),
            "how": f"eager {self.profile.dtype}, native SDPA, median of {self.repeats} after a warm-up pass",
        }

    def recipes(self) -> dict:
        p = self.profile
        width, height, frames = p.main_shape
        half = (width // 2, height // 2, frames)
        step_full = self.guided_step_seconds(p.main_shape)["step"]
        step_half = self.guided_step_seconds(half)["step"]
        pass_full, pass_half = self.pass_seconds(p.main_shape), self.pass_seconds(half)
        upsample = self._upsampler_seconds(half)
        self.models.drop("transformer")
        text = self._text_seconds()
        decode = self._decode_seconds(p.main_shape)
        dev = text["two_prompts"] + p.dev_steps * step_full + decode["total"]
        distilled = text["one_prompt"] + p.distilled_steps * pass_full + decode["total"]
        two_stage_distilled = (
            text["one_prompt"] + p.distilled_steps * pass_half + upsample + p.refine_steps * pass_full + decode["total"]
        )
        two_stage_dev = text["two_prompts"] + p.dev_steps * step_half + upsample + p.refine_steps * pass_full + decode["total"]
        return {
            "shape": _shape_name(p.main_shape),
            "dev_seconds": round(dev, 3),
            "distilled_seconds": round(distilled, 3),
            "two_stage_distilled_seconds": round(two_stage_distilled, 3),
            "two_stage_dev_seconds": round(two_stage_dev, 3),
            "parts": {
                "text_encoder_and_connectors": {k: round(v, 4) for k, v in text.items()},
                "guided_step_full": round(step_full, 4),
                "guided_step_half": round(step_half, 4),
                "pass_full": round(pass_full, 4),
                "pass_half": round(pass_half, 4),
                "latent_upsampler": round(upsample, 4),
                "decode": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in decode.items()},
            },
            "how": (
                f"sum of measured parts, eager: dev = text(prompt+negative) + {p.dev_steps} guided steps + decode; "
                f"distilled = text + {p.distilled_steps} plain passes + decode; two-stage = stage 1 at {_shape_name(half)} "
                f"({p.distilled_steps} plain passes, or {p.dev_steps} guided steps for dev) + x2 latent upsampler + "
                f"{p.refine_steps} refine passes at full size + decode. The engine is not timed here; muxing excluded."
            ),
        }

    def _upsampler_seconds(self, half_shape) -> float:
        upsampler = self.models.get("latent_upsampler")
        latents = torch.randn(*ref.video_latent_shape(*half_shape), device=self.device, dtype=self.dtype)
        latents = latents[:, : upsampler.config.in_channels]
        seconds = self.timed(lambda: upsampler(latents))
        self.models.drop("latent_upsampler")
        return seconds

    def _text_seconds(self) -> dict:
        encoder, tokens = self.models.get("text_encoder"), self.profile.text_tokens
        # ids below the image markers: random ids that hit the image token would demand pixels
        vocab = min(encoder.config.text_config.vocab_size, encoder.config.boi_token_index)

        def encode(batch: int):
            ids = torch.randint(0, vocab, (batch, tokens), device=self.device)
            mask = torch.ones(batch, tokens, device=self.device, dtype=torch.long)
            return lambda: encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)

        one, two = self.timed(encode(1)), self.timed(encode(2))
        layers = encoder.config.text_config.num_hidden_layers + 1
        hidden = encoder.config.text_config.hidden_size
        self.models.drop("text_encoder")
        connectors = self.models.get("connectors")

        def connect(batch: int):
            stacked = torch.randn(batch, tokens, hidden * layers, device=self.device, dtype=self.dtype)
            mask = torch.ones(batch, tokens, device=self.device, dtype=torch.long)
            return lambda: connectors(stacked, mask)

        connect_one, connect_two = self.timed(connect(1)), self.timed(connect(2))
        self.models.drop("connectors")
        return {"one_prompt": one + connect_one, "two_prompts": two + connect_two, "gemma_one": one, "connectors_one": connect_one}

    def _decode_seconds(self, shape) -> dict:
        vae = self.models.get("vae")
        latents = torch.randn(*ref.video_latent_shape(*shape), device=self.device, dtype=self.dtype)
        latents = latents[:, : vae.config.latent_channels]
        tiled = False
        try:
            video = self.timed(lambda: vae.decode(latents))
        except torch.OutOfMemoryError:
            _free(self.device)
            vae.enable_tiling()
            tiled, video = True, self.timed(lambda: vae.decode(latents))
        self.models.drop("vae")
        audio_vae, vocoder = self.models.get("audio_vae"), self.models.get("vocoder")
        audio_shape = list(ref.audio_latent_shape(shape[2], self.profile.fps))
        audio_shape[1], audio_shape[3] = audio_vae.config.latent_channels, audio_vae.config.mel_bins // 4
        audio_latents = torch.randn(*audio_shape, device=self.device, dtype=self.dtype)
        audio = self.timed(lambda: vocoder(audio_vae.decode(audio_latents).sample))
        self.models.drop("audio_vae", "vocoder")
        return {"video_vae": video, "video_vae_tiled": tiled, "audio_vae_and_vocoder": audio, "total": video + audio}

    def throughput(self) -> dict:
        p, shape = self.profile, self.profile.small_shape
        per_job = self._per_job_other_seconds(shape)  # first: it needs the memory the transformer takes
        rows = []
        for jobs in p.concurrency:
            off = jobs * (p.distilled_steps * self.pass_seconds(shape) + per_job)
            on = p.distilled_steps * self.pass_seconds(shape, batch=jobs) + jobs * per_job
            rows.append({
                "concurrent_jobs": jobs,
                "batching_off_jobs_per_hour": round(jobs * 3600 / off, 1),
                "batching_on_jobs_per_hour": round(jobs * 3600 / on, 1),
                "batched_pass_seconds": round(self.pass_seconds(shape, batch=jobs), 4),
            })
        one_at_a_time = rows[0]["batching_off_jobs_per_hour"]
        for row in rows:
            row["on_vs_one_at_a_time"] = round(row["batching_on_jobs_per_hour"] / one_at_a_time, 3)
        return {
            "shape": _shape_name(shape),
            "recipe": f"distilled ({p.distilled_steps} steps, no guidance)",
            "per_job_outside_transformer_seconds": round(per_job, 4),
            "rows": rows,
            "how": (
                "jobs x 3600 / (steps x transformer pass + per-job text encoding and decoding); batching on = one pass "
                "of batch N per step, off = N passes of batch 1; pass times measured, the engine itself not timed"
            ),
        }

    def _per_job_other_seconds(self, shape) -> float:
        """Text encoding and decoding for one job of ``shape``: what step batching does not share."""
        key = ("other", shape)
        if key not in self._pass_cache:
            self.models.drop("transformer")  # room for the text encoder; pass times are cached already
            text = self._text_seconds()["one_prompt"]
            self._pass_cache[("text", shape)] = text
            self._pass_cache[key] = text + self._decode_seconds(shape)["total"]
        return self._pass_cache[key]

    def diffusers(self) -> dict:
        p, shape = self.profile, self.profile.small_shape
        other = self._per_job_other_seconds(shape)
        text = self._pass_cache[("text", shape)]
        seconds = bare_pipeline_seconds(self.models, p, shape, repeats=self.repeats, timed=self.timed) + text
        ours_one = p.distilled_steps * self.pass_seconds(shape) + other
        jobs = max(p.concurrency)
        ours_batched = (p.distilled_steps * self.pass_seconds(shape, batch=jobs) + jobs * other) / jobs
        return {
            "shape": _shape_name(shape),
            "recipe": f"distilled ({p.distilled_steps} steps, no guidance), one job at a time, decoded to frames and waveform",
            "diffusers_seconds_per_job": round(seconds, 3),
            "diffusers_jobs_per_hour": round(3600 / seconds, 1),
            "ours_seconds_per_job_alone": round(ours_one, 3),
            "ours_seconds_per_job_batched": round(ours_batched, 3),
            "speedup_alone": round(seconds / ours_one, 3),
            f"throughput_ratio_at_{jobs}_jobs": round(seconds / ours_batched, 3),
            "how": "LTX2Pipeline called whole with precomputed prompt embeddings (text encoder time added from ours); ours as in throughput",
        }

    def kernels(self) -> dict:
        return kernel_variants(self)

    def multi_gpu(self) -> dict:
        return sequence_parallel_seconds(self)


def _shape_name(shape) -> str:
    return "x".join(str(v) for v in shape)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- report


def render_markdown(report: dict) -> str:
    """One table per section: figure, value."""
    lines = [f"# GPU benchmark: {report['profile']}", "", report["description"], "", f"Date: {report['date']}", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    for name, section in report["sections"].items():
        lines += [f"## {name}", "", "| figure | value |", "| --- | --- |"]
        for key, value in _flatten(section):
            lines.append(f"| {key} | {value} |")
        lines.append("")
    return "\n".join(lines)


def _flatten(section: dict, prefix: str = ""):
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for index, row in enumerate(value):
                yield from _flatten(row, f"{prefix}{key}[{index}].")
        else:
            yield f"{prefix}{key}", value


def _register() -> None:
    """``reelserve bench``'s GPU section (where a GPU exists); importing the registry needs nothing heavy."""
    @register_section("gpu", title="GPU: LTX-2 19B dims with random weights", needs_gpu=True)
    def gpu_section(context) -> SectionResult:
        report = run("ltx2-19b-random", Path(context.out_dir) / "gpu")
        text = (Path(context.out_dir) / "gpu" / "gpu-bench.md").read_text()
        return SectionResult(name="gpu", title="GPU, real LTX-2 dims", data=report, markdown=text)


_register()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ltx2-19b-random", help="ltx2-19b-random (one GPU) or tiny (CPU)")
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu-bench.json and gpu-bench.md")
    parser.add_argument("--sections", default="", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median; default per profile)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()] or None
    try:
        command = "python -m serving.bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
        report = run(args.profile, args.out, sections=sections, repeats=args.repeats, command=command)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    print((args.out / "gpu-bench.md").read_text())
    return 0 if all("error" not in s for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
