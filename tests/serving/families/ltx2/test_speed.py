"""Speed switches on the CPU: each works (same output) or is refused naming its config field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from serving.families.ltx2 import speed as speed
from serving.families.ltx2.config import SpeedConfig
from serving.families.ltx2.reference import random_transformer_inputs

REPO_ROOT = Path(__file__).resolve().parents[4]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_transformer():
    from serving.families.ltx2.tiny import tiny_ltx2_components  # noqa: PLC0415 - keeps collection of `make check` fast

    return tiny_ltx2_components()["transformer"].eval()


def small_inputs(transformer, batch=1):
    inputs = random_transformer_inputs(
        transformer.config, 64, 64, 9, text_tokens=16, batch=batch, dtype=torch.float32, seed=1, timestep=700.0
    )
    return dict(inputs, return_dict=False)


@torch.no_grad()
def test_defaults_change_nothing_on_the_cpu(tiny_transformer):
    inputs = small_inputs(tiny_transformer)
    before = tiny_transformer(**inputs)
    applied = speed.apply_speed(tiny_transformer, SpeedConfig(), CPU, torch.float32)
    after = tiny_transformer(**inputs)
    assert (applied.attention.unmasked, applied.attention.masked) == ("native", "native")
    assert not (applied.compiled or applied.fp8 or applied.cuda_graphs)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@torch.no_grad()
def test_masked_and_unmasked_layers_get_their_own_backend(tiny_transformer):
    inputs = small_inputs(tiny_transformer)
    expected = tiny_transformer(**inputs)
    choice = speed.AttentionChoice(unmasked="_native_math", masked="native")
    speed._set_attention_backends(tiny_transformer, choice)
    try:
        got = tiny_transformer(**inputs)
        backends = {
            name: module.processor._attention_backend.value
            for name, module in tiny_transformer.named_modules()
            if hasattr(getattr(module, "processor", None), "_attention_backend")
        }
    finally:
        speed._set_attention_backends(tiny_transformer, speed.AttentionChoice("native", "native"))
    assert backends["transformer_blocks.0.attn2"] == backends["transformer_blocks.1.audio_attn2"] == "native"
    assert backends["transformer_blocks.0.attn1"] == backends["transformer_blocks.1.audio_to_video_attn"] == "_native_math"
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expected, got))


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"fp8": True}, "model.speed.fp8"),
        ({"compile": True, "cuda_graphs": True}, "model.speed.cuda_graphs"),
        ({"attention_backend": "flash"}, "model.speed.attention_backend"),
        ({"attention_backend": "fastest"}, "model.speed.attention_backend"),
    ],
)
def test_what_the_cpu_cannot_do_is_refused_naming_the_field(tiny_transformer, settings, field):
    config = SpeedConfig(**settings)
    with pytest.raises(speed.SpeedSettingError, match=field.replace(".", r"\.")):
        speed.check_speed_settings(config, CPU)
    weight = tiny_transformer.proj_in.weight.clone()
    with pytest.raises(speed.SpeedSettingError):
        speed.apply_speed(tiny_transformer, config, CPU, torch.bfloat16)
    assert tiny_transformer.proj_in.weight.dtype == torch.float32  # refused before anything was touched
    assert torch.equal(weight, tiny_transformer.proj_in.weight)


def test_warm_up_runs_every_bucket_batch_and_guidance_pass(tiny_transformer):
    config = SpeedConfig(shape_buckets=["64x64x9", "128x64x9"], warmup_batch_sizes=[1, 2], text_tokens=16)
    applied = speed.apply_speed(tiny_transformer, config, CPU, torch.float32)
    warmed = speed.warm_up(tiny_transformer, config, applied, stg_blocks=[1])
    assert sorted(warmed) == sorted(
        f"{bucket}/b{batch}/{name}"
        for bucket in ("64x64x9", "128x64x9") for batch in (1, 2) for name in ("plain", "stg", "isolated")
    )
    assert all(seconds > 0 for seconds in warmed.values())


def test_speed_settings_load_from_yaml_style_dicts():
    config = load_config({"model": {"speed": {"compile": True, "shape_buckets": ["512x512x121"], "warmup_batch_sizes": [1, 2]}}})
    assert config.model.speed.compile and config.model.speed.shape_buckets == ["512x512x121"]
    with pytest.raises(ValueError, match="WIDTHxHEIGHTxFRAMES"):
        load_config({"model": {"speed": {"shape_buckets": ["1280x704"]}}})
    with pytest.raises(ValueError, match="set compile: true"):
        load_config({"model": {"speed": {"cuda_graphs": True}}})
    with pytest.raises(ValueError, match="extra"):
        load_config({"model": {"speed": {"fp4": True}}})


@pytest.mark.parametrize(
    "bucket, why",
    [
        ("1280x704x121", "above the request limits"),  # the tiny model's max_width is 1024
        ("512x512x257", "above max_latent_tokens"),  # 33 x 16 x 16 latent tokens > 8192
        ("500x512x121", "multiples of 32"),
        ("512x512x120", "8k + 1"),
        ("512x512x1209", "above the longest request"),
    ],
)
def test_a_warmup_shape_above_the_request_limits_is_refused_naming_the_field(bucket, why):
    from graphs import build_app  # noqa: PLC0415 - keeps collection of `make check` fast

    for refuse in (load_config, build_app):
        with pytest.raises(ValueError, match=rf"model.speed.shape_buckets\[0\] \({bucket}\).*{re.escape(why)}"):
            refuse({"model": {"speed": {"shape_buckets": [bucket]}}})


_COMPILE_RUN = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    from serving.families.ltx2.config import SpeedConfig
    from serving.families.ltx2 import speed as speed
    from serving.families.ltx2.reference import random_transformer_inputs
    from serving.families.ltx2.tiny import tiny_ltx2_components

    transformer = tiny_ltx2_components()["transformer"].eval()
    config = SpeedConfig(compile=True, compile_cache_dir=sys.argv[1], shape_buckets=["64x64x9"])
    inputs = random_transformer_inputs(transformer.config, 64, 64, 9, text_tokens=config.text_tokens,
                                       dtype=torch.float32, seed=1, timestep=700.0)
    inputs["return_dict"] = False
    with torch.no_grad():
        eager = transformer(**inputs)
        applied = speed.apply_speed(transformer, config, "cpu", torch.float32)
        speed.warm_up(transformer, config, applied)
        compiled = transformer(**inputs)
    print(json.dumps({
        "max_difference": max((a - b).abs().max().item() for a, b in zip(eager, compiled)),
        "loaded_artifacts": applied.loaded_cache_artifacts,
        "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "warmed": sorted(applied.warmup_seconds),
    }))
    """
)


@pytest.mark.slow
def test_regional_compile_on_the_cpu_matches_eager_and_is_reused_after_a_restart(tmp_path):
    """Two processes, one cache directory: the second finds the first one's kernels."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _COMPILE_RUN, str(tmp_path / "compile")],
            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=400,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["max_difference"] < 1e-5 and second["max_difference"] < 1e-5
    assert first["compiled_graphs"] >= 1  # the block was compiled (once, for both block instances)
    assert not first["loaded_artifacts"] and first["cache_hits"] == 0
    assert second["loaded_artifacts"] and second["cache_hits"] >= 1
    assert (tmp_path / "compile" / "inductor").is_dir()
    assert first["warmed"] == ["64x64x9/b1/plain"]


def test_attention_probe_checks_backends_against_math_with_and_without_a_mask():
    for name in ("native", "_native_math"):
        for masked in (False, True):
            reason, seconds = speed._probe(name, CPU, torch.float32, (2, 8), tokens=64, masked=masked)
            assert reason is None and seconds > 0, (name, masked, reason)
    assert "flash-attn" in speed._unusable_reason("flash")  # not installed here: passed over with diffusers' reason
    assert speed._unusable_reason("native") is None
