"""Which LTX-2 checkpoint a config names, and what its component configs say, without loading weights."""

from __future__ import annotations

from typing import Callable

from diffusers import ConfigMixin
from transformers import AutoTokenizer

from serving.families.base import ModelLimits
from serving.families.ltx2.config import LTX2ModelConfig
from serving.families.ltx2.tiny import ensure_tiny_ltx2

__all__ = ["checkpoint_path", "component_config", "read_limits", "token_counter"]


def checkpoint_path(config: LTX2ModelConfig) -> str:
    """The checkpoint to load: the configured path, or the tiny one (built on first use)."""
    if config.path is not None:
        return config.path
    return str(ensure_tiny_ltx2())


class _ConfigReader(ConfigMixin):
    config_name = "config.json"


def component_config(path: str, subfolder: str) -> dict:
    """A component's ``config.json`` without loading weights."""
    return dict(_ConfigReader.load_config(path, subfolder=subfolder))


def read_limits(config: LTX2ModelConfig) -> ModelLimits:
    path = checkpoint_path(config)
    vae = component_config(path, "vae")
    vocoder = component_config(path, "vocoder")  # the delivered sample rate is the vocoder's
    spatial = vae.get("spatial_compression_ratio") or vae["patch_size"] * 2 ** sum(vae["spatio_temporal_scaling"])
    temporal = vae.get("temporal_compression_ratio") or vae["patch_size_t"] * 2 ** sum(vae["spatio_temporal_scaling"])
    # The two_stage recipe generates at half width and height first.
    halves = 2 if config.diffusion.recipe == "two_stage" else 1
    return ModelLimits(
        size_multiple=int(spatial) * halves,
        temporal_compression=int(temporal),
        audio_sample_rate=int(vocoder["output_sampling_rate"]),
        max_prompt_tokens=config.max_prompt_tokens,
        spatial_compression=int(spatial),
        frame_step=int(temporal),
        frame_offset=1,
    )


def token_counter(config: LTX2ModelConfig) -> Callable[[str], int]:
    """Counts prompt tokens the way the text encoder stage will (tokenizer only, no weights)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path(config), subfolder="tokenizer")
    return lambda text: len(tokenizer(text.strip(), add_special_tokens=True)["input_ids"])
