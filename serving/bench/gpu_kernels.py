"""The headline pass under each speed switch, each variant on a freshly built transformer."""

from __future__ import annotations

import tempfile
import time

import torch

from serving.families.ltx2.config import SpeedConfig
from serving.families.ltx2.speed import SpeedSettingError, apply_speed, check_speed_settings, warm_up

__all__ = ["kernel_variants", "VARIANTS"]

# name -> SpeedConfig settings; each on top of eager bf16.
VARIANTS: dict[str, dict] = {
    "attention_auto": {"attention_backend": "auto"},
    "compile": {"attention_backend": "auto", "compile": True},
    "fp8_compile": {"attention_backend": "auto", "compile": True, "fp8": True},
    "compile_cuda_graphs": {"attention_backend": "auto", "compile": True, "cuda_graphs": True},
}


def kernel_variants(bench) -> dict:
    shape = bench.profile.main_shape
    eager = bench.pass_seconds(shape)
    results = {"shape": "x".join(map(str, shape)), "eager_pass_seconds": round(eager, 4), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="reelserve-compile-") as cache:
        for name, settings in VARIANTS.items():
            results["variants"][name] = _variant(bench, shape, settings, cache, eager)
    results["how"] = (
        "each variant: a fresh random-weight transformer, speed switches applied, compiled variants warmed up "
        "(compile time reported) in a fresh cache directory, then the pass timed like the eager one"
    )
    return results


def _variant(bench, shape, settings: dict, cache: str, eager: float) -> dict:
    width, height, frames = shape
    speed = SpeedConfig(**settings, compile_cache_dir=cache, shape_buckets=[f"{width}x{height}x{frames}"],
                        text_tokens=bench.profile.text_tokens)
    try:
        check_speed_settings(speed, bench.device)
    except SpeedSettingError as error:
        return {"refused": str(error)}
    if speed.compile and bench.device.type != "cuda":
        return {"skipped": "compiling on the CPU takes a minute here; tests/serving/families/ltx2/test_speed.py covers it"}
    bench.models.drop("transformer")
    transformer = bench.models.get("transformer")
    try:
        applied = apply_speed(transformer, speed, bench.device, bench.dtype)
    except SpeedSettingError as error:
        bench.models.drop("transformer")
        return {"refused": str(error)}
    started = time.perf_counter()
    if speed.compile:
        warm_up(transformer, speed, applied, fps=bench.profile.fps)  # the pass timed below: the plain one
    compile_seconds = time.perf_counter() - started
    inputs = bench.inputs(shape)
    seconds = bench.timed(lambda: transformer(**inputs))
    bench.models.drop("transformer")
    torch._dynamo.reset()  # compiled code holds on to the dropped model otherwise
    return {
        "pass_seconds": round(seconds, 4),
        "speedup_vs_eager": round(eager / seconds, 3),
        "warmup_seconds": round(compile_seconds, 2) if speed.compile else None,
        "attention": {"unmasked": applied.attention.unmasked, "masked": applied.attention.masked,
                      "passed_over": applied.attention.passed_over},
        "fp8": applied.fp8,
        "cuda_graphs": applied.cuda_graphs,
    }
