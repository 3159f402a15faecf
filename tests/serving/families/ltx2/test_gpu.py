"""On a CUDA GPU: the speed switches agree with eager bf16, and a real-size block fits its memory bound.

Tolerances (max |switch - eager| / max |eager| over the video output):
- regional compile, with or without CUDA graphs: 2e-2 (bf16 kernels fused differently);
- another attention backend: 2e-2 (SageAttention: 8e-2, it quantises Q and K to int8);
- FP8 weights and matmuls: 1.5e-1, and cosine similarity >= 0.99.
"""

from __future__ import annotations

import pytest
import torch

from serving.bench.gpu import run
from serving.families.ltx2 import reference as ref
from serving.families.ltx2 import speed as speed
from serving.families.ltx2.config import SpeedConfig

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
SHAPE = (768, 512, 25)  # 5 latent frames x 16 x 24 = 1920 video tokens
REAL_WIDTHS_TWO_BLOCKS = {"num_layers": 2}


def _transformer():
    return ref.build_component("transformer", device=CUDA, dtype=torch.bfloat16, seed=0, overrides=REAL_WIDTHS_TWO_BLOCKS)


def _inputs(config):
    width, height, frames = SHAPE
    kwargs = ref.random_transformer_inputs(config, width, height, frames, text_tokens=256, device=CUDA, seed=1, timestep=600.0)
    return dict(kwargs, return_dict=False)


@pytest.fixture(scope="module")
def eager():
    model = _transformer()
    inputs = _inputs(model.config)
    with torch.no_grad():
        video, audio = model(**inputs)
    del model
    torch.cuda.empty_cache()
    return inputs, video.float(), audio.float()


def _relative_error(got, expected):
    return ((got.float() - expected).abs().max() / expected.abs().max()).item()


def _run_with(settings: dict, inputs):
    model = _transformer()
    config = SpeedConfig(**settings)
    applied = speed.apply_speed(model, config, CUDA, torch.bfloat16)
    with torch.no_grad():
        for _ in range(2 if config.cuda_graphs else 1):  # CUDA graphs: record, then replay
            model(**inputs)
        video, audio = model(**inputs)
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return applied, video, audio


@pytest.mark.parametrize("settings", [{"compile": True}, {"compile": True, "cuda_graphs": True}], ids=["compile", "cuda-graphs"])
def test_compiled_blocks_agree_with_eager(eager, settings, tmp_path):
    inputs, video, audio = eager
    _, got_video, got_audio = _run_with({**settings, "compile_cache_dir": str(tmp_path)}, inputs)
    assert _relative_error(got_video, video) <= 2e-2
    assert _relative_error(got_audio, audio) <= 2e-2


def test_every_usable_attention_backend_agrees_with_eager(eager):
    inputs, video, _ = eager
    choice = speed.choose_attention_backends("auto", CUDA, torch.bfloat16, (32, 128))
    usable = sorted(set(choice.probe_seconds) - {name for name in choice.passed_over})
    assert "native" in usable
    for backend in usable:
        _, got, _ = _run_with({"attention_backend": backend}, inputs)
        assert _relative_error(got, video) <= (8e-2 if backend.startswith("sage") else 2e-2), backend


def test_fp8_agrees_with_eager_within_its_precision(eager):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    pytest.importorskip("torchao")
    inputs, video, _ = eager
    applied, got, _ = _run_with({"fp8": True}, inputs)
    assert applied.fp8
    assert _relative_error(got, video) <= 0.15
    cosine = torch.nn.functional.cosine_similarity(got.float().flatten(), video.flatten(), dim=0).item()
    assert cosine >= 0.99


def test_one_real_block_at_1280x704x121_fits_its_memory_bound():
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel  # noqa: PLC0415 - keeps collection of `make check` fast

    config = ref.component_config("transformer")
    full = ref.build_component("transformer", device="meta")
    block_meta = full.transformer_blocks[0]
    block_parameters = sum(p.numel() for p in block_meta.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    one_block = ref.build_component("transformer", device=CUDA, dtype=torch.bfloat16, overrides={"num_layers": 1})
    assert isinstance(one_block, LTX2VideoTransformer3DModel)
    weights = torch.cuda.memory_allocated() - before
    outside_blocks = ref.component_size("transformer").parameters - 48 * block_parameters
    # bf16 weights take what the meta count says (the allocator rounds each tensor up to 512 bytes)
    assert weights == pytest.approx((block_parameters + outside_blocks) * 2, rel=1e-3)

    width, height, frames = 1280, 704, 121
    inputs = dict(ref.random_transformer_inputs(one_block.config, width, height, frames, device=CUDA), return_dict=False)
    torch.cuda.synchronize()
    resting = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        video, _ = one_block(**inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - resting
    bound = ref.block_activation_bytes_bound(
        config, ref.video_token_count(width, height, frames), ref.audio_latent_frames(frames, 24.0), 1024
    )
    assert video.shape == (1, 14080, 128)
    assert peak <= bound, f"one block at 1280x704x121 used {peak / 1e9:.2f} GB over its inputs; bound {bound / 1e9:.2f} GB"
    # and 48 blocks' weights + this working set fit an 80 GB GPU with room for the rest of the pass
    assert ref.component_size("transformer").bytes + bound < 80e9 * 0.75


def test_two_gpus_run_the_sequence_parallel_pass(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")

    report = run("ltx2-19b-random", tmp_path, sections=["multi_gpu"], repeats=1)
    multi = report["sections"]["multi_gpu"]
    assert "error" not in multi and multi["backend"] == "nccl" and multi["sharded_pass_seconds"] > 0
