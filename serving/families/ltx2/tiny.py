"""A tiny, randomly initialised LTX-2 model set, built from configs in code.

It exists to exercise the system end to end without a model hub: every
component is a real diffusers / transformers class, saved in the exact
Hugging Face layout (``model_index.json`` plus one subfolder per component),
so the same ``from_pretrained`` code that loads real LTX-2 weights loads it.
Its output is noise.

The dimensions keep the real model's *shape rules* (video VAE compresses 32x
in space and 8x in time, the audio VAE 4x, the vocoder upsamples mel frames by
the mel hop length) so size and duration validation behaves as it does on the
real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizer

from serving.families.base import TINY_MARKER
from serving.prompting.tiny_rewriter import REWRITER_SUBFOLDER, TURN_TOKENS, build_tiny_rewriter

__all__ = [
    "REWRITER_SUBFOLDER", "LATENT_UPSAMPLER_SUBFOLDER", "tiny_latent_upsampler", "tiny_vocabulary", "build_tiny_ltx2",
    "tiny_ltx2_components", "ensure_tiny_ltx2", "default_tiny_dir", "is_complete_checkpoint", "TINY_SEED",
    "TransformerWidths",
]

TINY_SEED = 0

_TEXT_HIDDEN = 32  # = connector heads (4) x connector head dim (8)
_TEXT_LAYERS = 2
_LATENT_CHANNELS = 8
_AUDIO_LATENT_CHANNELS = 2
_MEL_BINS = 16
_SAMPLE_RATE = 16000
_MEL_HOP = 160
_TOKENIZER_MAX_LENGTH = 256


@dataclass(frozen=True)
class TransformerWidths:
    """Widths of the LTX-2 transformer; the defaults are the tiny checkpoint's.

    Wider settings keep the architecture and every other component, and give each denoising
    step real work (``reelserve bench`` profiles). Cross-attention widths follow the attention
    widths, as in the real model.
    """

    num_layers: int = 2
    video_heads: int = 2
    video_head_dim: int = 8
    audio_heads: int = 2
    audio_head_dim: int = 4


def build_tiny_ltx2(directory: str | Path, widths: TransformerWidths = TransformerWidths()) -> Path:
    """Build the tiny LTX-2 set (transformer ``widths``) and save it under ``directory``; return the path."""
    from diffusers import LTX2ImageToVideoPipeline  # noqa: PLC0415 - diffusers only when the tiny checkpoint is built

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    LTX2ImageToVideoPipeline(**tiny_ltx2_components(widths)).save_pretrained(directory)
    # Not a pipeline component either: the two-stage recipe's x2 latent upsampler, in its own
    # subfolder as in the real LTX-2 repository, loaded with ``from_pretrained(path, subfolder=...)``.
    tiny_latent_upsampler().save_pretrained(directory / LATENT_UPSAMPLER_SUBFOLDER)
    # Not a pipeline component (model_index.json does not list it): the prompt rewriter's own model.
    build_tiny_rewriter(directory / REWRITER_SUBFOLDER, tiny_vocabulary(extra_special=TURN_TOKENS), TINY_SEED)
    marker = {"family": "ltx2", "tiny": True, "transformer_widths": asdict(widths)}
    (directory / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
    return directory


def tiny_ltx2_components(widths: TransformerWidths = TransformerWidths()) -> dict:
    """The tiny components in memory, keyed by their ``model_index.json`` names (deterministic)."""
    from diffusers import (  # noqa: PLC0415 - diffusers only when the tiny checkpoint is built
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors  # noqa: PLC0415 - diffusers only when the tiny checkpoint is built
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder  # noqa: PLC0415 - diffusers only when the tiny checkpoint is built

    torch.manual_seed(TINY_SEED)
    text_encoder = Gemma3ForConditionalGeneration(_gemma3_config(Gemma3Config))
    tokenizer = _build_tokenizer()

    torch.manual_seed(TINY_SEED)
    connectors = LTX2TextConnectors(
        caption_channels=_TEXT_HIDDEN,
        text_proj_in_factor=_TEXT_LAYERS + 1,
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )

    torch.manual_seed(TINY_SEED)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=widths.video_heads,
        attention_head_dim=widths.video_head_dim,
        cross_attention_dim=widths.video_heads * widths.video_head_dim,
        audio_in_channels=_AUDIO_LATENT_CHANNELS * (_MEL_BINS // 4),
        audio_out_channels=_AUDIO_LATENT_CHANNELS * (_MEL_BINS // 4),
        audio_num_attention_heads=widths.audio_heads,
        audio_attention_head_dim=widths.audio_head_dim,
        audio_cross_attention_dim=widths.audio_heads * widths.audio_head_dim,
        num_layers=widths.num_layers,
        qk_norm="rms_norm_across_heads",
        caption_channels=_TEXT_HIDDEN,
        rope_double_precision=False,
        rope_type="split",
        # Spatio-temporal guidance perturbs self-attention only where a block has perturbed
        # attention; without it the guidance pass would equal the conditional one.
        perturbed_attn=True,
    )

    torch.manual_seed(TINY_SEED)
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=_LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 16, 32),  # halves per stage, as in the real decoder
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        # The ratio formula in the class assumes every stage scales space and time;
        # like the real checkpoint's config, state the true ratios.
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
        encoder_causal=True,
        decoder_causal=False,
    )

    torch.manual_seed(TINY_SEED)
    audio_vae = AutoencoderKLLTX2Audio(
        # Its latent statistics are sized by base_channels, which must equal the
        # packed audio feature size: latent channels x (mel bins / 4).
        base_channels=_AUDIO_LATENT_CHANNELS * (_MEL_BINS // 4),
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=_AUDIO_LATENT_CHANNELS,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=_SAMPLE_RATE,
        mel_hop_length=_MEL_HOP,
        is_causal=True,
        mel_bins=_MEL_BINS,
    )

    torch.manual_seed(TINY_SEED)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * _MEL_BINS,
        hidden_channels=16,
        out_channels=2,
        upsample_kernel_sizes=[10, 8, 8],  # twice each factor: no checkerboard gaps
        upsample_factors=[5, 4, 8],  # 5 * 4 * 8 = 160 = mel hop length
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=_SAMPLE_RATE,
    )

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )

    return dict(
        scheduler=scheduler,
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )


_COMPLETE_MARKER = TINY_MARKER
LATENT_UPSAMPLER_SUBFOLDER = "latent_upsampler"


def tiny_latent_upsampler():
    """A tiny x2 spatial latent upsampler with the real one's structure (deterministic).

    The real one (128 latent channels, 1024 middle channels, 4 residual blocks per
    side) has about 500M parameters; this one keeps the rational resampler and
    the residual blocks, 32 middle channels (GroupNorm needs multiples of 32).
    """
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel  # noqa: PLC0415 - diffusers only when the tiny checkpoint is built

    torch.manual_seed(TINY_SEED)
    return LTX2LatentUpsamplerModel(
        in_channels=_LATENT_CHANNELS,
        mid_channels=32,
        num_blocks_per_stage=1,
        dims=3,
        spatial_upsample=True,
        temporal_upsample=False,
        rational_spatial_scale=2.0,
        use_rational_resampler=True,
    )


def is_complete_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds a finished tiny build (the marker is written last)."""
    return (Path(directory) / _COMPLETE_MARKER).is_file()


