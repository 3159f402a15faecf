"""FLOPs computed from the config equal torch's own FLOP counter on real modules (CPU and meta device)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from serving.families.ltx2 import flops as flops
from serving.families.ltx2 import reference as ref

SMALL = dict(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
    audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=4,
    audio_cross_attention_dim=8, num_layers=2, caption_channels=32, rope_double_precision=False,
)


def counted_flops(model, shape: flops.PassShape, latent: tuple[int, int, int], device="cpu", dtype=torch.float32, **call):
    """Run one forward under torch's FLOP counter (math attention, so its products are counted too)."""
    config, b = model.config, shape.batch
    f, h, w = latent
    assert f * h * w == shape.video_tokens
    make = dict(device=device, dtype=dtype)
    timestep = torch.full((b, shape.video_tokens) if shape.per_token_timesteps else (b,), 500.0, device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(
            hidden_states=torch.randn(b, shape.video_tokens, config.in_channels, **make),
            audio_hidden_states=torch.randn(b, shape.audio_tokens, config.audio_in_channels, **make),
            encoder_hidden_states=torch.randn(b, shape.text_tokens, config.caption_channels, **make),
            audio_encoder_hidden_states=torch.randn(b, shape.text_tokens, config.caption_channels, **make),
            timestep=timestep,
            audio_timestep=torch.full((b,), 500.0, device=device),
            encoder_attention_mask=torch.ones(b, shape.text_tokens, device=device),
            audio_encoder_attention_mask=torch.ones(b, shape.text_tokens, device=device),
            num_frames=f, height=h, width=w, audio_num_frames=shape.audio_tokens, return_dict=False, **call,
        )
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def small_transformers():
    from diffusers import LTX2VideoTransformer3DModel  # noqa: PLC0415 - keeps collection of `make check` fast

    torch.manual_seed(0)
    plain = LTX2VideoTransformer3DModel(**SMALL, rope_type="split").eval()
    perturbable = LTX2VideoTransformer3DModel(**SMALL, rope_type="split", perturbed_attn=True).eval()
    return plain, perturbable


@pytest.mark.parametrize(
    "shape, call",
    [
        (flops.PassShape(60, 7, 11), {}),
        (flops.PassShape(60, 7, 11, batch=2), {}),
        (flops.PassShape(60, 7, 11), {"isolate_modalities": True}),
        (flops.PassShape(60, 7, 11, per_token_timesteps=True), {}),
    ],
    ids=["one", "batch-of-2", "modality-isolated", "per-token-timesteps"],
)
def test_small_pass_matches_torch_flop_counter(small_transformers, shape, call):
    plain, _ = small_transformers
    expected = counted_flops(plain, shape, (3, 4, 5), **call)
    computed = flops.transformer_pass_flops(plain.config, shape, isolate_modalities=call.get("isolate_modalities", False))
    assert sum(computed.values()) == expected


def test_stg_shortcut_counted_only_where_the_checkpoint_has_it(small_transformers):
    plain, perturbable = small_transformers
    shape = flops.PassShape(60, 7, 11)
    stg = {"spatio_temporal_guidance_blocks": [1]}
    for model in (plain, perturbable):
        expected = counted_flops(model, shape, (3, 4, 5), **stg)
        assert sum(flops.transformer_pass_flops(model.config, shape, perturbed_blocks=1).values()) == expected
    full = sum(flops.transformer_pass_flops(perturbable.config, shape).values())
    assert sum(flops.transformer_pass_flops(perturbable.config, shape, perturbed_blocks=1).values()) < full


def test_real_19b_pass_at_1280x704x121_matches_the_counter_on_meta():
    model = ref.build_meta("transformer")
    shape = flops.PassShape(video_tokens=16 * 22 * 40, audio_tokens=126, text_tokens=1024)
    computed = flops.transformer_pass_flops(ref.component_config("transformer"), shape)
    expected = counted_flops(model, shape, (16, 22, 40), device="meta", dtype=torch.bfloat16)
    assert sum(computed.values()) == expected
    assert sum(computed.values()) == pytest.approx(536.7e12, rel=1e-3)
    # where the work is: video self-attention and the video feed-forward dominate
    assert computed["video_self_attention"] > computed["video_ffn"] > computed["video_text_cross_attention"]


def test_guided_step_is_the_sum_of_its_passes(small_transformers):
    plain, _ = small_transformers
    shape = flops.PassShape(60, 7, 11)
    one = sum(flops.transformer_pass_flops(plain.config, shape).values())
    isolated = sum(flops.transformer_pass_flops(plain.config, shape, isolate_modalities=True).values())
    default = flops.guided_step_flops(plain.config, shape, flops.GuidancePasses())
    assert default == 2 * one + one + isolated  # cond+uncond batch, STG pass (no shortcut here), modality pass
    assert flops.guided_step_flops(plain.config, shape, flops.GuidancePasses.none()) == one


def test_mfu_and_peaks():
    assert flops.model_flops_utilization(500e12, 1.0, 1000e12) == pytest.approx(0.5)
    assert flops.bf16_peak_flops("NVIDIA H100 80GB HBM3") == flops.BF16_DENSE_PEAK["H100 SXM"]
    assert flops.bf16_peak_flops("NVIDIA H100 PCIe") == flops.BF16_DENSE_PEAK["H100 PCIe"]
    assert flops.bf16_peak_flops("NVIDIA H200") == flops.BF16_DENSE_PEAK["H200"]
    assert flops.bf16_peak_flops("NVIDIA H20") == flops.BF16_DENSE_PEAK["H20"]
    assert flops.bf16_peak_flops("cpu") is None
    with pytest.raises(ValueError):
        flops.model_flops_utilization(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        flops.transformer_pass_flops({**ref.component_config("transformer"), "cross_attention_dim": 8}, flops.PassShape(1, 1, 1))
