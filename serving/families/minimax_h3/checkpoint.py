"""Which MiniMax-H3 checkpoint a config names, and what its component configs say, without loading weights."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from diffusers import ConfigMixin
from transformers import AutoTokenizer

from serving.families.base import ModelLimits
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.families.minimax_h3.tiny import ensure_tiny_minimax_h3

__all__ = [
    "TRANSFORMER_OF_WORKFLOW",
    "checkpoint_path",
    "component_config",
    "pipeline_index",
    "read_limits",
    "token_counter",
]

# One repository holds both partitions: t2va and fl2va run on transformer/, ref2va on transformer_ref/.
TRANSFORMER_OF_WORKFLOW = {"t2va": "transformer", "fl2va": "transformer", "ref2va": "transformer_ref"}


def checkpoint_path(config: MiniMaxH3ModelConfig) -> str:
    """The checkpoint to load: the configured path, or the tiny one (built on first use)."""
    if config.path is not None:
        return config.path
    return str(ensure_tiny_minimax_h3())


class _ConfigReader(ConfigMixin):
    config_name = "config.json"


def component_config(path: str, subfolder: str) -> dict:
    """A component's ``config.json`` without loading weights."""
    return dict(_ConfigReader.load_config(path, subfolder=subfolder))


def pipeline_index(path: str) -> dict:
    """The checkpoint's ``modular_model_index.json`` (components and the canvas configs), local folders only."""
    index = Path(path) / "modular_model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def read_limits(config: MiniMaxH3ModelConfig) -> ModelLimits:
    """H3's shape rules from the VAE and transformer configs: sizes in multiples of the VAE's spatial ratio times
    the transformer's patch (32), frames ``clip_length * n + ceil(clip_length / temporal ratio)`` (17n + 5)."""
    path = checkpoint_path(config)
    vae = component_config(path, "vae")
    audio_vae = component_config(path, "audio_vae")
    partition = TRANSFORMER_OF_WORKFLOW[config.workflows[0]]
    patch = component_config(path, partition).get("patch_size", (1, 2, 2))
    spatial = math.prod(vae["spatial_downsample_factors"]) * int(patch[2])
    temporal = math.prod(vae["temporal_downsample_factors"])
    clip_length = int(vae["clip_length"])
    return ModelLimits(
        size_multiple=spatial,
        temporal_compression=temporal,
        audio_sample_rate=int(audio_vae["sampling_rate"]),
        max_prompt_tokens=config.max_prompt_tokens,
        spatial_compression=spatial,
        frame_step=clip_length,
        frame_offset=math.ceil(clip_length / temporal),
    )


def token_counter(config: MiniMaxH3ModelConfig) -> Callable[[str], int]:
    """Counts prompt tokens as the text encoder stage does (the prompt verbatim, no special tokens; no weights)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path(config), subfolder="tokenizer")
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
