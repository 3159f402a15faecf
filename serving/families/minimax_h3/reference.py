"""The real MiniMax-H3 component configs, as facts in code: real-size models on the meta device, or on a GPU with
random weights.

Nothing is downloaded. Sources, checked value by value:

- Transformer (both partitions, ``transformer/`` and ``transformer_ref/``): the
  class defaults of diffusers 0.42.1's ``MiniMaxH3Transformer3DModel`` (its
  docstring documents them as the released model's: 50 blocks, hidden 5376,
  56 x 128 heads, SwiGLU 14336, 24 video and 32 audio latent channels, text
  width 5120). Built on the meta device they hold 33,123 M parameters: 66.25 GB
  in bfloat16, which is the "61.7 GB" diffusers' ``MiniMaxH3Blocks`` docstring
  gives per partition (61.70 GiB). ``tests/.../test_sizing.py`` checks both.
- Video and audio VAEs: the class defaults of ``AutoencoderKLMiniMaxH3`` (16x /
  4x, 17-frame clips, 24 latent channels, a 36-layer ViT decoder; 2,604 M
  parameters, 10.4 GB in float32, as released) and ``AutoencoderKLMiniMaxH3Audio``
  (32 kHz, 800-sample hop, 32 latent channels; 0.61 GB in float32).
- Text encoder, Qwen3-VL-32B: the width 5120 and the read-out layer 50 come from
  diffusers' H3 blocks (``prompt_embeds`` is ``(1, T, 5120)``, "read after the
  50th decoder layer", "needs more than 50 decoder layers"); the rest is
  Qwen3-VL-32B's published ``config.json`` (64 layers, 64 query / 8 key-value
  heads of 128, MLP 25600, vocabulary 151,936; vision tower 27 x 1152 with
  patch 16, merge 2, temporal patch 2, 2304 positions, deepstack 8/16/24):
  33,357 M parameters, 66.7 GB in bfloat16.
- Schedulers: ``MiniMaxH3Scheduler`` with shift 12 (video) and 3 (audio), as the
  diffusers scheduler docstring states for the released checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from diffusers import (
    AutoencoderKLMiniMaxH3,
    AutoencoderKLMiniMaxH3Audio,
    MiniMaxH3Scheduler,
    MiniMaxH3Transformer3DModel,
)
from diffusers.modular_pipelines.minimax_h3.before_denoise import (
    MiniMaxH3PrepareLayoutStep,
    MiniMaxH3Ref2VAPrepareLayoutStep,
    MiniMaxH3SetTimestepsStep,
)
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from serving.families.minimax_h3.config import FPS, latent_frame_count
from serving.families.minimax_h3.diffusion import layout_references
from serving.families.minimax_h3.handoffs import ReferenceConditioning

__all__ = [
    "COMPONENT_NAMES",
    "REFERENCE_IMAGES",
    "REFERENCE_VIDEO_FRAMES",
    "SCHEDULER_SHIFTS",
    "build_component",
    "build_meta",
    "component_config",
    "component_elements",
    "random_transformer_inputs",
]

COMPONENT_NAMES = ("transformer", "transformer_ref", "text_encoder", "vae", "audio_vae")
SCHEDULER_SHIFTS = {"scheduler": 12.0, "audio_scheduler": 3.0}

_TRANSFORMER = {
    "num_attention_heads": 56,
    "attention_head_dim": 128,  # 56 x 128 = 7168: wider than the 5376 residual stream
    "hidden_size": 5376,
    "num_layers": 50,
    "num_refiner_layers": 2,
    "ffn_dim": 14336,
    "in_channels": 24,  # the video VAE's latent channels
    "audio_in_channels": 32,  # the audio VAE's
    "patch_size": (1, 2, 2),
    "text_dim": 5120,  # Qwen3-VL-32B's width
    "freq_dim": 256,
    "time_embed_hidden_dim": 5376,
    "time_embed_dim": 2688,
    "rope_freq_dim": 16,
    "rope_theta": 10000.0,
    "norm_eps": 1e-5,
    "qk_norm_eps": 1e-5,
    "final_norm_eps": 1e-5,
}

_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 24,
    "block_out_channels": (128, 256, 256, 512, 512, 1024),
    "layers_per_block": 2,
    "spatial_downsample_factors": (2, 2, 2, 2, 1, 1),  # 16x
    "temporal_downsample_factors": (1, 2, 2, 1, 1, 1),  # 4x
    "decoder_num_layers": 36,
    "decoder_num_attention_heads": 32,
    "decoder_attention_head_dim": 64,
    "clip_length": 17,
    "token_drop": 3,
}

_AUDIO_VAE = {
    "encoder_dim": 64,
    "encoder_rates": (2, 4, 4, 5, 5),  # the 800-sample hop: 40 latents a second at 32 kHz
    "latent_dim": 2048,
    "latent_channels": 32,
    "num_attention_heads": 8,
    "decoder_dim": 1024,
    "decoder_rates": (5, 5, 2, 2, 2, 2, 2),
    "sampling_rate": 32000,
}

_TEXT_ENCODER = {
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_hidden_layers": 64,  # H3 reads hidden_states[50]
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
    },
    "vision_config": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 5120,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

_CONFIGS = {
    "transformer": _TRANSFORMER,
    "transformer_ref": _TRANSFORMER,
    "vae": _VAE,
    "audio_vae": _AUDIO_VAE,
    "text_encoder": _TEXT_ENCODER,
}


def component_config(name: str) -> dict:
    """The real config of one component, as its ``config.json`` holds it (a copy)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown component '{name}'; components: {', '.join(COMPONENT_NAMES)}")
    return copy.deepcopy(_CONFIGS[name])


