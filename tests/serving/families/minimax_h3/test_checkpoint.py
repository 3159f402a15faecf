"""The tiny random checkpoint: the real layout and every shape rule diffusers' blocks hard-code, built offline and
cached once; the limits and the token counter read from it without weights."""

from __future__ import annotations

import json
import math

import torch
from diffusers import ModularPipeline

from serving.families import checkpoint_family, is_tiny_checkpoint
from serving.families.base import TINY_MARKER
from serving.families.minimax_h3.checkpoint import read_limits, token_counter
from serving.families.minimax_h3.processor import StandInQwen3VLProcessor
from serving.families.minimax_h3.tiny import ensure_tiny_minimax_h3
from serving.protocol import RenderPlan


def read(path, *parts) -> dict:
    return json.loads(path.joinpath(*parts).read_text())


def test_the_real_layout_with_both_partitions(h3_checkpoint, h3_family):
    index = read(h3_checkpoint, "modular_model_index.json")
    assert index["_class_name"] in h3_family.pipeline_classes and index["_blocks_class_name"] == "MiniMaxH3Blocks"
    for component in ("transformer", "transformer_ref", "text_encoder", "tokenizer", "processor", "vae", "audio_vae",
                      "scheduler", "audio_scheduler"):
        assert (h3_checkpoint / component).is_dir(), component
    assert index["processor"][:2] == ["serving.families.minimax_h3.processor", "StandInQwen3VLProcessor"]
    assert read(h3_checkpoint, TINY_MARKER) == {"family": "minimax_h3", "tiny": True}
    assert checkpoint_family(h3_checkpoint) == "minimax_h3" and is_tiny_checkpoint(h3_checkpoint)
    assert sum(f.stat().st_size for f in h3_checkpoint.rglob("*") if f.is_file()) < 8e6


def test_the_shape_rules_the_blocks_hard_code(h3_checkpoint):
    text = read(h3_checkpoint, "text_encoder", "config.json")
    tokenizer = StandInQwen3VLProcessor.from_pretrained(h3_checkpoint, subfolder="processor").tokenizer
    text_config, vision = text["text_config"], text["vision_config"]
    assert text_config["num_hidden_layers"] > 50  # the blocks read hidden_states[50]
    assert vision["out_hidden_size"] == text_config["hidden_size"]
    assert math.isqrt(vision["num_position_embeddings"]) ** 2 == vision["num_position_embeddings"]
    for name, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert text[name] == tokenizer.convert_tokens_to_ids(token)
    transformer = read(h3_checkpoint, "transformer", "config.json")
    assert transformer["attention_head_dim"] >= 6 * transformer["rope_freq_dim"]
    assert (transformer["in_channels"], transformer["audio_in_channels"], transformer["text_dim"]) == (
        24, 32, text_config["hidden_size"])
    vae = read(h3_checkpoint, "vae", "config.json")
    assert math.prod(vae["temporal_downsample_factors"]) == 4 and vae["clip_length"] == 17
    assert math.prod(vae["spatial_downsample_factors"]) == 16
    assert int(vae["decoder_attention_head_dim"] * vae["decoder_rope_dim_ratio"]) % 6 == 0
    audio = read(h3_checkpoint, "audio_vae", "config.json")
    assert audio["sampling_rate"] == 32000 and math.prod(audio["encoder_rates"]) == math.prod(audio["decoder_rates"]) == 800
    assert len(audio["latents_mean"]) == len(audio["latents_std"]) == 32


def test_a_workflow_loads_only_its_partition_offline(h3_checkpoint):
    pipeline = ModularPipeline.from_pretrained(str(h3_checkpoint), workflow="t2va")
    pipeline.load_components(dtype=torch.float32)
    assert pipeline.transformer is not None and "transformer_ref" not in pipeline.components
    assert isinstance(pipeline.processor, StandInQwen3VLProcessor)


def test_limits_and_tokens_from_configs_alone(h3_config):
    limits = read_limits(h3_config)
    assert (limits.size_multiple, limits.spatial_compression, limits.temporal_compression) == (32, 32, 4)
    assert (limits.frames_step, limits.frame_offset, limits.audio_sample_rate) == (17, 5, 32000)
    plan = RenderPlan.build(width=64, height=32, fps=24, seconds=5.0, seed=0, num_inference_steps=4,
                            frame_step=limits.frames_step, frame_offset=limits.frame_offset)
    assert (plan.generated_frames, plan.output_frames) == (124, 120)
    assert token_counter(h3_config)("a cat purrs") == len(b"a cat purrs")  # byte-level, no special tokens


def test_the_cached_build_is_made_once_and_a_broken_one_replaced(tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "leftover").write_text("an interrupted build")
    built = ensure_tiny_minimax_h3(target)
    assert built == target and not (target / "leftover").exists() and is_tiny_checkpoint(target)
    marker = (target / TINY_MARKER).stat().st_mtime_ns
    assert ensure_tiny_minimax_h3(target) == target and (target / TINY_MARKER).stat().st_mtime_ns == marker
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny"]  # no scratch folders left behind
