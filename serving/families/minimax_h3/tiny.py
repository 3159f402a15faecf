"""A tiny, randomly initialised MiniMax-H3 checkpoint in the real layout, built from configs in code.

Every component is the real diffusers / transformers class, saved through
diffusers' own ``MiniMaxH3ModularPipeline`` (``init_pipeline``,
``update_components``, ``save_pretrained``): ``modular_model_index.json`` plus a
folder per component, both transformer partitions included, so the loaders
that read the released checkpoint read this one. Its output is noise. It builds
offline in a second and weighs about 4 MB.

The widths are tiny; the *shape rules* are the real model's, because diffusers'
blocks hard-code them:

- Qwen3-VL: more than 50 text layers (the text-encoder step reads
  ``hidden_states[50]``), 32 wide with ``mrope_section`` [4, 2, 2]; the vision
  tower's output width is the text width, its position table a perfect square,
  its patch / merge / temporal-patch sizes the processor's, and its special
  token ids the tokenizer's.
- Tokenizer: byte-level Qwen2 with the four vision special tokens, built in
  code (no chat template: the blocks use none).
- Processor: the torch/PIL stand-in (``processor.py``), since transformers'
  own needs torchvision.
- Transformer: ``attention_head_dim`` >= 6 x ``rope_freq_dim``; 24 video and 32
  audio latent channels; ``text_dim`` = the text width.
- Video VAE: 16x in space, 4x in time with the 17-frame clips (the layout
  hard-codes the (1, 4, 4, 4, 4) latent-frame rhythm); the decoder's rope width
  ``int(head_dim x 0.75)`` divides by 6.
- Audio VAE: 32 kHz with an 800-sample hop (the blocks hard-code 40 latents a
  second), decoder rates multiplying to the hop, latent statistics set.
- Canvas: 32 pixels on the short edge (``canvas_short_edge``), so a request's
  default 16:9 canvas is 64x32 and reference images are encoded at 64 pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs
import torch
from diffusers import (
    AutoencoderKLMiniMaxH3,
    AutoencoderKLMiniMaxH3Audio,
    MiniMaxH3Scheduler,
    MiniMaxH3Transformer3DModel,
)
from diffusers.modular_pipelines.minimax_h3 import MiniMaxH3Blocks
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Qwen2TokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from serving.families.base import TINY_MARKER
from serving.families.minimax_h3.processor import (
    StandInQwen3VLProcessor,
    StandInQwen3VLVideoProcessor,
)

__all__ = [
    "TINY_CANVAS",
    "TINY_SEED",
    "VISION_TOKENS",
    "TransformerWidths",
    "build_key",
    "build_tiny_minimax_h3",
    "default_tiny_dir",
    "ensure_tiny_minimax_h3",
    "is_complete_checkpoint",
    "tiny_minimax_h3_components",
]

TINY_SEED = 0
TINY_CANVAS = {"canvas_short_edge": 32, "canvas_max_pixels": 64 * 64, "reference_image_short_edge": 64}
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_TEXT_HIDDEN = 32
_TEXT_LAYERS = 51  # the blocks read hidden_states[50]
_VERSION = "v1"  # bump when the tiny configs change, so stale caches are rebuilt


@dataclass(frozen=True)
class TransformerWidths:
    """Widths of both transformer partitions; the defaults are the tiny checkpoint's.

    Wider settings keep every other component and give each denoising step real work (the engine benchmark keeps
    the released model's 50 blocks and its proportions: attention 4/3 as wide as the residual stream, the SwiGLU
    8/3). ``attention_head_dim`` must be at least 6 x ``rope_freq_dim``.
    """

    num_layers: int = 2
    num_refiner_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 12
    hidden_size: int = 32
    ffn_dim: int = 64
    rope_freq_dim: int = 2
    freq_dim: int = 32
    time_embed_hidden_dim: int = 32
    time_embed_dim: int = 16


def build_tiny_minimax_h3(directory: str | Path, widths: TransformerWidths = TransformerWidths(),
                          canvas: dict | None = None) -> Path:
    """Build the tiny H3 checkpoint into ``directory`` (the marker last); return the path. ``canvas`` overrides the
    pipeline's canvas configs (``TINY_CANVAS``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline = MiniMaxH3Blocks().init_pipeline()
    pipeline.update_components(**tiny_minimax_h3_components(widths), **{**TINY_CANVAS, **(canvas or {})})
    pipeline.save_pretrained(str(directory))
    marker = {"family": "minimax_h3", "tiny": True}
    if widths != TransformerWidths() or canvas:
        marker.update(transformer_widths=asdict(widths), canvas=canvas or {})
    (directory / TINY_MARKER).write_text(json.dumps(marker) + "\n")
    return directory


