"""Floating-point work of one LTX-2 transformer pass, computed from its config, and MFU.

Counted: every matrix product (a multiply-add is 2 FLOPs) -- the linear
layers and the two products inside each attention (scores and weighted
values, 4 x tokens_q x tokens_k x width). Not counted: norms, softmax, GELU,
RoPE and modulation arithmetic (elementwise, well under 1% at real size).
That is the same set of operations ``torch.utils.flop_counter`` counts, which
the tests use as the independent check.

The pass reads only the config (a dict, e.g.
``ltx2_reference.component_config("transformer")`` or a loaded model's
``config``), so it sizes any LTX-2 variant: the 19B checkpoint, the tiny test
model, or a CPU benchmark profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = [
    "PassShape",
    "GuidancePasses",
    "transformer_pass_flops",
    "guided_step_flops",
    "model_flops_utilization",
    "bf16_peak_flops",
    "BF16_DENSE_PEAK",
]

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
BF16_DENSE_PEAK = {
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.5e12,
    "H200": 989.4e12,
    "H20": 148.0e12,
    "GH200": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "L20": 119.5e12,
    "B200": 2250.0e12,
}


@dataclass(frozen=True)
class PassShape:
    """What one transformer call sees.

    ``per_token_timesteps``: image-to-video gives every video token its own
    timestep, so the video timestep embeddings run once per token instead of
    once per sample.
    """

    video_tokens: int
    audio_tokens: int
    text_tokens: int
    batch: int = 1
    per_token_timesteps: bool = False


@dataclass(frozen=True)
class GuidancePasses:
    """Which transformer passes one denoising step runs (LTX-2's default guidance runs all of them).

    ``cfg``: conditional + unconditional in one batch of 2. ``stg_blocks``:
    blocks perturbed by the spatio-temporal guidance pass (0: no STG pass).
    ``modality``: a pass with audio<->video attention switched off.
    """

    cfg: bool = True
    stg_blocks: int = 1
    modality: bool = True

    @classmethod
    def none(cls) -> GuidancePasses:
        return cls(cfg=False, stg_blocks=0, modality=False)


def transformer_pass_flops(
    config: Mapping,
    shape: PassShape,
    *,
    isolate_modalities: bool = False,
    perturbed_blocks: int = 0,
) -> dict[str, int]:
    """FLOPs of one transformer call, broken down by part; ``sum(...values())`` is the total.

    ``isolate_modalities``: the modality-guidance pass (no audio<->video
    attention). ``perturbed_blocks``: blocks whose self-attention STG
    shortcuts to its values (only checkpoints built with ``perturbed_attn``
    shortcut it; others run those blocks in full).
    """
    c = _Dims(config)
    b, tv, ta, tt = shape.batch, shape.video_tokens, shape.audio_tokens, shape.text_tokens
    rows_v, rows_a, rows_t = b * tv, b * ta, b * tt
    layers = c.layers
    perturbed = min(perturbed_blocks, layers) if c.perturbed_attn else 0

    def self_attention(rows: int, tokens: int, width: int, heads: int, gated: bool, shortcut: int) -> int:
        full = 4 * _linear(rows, width, width) + 4 * b * tokens * tokens * width
        values_only = 2 * _linear(rows, width, width)  # STG: value and output projections only
        gate = _linear(rows, width, heads) if gated else 0
        return (layers - shortcut) * full + shortcut * values_only + layers * gate

    def text_cross_attention(rows: int, tokens: int, width: int, heads: int, gated: bool) -> int:
        projections = 2 * _linear(rows, width, width) + 2 * _linear(rows_t, width, width)
        gate = _linear(rows, width, heads) if gated else 0
        return layers * (projections + 4 * b * tokens * tt * width + gate)

    breakdown = {
        "video_self_attention": self_attention(rows_v, tv, c.video, c.video_heads, c.video_gated, perturbed),
        "audio_self_attention": self_attention(rows_a, ta, c.audio, c.audio_heads, c.audio_gated, perturbed),
        "video_text_cross_attention": text_cross_attention(rows_v, tv, c.video, c.video_heads, c.video_gated),
        "audio_text_cross_attention": text_cross_attention(rows_a, ta, c.audio, c.audio_heads, c.audio_gated),
        "audio_to_video_attention": 0 if isolate_modalities else layers * _audio_to_video(c, b, tv, ta),
        "video_to_audio_attention": 0 if isolate_modalities else layers * _video_to_audio(c, b, tv, ta),
        "video_ffn": layers * 2 * _linear(rows_v, c.video, c.video * c.ffn_mult),
        "audio_ffn": layers * 2 * _linear(rows_a, c.audio, c.audio * c.ffn_mult),
        "projections": _outer_projections(c, shape),
    }
    return breakdown


def _audio_to_video(c: _Dims, b: int, tv: int, ta: int) -> int:
    """Queries from video, keys and values from audio, in the audio attention width."""
    return (
        _linear(b * tv, c.video, c.cross_modal)  # to_q
        + 2 * _linear(b * ta, c.audio, c.cross_modal)  # to_k, to_v
        + _linear(b * tv, c.cross_modal, c.video)  # to_out
        + 4 * b * tv * ta * c.cross_modal
        + (_linear(b * tv, c.video, c.audio_heads) if c.video_gated else 0)
    )


def _video_to_audio(c: _Dims, b: int, tv: int, ta: int) -> int:
    """Queries from audio, keys and values from video."""
    return (
        _linear(b * ta, c.audio, c.cross_modal)
        + 2 * _linear(b * tv, c.video, c.cross_modal)
        + _linear(b * ta, c.cross_modal, c.audio)
        + 4 * b * ta * tv * c.cross_modal
        + (_linear(b * ta, c.audio, c.audio_heads) if c.audio_gated else 0)
    )


def _outer_projections(c: _Dims, shape: PassShape) -> int:
    """Patch projections in and out, caption projections, timestep embeddings and modulation."""
    b = shape.batch
    rows_v, rows_a, rows_t = b * shape.video_tokens, b * shape.audio_tokens, b * shape.text_tokens
    flops = _linear(rows_v, c.in_channels, c.video) + _linear(rows_v, c.video, c.out_channels)
    flops += _linear(rows_a, c.audio_in_channels, c.audio) + _linear(rows_a, c.audio, c.audio_out_channels)
    if c.caption_projection:
        flops += _linear(rows_t, c.caption_channels, c.video) + _linear(rows_t, c.video, c.video)
        flops += _linear(rows_t, c.caption_channels, c.audio) + _linear(rows_t, c.audio, c.audio)
    timestep_rows_v = rows_v if shape.per_token_timesteps else b
    timestep_rows_a = b
    video_params = 9 if c.video_cross_attn_mod else 6
    audio_params = 9 if c.audio_cross_attn_mod else 6
    # time_embed, av scale/shift (4 sets), a2v gate (1 set): each embeds the timestep then projects.
    for params in (video_params, 4, 1):
        flops += _adaln_single(timestep_rows_v, c.video, params)
    for params in (audio_params, 4, 1):
        flops += _adaln_single(timestep_rows_a, c.audio, params)
    if c.prompt_adaln:
        flops += _adaln_single(b, c.video, 2) + _adaln_single(b, c.audio, 2)
    return flops


def _adaln_single(rows: int, width: int, params: int) -> int:
    """Sinusoidal 256 -> width -> width, then width -> params x width."""
    return _linear(rows, 256, width) + _linear(rows, width, width) + _linear(rows, width, params * width)


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


class _Dims:
    """The widths a pass depends on, read from a transformer config."""

    def __init__(self, config: Mapping):
        get: Callable[..., Any] = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
        self.layers = int(get("num_layers"))
        self.video_heads = int(get("num_attention_heads"))
        self.video = self.video_heads * int(get("attention_head_dim"))
        self.audio_heads = int(get("audio_num_attention_heads"))
        self.audio = self.audio_heads * int(get("audio_attention_head_dim"))
        self.cross_modal = self.audio  # a2v / v2a attention runs in the audio stream's width
        self.in_channels = int(get("in_channels"))
        self.out_channels = int(get("out_channels") or self.in_channels)
        self.audio_in_channels = int(get("audio_in_channels"))
        self.audio_out_channels = int(get("audio_out_channels") or self.audio_in_channels)
        self.caption_channels = int(get("caption_channels"))
        self.caption_projection = bool(get("use_prompt_embeddings", True))
        self.video_gated = bool(get("gated_attn", False))
        self.audio_gated = bool(get("audio_gated_attn", False))
        self.video_cross_attn_mod = bool(get("cross_attn_mod", False))
        self.audio_cross_attn_mod = bool(get("audio_cross_attn_mod", False))
        self.prompt_adaln = (self.video_cross_attn_mod or self.audio_cross_attn_mod) and bool(
            get("use_prompt_adaln_single", True)
        )
        self.perturbed_attn = bool(get("perturbed_attn", False))
        self.ffn_mult = 4  # diffusers' FeedForward default, which LTX-2 blocks use
        activation = get("activation_fn", "gelu-approximate")
        if activation not in ("gelu-approximate", "gelu"):
            raise ValueError(f"activation_fn {activation!r}: only GELU feed-forwards are counted")
        # The caption projections map text to each stream's own width, so cross-attention keys come in at it.
        for key, width in (("cross_attention_dim", self.video), ("audio_cross_attention_dim", self.audio)):
            if int(get(key)) != width:
                raise ValueError(f"{key} {get(key)} differs from the stream width {width}: not an LTX-2 layout")


def guided_step_flops(config: Mapping, shape: PassShape, guidance: GuidancePasses) -> int:
    """FLOPs of one denoising step: every transformer pass its guidance runs (``shape.batch`` jobs)."""
    first = PassShape(**{**shape.__dict__, "batch": shape.batch * (2 if guidance.cfg else 1)})
    total = sum(transformer_pass_flops(config, first).values())
    if guidance.stg_blocks:
        total += sum(transformer_pass_flops(config, shape, perturbed_blocks=guidance.stg_blocks).values())
    if guidance.modality:
        total += sum(transformer_pass_flops(config, shape, isolate_modalities=True).values())
    return total


def model_flops_utilization(flops: float, seconds: float, peak_flops_per_second: float) -> float:
    """Share of the peak used: FLOPs done / (seconds x peak)."""
    if seconds <= 0 or peak_flops_per_second <= 0:
        raise ValueError("seconds and peak must be positive")
    return flops / (seconds * peak_flops_per_second)


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak for a GPU name as CUDA reports it (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    name = device_name.upper()
    if "H100" in name:
        if "PCIE" in name:
            return BF16_DENSE_PEAK["H100 PCIe"]
        if "NVL" in name:
            return BF16_DENSE_PEAK["H100 NVL"]
        return BF16_DENSE_PEAK["H100 SXM"]  # "NVIDIA H100 80GB HBM3" is the SXM part
    for key in ("GH200", "H200", "H20", "A100", "L40S", "L20", "B200"):
        if key in name:
            return BF16_DENSE_PEAK[key]
    return None
