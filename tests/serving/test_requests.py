"""validate_request: what it accepts, and how it refuses (field named, what is allowed said)."""

from __future__ import annotations

import pytest

from cluster.config import JobsConfig
from serving.errors import InvalidRequest
from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig
from serving.requests import MAX_PROMPT_CHARS, MAX_SEED, validate_request


@pytest.fixture(scope="module")
def count_tokens(tiny_config):
    """The real tokenizer-based counter of the tiny checkpoint (tokenizer only, no weights)."""
    return get_family(tiny_config.family).token_counter(tiny_config)


@pytest.fixture
def validate(tiny_config, tiny_limits, count_tokens):
    def run(**fields):
        fields.setdefault("prompt", "a cat looks around")
        return validate_request(config=tiny_config, limits=tiny_limits, count_tokens=count_tokens, **fields)

    return run


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("seconds", ["4", 4, 4.0, " 4 ", "4.0"])
def test_accepts_seconds_as_string_or_number(validate, seconds):
    request = validate(prompt="  a cat purrs  ", seconds=seconds, size="96x64", fps="24", seed="7")
    plan = request.plan
    assert request.prompt == "a cat purrs"
    assert plan.seconds == 4.0 and isinstance(plan.seconds, float)
    assert (plan.width, plan.height, plan.fps, plan.seed) == (96, 64, 24, 7)
    assert plan.output_frames == 96
    assert plan.generated_frames == 97
    assert request.size == "96x64"


def test_accepts_fractional_seconds(validate):
    plan = validate(seconds="0.5", fps=30, size="64x64", seed=1).plan
    assert (plan.output_frames, plan.generated_frames) == (15, 17)


def test_defaults_come_from_the_config(validate, tiny_config):
    request = validate(seed=None)
    plan = request.plan
    assert request.size == tiny_config.default_size
    assert plan.fps == tiny_config.default_fps
    assert plan.seconds == tiny_config.default_seconds
    assert plan.num_inference_steps == tiny_config.num_inference_steps
    assert request.negative_prompt == tiny_config.negative_prompt
    assert request.model == tiny_config.name
    assert request.image is None
    assert 0 <= plan.seed < 2**31


def test_accepts_model_name_image_and_limits(validate, tiny_config, photos):
    request = validate(
        model=tiny_config.name,
        image=photos.jpeg,
        size="64x32",  # the smallest frames: the longest clip at the highest rate fits the budget
        seconds=tiny_config.max_seconds,
        fps=tiny_config.max_fps,
        seed=MAX_SEED,
        negative_prompt="  blurry ",
    )
    assert request.image == photos.jpeg
    assert request.plan.seed == MAX_SEED  # every digit kept
    assert request.negative_prompt == "blurry"
    assert request.plan.seconds == tiny_config.max_seconds
    largest = validate(size=f"{tiny_config.max_width}x{tiny_config.max_height}", seconds=0.3, fps=24)
    assert largest.size == "1024x1024"  # one latent frame of the largest side fits (32 x 32 = 1,024 tokens)


def test_the_request_budget_in_latent_tokens(validate, tiny_config):
    """frames/8 x height/32 x width/32 against model.max_latent_tokens (8,192 for the tiny model)."""
    budget = tiny_config.max_latent_tokens
    # 512x512 for 10 s at 24 fps: 31 latent frames x 16 x 16 = 7,936 tokens: allowed.
    assert validate(size="512x512", seconds=10, fps=24).size == "512x512"
    error = _refused(validate, "size", size="1024x512", seconds=10, fps=24)  # 31 x 16 x 32 = 15,872
    assert "15,872 latent tokens" in error.message and f"at most {budget:,}" in error.message
    assert "the largest size of this shape allowed is 704x352" in error.message  # 31 x 11 x 22 = 7,502
    assert validate(size="704x352", seconds=10, fps=24).size == "704x352"


def test_prompt_at_the_token_limit_is_accepted(validate, tiny_limits, count_tokens):
    prompt = "a" * tiny_limits.max_prompt_tokens
    assert count_tokens(prompt) == tiny_limits.max_prompt_tokens
    assert validate(prompt=prompt).prompt == prompt


