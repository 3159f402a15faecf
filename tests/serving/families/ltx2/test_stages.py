"""The LTX-2 family on the tiny checkpoint.

The stages, run one after another, must give what the whole diffusers
pipeline gives for the same seed; the tiny checkpoint must load back with the
real ``from_pretrained``; the step callback must report and cancel.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

from serving.errors import JobCancelled
from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig as ModelConfig
from serving.families.ltx2.stages import center_crop_to_aspect
from serving.families.ltx2.tiny import ensure_tiny_ltx2, is_complete_checkpoint, tiny_ltx2_components
from serving.protocol import HostTensor, RenderPlan

WIDTH, HEIGHT = 96, 64  # non-square, so a width/height swap shows
FPS = 24
SECONDS = 0.5  # 12 output frames, 17 generated (8k + 1)
STEPS = 3
SEED = 7
PROMPT = "a tabby cat looks around and purrs"

COMPONENT_NAMES = ["scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder"]


@pytest.fixture(scope="module")
def family():
    return get_family("ltx2")


@pytest.fixture(scope="module")
def stages(family, tiny_config):
    """All five stages of the tiny checkpoint, each loading its own components."""
    return SimpleNamespace(
        text_encoder=family.stage("text_encoder").component(tiny_config),
        image_conditioner=family.stage("image_conditioner").component(tiny_config),
        denoiser=family.diffusion_model(tiny_config),
        video_decoder=family.stage("video_decoder").component(tiny_config),
        audio_decoder=family.stage("audio_decoder").component(tiny_config),
    )


@pytest.fixture(scope="module")
def plan():
    return RenderPlan.build(
        width=WIDTH,
        height=HEIGHT,
        fps=FPS,
        seconds=SECONDS,
        seed=SEED,
        num_inference_steps=STEPS,
        frame_step=8,
    )


@pytest.fixture(scope="module")
def photo_3x2(sample_photo):
    """The sample photo cropped to exactly 3:2 (the target's aspect), so our centre crop is a no-op."""
    photo = sample_photo.crop((0, 0, 450, 300))
    assert photo.size[0] * HEIGHT == photo.size[1] * WIDTH
    return photo


def _pipeline_kwargs(config, plan):
    """The pipeline call with exactly the guidance settings the ModelConfig gives the denoiser."""
    return dict(
        prompt=PROMPT,
        negative_prompt=config.negative_prompt,
        height=plan.height,
        width=plan.width,
        num_frames=plan.generated_frames,
        frame_rate=float(plan.fps),
        num_inference_steps=plan.num_inference_steps,
        guidance_scale=config.guidance_scale,
        audio_guidance_scale=config.audio_guidance_scale,
        stg_scale=config.stg_scale,
        audio_stg_scale=config.audio_stg_scale,
        spatio_temporal_guidance_blocks=list(config.stg_blocks),
        modality_scale=config.modality_scale,
        audio_modality_scale=config.audio_modality_scale,
        guidance_rescale=config.guidance_rescale,
        audio_guidance_rescale=config.guidance_rescale,
        max_sequence_length=config.max_prompt_tokens,
        generator=torch.Generator().manual_seed(plan.seed),
        output_type="np",
        return_dict=False,
    )


def _run_stages(stages, config, plan, photo):
    embeddings = stages.text_encoder.encode(PROMPT, config.negative_prompt)
    condition = None if photo is None else stages.image_conditioner.condition(photo, plan.width, plan.height)
    steps = []
    latents = stages.denoiser.denoise(embeddings, condition, plan, on_step=lambda k, n: steps.append((k, n)))
    return SimpleNamespace(
        embeddings=embeddings,
        condition=condition,
        steps=steps,
        latents=latents,
        pixels=stages.video_decoder.decode_pixels(latents.video),
        audio=stages.audio_decoder.decode_tensor(latents.audio),
        video_out=stages.video_decoder.decode(latents.video, plan),
        waveform=stages.audio_decoder.decode(latents.audio),
    )


def _to_bytes(unit_float_frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit_float_frames * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- stages == whole pipeline


@pytest.mark.parametrize("mode", ["image-to-video", "text-to-video"])
def test_stages_equal_the_whole_pipeline(mode, stages, tiny_config, tiny_checkpoint, plan, photo_3x2):
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline  # noqa: PLC0415 - keeps collection of `make check` fast

    image_to_video = mode == "image-to-video"
    photo = photo_3x2 if image_to_video else None
    if image_to_video:
        assert center_crop_to_aspect(photo, WIDTH, HEIGHT) is photo  # the crop is a no-op here

    ours = _run_stages(stages, tiny_config, plan, photo)

    pipeline_class = LTX2ImageToVideoPipeline if image_to_video else LTX2Pipeline
    pipeline = pipeline_class.from_pretrained(str(tiny_checkpoint))
    pipeline.set_progress_bar_config(disable=True)
    extra = {"image": photo} if image_to_video else {}
    with torch.no_grad():
        video, audio = pipeline(**_pipeline_kwargs(tiny_config, plan), **extra)

    assert ours.steps == [(k, STEPS) for k in range(1, STEPS + 1)]
    assert ours.embeddings.negative is not None  # guidance is on in this config

    # Video: the pipeline's np output, all generated frames, in 8 bits (the decoder never makes floats on the host).
    # The engine runs all guidance passes as one batch, so its latents equal the pipeline's up to summation
    # order (about 1e-6): a pixel may round to the neighbouring byte, never further.
    assert video.shape == (1, plan.generated_frames, HEIGHT, WIDTH, 3)
    assert ours.pixels.shape == video.shape[1:] and ours.pixels.dtype == np.uint8
    byte_error = np.abs(ours.pixels.astype(np.int16) - _to_bytes(video[0]).astype(np.int16))
    assert byte_error.max() <= 1 and (byte_error > 0).mean() < 0.01
    assert float(ours.pixels.std()) > 2  # not a constant image

    # Audio: the pipeline's waveform tensor.
    assert audio.shape == ours.audio.shape
    assert audio.shape[:2] == (1, 2)
    assert float((ours.audio.float() - audio.float()).abs().max()) <= 1e-4
    assert float(ours.audio.float().std()) > 0

    # The delivered forms: the output frames compressed to H.264, and the vocoder's rate.
    assert ours.video_out.num_frames == plan.output_frames
    assert (ours.video_out.width, ours.video_out.height, ours.video_out.fps) == (WIDTH, HEIGHT, FPS)
    assert 0 < ours.video_out.nbytes < ours.pixels[: plan.output_frames].nbytes
    assert ours.waveform.sample_rate == 16000
    np.testing.assert_allclose(ours.waveform.samples, audio[0].float().numpy(), rtol=0, atol=1e-4)


def test_hand_offs_are_host_arrays_of_the_connector_outputs(stages, tiny_config, plan, photo_3x2):
    embeddings = stages.text_encoder.encode(PROMPT, tiny_config.negative_prompt)
    condition = stages.image_conditioner.condition(photo_3x2, WIDTH, HEIGHT)
    texts = (embeddings.prompt, embeddings.negative)
    tensors = [t for text in texts for t in (text.video, text.audio, text.mask)] + [condition.latents]
    assert all(isinstance(t, HostTensor) and isinstance(t.array, np.ndarray) for t in tensors)
    # The connectors' outputs (not the stacked Gemma layers): [1, tokens, connector width].
    connectors = stages.text_encoder.connectors.config
    width = connectors.video_connector_num_attention_heads * connectors.video_connector_attention_head_dim
    for text in texts:
        assert text.video.shape == (1, tiny_config.max_prompt_tokens, width)
        assert text.mask.shape == (1, tiny_config.max_prompt_tokens)
    # One frame of latents, 32x smaller in space.
    assert condition.latents.shape[0] == 1 and condition.latents.shape[2] == 1
    assert condition.latents.shape[3:] == (HEIGHT // 32, WIDTH // 32)
    assert (condition.width, condition.height) == (WIDTH, HEIGHT)
    latents = stages.denoiser.denoise(embeddings, condition, plan)
    assert latents.video.latents.shape[2] == (plan.generated_frames - 1) // 8 + 1
    assert latents.video.latents.shape[3:] == (HEIGHT // 32, WIDTH // 32)
    assert latents.nbytes == latents.video.latents.array.nbytes + latents.audio.latents.array.nbytes


def test_host_tensors_round_trip_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        tensor = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7).to(dtype)
        packed = HostTensor.of(tensor)
        assert packed.nbytes == tensor.numel() * tensor.element_size()
        back = packed.to("cpu")
        assert back.dtype == dtype and torch.equal(back, tensor)
        back.add_(1)  # a tensor of its own: the packed buffer is untouched
        assert torch.equal(packed.to("cpu"), tensor)


def test_the_default_negative_prompt_is_encoded_once(stages, tiny_config):
    calls = _Calls(stages.text_encoder.connectors)
    with calls:
        first = stages.text_encoder.encode(PROMPT, tiny_config.negative_prompt + " (fresh)")
        second = stages.text_encoder.encode(PROMPT + " again", tiny_config.negative_prompt + " (fresh)")
    assert calls.count == 3  # two prompts, one negative prompt
    assert second.negative is first.negative


class _Calls:
    """Counts forward calls of one module."""

    def __init__(self, module):
        self.module, self.count = module, 0

    def __enter__(self):
        self._handle = self.module.register_forward_hook(lambda *args: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_same_seed_same_output_other_seed_differs(stages, tiny_config, plan):
    embeddings = stages.text_encoder.encode(PROMPT, tiny_config.negative_prompt)
    first = stages.denoiser.denoise(embeddings, None, plan)
    again = stages.denoiser.denoise(embeddings, None, plan)
    other = stages.denoiser.denoise(
        embeddings,
        None,
        RenderPlan.build(
            width=WIDTH, height=HEIGHT, fps=FPS, seconds=SECONDS, seed=SEED + 1, num_inference_steps=STEPS,
            frame_step=8,
        ),
    )
    assert torch.equal(first.video.latents.to(), again.video.latents.to())
    assert torch.equal(first.audio.latents.to(), again.audio.latents.to())
    assert not torch.allclose(first.video.latents.to(), other.video.latents.to())


def test_condition_size_must_match_the_plan(stages, tiny_config, plan, photo_3x2):
    embeddings = stages.text_encoder.encode(PROMPT, tiny_config.negative_prompt)
    condition = stages.image_conditioner.condition(photo_3x2.resize((96, 96)), 64, 64)
    with pytest.raises(ValueError, match="64x64 but the plan is 96x64"):
        stages.denoiser.denoise(embeddings, condition, plan)


# --------------------------------------------------------------------------- centre crop


def _quadrant_image(width: int, height: int) -> PIL.Image.Image:
    """Every pixel encodes its own coordinates, so a crop's position can be read back."""
    x = np.arange(width, dtype=np.uint16)[None, :].repeat(height, 0)
    y = np.arange(height, dtype=np.uint16)[:, None].repeat(width, 1)
    pixels = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], -1).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("source", "target", "box"),
    [
        ((300, 200), (64, 64), (50, 0, 250, 200)),  # wider than the target: sides cut
        ((200, 300), (64, 64), (0, 50, 200, 250)),  # taller: top and bottom cut
        ((400, 100), (96, 64), (125, 0, 275, 100)),  # 4:1 -> 3:2
        ((120, 300), (96, 64), (0, 110, 120, 190)),  # 2:5 -> 3:2
        ((451, 300), (96, 64), (0, 0, 450, 300)),  # the sample photo: one column off
    ],
)
def test_center_crop_to_aspect(source, target, box):
    image = _quadrant_image(*source)
    cropped = center_crop_to_aspect(image, *target)
    left, top, right, bottom = box
    assert cropped.size == (right - left, bottom - top)
    assert cropped.size[0] / cropped.size[1] == pytest.approx(target[0] / target[1], rel=0.01)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image)[top:bottom, left:right])


