"""``model`` for MiniMax-H3: every field described, H3's frame and canvas rules, its latent grid."""

from __future__ import annotations

import pytest
import torch
from diffusers.modular_pipelines.minimax_h3.before_denoise import (
    MiniMaxH3PrepareLayoutStep,
)
from diffusers.modular_pipelines.minimax_h3.modular_pipeline import (
    audio_latent_num_frames,
    video_latent_num_frames,
)
from pydantic import ValidationError

from cluster.config import load_config
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig


def test_every_field_is_described_and_extra_fields_are_refused():
    for name, field in MiniMaxH3ModelConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MiniMaxH3ModelConfig(guidance_scale=3.0)  # guidance-distilled: there is none


def test_the_frame_rule_and_the_duration_bounds():
    config = MiniMaxH3ModelConfig()
    assert (config.FRAME_STEP, config.FRAME_OFFSET) == (17, 5)
    assert config.generated_frames(5.0, 24) == 124 and config.generated_frames(14.375, 24) == 345
    assert config.max_latent_tokens == config.latent_tokens(1344, 768, 14.375, 24) == 102 * 24 * 42


@pytest.mark.parametrize("frames", [124, 141, 243, 345])
def test_latent_tokens_count_the_real_packed_layout(frames):
    """The config's token count is the number of video rows diffusers' layout block packs at the real dims."""
    config = MiniMaxH3ModelConfig()
    width, height = 1344, 768
    latent_frames = video_latent_num_frames(frames, 17, 5)
    assert config.latent_frames(frames) == latent_frames
    text = torch.ones(40, dtype=torch.long)
    _, token_tags, video_indices, audio_indices, _, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        text, latent_frames, height // 16, width // 16, audio_latent_num_frames(frames), (1, 2, 2), 2, 2, 0,
    )
    seconds = (frames - 4) / 24  # a clip whose frames snap to `frames`
    assert config.generated_frames(seconds, 24) == frames
    assert config.latent_tokens(width, height, seconds, 24) == video_indices.numel()
    assert config.sequence_tokens(width, height, frames, 40) == token_tags.numel()
    assert 2 * config.audio_latents(frames) == audio_indices.numel()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_seconds": 15}, "max_seconds 15 s: the model would generate 362 frames"),
        ({"min_seconds": 4, "default_seconds": 4}, "min_seconds 4 s: the model would generate 107 frames"),
        ({"default_fps": 25}, "less than or equal to 24"),
        ({"default_size": "1000x768"}, "multiples of 32"),
        ({"default_size": "1600x768"}, "1228800 pixels, over max_pixels"),
        ({"default_size": "1536x320"}, "aspect ratio must lie between 1:4 and 4:1"),
        ({"max_reference_images": 10}, "at most 9"),
        ({"workflows": []}, "at least one workflow"),
        ({"workflows": ["t2va", "t2va"]}, "each workflow once"),
        ({"workflows": ["i2v"]}, "'t2va', 'fl2va' or 'ref2va'"),
        ({"max_width": 1000}, "max_width .* multiple of 32"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ValidationError, match=message):
        MiniMaxH3ModelConfig(**settings)


def test_a_cluster_config_selects_the_family_and_its_stages():
    config = load_config({"model": {"family": "minimax_h3"}, "rewriter": {"enabled": False}})
    assert isinstance(config.model, MiniMaxH3ModelConfig) and config.model.name == "minimax-h3-tiny"
    assert config.stage_names == ("text_encoder", "reference_encoder", "diffusion", "video_decoder", "audio_decoder",
                                  "muxer")
    with pytest.raises(ValidationError) as caught:
        load_config({"model": {"family": "minimax_h3", "path": "/m", "max_seconds": 20}})
    assert caught.value.errors()[0]["loc"] == ("model",)
    for name in ("local-cpu-h3", "8x-h100-h3", "h200-h3"):
        assert load_config(f"cluster/profiles/{name}.yaml").model.family == "minimax_h3"