# --------------------------------------------------------------------------- refused


def _refused(validate, field: str, **fields) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        validate(**fields)
    error = caught.value
    assert error.field == field
    assert str(error) == f"{field}: {error.message}"
    return error


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t ", None, 42])
def test_refuses_empty_prompt(validate, prompt):
    error = _refused(validate, "prompt", prompt=prompt)
    assert "non-empty" in error.message


def test_refuses_prompt_over_the_token_limit(validate, tiny_limits, count_tokens):
    prompt = "a" * (tiny_limits.max_prompt_tokens + 1)
    assert count_tokens(prompt) > tiny_limits.max_prompt_tokens
    error = _refused(validate, "prompt", prompt=prompt)
    assert f"at most {tiny_limits.max_prompt_tokens} tokens" in error.message
    assert f"{tiny_limits.max_prompt_tokens + 1} tokens" in error.message


def test_refuses_prompt_over_the_character_limit(tiny_config, tiny_limits):
    with pytest.raises(InvalidRequest) as caught:
        validate_request(config=tiny_config, limits=tiny_limits, prompt="b" * (MAX_PROMPT_CHARS + 1))
    assert caught.value.field == "prompt"
    assert f"at most {MAX_PROMPT_CHARS}" in caught.value.message


@pytest.mark.parametrize("size", ["big", "96", "96x64x2", "x64", "96x", "-96x64", "96.0x64", "ninety-six by 64"])
def test_refuses_unreadable_size(validate, size):
    error = _refused(validate, "size", size=size)
    assert "WIDTHxHEIGHT" in error.message


def test_refuses_zero_size(validate):
    error = _refused(validate, "size", size="0x64")
    assert "positive" in error.message


@pytest.mark.parametrize("size", ["100x100", "96x60", "33x64", "64x1000"])
def test_refuses_size_not_a_multiple_of_32(validate, size):
    error = _refused(validate, "size", size=size)
    assert "multiples of 32" in error.message


@pytest.mark.parametrize("size", ["2048x64", "64x2048", "1056x1024"])
def test_refuses_size_over_the_max(validate, tiny_config, size):
    error = _refused(validate, "size", size=size, seconds=0.3)
    assert f"at most {tiny_config.max_width}x{tiny_config.max_height}" in error.message


@pytest.mark.parametrize("seconds", [0, "0", -1, "-1", -0.5, "0.0"])
def test_refuses_seconds_not_positive(validate, tiny_config, seconds):
    error = _refused(validate, "seconds", seconds=seconds)
    assert f"more than 0 and at most {tiny_config.max_seconds:g}" in error.message


@pytest.mark.parametrize("seconds", [20.5, "21", 999, 1e9])
def test_refuses_seconds_over_the_max(validate, tiny_config, seconds):
    error = _refused(validate, "seconds", seconds=seconds)
    assert f"at most {tiny_config.max_seconds:g}" in error.message


@pytest.mark.parametrize("seconds", ["four", "4s", "nan", "inf", float("nan"), float("inf"), True, [4]])
def test_refuses_non_numeric_seconds(validate, seconds):
    error = _refused(validate, "seconds", seconds=seconds)
    assert "number of seconds" in error.message


@pytest.mark.parametrize("fps", [0, -24, 61, "2.5", 23.9, "fast", True])
def test_refuses_bad_fps(validate, tiny_config, fps):
    error = _refused(validate, "fps", fps=fps)
    assert "whole number" in error.message
    if not isinstance(fps, bool) and fps != "fast":
        assert f"from 1 to {tiny_config.max_fps}" in error.message


@pytest.mark.parametrize("seed", [-1, "-1", MAX_SEED + 1, "1.5", "lucky"])
def test_refuses_bad_seed(validate, seed):
    error = _refused(validate, "seed", seed=seed)
    assert "whole number" in error.message
    if seed != "lucky":
        assert f"from 0 to {MAX_SEED}" in error.message