def tiny_minimax_h3_components(widths: TransformerWidths = TransformerWidths()) -> dict:
    """The tiny components in memory, keyed by their ``modular_model_index.json`` names (deterministic)."""
    tokenizer = _tokenizer()
    torch.manual_seed(TINY_SEED)
    text_encoder = Qwen3VLForConditionalGeneration(_qwen3_vl_config(tokenizer))

    def transformer(seed: int):
        torch.manual_seed(seed)
        return MiniMaxH3Transformer3DModel(**asdict(widths), in_channels=24, audio_in_channels=32,
                                           text_dim=_TEXT_HIDDEN)

    torch.manual_seed(TINY_SEED)
    vae = AutoencoderKLMiniMaxH3(
        block_out_channels=(8, 8, 8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        decoder_num_layers=1, decoder_num_attention_heads=2, decoder_attention_head_dim=8,  # rope width 6
        decoder_num_register_tokens=1, decoder_ffn_mult=2,
        latents_mean=tuple(0.1 * i / 24 for i in range(24)), latents_std=tuple(1.0 + 0.01 * i for i in range(24)),
    )
    torch.manual_seed(TINY_SEED)
    audio_vae = AutoencoderKLMiniMaxH3Audio(
        encoder_dim=4, latent_dim=64, latent_channels=32, num_attention_heads=2, decoder_dim=16,
        decoder_rates=(5, 5, 4, 8), decoder_kernel_sizes=(10, 10, 8, 16),  # 5 x 5 x 4 x 8 = the 800-sample hop
        resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
        latents_mean=[0.01 * i for i in range(32)], latents_std=[1.0 + 0.02 * i for i in range(32)],
    )
    return {
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": _processor(tokenizer),
        "vae": vae,
        "audio_vae": audio_vae,
        "scheduler": MiniMaxH3Scheduler(shift=12.0),
        "audio_scheduler": MiniMaxH3Scheduler(shift=3.0),
        "transformer": transformer(TINY_SEED + 1),
        "transformer_ref": transformer(TINY_SEED + 2),
    }


def _tokenizer():
    vocabulary = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return Qwen2TokenizerFast(
        vocab=vocabulary, merges=[], additional_special_tokens=list(VISION_TOKENS), model_max_length=4096
    )


def _qwen3_vl_config(tokenizer) -> Qwen3VLConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": _TEXT_HIDDEN, "intermediate_size": 64, "num_hidden_layers": _TEXT_LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "out_hidden_size": _TEXT_HIDDEN, "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _processor(tokenizer):
    sizes = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}  # the vision tower's
    return StandInQwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**sizes, min_pixels=32 * 32, max_pixels=128 * 128),
        tokenizer=tokenizer,
        video_processor=StandInQwen3VLVideoProcessor(**sizes, min_pixels=32 * 32, max_pixels=2 * 64 * 64),
    )


def is_complete_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds a finished tiny build (the marker is written last)."""
    return (Path(directory) / TINY_MARKER).is_file()


def default_tiny_dir() -> Path:
    return Path(platformdirs.user_cache_dir("reelserve")) / f"tiny-minimax-h3-{_VERSION}"


def build_key(widths: TransformerWidths, canvas: dict | None = None) -> str:
    """A short name for a build's settings (cache folders of wider builds)."""
    settings = json.dumps([_VERSION, asdict(widths), canvas or {}], sort_keys=True)
    return hashlib.sha1(settings.encode()).hexdigest()[:8]


def ensure_tiny_minimax_h3(directory: str | Path | None = None, widths: TransformerWidths = TransformerWidths(),
                           canvas: dict | None = None) -> Path:
    """A complete tiny checkpoint, built first when missing.

    Safe when several processes (replicas) ask at once: each builds into its own
    temporary folder and the first finished one is renamed into place.
    """
    target = Path(directory) if directory is not None else default_tiny_dir()
    if is_complete_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_tiny_minimax_h3(scratch, widths, canvas)
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
