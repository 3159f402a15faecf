"""`reelserve plan`: the shipped profiles fit, impossible configs are refused naming the field, and the
sizes it reports match what the stages really produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ReelserveConfig, load_config
from cluster.plan import _first_fit, format_plan, make_plan, worst_first_fit
from serving.families import get_family

PROFILES = Path(__file__).resolve().parents[2] / "cluster" / "profiles"
MB = 1e6


@pytest.fixture
def h100() -> dict:
    return load_config(str(PROFILES / "1x-h100.yaml")).model_dump()


@pytest.mark.parametrize("profile", ["local-cpu", "1x-h100", "8x-h100", "mixed-l4-h100"])
def test_every_shipped_profile_fits(profile):
    plan = make_plan(load_config(str(PROFILES / f"{profile}.yaml")))
    assert plan.fits, format_plan(plan)
    assert {s.name for s in plan.stages} >= {"text_encoder", "diffusion", "video_decoder", "audio_decoder", "muxer"}
    for stage in plan.stages:
        if stage.budget_gb is not None:
            assert stage.needs_gb <= stage.budget_gb, stage
    # Every GPU a profile asks for at its minimum exists; the GPU stages get the device Ray gives them.
    for accelerator, count in plan.gpus_at_min.items():
        assert count <= plan.gpus_available.get(accelerator, count)
    for stage in plan.stages:
        assert stage.device == ("cuda" if stage.gpus_per_replica > 0 else "cpu"), stage


def test_the_gpu_profiles_pack_as_described():
    one = make_plan(load_config(str(PROFILES / "1x-h100.yaml")))
    assert one.gpus_at_min == {"H100": 1} and one.gpus_at_max == {"H100": 1}
    eight = make_plan(load_config(str(PROFILES / "8x-h100.yaml")))
    diffusion = next(s for s in eight.stages if s.name == "diffusion")
    assert diffusion.gpus_per_replica == 1 and diffusion.replicas == (1, 6)
    assert eight.gpus_at_max == {"H100": 8}  # 6 diffusion GPUs + everything else packed on 2
    mixed = make_plan(load_config(str(PROFILES / "mixed-l4-h100.yaml")))
    placed = {s.name: s.accelerator for s in mixed.stages if s.gpus_per_replica}
    assert placed["diffusion"] == placed["text_encoder"] == "H100"
    assert placed["image_conditioner"] == placed["video_decoder"] == placed["audio_decoder"] == "L4"


def _problems(config: dict) -> list[str]:
    plan = make_plan(ReelserveConfig.model_validate(config))
    assert not plan.fits
    return [problem.field for problem in plan.problems]


def test_a_stage_that_cannot_fit_its_accelerator_is_refused(h100):
    config = load_config(str(PROFILES / "mixed-l4-h100.yaml")).model_dump()
    config["stages"]["text_encoder"].update(accelerator_type="L4", gpu_memory_gb=None, num_gpus=1)
    assert "stages.text_encoder.num_gpus" in _problems(config)  # Gemma 3 12B + connectors: ~28 GB > an L4's 24
    h100["stages"]["text_encoder"]["gpu_memory_gb"] = 20
    assert _problems(h100) == ["stages.text_encoder.gpu_memory_gb"]


def test_a_diffusion_replica_larger_than_a_node_is_refused(h100):
    h100["stages"]["diffusion"].update(gpu_memory_gb=None, num_gpus=2)
    assert "stages.diffusion.num_gpus" in _problems(h100)


def test_a_request_limit_that_would_run_out_of_memory_is_refused(h100):
    h100["model"]["max_latent_tokens"] = 60_000  # the weights fit; the largest request's activations do not
    h100["model"]["max_seconds"] = 20
    assert "model.max_latent_tokens" in _problems(h100)


def test_an_accelerator_no_node_has_and_too_few_gpus_are_refused(h100):
    h100["stages"]["video_decoder"].update(accelerator_type="L4", gpu_memory_gb=6)
    assert "stages.video_decoder.accelerator_type" in _problems(h100)
    config = load_config(str(PROFILES / "8x-h100.yaml")).model_dump()
    config["stages"]["diffusion"].update(min_replicas=7, max_replicas=8)
    assert "nodes" in _problems(config)


def test_a_rewriter_taking_more_than_its_share_is_refused():
    config = load_config(str(PROFILES / "8x-h100.yaml")).model_dump()
    config["stages"]["prompt_rewriter"]["gpu_memory_gb"] = 20  # 0.25 of an H100, vLLM takes 0.45
    assert "rewriter.gpu_memory_utilization" in _problems(config)


def test_shared_gpus_are_counted_for_every_start_order():
    shares = [0.4, 0.5, 0.6, 0.5]
    assert _first_fit(sorted(shares, reverse=True)) == 2  # largest first: 0.6 + 0.4, 0.5 + 0.5
    assert _first_fit([0.4, 0.5, 0.6, 0.5]) == 3  # Ray, in this start order: 0.4 + 0.5, then 0.6, then 0.5
    assert worst_first_fit(shares) == 3
    assert worst_first_fit([0.25] * 4) == 1 and worst_first_fit([0.5, 0.5, 0.7]) == 2
    assert worst_first_fit([0.1] * 30) >= _first_fit([0.1] * 30)  # past the orders it tries: a bound for all


def test_shares_that_fit_only_in_some_start_orders_are_refused_naming_a_share():
    config = load_config(str(PROFILES / "8x-h100.yaml")).model_dump()
    config["nodes"][0]["gpus"] = 3  # diffusion takes 1; the shares get 2 GPUs
    config["stages"]["diffusion"].update(min_replicas=1, max_replicas=1)
    config["stages"]["text_encoder"].update(num_replicas=1, gpu_memory_gb=40)  # 0.5
    config["stages"]["prompt_rewriter"]["gpu_memory_gb"] = 48  # 0.6
    config["stages"]["video_decoder"].update(gpu_memory_gb=40, num_replicas=1)  # 0.5
    config["stages"]["image_conditioner"]["gpu_memory_gb"] = 24  # 0.3
    config["stages"]["audio_decoder"]["gpu_memory_gb"] = 8  # 0.1
    plan = make_plan(ReelserveConfig.model_validate(config))
    assert [p.field for p in plan.problems] == ["stages.prompt_rewriter.gpu_memory_gb"], format_plan(plan)
    assert "some orders need 4" in plan.problems[0].message


def test_a_sequence_parallel_diffusion_replica_is_sized_per_gpu():
    config = load_config(str(PROFILES / "8x-h100.yaml")).model_dump()
    one = next(s for s in make_plan(ReelserveConfig.model_validate(config)).stages if s.name == "diffusion")
    config["stages"]["diffusion"]["num_gpus"] = 2
    two = next(s for s in make_plan(ReelserveConfig.model_validate(config)).stages if s.name == "diffusion")
    assert two.weights_gb == one.weights_gb  # every GPU holds the whole transformer
    assert two.activations_gb == pytest.approx((one.activations_gb - 0.5) / 2 + 0.5)  # split, + its CUDA context
    assert two.budget_gb == one.budget_gb == 80  # per GPU
    assert "per GPU of 2" in two.note
    config["model"]["diffusion"] = {"step_cache": "first_block", "batching": False}
    assert "model.diffusion.step_cache" in _problems(config)


def test_a_replica_wider_than_the_local_cluster_is_refused():
    config = {"ray": {"num_gpus": 1}, "stages": {"diffusion": {"num_gpus": 2, "device": "cpu"}}}
    assert "stages.diffusion.num_gpus" in _problems(config)
    config["ray"]["num_gpus"] = 2
    assert make_plan(ReelserveConfig.model_validate(config)).fits


def test_the_plan_prints_the_expected_load_time_from_the_weight_bytes():
    config = load_config(str(PROFILES / "8x-h100.yaml")).model_dump()
    config["startup"] = {"shared_read_gb_per_s": 2.0, "cache_read_gb_per_s": 8.0}
    plan = make_plan(ReelserveConfig.model_validate(config))
    diffusion = next(s for s in plan.stages if s.name == "diffusion")
    assert diffusion.load_s == pytest.approx(diffusion.weights_gb / 2.0)
    assert diffusion.cached_load_s == pytest.approx(diffusion.weights_gb / 8.0)
    text = format_plan(plan)
    assert f"{diffusion.load_s:.1f}" in text and "startup.shared_read_gb_per_s" in text


def test_the_cli_prints_the_plan_and_exits_2_naming_the_field(tmp_path):
    good = subprocess.run(
        [sys.executable, "-m", "serving.cli", "plan", "--config", str(PROFILES / "1x-h100.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert "diffusion" in good.stdout and "fits" in good.stdout
    config = load_config(str(PROFILES / "1x-h100.yaml")).model_dump()
    config["stages"]["text_encoder"]["gpu_memory_gb"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    bad = subprocess.run(
        [sys.executable, "-m", "serving.cli", "plan", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert "problem: stages.text_encoder.gpu_memory_gb" in bad.stdout


# --------------------------------------------------------------------------- sizes at real scale


def test_real_size_hand_offs_stay_under_40_mb_per_job():
    """1280x704 x 121 frames with the published LTX-2 19B configs (no checkpoint here: the reference sizes)."""
    from serving.families.ltx2.sizing import checkpoint_source, handoff_sizes  # noqa: PLC0415 - keeps collection of `make check` fast

    config = load_config(str(PROFILES / "1x-h100.yaml"))
    assert checkpoint_source(config.model) == "reference"
    sizes = handoff_sizes(config.model, 1280, 704, 121 / 24, 24)
    # Two prompts (prompt + negative) x 1024 tokens x (3840 video + 3840 audio) in bf16, plus the masks.
    assert sizes.prompt_embeddings == 2 * (1024 * 7680 * 2 + 1024 * 8)
    assert sizes.video_latents == 128 * 16 * 22 * 40 * 4  # [1, 128, 16, 22, 40] float32: 7.2 MB
    assert sizes.encoder_to_decoders <= 40 * MB
    # What the same job moved before the connectors ran in the text encoder: all 49 Gemma layers per prompt.
    before = 2 * 1024 * 49 * 3840 * 2
    assert before > 19 * sizes.prompt_embeddings


def test_the_connectors_really_produce_those_shapes_at_real_size():
    """The real LTX2TextConnectors, built from the published config on the meta device (no weights)."""
    import torch  # noqa: PLC0415 - keeps collection of `make check` fast

    from serving.families.ltx2.reference import build_meta  # noqa: PLC0415 - keeps collection of `make check` fast

    connectors = build_meta("connectors")
    hidden = torch.empty(1, 1024, 3840 * 49, device="meta", dtype=torch.bfloat16)
    mask = torch.ones(1, 1024, device="meta", dtype=torch.int64)
    video, audio, out_mask = connectors(hidden, mask, padding_side="left")
    assert tuple(video.shape) == (1, 1024, 3840) and tuple(audio.shape) == (1, 1024, 3840)
    assert video.dtype == audio.dtype == torch.bfloat16 and tuple(out_mask.shape) == (1, 1024)


def test_sizes_match_what_the_tiny_stages_produce(tiny_config, tiny_checkpoint, sample_photo):
    """The sizing arithmetic against the stages' real hand-offs (tiny checkpoint, float32 on the CPU)."""
    from serving.families.ltx2.sizing import handoff_sizes, stage_memory  # noqa: PLC0415 - keeps collection of `make check` fast
    from serving.protocol import RenderPlan  # noqa: PLC0415 - keeps collection of `make check` fast

    family = get_family("ltx2")
    width, height, seconds, fps = 96, 64, 1.0, 24
    sizes = handoff_sizes(tiny_config, width, height, seconds, fps, transformer_dtype_bytes=4)
    encoder, conditioner = family.stage("text_encoder").component(tiny_config), family.stage("image_conditioner").component(tiny_config)
    denoiser, video_decoder, audio_decoder = (
        family.diffusion_model(tiny_config), family.stage("video_decoder").component(tiny_config), family.stage("audio_decoder").component(tiny_config)
    )
    plan = RenderPlan.build(width=width, height=height, fps=fps, seconds=seconds, seed=1, num_inference_steps=2,
                            frame_step=8)
    embeddings = encoder.encode("a cat", tiny_config.negative_prompt)
    condition = conditioner.condition(sample_photo, width, height)
    latents = denoiser.denoise(embeddings, condition, plan)
    assert embeddings.nbytes == sizes.prompt_embeddings
    assert condition.nbytes == sizes.image_condition
    assert latents.video.nbytes == sizes.video_latents
    assert latents.audio.nbytes == sizes.audio_latents
    waveform = audio_decoder.decode(latents.audio)
    assert abs(waveform.nbytes - sizes.waveform) <= 0.05 * sizes.waveform
    assert video_decoder.decode(latents.video, plan).nbytes > 0

    # Weights from the safetensors headers equal the parameters the stages hold.
    config = ReelserveConfig(model=tiny_config.model_dump())
    transformer = denoiser.transformer
    expected = sum(t.numel() for t in list(transformer.parameters()) + list(transformer.buffers())) * 4
    assert stage_memory(config, "diffusion").weights == expected
