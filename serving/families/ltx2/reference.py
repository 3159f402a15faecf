"""The real LTX-2 19B component configs and its Gemma 3 12B text encoder, as facts in code.

Nothing is downloaded: these are the configs the released checkpoint's
``*/config.json`` files hold, so real-size models can be built on the meta
device (to count parameters and bytes, to size hand-offs) or on a GPU with
random weights (to benchmark: speed depends on shapes, not on weight values).

Sources, checked value by value:

- LTX-2 components: ``get_ltx2_*_config(version="2.0")`` in diffusers'
  ``scripts/convert_ltx2_to_diffusers.py`` (the script that wrote the diffusers
  checkpoint ``Lightricks/LTX-2`` from ``ltx-2-19b-dev.safetensors``), compared
  with the class defaults of diffusers 0.42.1. Where they differ the
  conversion script wins, and the comment says so.
- Gemma 3 12B: the ``google/gemma-3-12b-it`` ``config.json`` (the conversion
  script loads ``google/gemma-3-12b-it-qat-q4_0-unquantized``, which has the
  same architecture), cross-checked against keras-hub's ``gemma3_12b_text``
  preset (48 layers, 11,765,788,416 parameters with a 262,144-token
  vocabulary) and MaxText's ``gemma3-12b.yml`` (emb 3840, 16 query heads,
  8 KV heads).
- Scheduler: the ``FlowMatchEulerDiscreteScheduler`` the conversion script
  saves with the full pipeline.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "COMPONENT_NAMES",
    "ComponentSize",
    "component_config",
    "component_class",
    "build_component",
    "build_meta",
    "component_size",
    "component_sizes",
    "scheduler_config",
    "video_latent_shape",
    "video_token_count",
    "audio_latent_frames",
    "audio_latent_shape",
    "prompt_embedding_shape",
    "connector_output_shape",
    "random_transformer_inputs",
    "block_activation_bytes_bound",
    "DISTILLED_SIGMAS",
    "DISTILLED_REFINE_SIGMAS",
]

COMPONENT_NAMES = ("transformer", "connectors", "vae", "audio_vae", "vocoder", "text_encoder", "latent_upsampler")

# The distilled checkpoint's fixed schedule (8 steps) and the two-stage recipe's refinement (3 steps).
DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
DISTILLED_REFINE_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)

# --------------------------------------------------------------------------- the configs

_TRANSFORMER: dict[str, Any] = {
    # Video stream: 32 heads x 128 = 4096 wide; latent channels 128 (the video VAE's).
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "vae_scale_factors": (8, 32, 32),
    "pos_embed_max_pos": 20,
    "base_height": 2048,
    "base_width": 2048,
    # Audio stream: 32 heads x 64 = 2048 wide; 128 input features = 8 latent channels x 16 latent mel bins.
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_patch_size": 1,
    "audio_patch_size_t": 1,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "audio_scale_factor": 4,
    "audio_pos_embed_max_pos": 20,
    "audio_sampling_rate": 16000,
    "audio_hop_length": 160,
    "num_layers": 48,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 3840,  # Gemma 3 12B hidden size: what the connectors hand over
    "attention_bias": True,
    "attention_out_bias": True,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "causal_offset": 1,
    "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000,
    # The class default is "interleaved"; the released LTX-2 checkpoint uses "split" (conversion script).
    "rope_type": "split",
}

_CONNECTORS: dict[str, Any] = {
    "caption_channels": 3840,  # Gemma 3 12B hidden size
    "text_proj_in_factor": 49,  # 48 Gemma layers + the embedding layer, stacked: 49 x 3840 = 188160 features
    "video_connector_num_attention_heads": 30,  # 30 x 128 = 3840
    "video_connector_attention_head_dim": 128,
    "video_connector_num_layers": 2,
    "video_connector_num_learnable_registers": 128,
    "audio_connector_num_attention_heads": 30,
    "audio_connector_attention_head_dim": 128,
    "audio_connector_num_layers": 2,
    "audio_connector_num_learnable_registers": 128,
    "connector_rope_base_seq_len": 4096,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "causal_temporal_positioning": False,
    # Class default "interleaved"; the checkpoint uses "split" (conversion script).
    "rope_type": "split",
}

_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "block_out_channels": (256, 512, 1024, 2048),
    "down_block_types": ("LTX2VideoDownBlock3D",) * 4,
    "decoder_block_out_channels": (256, 512, 1024),
    "layers_per_block": (4, 6, 6, 2, 2),
    "decoder_layers_per_block": (5, 5, 5, 5),
    "spatio_temporal_scaling": (True, True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True),
    "upsample_factor": (2, 2, 2),
    "timestep_conditioning": False,
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
    "encoder_causal": True,
    # Class default True; the checkpoint decodes non-causally (conversion script).
    "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros",
    "decoder_spatial_padding_mode": "reflect",
    # Class default None (derived, and wrong for this layout); the checkpoint states them (conversion script).
    "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}

_AUDIO_VAE: dict[str, Any] = {
    # Identical to the class defaults and the conversion script.
    "base_channels": 128,
    "output_channels": 2,
    "ch_mult": (1, 2, 4),
    "num_res_blocks": 2,
    "attn_resolutions": None,
    "in_channels": 2,
    "resolution": 256,
    "latent_channels": 8,
    "norm_type": "pixel",
    "causality_axis": "height",
    "dropout": 0.0,
    "mid_block_add_attention": False,
    "sample_rate": 16000,
    "mel_hop_length": 160,
    "is_causal": True,
    "mel_bins": 64,
    "double_z": True,
}

_VOCODER: dict[str, Any] = {
    # Identical to the class defaults and the conversion script: 2 channels x 64 mel bins in,
    # 6*5*2*2*2 = 240x upsampling of 100 mel frames/s = 24 kHz stereo out.
    "in_channels": 128,
    "hidden_channels": 1024,
    "out_channels": 2,
    "upsample_kernel_sizes": [16, 15, 8, 4, 4],
    "upsample_factors": [6, 5, 2, 2, 2],
    "resnet_kernel_sizes": [3, 7, 11],
    "resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "leaky_relu_negative_slope": 0.1,
    "output_sampling_rate": 24000,
}

_GEMMA3_TEXT = {
    # google/gemma-3-12b-it config.json "text_config" (transformers 5 spells rope settings as rope_parameters).
    "vocab_size": 262208,
    "hidden_size": 3840,
    "intermediate_size": 15360,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "attention_bias": False,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

_GEMMA3_VISION = {
    # SigLIP-So400m at 896 px: google/gemma-3-12b-it config.json "vision_config".
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}

_TEXT_ENCODER: dict[str, Any] = {
    "text_config": _GEMMA3_TEXT,
    "vision_config": _GEMMA3_VISION,
    "mm_tokens_per_image": 256,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "image_token_index": 262144,
}

_LATENT_UPSAMPLER: dict[str, Any] = {
    # The x2 spatial upsampler of the two-stage recipe (ltx-2-spatial-upscaler-x2-1.0):
    # get_ltx2_spatial_latent_upsampler_config("2.0") in the conversion script.
    "in_channels": 128,
    "mid_channels": 1024,
    "num_blocks_per_stage": 4,
    "dims": 3,
    "spatial_upsample": True,
    "temporal_upsample": False,
    "rational_spatial_scale": 2.0,
}

_SCHEDULER: dict[str, Any] = {
    "use_dynamic_shifting": True,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
    "shift_terminal": 0.1,
}

_CONFIGS: dict[str, Any] = {
    "transformer": _TRANSFORMER,
    "connectors": _CONNECTORS,
    "vae": _VAE,
    "audio_vae": _AUDIO_VAE,
    "vocoder": _VOCODER,
    "text_encoder": _TEXT_ENCODER,
    "latent_upsampler": _LATENT_UPSAMPLER,
}


def component_config(name: str) -> dict:
    """The real config of one component (a fresh copy: change it freely)."""
    return copy.deepcopy(_CONFIGS[_checked_name(name)])


def scheduler_config() -> dict:
    """The scheduler config saved with the real pipeline."""
    return dict(_SCHEDULER)


def component_class(name: str) -> type:
    """The diffusers / transformers class of one component."""
    name = _checked_name(name)
    if name == "text_encoder":
        from transformers import Gemma3ForConditionalGeneration  # noqa: PLC0415 - transformers and diffusers only when a reference component is built

        return Gemma3ForConditionalGeneration
    import diffusers  # noqa: PLC0415 - transformers and diffusers only when a reference component is built
    from diffusers.pipelines import ltx2  # noqa: PLC0415 - transformers and diffusers only when a reference component is built

    classes = {
        "transformer": diffusers.LTX2VideoTransformer3DModel,
        "connectors": ltx2.LTX2TextConnectors,
        "vae": diffusers.AutoencoderKLLTX2Video,
        "audio_vae": diffusers.AutoencoderKLLTX2Audio,
        "vocoder": ltx2.LTX2Vocoder,
        "latent_upsampler": ltx2.LTX2LatentUpsamplerModel,
    }
    return classes[name]


def _checked_name(name: str) -> str:
    if name not in _CONFIGS:
        raise ValueError(f"unknown LTX-2 component '{name}'; components are {list(COMPONENT_NAMES)}")
    return name


# --------------------------------------------------------------------------- building


def build_component(
    name: str,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    overrides: dict | None = None,
) -> torch.nn.Module:
    """One component at real size: on ``meta`` (no memory), or on ``device`` with random weights in ``dtype``.

    The weights are built directly on the device in ``dtype`` (no float32 copy
    on the host), from the classes' own random initialisation seeded by
    ``seed``. ``overrides`` replaces config entries (e.g. ``num_layers`` for a
    one-block transformer).
    """
    config = component_config(name)
    config.update(overrides or {})
    cls = component_class(name)
    device = torch.device(device)
    if device.type != "meta":
        torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        if name == "text_encoder":
            model = cls(_gemma3_config(config))
        else:
            model = cls(**config)
    if device.type != "meta" and any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)  # the few parameters a class creates in float32 on purpose
    return model.eval().requires_grad_(False)


def build_meta(name: str, overrides: dict | None = None) -> torch.nn.Module:
    """One component on the meta device: shapes only, no memory."""
    return build_component(name, device="meta", overrides=overrides)


def _gemma3_config(config: dict):
    from transformers import Gemma3Config  # noqa: PLC0415 - transformers and diffusers only when a reference component is built

    return Gemma3Config(**config)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Create parameters in ``dtype`` directly, so a 19B model never needs a float32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class ComponentSize:
    """Parameter count and weight bytes of one component (buffers included in bytes)."""

    name: str
    parameters: int
    buffer_elements: int
    bytes: int

    @property
    def gigabytes(self) -> float:
        return self.bytes / 1e9


def component_size(name: str, dtype: torch.dtype = torch.bfloat16, model: torch.nn.Module | None = None) -> ComponentSize:
    """Counted on the meta model (or on ``model`` when given), weights held in ``dtype``."""
    model = model if model is not None else build_meta(name)
    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    element = torch.empty((), dtype=dtype).element_size()
    return ComponentSize(name=name, parameters=parameters, buffer_elements=buffers, bytes=(parameters + buffers) * element)


def component_sizes(dtype: torch.dtype = torch.bfloat16) -> dict[str, ComponentSize]:
    """Every component's size (builds each on the meta device: about 2 s in all)."""
    return {name: component_size(name, dtype) for name in COMPONENT_NAMES}