def build_component(name: str, device: torch.device | str = "meta", dtype: torch.dtype | None = None,
                    overrides: dict | None = None) -> torch.nn.Module:
    """The component at real size (with ``overrides``) on ``device``: the meta device for sizes, a GPU with random
    weights for speed (speed depends on shapes, not on weight values)."""
    config = {**component_config(name), **(overrides or {})}
    with torch.device(device), _default_dtype(dtype):
        if name in ("transformer", "transformer_ref"):
            model = MiniMaxH3Transformer3DModel(**config)
        elif name == "vae":
            model = AutoencoderKLMiniMaxH3(**config)
        elif name == "audio_vae":
            model = AutoencoderKLMiniMaxH3Audio(**config)
        else:
            model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config))
    if dtype in (torch.bfloat16, torch.float16):
        _keep_fp32_modules(model)
    return model.eval()


def _keep_fp32_modules(model: torch.nn.Module) -> None:
    """The released checkpoints are mixed precision: the modules a class pins to float32 on load
    (``_keep_in_fp32_modules``: H3's patch projections, timestep MLP and output heads) stay float32 here too."""
    kept = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(part in name.split(".") for part in kept):
            module.float()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_meta(name: str) -> torch.nn.Module:
    return build_component(name, "meta")


@functools.cache
def component_elements(name: str, part: str | None = None) -> int:
    """Parameter + buffer elements of a real-size component (``part``: a submodule such as ``decoder``)."""
    model = build_meta(name)
    if part is not None:
        model = functools.reduce(getattr, part.split("."), model)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


# The references of the ref2va pass the benchmark times: three 16:9 images at the reference short edge (2048
# pixels: 128 x 228 latents each) and a 2 s video snapped down to 39 frames (12 latent frames) with its soundtrack.
REFERENCE_IMAGES = 3
REFERENCE_VIDEO_FRAMES = 39


def random_transformer_inputs(width: int, height: int, seconds: float, text_tokens: int, batch: int = 1,
                              step: int = 0, num_inference_steps: int = 50, references: bool = False,
                              reference_short_edge: int = 2048, device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.bfloat16, generator: torch.Generator | None = None) -> dict:
    """One transformer pass's inputs at a real size: the packed layout built by diffusers' own layout block (t2va,
    or ref2va with ``references``: images at ``reference_short_edge``), the row-timestep plan of ``step``, random
    rows (``batch`` requests of that one layout)."""
    output_frames = max(1, round(seconds * FPS))
    generated = -(-max(output_frames - 5, 0) // 17) * 17 + 5
    latent_frames = latent_frame_count(generated)
    audio_latents = round(generated / FPS * 40)
    tags = torch.ones(text_tokens, dtype=torch.long)
    if references:
        layout = _ref2va_layout(tags, latent_frames, height // 16, width // 16, audio_latents, reference_short_edge)
    else:
        layout = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
            tags, latent_frames, height // 16, width // 16, audio_latents, (1, 2, 2), 2, audio_tag=2, video_tag=0,
        )
    position_ids, token_tags, video_indices, audio_indices, text_indices, condition_video, condition_audio = layout
    timesteps = _timesteps(num_inference_steps)
    timestep, timestep_indices = MiniMaxH3SetTimestepsStep.build_row_timesteps(
        video_indices, audio_indices, condition_video, condition_audio, text_tokens, float(timesteps[step]),
        float(timesteps[step]), max(float(timesteps[step]), 0.999), 1.0,
    )

    def noise(*shape, kind=torch.float32):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=kind)

    return {
        "hidden_states": noise(batch, video_indices.numel(), 24 * 4),
        "audio_hidden_states": noise(batch, audio_indices.numel(), 32),
        "encoder_hidden_states": noise(batch, text_tokens, 5120, kind=dtype),
        "timestep": timestep.to(device),
        "timestep_indices": timestep_indices.to(device),
        "token_tags": token_tags.to(device),
        "position_ids": position_ids.to(device),
        "video_indices": video_indices.to(device),
        "audio_indices": audio_indices.to(device),
        "text_indices": text_indices.to(device),
        "return_dict": False,
    }


def _ref2va_layout(tags: torch.Tensor, latent_frames: int, latent_height: int, latent_width: int, audio_latents: int,
                   reference_short_edge: int):
    # A 16:9 image at the reference short edge, in latents (16 pixels each) rounded to whole 2x2 patches.
    image = torch.zeros(1, 24, 1, reference_short_edge // 32 * 2, round(reference_short_edge * 16 / 9 / 32) * 2)
    video = torch.zeros(1, 24, latent_frame_count(REFERENCE_VIDEO_FRAMES), latent_height, latent_width)
    soundtrack = torch.zeros(2 * round(REFERENCE_VIDEO_FRAMES / FPS * 40), 32)
    kinds = ("image",) * REFERENCE_IMAGES + ("video",)
    placeholders = layout_references(
        ReferenceConditioning("ref2va", kinds, (False,) * REFERENCE_IMAGES + (True,), (), (), ())
    )
    return MiniMaxH3Ref2VAPrepareLayoutStep.build_ref2va_packed_sequence(
        tags, placeholders, [image] * REFERENCE_IMAGES + [video], [soundtrack], latent_frames, latent_height,
        latent_width, audio_latents, (1, 2, 2), 2, 2, 0,
    )


def _timesteps(num_inference_steps: int) -> torch.Tensor:
    scheduler = MiniMaxH3Scheduler(shift=SCHEDULER_SHIFTS["scheduler"])
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps
