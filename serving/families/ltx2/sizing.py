"""How big LTX-2's stages and hand-offs are, from configs and file headers alone (no weights loaded).

Weights come from the checkpoint's safetensors headers when the checkpoint is
a local folder, and from the published LTX-2 19B configs
(``ltx2_reference``) otherwise. Activations are estimated for the largest
request the limits allow (``model.max_latent_tokens``, ``max_prompt_tokens``,
the frame caps) with the formulas below; they assume memory-efficient
attention (SDPA flash / mem-efficient on GPUs), which never materialises the
token x token score matrix. Hand-off bytes follow from the shapes the stages
produce, which the tests check against the stages' real outputs.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cluster.config import ReelserveConfig
from serving.families.ltx2.checkpoint import checkpoint_path
from serving.families.ltx2.config import LTX2ModelConfig
from serving.families.ltx2.reference import build_meta, component_config

__all__ = ["MemoryEstimate", "HandoffSizes", "stage_memory", "handoff_sizes", "checkpoint_source"]

GB = 1e9

# Bytes per element by safetensors / torch dtype name.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Which checkpoint components (and which part of them) each stage holds in memory.
_STAGE_COMPONENTS: dict[str, list[tuple[str, str | None]]] = {
    "text_encoder": [("text_encoder", None), ("connectors", None)],
    "image_conditioner": [("vae", "encoder.")],
    "diffusion": [("transformer", None)],
    "video_decoder": [("vae", "decoder.")],
    "audio_decoder": [("audio_vae", "decoder."), ("vocoder", None)],
}
MODEL_STAGES = tuple(_STAGE_COMPONENTS)


@dataclass(frozen=True)
class MemoryEstimate:
    """Device memory one replica of a stage needs, in bytes."""

    weights: int
    activations: int
    note: str  # what the activation figure assumes

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass(frozen=True)
class HandoffSizes:
    """Bytes one job hands from stage to stage, by hand-off."""

    prompt_embeddings: int  # text_encoder -> diffusion (prompt and negative prompt)
    image_condition: int  # image_conditioner -> diffusion
    video_latents: int  # diffusion -> video_decoder
    audio_latents: int  # diffusion -> audio_decoder
    encoded_video: int  # video_decoder -> muxer (estimated: H.264 at about 0.15 bit per pixel)
    waveform: int  # audio_decoder -> muxer

    @property
    def encoder_to_decoders(self) -> int:
        """Everything between the text encoder and the decoders: the hand-offs that carry tensors."""
        return self.prompt_embeddings + self.image_condition + self.video_latents + self.audio_latents

    @property
    def total(self) -> int:
        return self.encoder_to_decoders + self.encoded_video + self.waveform

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_embeddings": self.prompt_embeddings,
            "image_condition": self.image_condition,
            "video_latents": self.video_latents,
            "audio_latents": self.audio_latents,
            "encoded_video": self.encoded_video,
            "waveform": self.waveform,
        }


# --------------------------------------------------------------------------- where the numbers come from


def checkpoint_source(model: LTX2ModelConfig) -> str:
    """The local checkpoint folder whose headers are read, or "reference" (the published LTX-2 19B configs)."""
    if model.path is None:
        return checkpoint_path(model)
    folder = Path(model.path).expanduser()
    return str(folder) if (folder / "model_index.json").is_file() else "reference"


def _component_config(source: str, component: str) -> dict:
    if source == "reference":
        config = component_config(component)
    else:
        config = json.loads((Path(source) / component / "config.json").read_text())
    if component == "text_encoder":  # Gemma 3 keeps the language model's sizes in text_config
        config = {**config, **config.get("text_config", {})}
    return config


def _header_elements(source: str, component: str, prefix: str | None) -> int:
    """Parameter + buffer elements of a component, summed over its safetensors headers."""
    total = 0
    for file in sorted((Path(source) / component).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__" or (prefix is not None and not name.startswith(prefix)):
                continue
            total += math.prod(entry["shape"])
    return total


@functools.lru_cache(maxsize=None)
def _reference_elements(component: str, prefix: str | None) -> int:
    model = build_meta(component)
    if prefix is not None:
        model = getattr(model, prefix.rstrip("."))
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def _weights(source: str, stage: str, element_bytes: int) -> int:
    elements = 0
    for component, prefix in _STAGE_COMPONENTS[stage]:
        if source == "reference":
            elements += _reference_elements(component, prefix)
        else:
            elements += _header_elements(source, component, prefix)
    return elements * element_bytes


# --------------------------------------------------------------------------- activations


def _largest_frame(model: LTX2ModelConfig) -> tuple[int, int, int]:
    """(width, height, generated frames) of the largest request: the budget at the longest clip the caps allow."""
    fps = model.max_fps
    output_frames = max(1, round(model.max_seconds * fps))
    frames = math.ceil(max(output_frames - 1, 0) / 8) * 8 + 1
    latent_frames = (frames - 1) // 8 + 1
    area_tokens = max(1, model.max_latent_tokens // latent_frames)  # (h/32) x (w/32) the budget leaves at that length
    side = max(1, int(math.sqrt(area_tokens)))
    return min(model.max_width, side * 32), min(model.max_height, side * 32), frames


def _activations(
    stage: str, model: LTX2ModelConfig, source: str, element_bytes: int, concurrent: int = 1
) -> tuple[int, str]:
    tokens = model.max_latent_tokens
    if stage == "diffusion":
        tokens *= concurrent  # requests a replica holds at once run their steps in one batch
        config = _component_config(source, "transformer")
        width = config["num_attention_heads"] * config["attention_head_dim"]
        passes = 4  # conditional, unconditional, spatio-temporal and modality guidance, batched together
        # Per token per layer: residual, q/k/v, attention output and the 4x feed-forward stay live at once.
        working = passes * tokens * width * element_bytes * 9
        rope = passes * tokens * width * 4 * 2  # cos and sin tables in float32
        requests = f"{concurrent} requests x " if concurrent > 1 else ""
        return working + rope, f"{passes} guidance passes in one batch at {requests}{model.max_latent_tokens:,} latent tokens"
    if stage == "text_encoder":
        config = _component_config(source, "text_encoder")
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        prompt = model.max_prompt_tokens
        states = (layers + 1) * prompt * hidden * element_bytes  # every layer's output is kept for the connectors
        mlp = 2 * prompt * config["intermediate_size"] * element_bytes
        attention = config["num_attention_heads"] * prompt * prompt * 4
        return states + mlp + attention, f"one prompt of {prompt} tokens, all {layers + 1} hidden states kept"
    vae = _component_config(source, "vae")
    patch = vae["patch_size"]
    widest = vae["decoder_block_out_channels"][0] if stage == "video_decoder" else vae["block_out_channels"][0]
    width, height, frames = _largest_frame(model)
    if stage == "image_conditioner":
        plane = (height // patch) * (width // patch)
        return 6 * plane * widest * element_bytes, f"one {width}x{height} photo"
    if stage == "video_decoder":
        tile = 512 if model.vae_tiling else None
        h, w = (min(height, tile), min(width, tile)) if tile else (height, width)
        working = 3 * frames * (h // patch) * (w // patch) * widest * element_bytes
        output = 3 * frames * height * width * element_bytes
        how = "512 px tiles" if tile else "whole frames (vae_tiling off)"
        return working + output, f"{frames} frames at {width}x{height}, {how}"
    if stage == "audio_decoder":
        vocoder = _component_config(source, "vocoder")
        mel_frames = round(model.max_seconds * 100)
        first = vocoder["hidden_channels"] * mel_frames * vocoder["upsample_factors"][0] * 4
        return 4 * first, f"{model.max_seconds:g} s of audio"
    raise ValueError(f"no memory model for stage '{stage}'")


def stage_memory(config: ReelserveConfig, stage: str) -> MemoryEstimate:
    """Weights and peak activations of one replica of a model stage, in its configured dtype."""
    stage_model = config.stage_model(stage)
    dtype = stage_model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if stage_model.device.startswith("cuda") else "float32"
    element_bytes = _TORCH_BYTES[dtype]
    model = cast(LTX2ModelConfig, config.model)  # a family sizes its own config
    source = checkpoint_source(model)
    concurrent = config.stages[stage].max_ongoing_requests
    activations, note = _activations(stage, model, source, element_bytes, concurrent)
    return MemoryEstimate(weights=_weights(source, stage, element_bytes), activations=activations, note=note)


# --------------------------------------------------------------------------- hand-offs


def handoff_sizes(
    model: LTX2ModelConfig, width: int, height: int, seconds: float, fps: int, transformer_dtype_bytes: int = 2
) -> HandoffSizes:
    """Bytes of every hand-off of one job of this size (text connectors' outputs in the transformer's dtype)."""
    source = checkpoint_source(model)
    connectors = _component_config(source, "connectors")
    vae = _component_config(source, "vae")
    audio_vae = _component_config(source, "audio_vae")
    vocoder = _component_config(source, "vocoder")
    transformer = _component_config(source, "transformer")

    prompt_tokens = model.max_prompt_tokens  # padded to the full length (LTX-2's registers fill it)
    video_width = connectors["video_connector_num_attention_heads"] * connectors["video_connector_attention_head_dim"]
    audio_width = connectors["audio_connector_num_attention_heads"] * connectors["audio_connector_attention_head_dim"]
    guided = model.guidance_scale > 1.0 or model.audio_guidance_scale > 1.0
    per_prompt = prompt_tokens * (video_width + audio_width) * transformer_dtype_bytes + prompt_tokens * 8
    prompt_embeddings = per_prompt * (2 if guided else 1)

    tokens = model.latent_tokens(width, height, seconds, fps)
    channels = vae["latent_channels"]
    spatial = vae.get("spatial_compression_ratio") or 32
    image_condition = channels * (height // spatial) * (width // spatial) * 4
    video_latents = channels * tokens * 4

    output_frames = max(1, round(seconds * fps))
    generated = math.ceil(max(output_frames - 1, 0) / 8) * 8 + 1
    audio_frames = round(generated / fps * audio_vae["sample_rate"] / audio_vae["mel_hop_length"] / transformer["audio_scale_factor"])
    mel_bins = audio_vae["mel_bins"] // 4  # the audio VAE compresses mel bins 4x
    audio_latents = audio_vae["latent_channels"] * audio_frames * mel_bins * 4

    encoded_video = int(output_frames * width * height * 0.15 / 8)
    waveform = vocoder["out_channels"] * round(generated / fps * vocoder["output_sampling_rate"]) * 4
    return HandoffSizes(
        prompt_embeddings=prompt_embeddings,
        image_condition=image_condition,
        video_latents=video_latents,
        audio_latents=audio_latents,
        encoded_video=encoded_video,
        waveform=waveform,
    )
