"""The GPU benchmark of MiniMax-H3 at its released dims with random bf16 weights, on one GPU.

    reelserve bench --profile minimax-h3-random [--section step ...]
    python -m serving.bench.gpu_h3 --profile minimax-h3-random --out DIR [--sections step,batching]

Speed depends on shapes, not on weight values: every component is built at the
released size (``serving/families/minimax_h3/reference.py``) with random
weights, on the GPU, one big model at a time (a 61.7 GiB transformer partition,
then the 66.7 GB Qwen3-VL-32B). Sections, each runnable alone:

- ``machine``: the GPU, versions, its bf16 peak and the matmul rate it reaches.
- ``step``: one transformer pass (= one denoising step: H3 is guidance-distilled)
  at the main shape for t2va, and for ref2va with 3 reference images at the
  2048-pixel short edge and a 2 s reference video with its soundtrack (the
  layout built by diffusers' own layout blocks); FLOPs
  from the config, MFU; and the denoising loop it implies (steps - 1 passes).
- ``batching``: one pass at the smaller shape with 1, 2 and 4 requests of one
  layout in the batch, against the same requests one pass each.
- ``text_encoder``: Qwen3-VL-32B over the prompt, every hidden state kept (as
  the blocks run it).
- ``decoders``: the video VAE's decoder (tiled, as released) over the main shape's
  latents, and the audio VAE's decoder.

Output: ``gpu-bench-h3.json`` and ``gpu-bench-h3.md`` in ``--out``. Needs torch and
diffusers (transformers for the text encoder); not Ray, not PyAV.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from serving.bench.gpu_profiles import BenchProfile, get_profile
from serving.families.ltx2.flops import bf16_peak_flops, model_flops_utilization
from serving.families.minimax_h3 import reference
from serving.families.minimax_h3.config import FPS, latent_frame_count
from serving.families.minimax_h3.flops import transformer_pass_flops

__all__ = ["SECTIONS", "main", "render_markdown", "run"]

SECTIONS = ("machine", "step", "batching", "text_encoder", "decoders")
# Reference images are encoded at 2048 pixels on the short edge where the canvas has 768: smaller profiles scale both.
_REFERENCE_EDGE_PER_CANVAS_EDGE = 2048 / 768


def run(profile: str, out_dir: Path, *, sections: list[str] | None = None, repeats: int | None = None,
        command: str | None = None) -> dict:
    """Run the chosen sections (all by default); write ``gpu-bench-h3.json`` and ``gpu-bench-h3.md``."""
    settings = get_profile(profile)
    if settings.family != "minimax_h3":
        raise ValueError(f"--profile: {profile} is not a MiniMax-H3 profile")
    chosen = list(sections or SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; sections are {list(SECTIONS)}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"profile {profile} needs a CUDA GPU and none is visible; the CPU profile is minimax-h3-tiny")
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    bench = _Bench(settings, repeats or settings.repeats)
    report: dict[str, Any] = {
        "profile": settings.name, "description": settings.description, "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "sections": {},
    }
    for name in [s for s in SECTIONS if s in chosen]:
        started = time.perf_counter()
        try:
            report["sections"][name] = getattr(bench, name)()
        except Exception as error:  # noqa: BLE001 - one failed section is reported; the others still run
            report["sections"][name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        report["sections"][name]["section_seconds"] = round(time.perf_counter() - started, 2)
        report["sections"][name]["peak_memory_gb"] = bench.peak_memory_gb()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-bench-h3.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "gpu-bench-h3.md").write_text(render_markdown(report))
    return report


class _Bench:
    def __init__(self, profile: BenchProfile, repeats: int):
        self.profile, self.repeats = profile, repeats
        self.device = torch.device(profile.device)
        self.dtype = getattr(torch, profile.dtype)
        self.peak = bf16_peak_flops(torch.cuda.get_device_name()) if self.device.type == "cuda" else None
        self._transformer: torch.nn.Module | None = None
        self._passes: dict[tuple, float] = {}

    # ------------------------------------------------------------------ helpers

    def timed(self, work: Callable[[], object]) -> float:
        """Median seconds of ``repeats`` runs after one warm-up run."""
        with torch.no_grad():
            work()
            samples = []
            for _ in range(self.repeats):
                self._sync()
                started = time.perf_counter()
                work()
                self._sync()
                samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 1e9
        torch.cuda.reset_peak_memory_stats(self.device)
        return round(peak, 2)

    def build(self, name: str) -> Any:
        return reference.build_component(name, self.device, self.dtype, self.profile.overrides.get(name))

    def drop_transformer(self) -> None:
        self._transformer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def transformer(self) -> torch.nn.Module:
        if self._transformer is None:
            self._transformer = self.build("transformer")
        return self._transformer

    def mfu(self, flops: float, seconds: float) -> float | None:
        return round(model_flops_utilization(flops, seconds, self.peak), 4) if self.peak else None

    def pass_seconds(self, shape, batch: int = 1, references: bool = False) -> tuple[float, dict]:
        """Seconds of one pass over ``batch`` requests of one layout at ``shape``; the pass's inputs (for sizes)."""
        width, height, frames = shape
        inputs = reference.random_transformer_inputs(
            width, height, frames / FPS, self.profile.text_tokens, batch=batch, references=references,
            reference_short_edge=round(height * _REFERENCE_EDGE_PER_CANVAS_EDGE / 32) * 32,
            num_inference_steps=self.profile.dev_steps, device=self.device, dtype=self.dtype,
        )
        key = (shape, batch, references)
        if key not in self._passes:
            transformer = self.transformer
            self._passes[key] = self.timed(lambda: transformer(**inputs))
        return self._passes[key], inputs

    def _config(self) -> dict:
        return {**reference.component_config("transformer"), **self.profile.overrides.get("transformer", {})}

    def pass_flops(self, inputs: dict) -> float:
        rows = int(inputs["position_ids"].shape[0])
        batch = int(inputs["hidden_states"].shape[0])
        return sum(transformer_pass_flops(self._config(), rows, int(inputs["text_indices"].numel()), batch).values())

    # ------------------------------------------------------------------ sections

    def machine(self) -> dict:
        info = {
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "bf16_dense_peak_tflops": self.peak / 1e12 if self.peak else None,
        }
        size = 8192 if self.device.type == "cuda" else 512
        a, b = (torch.randn(size, size, device=self.device, dtype=self.dtype) for _ in range(2))
        info["matmul_tflops"] = round(2 * size**3 / self.timed(lambda: a @ b) / 1e12, 2)
        return info

    def step(self) -> dict:
        shape, steps = self.profile.main_shape, self.profile.dev_steps
        figures: dict[str, Any] = {"shape": "x".join(map(str, shape)), "how": f"eager {self.profile.dtype}, native SDPA, median of "
                   f"{self.repeats} after a warm-up pass; a denoising step is one pass (guidance-distilled)"}
        for workflow, references in (("t2va", False), ("ref2va", True)):
            seconds, inputs = self.pass_seconds(shape, references=references)
            flops = self.pass_flops(inputs)
            figures[workflow] = {
                "packed_rows": int(inputs["position_ids"].shape[0]),
                "video_rows": int(inputs["hidden_states"].shape[1]),
                "pass_seconds": round(seconds, 4),
                "pass_tflop": round(flops / 1e12, 2),
                "pass_mfu": self.mfu(flops, seconds),
                f"denoise_seconds_{steps}_steps": round((steps - 1) * seconds, 2),
            }
        return figures

    def batching(self) -> dict:
        shape = self.profile.small_shape
        single, _ = self.pass_seconds(shape)
        rows = []
        for batch in self.profile.concurrency:
            seconds, _ = self.pass_seconds(shape, batch=batch)
            rows.append({"requests": batch, "batched_pass_seconds": round(seconds, 4),
                         "one_by_one_seconds": round(batch * single, 4),
                         "throughput_gain": round(batch * single / seconds, 3)})
        return {"shape": "x".join(map(str, shape)), "rows": rows,
                "how": "one pass of batch N (N requests of one packed layout at one step) against N passes of batch 1"}

    def text_encoder(self) -> dict:
        self.drop_transformer()  # one 60+ GB model at a time
        tokens = self.profile.text_tokens
        return {"prompt_tokens": tokens, "seconds": round(self._encode_seconds(tokens), 4),
                "how": "Qwen3-VL-32B's decoder over the prompt with every hidden state kept (the blocks read layer 50)"}

    def _encode_seconds(self, tokens: int) -> float:
        encoder = self.build("text_encoder")  # freed on return
        ids = torch.randint(0, 151_000, (1, tokens), device=self.device)  # below the vision special tokens
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids),
                  "use_cache": False, "output_hidden_states": True}
        return self.timed(lambda: encoder.model(**kwargs))

    def decoders(self) -> dict:
        self.drop_transformer()
        width, height, frames = self.profile.main_shape
        video_latents = (1, 24, latent_frame_count(frames), height // 16, width // 16)
        audio_latents = (2, 32, round(frames / FPS * 40))
        return {"shape": "x".join(map(str, self.profile.main_shape)),
                "video_vae_seconds": round(self._decode_seconds("vae", video_latents), 4),
                "audio_vae_seconds": round(self._decode_seconds("audio_vae", audio_latents), 4),
                "how": "tiled video decode (256-pixel tiles, as released)"}

    def _decode_seconds(self, name: str, shape: tuple[int, ...]) -> float:
        vae = self.build(name)  # freed on return
        latents = torch.randn(*shape, device=self.device, dtype=self.dtype)
        return self.timed(lambda: vae.decode(latents))


# --------------------------------------------------------------------------- report


def render_markdown(report: dict) -> str:
    lines = [f"# GPU benchmark: {report['profile']}", "", report["description"], "", f"Date: {report['date']}", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    for name, section in report["sections"].items():
        lines += [f"## {name}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in _flatten(section)]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench.gpu_h3", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="minimax-h3-random", help="minimax-h3-random (one GPU) or minimax-h3-tiny")
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu-bench-h3.json and gpu-bench-h3.md")
    parser.add_argument("--sections", default="", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median; default per profile)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()] or None
    command = "python -m serving.bench.gpu_h3 " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        report = run(args.profile, args.out, sections=sections, repeats=args.repeats, command=command)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    print((args.out / "gpu-bench-h3.md").read_text())
    return 0 if all("error" not in s for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