@pytest.mark.parametrize("model", ["sora-2", "ltx-2", 7])
def test_refuses_unknown_model(validate, tiny_config, model):
    error = _refused(validate, "model", model=model)
    assert f"serves '{tiny_config.name}'" in error.message


def test_refuses_bad_negative_prompt(validate):
    error = _refused(validate, "negative_prompt", negative_prompt=3)
    assert "text" in error.message


def test_refuses_bad_image(validate, photos):
    error = _refused(validate, "image", image=photos.truncated_jpeg)
    assert "JPEG" in error.message


def test_field_names_rename_fields_in_errors(validate, photos):
    names = {"seconds": "--seconds", "image": "input_reference", "size": "--size"}
    with pytest.raises(InvalidRequest) as caught:
        validate(seconds="-3", field_names=names)
    assert caught.value.field == "--seconds"
    assert str(caught.value).startswith("--seconds: ")
    with pytest.raises(InvalidRequest) as caught:
        validate(image=photos.text, field_names=names)
    assert caught.value.field == "input_reference"


def test_first_bad_field_is_reported(validate):
    # The model is checked first, then the prompt, then size, fps, seconds, seed.
    with pytest.raises(InvalidRequest) as caught:
        validate(prompt="", size="big", seconds=-1)
    assert caught.value.field == "prompt"
    with pytest.raises(InvalidRequest) as caught:
        validate(size="big", seconds=-1)
    assert caught.value.field == "size"


@pytest.mark.parametrize("field", ["seconds", "fps", "seed"])
def test_refuses_absurdly_large_numbers_cleanly(validate, field):
    huge = "1" + "0" * 400
    with pytest.raises(InvalidRequest) as raised:
        validate(**{field: huge})
    message = raised.value.message
    assert raised.value.field == field
    assert "out of range" in message or "not allowed" in message


def test_refuses_negative_prompt_over_the_token_limit(validate, tiny_limits):
    with pytest.raises(InvalidRequest) as raised:
        validate(negative_prompt="b " * (tiny_limits.max_prompt_tokens + 10))
    assert raised.value.field == "negative_prompt"
    assert f"at most {tiny_limits.max_prompt_tokens} tokens" in raised.value.message


@pytest.mark.parametrize("size", ["32x²", "６４x64", "1234567x32"])
def test_refuses_sizes_that_only_look_numeric(validate, size):
    with pytest.raises(InvalidRequest) as raised:
        validate(size=size)
    assert raised.value.field == "size" and "WIDTHxHEIGHT" in raised.value.message


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("0", False), (None, False)])
def test_enhance_prompt_switch(validate, value, expected):
    assert validate(enhance_prompt=value, rewriter_available=True).enhance_prompt is expected


def test_enhance_prompt_default_comes_from_the_config(validate):
    assert validate(enhance_default=True, rewriter_available=True).enhance_prompt is True
    assert validate(enhance_default=True, rewriter_available=False).enhance_prompt is False


@pytest.mark.parametrize("value", ["maybe", 2, [True]])
def test_enhance_prompt_must_be_a_boolean(validate, value):
    with pytest.raises(InvalidRequest) as raised:
        validate(enhance_prompt=value, rewriter_available=True)
    assert raised.value.field == "enhance_prompt"


def test_enhance_prompt_without_a_rewriter_is_refused(validate):
    with pytest.raises(InvalidRequest) as raised:
        validate(enhance_prompt=True, rewriter_available=False)
    assert raised.value.field == "enhance_prompt" and "no prompt rewriter" in raised.value.message


def test_the_most_steps_a_request_may_ask_for_fit_the_job_timeout_at_real_size():
    """LTX-2 19B at 1280x704 x 121 frames: 14,080 latent tokens; at the default 3.5e-4 s per token-step, the most
    steps a request may ask for (100) take about 493 s of diffusion, well inside the 1800 s job timeout."""
    model = LTX2ModelConfig()
    tokens = model.latent_tokens(1280, 704, 121 / 24, 24)
    diffusion_s = tokens * model.seconds_per_token_step * model.max_inference_steps
    assert tokens == 14_080 and round(diffusion_s) == 493
    assert diffusion_s < JobsConfig().job_timeout_s