# --------------------------------------------------------------------------- shapes


def video_latent_shape(width: int, height: int, frames: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """[batch, 128, frames', height/32, width/32] with frames' = (frames - 1) / 8 + 1."""
    vae = _VAE
    spatial, temporal = vae["spatial_compression_ratio"], vae["temporal_compression_ratio"]
    if width % spatial or height % spatial:
        raise ValueError(f"width and height must be multiples of {spatial}; got {width}x{height}")
    if (frames - 1) % temporal:
        raise ValueError(f"frames must be k * {temporal} + 1; got {frames}")
    return (batch, vae["latent_channels"], (frames - 1) // temporal + 1, height // spatial, width // spatial)


def video_token_count(width: int, height: int, frames: int) -> int:
    """Video tokens the transformer sees (patch size 1: one per latent voxel)."""
    _, _, f, h, w = video_latent_shape(width, height, frames)
    return f * h * w


def audio_latent_frames(frames: int, fps: float) -> int:
    """Audio latent frames for a clip, as the pipeline computes them (25 per second)."""
    vae = _AUDIO_VAE
    per_second = vae["sample_rate"] / vae["mel_hop_length"] / _TRANSFORMER["audio_scale_factor"]
    return round(frames / fps * per_second)


def audio_latent_shape(frames: int, fps: float, batch: int = 1) -> tuple[int, int, int, int]:
    """[batch, 8 latent channels, audio frames, 16 latent mel bins]."""
    vae = _AUDIO_VAE
    return (batch, vae["latent_channels"], audio_latent_frames(frames, fps), vae["mel_bins"] // 4)


def prompt_embedding_shape(tokens: int, batch: int = 1) -> tuple[int, int, int]:
    """Gemma's stacked hidden states as the connectors receive them: [batch, tokens, 49 x 3840]."""
    return (batch, tokens, _CONNECTORS["caption_channels"] * _CONNECTORS["text_proj_in_factor"])


def connector_output_shape(tokens: int, batch: int = 1) -> tuple[int, int, int]:
    """Each connector's output (video and audio alike): [batch, tokens, 30 heads x 128]."""
    width = _CONNECTORS["video_connector_num_attention_heads"] * _CONNECTORS["video_connector_attention_head_dim"]
    return (batch, tokens, width)


def random_transformer_inputs(
    config,
    width: int,
    height: int,
    frames: int,
    *,
    fps: float = 24.0,
    text_tokens: int = 1024,
    batch: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    timestep: float = 1000.0,
) -> dict:
    """Keyword arguments for one transformer call as the pipeline makes them: packed latents, connector outputs.

    ``config`` is a transformer config (dict or a model's ``config``); its widths
    and compression ratios size the tensors, so this serves the 19B and any
    small profile alike (spatial compression 32, temporal 8).
    """
    get = config.get if hasattr(config, "get") else lambda key: getattr(config, key)
    if width % 32 or height % 32 or (frames - 1) % 8:
        raise ValueError(f"{width}x{height}x{frames}: width and height must be multiples of 32 and frames k * 8 + 1")
    latent_frames, latent_height, latent_width = (frames - 1) // 8 + 1, height // 32, width // 32
    audio_frames = audio_latent_frames(frames, fps)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return dict(
        hidden_states=noise(batch, latent_frames * latent_height * latent_width, get("in_channels")),
        audio_hidden_states=noise(batch, audio_frames, get("audio_in_channels")),
        encoder_hidden_states=noise(batch, text_tokens, get("caption_channels")),
        audio_encoder_hidden_states=noise(batch, text_tokens, get("caption_channels")),
        timestep=torch.full((batch,), float(timestep), device=device),
        encoder_attention_mask=torch.ones(batch, text_tokens, device=device, dtype=torch.long),
        audio_encoder_attention_mask=torch.ones(batch, text_tokens, device=device, dtype=torch.long),
        num_frames=latent_frames,
        height=latent_height,
        width=latent_width,
        fps=fps,
        audio_num_frames=audio_frames,
    )


def block_activation_bytes_bound(config, video_tokens: int, audio_tokens: int, text_tokens: int, batch: int = 1,
                                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Upper bound on the activation memory one transformer block needs in an eager inference pass.

    At its widest a block holds the video stream's residual, its normalised
    copy and the feed-forward's 4x-wide projection before and after GELU:
    about 10 video-width tensors; 16 leaves room for the attention's q, k, v,
    rotated copies and output living at once. Rotary tables are float32
    (cos and sin, self-attention and audio<->video attention). The audio and
    text streams are counted the same way; attention runs in fused kernels
    (no tokens x tokens score matrix).
    """
    get = config.get if hasattr(config, "get") else lambda key: getattr(config, key)
    element = torch.empty((), dtype=dtype).element_size()
    video = get("num_attention_heads") * get("attention_head_dim")
    audio = get("audio_num_attention_heads") * get("audio_attention_head_dim")
    video_stream = 16 * batch * video_tokens * video * element
    audio_stream = 16 * batch * audio_tokens * audio * element
    text = 2 * batch * text_tokens * (video + audio) * element
    rotary = 2 * batch * video_tokens * (video + audio) // 2 * 4 * 2  # cos + sin, float32, video and cross-modal
    return video_stream + audio_stream + text + rotary