def test_center_crop_keeps_matching_aspect():
    image = _quadrant_image(192, 128)
    assert center_crop_to_aspect(image, 96, 64) is image


def test_conditioner_crops_before_resizing(stages, sample_photo):
    """A photo of another aspect is centre-cropped, not squashed: same latents as cropping it first."""
    wide = sample_photo.resize((400, 150))
    manual = wide.crop((87, 0, 312, 150))  # 225x150 = 3:2, centred
    assert center_crop_to_aspect(wide, WIDTH, HEIGHT).size == manual.size
    cropped = stages.image_conditioner.condition(wide, WIDTH, HEIGHT)
    expected = stages.image_conditioner.condition(manual, WIDTH, HEIGHT)
    squashed = stages.image_conditioner.condition(wide.resize((WIDTH, HEIGHT)), WIDTH, HEIGHT)
    assert torch.equal(cropped.latents.to(), expected.latents.to())
    assert not torch.allclose(cropped.latents.to(), squashed.latents.to())


# --------------------------------------------------------------------------- from_pretrained round trip


def _component_classes():
    from diffusers import (  # noqa: PLC0415 - keeps collection of `make check` fast
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors  # noqa: PLC0415 - keeps collection of `make check` fast
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder  # noqa: PLC0415 - keeps collection of `make check` fast

    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler,
        vae=AutoencoderKLLTX2Video,
        audio_vae=AutoencoderKLLTX2Audio,
        text_encoder=Gemma3ForConditionalGeneration,
        tokenizer=AutoTokenizer,
        connectors=LTX2TextConnectors,
        transformer=LTX2VideoTransformer3DModel,
        vocoder=LTX2Vocoder,
    )


