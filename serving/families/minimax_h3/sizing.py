"""How big MiniMax-H3's stages and hand-offs are, from configs and file headers alone (no weights loaded).

Weights come from the checkpoint's safetensors headers when the checkpoint is a
local folder, and from the published configs (``reference.py``, built on the
meta device) otherwise. The diffusion stage holds one 61.7 GiB (66.25 GB)
partition per transformer its workflows need: both when a deployment serves
ref2va beside t2va or fl2va. Weights count in the stage's dtype, except the
modules diffusers keeps in float32 on load (the VAEs' encoders and norms, the
audio VAE whole).

Activations are estimated for the largest request the limits allow, assuming
memory-efficient attention (no token x token matrix):

- diffusion: the packed sequence (text + reference rows + audio + video tokens
  at ``max_latent_tokens``) times what one block keeps live per row: the
  residual stream and its norm, the per-row AdaLN modulations, q/k/v and the
  attention output (56 x 128 wide), and the SwiGLU's three 14336-wide tensors;
- text encoder: Qwen3-VL run with ``output_hidden_states`` keeps every layer's
  output (65 x 5120 per token), over the prompt and, for ref2va, 9 reference
  images at their 2048-pixel short edge (7,296 vision tokens each);
- VAEs: a 256-pixel tile of a 17-frame clip (tiling is on, as released).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cluster.config import ReelserveConfig
from serving.families.minimax_h3 import reference
from serving.families.minimax_h3.checkpoint import (
    TRANSFORMER_OF_WORKFLOW,
    checkpoint_path,
    pipeline_index,
)
from serving.families.minimax_h3.config import FPS, MiniMaxH3ModelConfig

__all__ = ["HandoffSizes", "MemoryEstimate", "checkpoint_source", "handoff_sizes", "stage_memory"]

GB = 1e9
_TORCH_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Which checkpoint components (and which part of them) each stage holds, and whether that part stays float32
# whatever the stage's dtype (the classes' _keep_in_fp32_modules).
_STAGE_COMPONENTS: dict[str, list[tuple[str, str | None, bool]]] = {
    "text_encoder": [("text_encoder", None, False)],
    "reference_encoder": [("vae", "encoder", True), ("vae", "quant_conv", True), ("audio_vae", "encoder", True),
                          ("audio_vae", "pre_block", True), ("audio_vae", "mean_proj", True),
                          ("audio_vae", "logs_proj", True)],
    "video_decoder": [("vae", "decoder", False), ("vae", "post_quant_conv", False)],
    "audio_decoder": [("audio_vae", "decoder", True), ("audio_vae", "dec_in_proj", True)],
}
_REFERENCE_IMAGE_SHORT_EDGE = 2048  # the released checkpoint's reference_image_short_edge (its index's config)
_VIDEO_PROCESSOR_PIXELS = 768 * 32 * 32  # Qwen3-VL's video processor caps a video's total pixels
_H264_BITS_PER_PIXEL = 0.15


@dataclass(frozen=True)
class MemoryEstimate:
    """Device memory one replica of a stage needs, in bytes."""

    weights: int
    activations: int
    note: str

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass(frozen=True)
class HandoffSizes:
    """Bytes one job hands from stage to stage, by hand-off (the stages' declared output names)."""

    text_conditioning: int  # text_encoder -> diffusion
    reference_conditioning: int  # reference_encoder -> diffusion
    video_latents: int  # diffusion -> video_decoder
    audio_latents: int  # diffusion -> audio_decoder
    encoded_video: int  # video_decoder -> muxer (estimated: H.264 at about 0.15 bit per pixel)
    waveform: int  # audio_decoder -> muxer

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return {
            "text_conditioning": self.text_conditioning,
            "reference_conditioning": self.reference_conditioning,
            "video_latents": self.video_latents,
            "audio_latents": self.audio_latents,
            "encoded_video": self.encoded_video,
            "waveform": self.waveform,
        }


# --------------------------------------------------------------------------- where the numbers come from


def checkpoint_source(model: MiniMaxH3ModelConfig) -> str:
    """The local checkpoint folder whose headers are read, or "reference" (the published configs)."""
    if model.path is None:
        return checkpoint_path(model)
    folder = Path(model.path).expanduser()
    return str(folder) if (folder / "modular_model_index.json").is_file() else "reference"


def _component_config(source: str, component: str) -> dict:
    if source == "reference":
        return reference.component_config(component)
    return json.loads((Path(source) / component / "config.json").read_text())


def _reference_image_rows(source: str) -> tuple[int, int]:
    """(height, width) in 32-pixel tokens of a 16:9 reference image at the checkpoint's reference short edge."""
    short = _REFERENCE_IMAGE_SHORT_EDGE
    if source != "reference":
        short = int(pipeline_index(source).get("reference_image_short_edge", short))
    return short // 32, round(short * 16 / 9 / 32)


def _elements(source: str, component: str, part: str | None) -> int:
    if source == "reference":
        return reference.component_elements(component, part)
    total = 0
    for file in sorted((Path(source) / component).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__" and (part is None or name.startswith(part + ".")):
                total += math.prod(entry["shape"])
    return total


def _partitions(model: MiniMaxH3ModelConfig) -> list[str]:
    return sorted({TRANSFORMER_OF_WORKFLOW[w] for w in model.workflows})


def _weights(source: str, stage: str, model: MiniMaxH3ModelConfig, element_bytes: int) -> tuple[int, str]:
    if stage == "diffusion":
        partitions = _partitions(model)
        return sum(_elements(source, p, None) for p in partitions) * element_bytes, " + ".join(f"{p}/" for p in partitions)
    total = 0
    for component, part, fp32 in _STAGE_COMPONENTS[stage]:
        total += _elements(source, component, part) * (4 if fp32 else element_bytes)
    return total, ""


# --------------------------------------------------------------------------- activations


def _largest_sequence(model: MiniMaxH3ModelConfig, source: str) -> tuple[int, int]:
    """(packed rows, video tokens) of the largest request: the token budget at the longest clip, plus its audio,
    its text and, for ref2va, reference rows."""
    generated = model.generated_frames(model.max_seconds, FPS)
    video = model.max_latent_tokens
    audio = 2 * model.audio_latents(generated)
    references = 0
    if "ref2va" in model.workflows:
        # The reference images at the checkpoint's reference short edge (16:9: 2048 x 3648 -> 64 x 114 rows).
        height, width = _reference_image_rows(source)
        references = model.max_reference_images * height * width
    elif "fl2va" in model.workflows:
        references = 2 * video // model.latent_frames(generated)  # two keyframes of one latent frame each
    return model.max_prompt_tokens + references + audio + video, video


def _diffusion_activations(model: MiniMaxH3ModelConfig, source: str, element_bytes: int, concurrent: int):
    config = _component_config(source, _partitions(model)[0])
    hidden, ffn = config["hidden_size"], config["ffn_dim"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    rows, video = _largest_sequence(model, source)
    rows *= concurrent  # requests a replica holds batch into one pass
    per_row = element_bytes * (6 * hidden + 4 * inner + 3 * ffn)
    rope = 2 * 6 * config["rope_freq_dim"] * 4  # cos and sin, float32
    requests = f"{concurrent} requests x " if concurrent > 1 else ""
    return rows * (per_row + rope), f"one pass over {requests}{rows // concurrent:,} packed rows ({video:,} video tokens)"


def _text_tokens(model: MiniMaxH3ModelConfig, source: str) -> int:
    """Rows of the largest presentation the conditioner reads."""
    tokens = model.max_prompt_tokens
    if "ref2va" in model.workflows:
        height, width = _reference_image_rows(source)  # 2x2-merged 16-pixel patches: 32-pixel tokens
        tokens += model.max_reference_images * height * width + model.max_reference_videos * _VIDEO_PROCESSOR_PIXELS // 1024
    elif "fl2va" in model.workflows:
        width, height = model.max_width, model.max_pixels // model.max_width
        tokens += 2 * (width // 32) * (height // 32)
    return tokens


def _activations(stage: str, model: MiniMaxH3ModelConfig, source: str, element_bytes: int,
                 concurrent: int) -> tuple[int, str]:
    if stage == "diffusion":
        return _diffusion_activations(model, source, element_bytes, concurrent)
    if stage == "text_encoder":
        text = _component_config(source, "text_encoder")["text_config"]
        hidden, layers = text["hidden_size"], text["num_hidden_layers"]
        tokens = _text_tokens(model, source)
        states = (layers + 1) * tokens * hidden * element_bytes  # output_hidden_states keeps every layer's
        mlp = 3 * tokens * text["intermediate_size"] * element_bytes
        return states + mlp, f"{tokens:,} rows (prompt + vision blocks), all {layers + 1} hidden states kept"
    tile, frames = 256, 17  # the VAEs encode and decode 256-pixel tiles of 17-frame clips (tiling on, as released)
    if stage == "reference_encoder":
        vae = _component_config(source, "vae")
        widest = max(vae["block_out_channels"])
        working = 4 * frames * tile * tile * vae["block_out_channels"][0] * 4 + 4 * frames * (tile // 8) ** 2 * widest * 4
        return working, "one 256-pixel tile of a 17-frame clip, float32 encoder"
    if stage == "video_decoder":
        vae = _component_config(source, "vae")
        width = vae["decoder_num_attention_heads"] * vae["decoder_attention_head_dim"]
        tokens = 5 * (tile // 16) ** 2  # one clip of 5 latent frames, one tile
        working = tokens * width * 12 * element_bytes
        generated = model.generated_frames(model.max_seconds, FPS)
        output = generated * model.max_pixels * 3 * 4  # the decoded clip, float32, before it becomes bytes
        return working + output, f"{generated} frames at up to {model.max_pixels:,} pixels, 256-pixel tiles"
    if stage == "audio_decoder":
        audio = _component_config(source, "audio_vae")
        samples = round(model.max_seconds * audio.get("sampling_rate", 32000))
        return 2 * 4 * samples * 32 * 4, f"{model.max_seconds:g} s of stereo audio"
    raise ValueError(f"no memory model for stage '{stage}'")


def stage_memory(config: ReelserveConfig, stage: str) -> MemoryEstimate:
    """Weights and peak activations of one replica of a model stage, in its configured dtype."""
    stage_model = config.stage_model(stage)
    dtype = stage_model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if stage_model.device.startswith("cuda") else "float32"
    element_bytes = _TORCH_BYTES[dtype]
    model = cast(MiniMaxH3ModelConfig, config.model)  # a family sizes its own config
    source = checkpoint_source(model)
    concurrent = config.stages[stage].max_ongoing_requests if stage == "diffusion" else 1
    weights, which = _weights(source, stage, model, element_bytes)
    activations, note = _activations(stage, model, source, element_bytes, concurrent)
    if which:
        note = f"{which} weights; {note}"
    return MemoryEstimate(weights=weights, activations=activations, note=note)


# --------------------------------------------------------------------------- hand-offs


def handoff_sizes(model: MiniMaxH3ModelConfig, width: int, height: int, seconds: float, fps: int,
                  text_dtype_bytes: int = 2) -> HandoffSizes:
    """Bytes of every hand-off of one job of this size. Conditioning is counted for the richest workflow the
    deployment serves: ref2va at its reference caps, else fl2va with both keyframes, else t2va's none."""
    source = checkpoint_source(model)
    text_width = _component_config(source, "text_encoder")["text_config"]["hidden_size"]
    vae = _component_config(source, "vae")
    channels = vae["latent_channels"]
    spatial = math.prod(vae["spatial_downsample_factors"])
    generated = model.generated_frames(seconds, FPS)
    audio_latents = model.audio_latents(generated)

    text_tokens = _text_tokens(model, source)
    text_conditioning = text_tokens * (text_width * text_dtype_bytes + 8)  # states + int64 row tags
    reference_conditioning = 0
    if "ref2va" in model.workflows:
        height_tokens, width_tokens = _reference_image_rows(source)
        image = channels * (height_tokens * 32 // spatial) * (width_tokens * 32 // spatial) * 4
        video_seconds = min(model.max_video_reference_seconds_total, seconds)
        video = channels * model.latent_frames(model.generated_frames(video_seconds, FPS)) * (
            height // spatial) * (width // spatial) * 4
        audio = 2 * audio_latents * 32 * 4 * model.max_reference_audios
        reference_conditioning = model.max_reference_images * image + video + audio
    elif "fl2va" in model.workflows:
        reference_conditioning = 2 * channels * (height // spatial) * (width // spatial) * 4

    video_latents = channels * model.latent_frames(generated) * (height // spatial) * (width // spatial) * 4
    audio_latents_bytes = 2 * 32 * audio_latents * 4
    output_frames = max(1, round(seconds * fps))
    encoded_video = int(output_frames * width * height * _H264_BITS_PER_PIXEL / 8)
    hop = math.prod(_component_config(source, "audio_vae").get("encoder_rates", (800,)))
    waveform = 2 * audio_latents * hop * 4
    return HandoffSizes(
        text_conditioning=text_conditioning,
        reference_conditioning=reference_conditioning,
        video_latents=video_latents,
        audio_latents=audio_latents_bytes,
        encoded_video=encoded_video,
        waveform=waveform,
    )
