"""Sizing H3 from its published configs: 61.7 GiB per transformer partition, what fits where, and hand-off sizes
under the names the stages declare."""

from __future__ import annotations

import inspect

import pytest
from diffusers import (
    AutoencoderKLMiniMaxH3,
    AutoencoderKLMiniMaxH3Audio,
    MiniMaxH3Transformer3DModel,
)

from cluster.config import load_config
from cluster.plan import make_plan
from serving.families.minimax_h3 import reference
from serving.families.minimax_h3.sizing import handoff_sizes, stage_memory
from tests.serving.families.minimax_h3.conftest import HEIGHT, SECONDS, WIDTH

GIB = 2**30


def test_a_partition_is_61_7_gib_in_bfloat16():
    """Counted on the meta device from diffusers' class defaults (the released model's dims)."""
    elements = reference.component_elements("transformer")
    assert elements == reference.component_elements("transformer_ref")
    assert 33.0e9 < elements < 33.2e9
    assert round(2 * elements / GIB, 1) == 61.7  # diffusers' "61.7GB": GiB
    assert round(2 * reference.component_elements("text_encoder") / 1e9, 1) == 66.7  # Qwen3-VL-32B
    assert round(4 * reference.component_elements("vae") / 1e9, 1) == 10.4  # float32, as released


@pytest.mark.parametrize(("name", "cls"), [("transformer", MiniMaxH3Transformer3DModel),
                                            ("vae", AutoencoderKLMiniMaxH3), ("audio_vae", AutoencoderKLMiniMaxH3Audio)])
def test_the_reference_configs_are_diffusers_class_defaults(name, cls):
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    for key, value in reference.component_config(name).items():
        assert defaults[key] == value, key


def test_plan_says_where_a_partition_does_not_fit_one_gpu():
    fits = make_plan(load_config("cluster/profiles/8x-h100-h3.yaml"))
    assert fits.fits, fits.problems
    diffusion = next(stage for stage in fits.stages if stage.name == "diffusion")
    assert round(diffusion.weights_gb, 2) == 66.25 and diffusion.needs_gb <= 80
    # H3's largest request (1344x768 for 14.375 s) beside a partition on one 80 GB H100: too little room left.
    raw = load_config("cluster/profiles/8x-h100-h3.yaml").model_dump(exclude_unset=True)
    raw["model"].update(max_seconds=14.375, max_latent_tokens=102_816)
    largest = make_plan(load_config(raw))
    assert [problem.field for problem in largest.problems] == ["model.max_latent_tokens"]
    assert "diffusion needs about" in largest.problems[0].message
    # Both partitions on one replica (all three workflows): the weights alone exceed the GPU.
    raw["model"].update(workflows=["t2va", "fl2va", "ref2va"], max_latent_tokens=37_296, max_seconds=5)
    both = make_plan(load_config(raw))
    assert any(p.field == "stages.diffusion.num_gpus" and "132.5 weights" in p.message for p in both.problems)
    assert make_plan(load_config("cluster/profiles/h200-h3.yaml")).fits


def test_handoffs_are_named_as_the_stages_declare_and_match_real_outputs(h3_family, h3_config, h3_stages, h3_plan):
    declared = {name for stage in h3_family.stages for outputs in stage.methods.values() for name in outputs}
    sizes = handoff_sizes(h3_config, WIDTH, HEIGHT, SECONDS, 24)
    assert set(sizes.as_dict()) == declared
    plan = make_plan(load_config("cluster/profiles/local-cpu-h3.yaml"))
    assert plan.fits and set(plan.handoffs) == declared
    # What the stages really hand on at this size.
    text = h3_stages["text_encoder"].encode("a cat", h3_plan)
    denoised = h3_stages["diffusion"].denoise(text, None, h3_plan)
    assert denoised.video.nbytes == sizes.video_latents and denoised.audio.nbytes == sizes.audio_latents
    waveform = h3_stages["audio_decoder"].decode(denoised.audio)
    assert waveform.nbytes == pytest.approx(sizes.waveform, rel=0.005)  # the decoder's convolutions pad a little


def test_stage_memory_of_the_h200_profile():
    config = load_config("cluster/profiles/h200-h3.yaml")
    diffusion = stage_memory(config, "diffusion")
    assert diffusion.weights == 2 * reference.component_elements("transformer_ref")
    assert "transformer_ref/" in diffusion.note and "102,816 video tokens" in diffusion.note
    text = stage_memory(config, "text_encoder")
    assert text.weights == 2 * reference.component_elements("text_encoder") and text.total < 141e9