def _gemma3_config(config_class):
    text_config = {
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": _TEXT_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": _vocab_size(),
        "max_position_embeddings": 1024,
        "sliding_window": 64,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    vision_config = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    return config_class(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)


_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def tiny_vocabulary(extra_special: tuple[str, ...] = ()) -> dict[str, int]:
    """Special tokens, the 256 byte-fallback tokens, printable characters, then ``extra_special``."""
    tokens = list(_SPECIAL_TOKENS)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
    tokens += list(extra_special)
    return {token: index for index, token in enumerate(tokens)}


def _vocabulary() -> dict[str, int]:
    return tiny_vocabulary()


def _vocab_size() -> int:
    return len(_vocabulary())


def _build_tokenizer():
    return GemmaTokenizer(vocab=_vocabulary(), merges=[], model_max_length=_TOKENIZER_MAX_LENGTH)


_TINY_VERSION = "v3"  # bump when the tiny configs change, so stale caches are rebuilt


def default_tiny_dir() -> Path:
    return Path(platformdirs.user_cache_dir("reelserve")) / f"tiny-ltx2-{_TINY_VERSION}"


def ensure_tiny_ltx2(directory: str | Path | None = None, widths: TransformerWidths = TransformerWidths()) -> Path:
    """Return a complete tiny checkpoint, building it first if needed.

    Safe when several processes (replicas) ask at once: each builds into its
    own temporary folder and the first finished one is renamed into place.
    """
    target = Path(directory) if directory is not None else default_tiny_dir()
    if is_complete_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_tiny_ltx2(scratch, widths)
        if target.exists() and not is_complete_checkpoint(target):
            shutil.rmtree(target, ignore_errors=True)  # left over from an interrupted build
        try:
            os.rename(scratch, target)
        except OSError:
            if not is_complete_checkpoint(target):  # lost the race to a broken build: surface it
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