@pytest.fixture(scope="module")
def fresh_components():
    return tiny_ltx2_components()


@pytest.mark.parametrize("name", [n for n in COMPONENT_NAMES if n not in ("scheduler", "tokenizer")])
def test_round_trip_weights(name, fresh_components, tiny_checkpoint):
    cls = _component_classes()[name]
    loaded = cls.from_pretrained(str(tiny_checkpoint), subfolder=name)
    original = fresh_components[name]
    assert type(loaded) is type(original)
    expected, got = original.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(expected)
    assert len(expected) > 0
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def test_round_trip_scheduler(fresh_components, tiny_checkpoint):
    cls = _component_classes()["scheduler"]
    loaded = cls.from_pretrained(str(tiny_checkpoint), subfolder="scheduler")
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    expected = public(fresh_components["scheduler"].config)
    assert public(loaded.config) == expected
    assert expected["use_dynamic_shifting"] is True


def test_round_trip_tokenizer(fresh_components, tiny_checkpoint):
    loaded = AutoTokenizer.from_pretrained(str(tiny_checkpoint), subfolder="tokenizer")
    original = fresh_components["tokenizer"]
    assert loaded.get_vocab() == original.get_vocab()
    texts = [PROMPT, "A tabby cat, 3 blinks & a purr!", "  spaces  ", "ünïcödé → bytes", ""]
    for text in texts:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
    batch = dict(padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    a, b = loaded(texts, **batch), original(texts, **batch)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    assert loaded.pad_token_id == original.pad_token_id


def test_model_index_lists_every_component(fresh_components, tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2ImageToVideoPipeline"
    for name in COMPONENT_NAMES:
        library, class_name = index[name]
        assert class_name == type(fresh_components[name]).__name__, name
        assert library in ("diffusers", "transformers", "ltx2"), name
        assert (tiny_checkpoint / name).is_dir(), name
    assert index["text_encoder"] == ["transformers", "Gemma3ForConditionalGeneration"]


def test_tiny_components_are_deterministic(fresh_components):
    again = tiny_ltx2_components()
    for name in ("transformer", "vae", "text_encoder"):
        first, second = fresh_components[name].state_dict(), again[name].state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_checkpoint_is_marked_complete(tiny_checkpoint, tmp_path):
    assert is_complete_checkpoint(tiny_checkpoint)
    assert not is_complete_checkpoint(tmp_path)
    # Already complete: returned as is, nothing rebuilt.
    before = (tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_ltx2(tiny_checkpoint) == tiny_checkpoint
    assert (tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


# --------------------------------------------------------------------------- step callback


class _TransformerCalls:
    """Counts forward calls of any LTX-2 transformer (a global forward hook, nothing replaced)."""

    def __enter__(self):
        from diffusers import LTX2VideoTransformer3DModel  # noqa: PLC0415 - keeps collection of `make check` fast

        self.count = 0

        def hook(module, args, output):
            if isinstance(module, LTX2VideoTransformer3DModel):
                self.count += 1

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _plan_with_steps(steps: int) -> RenderPlan:
    return RenderPlan.build(
        width=64, height=64, fps=FPS, seconds=9 / FPS, seed=SEED, num_inference_steps=steps, frame_step=8
    )


def test_step_callback_reports_every_step(stages, tiny_config):
    embeddings = stages.text_encoder.encode(PROMPT, tiny_config.negative_prompt)
    for steps in (2, 5):
        calls = []
        stages.denoiser.denoise(embeddings, None, _plan_with_steps(steps), on_step=lambda k, n, calls=calls: calls.append((k, n)))
        assert calls == [(k, steps) for k in range(1, steps + 1)]
        assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


@pytest.mark.parametrize("stop_after", [1, 2])
def test_raising_from_the_callback_stops_the_loop(stop_after, stages, tiny_config):
    total = 5
    plan = _plan_with_steps(total)
    embeddings = stages.text_encoder.encode(PROMPT, tiny_config.negative_prompt)

    with _TransformerCalls() as full_run:
        complete = stages.denoiser.denoise(embeddings, None, plan)
    assert full_run.count % total == 0 and full_run.count > 0
    per_step = full_run.count // total

    seen = []

    def cancel(k, n):
        seen.append((k, n))
        if k == stop_after:
            raise JobCancelled("job cancelled")

    with _TransformerCalls() as cancelled_run, pytest.raises(JobCancelled):
        stages.denoiser.denoise(embeddings, None, plan, on_step=cancel)
    assert seen == [(k, total) for k in range(1, stop_after + 1)]
    assert cancelled_run.count == stop_after * per_step  # no further step ran

    # The denoiser is left usable: the next job gives exactly the uncancelled result.
    after = stages.denoiser.denoise(embeddings, None, plan)
    assert torch.equal(after.video.latents.to(), complete.video.latents.to())
    assert torch.equal(after.audio.latents.to(), complete.audio.latents.to())


# --------------------------------------------------------------------------- limits and config checks


def test_read_limits(family, tiny_config):
    limits = family.read_limits(tiny_config)
    assert limits.size_multiple == 32
    assert limits.temporal_compression == 8
    assert limits.audio_sample_rate == 16000
    assert limits.max_prompt_tokens == tiny_config.max_prompt_tokens


def test_denoiser_refuses_stg_blocks_beyond_the_block_count(family, tiny_checkpoint):
    config = ModelConfig.tiny(path=str(tiny_checkpoint), stg_blocks=[1, 2, 28])
    with pytest.raises(ValueError) as caught:
        family.diffusion_model(config)
    message = str(caught.value)
    assert "model.stg_blocks" in message
    assert "[2, 28]" in message
    assert "2 blocks" in message


def test_token_counter_matches_the_text_encoder(family, tiny_config, stages):
    count = family.token_counter(tiny_config)
    for text in ("a", "  hello world ", PROMPT):
        assert count(text) == stages.text_encoder.count_tokens(text) > 0
    assert count("abc" * 10) == 30  # the tiny tokenizer reads one token per character
