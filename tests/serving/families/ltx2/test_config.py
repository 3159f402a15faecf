"""``model.diffusion``: the engine's config section, its defaults and its cross-field rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import load_config
from serving.families.ltx2.config import DiffusionEngineConfig
from serving.families.ltx2.config import LTX2ModelConfig as ModelConfig

GUIDANCE_OFF = dict(
    guidance_scale=1, audio_guidance_scale=1, stg_scale=0, audio_stg_scale=0, modality_scale=1, audio_modality_scale=1
)


def test_defaults_and_every_field_described():
    settings = ModelConfig().diffusion
    assert (settings.recipe, settings.batching, settings.step_cache, settings.checkpoint_every_steps) == (
        "dev",
        True,
        "none",
        4,
    )
    for name, field in DiffusionEngineConfig.model_fields.items():
        assert field.description, name
    assert ModelConfig.model_fields["diffusion"].description


def test_yaml_shaped_dicts_map_onto_it():
    config = load_config({"model": {"diffusion": {"recipe": "two_stage", "first_stage": "distilled", **{}}, **GUIDANCE_OFF}})
    assert config.model.diffusion.recipe == "two_stage"
    assert config.model.diffusion.runs_without_guidance


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"diffusion": {"recipe": "distilled"}}, "recipe distilled runs without guidance, but guidance is on"),
        (
            {"diffusion": {"recipe": "two_stage", "first_stage": "distilled"}, **GUIDANCE_OFF, "modality_scale": 2},
            r"guidance is on \(modality_scale 2\)",
        ),
        ({"diffusion": {"recipe": "two_stage"}, "default_size": "96x64"}, "must be a multiple of 64"),
        ({"diffusion": {"first_stage": "distilled"}}, "first_stage applies to the two_stage recipe only"),
        ({"diffusion": {"upsampler_path": "/models/up"}}, "upsampler_path applies to the two_stage recipe only"),
        ({"diffusion": {"step_cache": "first_block"}}, "set diffusion.batching to false"),
        ({"diffusion": {"step_cache": "mag", "batching": False}}, "needs diffusion.mag_ratios"),
        ({"diffusion": {"mag_ratios": [1.0]}}, "mag_ratios applies to step_cache mag only"),
        ({"diffusion": {"step_cache_threshold": 0.1}}, "step_cache_threshold applies to"),
        ({"diffusion": {"max_batch_tokens": 0}}, "greater than or equal to 1"),
        ({"diffusion": {"recipe": "fast"}}, "'dev', 'distilled' or 'two_stage'"),
        ({"diffusion": {"batch": True}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(model, message):
    with pytest.raises(ValidationError, match=message) as caught:
        ModelConfig.tiny(**model)
    assert "diffusion" in str(caught.value)


def test_distilled_with_guidance_off_is_accepted():
    config = ModelConfig.tiny(diffusion={"recipe": "distilled"}, **GUIDANCE_OFF)
    assert config.diffusion.runs_without_guidance
    cached = ModelConfig.tiny(diffusion={"batching": False, "step_cache": "taylorseer"})
    assert cached.diffusion.step_cache == "taylorseer"
