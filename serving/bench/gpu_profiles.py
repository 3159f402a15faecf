"""Benchmark profiles: which model dims and shapes the GPU benchmark measures.

``ltx2-19b-random`` is the real LTX-2 19B + Gemma 3 12B architecture with
random weights (speed depends on shapes, not on weight values). ``tiny`` has
the same structure at widths a CPU runs in seconds, so every code path of the
benchmark is exercised without a GPU. ``minimax-h3-random`` and ``minimax-h3-tiny``
are the same pair for MiniMax-H3 (``serving.bench.gpu_h3``): its 33B transformer
partition, Qwen3-VL-32B and VAEs at the released dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BenchProfile", "PROFILES", "get_profile"]


@dataclass(frozen=True)
class BenchProfile:
    name: str
    description: str
    device: str  # "cuda" or "cpu"
    dtype: str
    main_shape: tuple[int, int, int]  # width, height, frames: the headline step and the recipes
    small_shape: tuple[int, int, int]  # the throughput and bare-pipeline workload
    text_tokens: int
    fps: float = 24.0
    dev_steps: int = 30  # LTX2Pipeline's default
    distilled_steps: int = 8  # len(DISTILLED_SIGMAS) - 1
    refine_steps: int = 3  # len(DISTILLED_REFINE_SIGMAS) - 1
    stg_blocks: tuple[int, ...] = (28,)
    concurrency: tuple[int, ...] = (1, 2, 4)
    repeats: int = 3
    cpu_threads: int | None = None  # pin torch's CPU threads (tiny ops on shared CPUs: 1 thread is fastest and steadiest)
    overrides: dict[str, dict] = field(default_factory=dict)  # per component, over the real configs
    family: str = "ltx2"  # whose benchmark runs the profile: serving.bench.gpu (ltx2) or gpu_h3 (minimax_h3)


_TINY_TEXT = {
    "text_config": {
        "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 1024,
        "sliding_window": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    },
    "vision_config": {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": 28, "patch_size": 14,
    },
    "mm_tokens_per_image": 4,
    "boi_token_index": 500,
    "eoi_token_index": 501,
    "image_token_index": 502,
}

_TINY: dict[str, dict] = {
    "transformer": dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=32, rope_double_precision=False,
    ),
    "connectors": dict(
        caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_double_precision=False,
    ),
    "vae": dict(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
    ),
    "audio_vae": dict(base_channels=8, ch_mult=(1,), num_res_blocks=1, resolution=32, latent_channels=2, mel_bins=16),
    "vocoder": dict(in_channels=32, hidden_channels=16, upsample_kernel_sizes=[10, 8, 8], upsample_factors=[5, 4, 8],
                    resnet_kernel_sizes=[3], resnet_dilations=[[1, 3]], output_sampling_rate=16000),
    "text_encoder": _TINY_TEXT,
    "latent_upsampler": dict(in_channels=8, mid_channels=32, num_blocks_per_stage=1),  # GroupNorm: 32 groups
}

PROFILES = {
    "ltx2-19b-random": BenchProfile(
        name="ltx2-19b-random",
        description="LTX-2 19B + Gemma 3 12B real dims, random bf16 weights, one GPU (nothing downloaded)",
        device="cuda",
        dtype="bfloat16",
        main_shape=(1280, 704, 121),
        small_shape=(768, 512, 121),
        text_tokens=1024,
    ),
    "tiny": BenchProfile(
        name="tiny",
        description="the same structure at tiny widths, float32 on the CPU (exercises every code path in seconds)",
        device="cpu",
        dtype="float32",
        main_shape=(128, 64, 17),
        small_shape=(64, 64, 9),
        text_tokens=16,
        stg_blocks=(1,),
        repeats=1,
        cpu_threads=1,
        overrides=_TINY,
    ),
}


# MiniMax-H3: the tiny profile keeps the structure (packed layout, both references, the decoders) at CPU widths.
_H3_TINY: dict[str, dict] = {
    "transformer": {"num_attention_heads": 2, "attention_head_dim": 96, "hidden_size": 64, "num_layers": 2,
                    "num_refiner_layers": 1, "ffn_dim": 128, "text_dim": 5120, "freq_dim": 32,
                    "time_embed_hidden_dim": 64, "time_embed_dim": 32},
    "text_encoder": {
        "text_config": {"vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                        "max_position_embeddings": 4096,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                            "mrope_interleaved": True}},
        "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                          "out_hidden_size": 32, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
    },
    "vae": {"block_out_channels": (8, 8, 8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
            "decoder_num_layers": 1, "decoder_num_attention_heads": 2, "decoder_attention_head_dim": 8,
            "decoder_num_register_tokens": 1, "decoder_ffn_mult": 2},
    "audio_vae": {"encoder_dim": 4, "latent_dim": 64, "num_attention_heads": 2, "decoder_dim": 16,
                  "decoder_rates": (5, 5, 4, 8), "decoder_kernel_sizes": (10, 10, 8, 16), "resblock_kernel_sizes": (3,),
                  "resblock_dilation_sizes": ((1, 3),)},
}

PROFILES.update({
    "minimax-h3-random": BenchProfile(
        name="minimax-h3-random",
        description="MiniMax-H3 real dims (33B transformer partition, Qwen3-VL-32B, the VAEs), random bf16 weights, "
                    "one GPU (nothing downloaded)",
        device="cuda",
        dtype="bfloat16",
        main_shape=(1344, 768, 124),  # H3's own 16:9 canvas, 5 s
        small_shape=(832, 480, 124),
        text_tokens=512,
        dev_steps=50,  # diffusers' default: 49 passes
        family="minimax_h3",
    ),
    "minimax-h3-tiny": BenchProfile(
        name="minimax-h3-tiny",
        description="MiniMax-H3's structure at tiny widths, float32 on the CPU (every code path in seconds)",
        device="cpu",
        dtype="float32",
        main_shape=(64, 32, 124),
        small_shape=(64, 32, 124),
        text_tokens=16,
        dev_steps=4,
        repeats=1,
        cpu_threads=1,
        overrides=_H3_TINY,
        family="minimax_h3",
    ),
})


def get_profile(name: str) -> BenchProfile:
    if name not in PROFILES:
        raise ValueError(f"--profile: unknown profile '{name}'; profiles are {sorted(PROFILES)}")
    return PROFILES[name]
