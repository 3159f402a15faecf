"""Turning what a client sent into a validated request and a render plan.

Shared by the CLI and both ingresses so every entry point refuses the same
things with the same words: the field, what is wrong, what is allowed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from cluster.config import ModelConfig, parse_size
from serving.errors import InvalidRequest
from serving.families.base import ModelLimits
from serving.media import load_photo
from serving.protocol import RenderPlan

__all__ = ["VideoRequest", "validate_request", "MAX_PROMPT_CHARS", "MAX_SEED"]

MAX_PROMPT_CHARS = 20_000  # cheap guard before tokenizing
MAX_SEED = 2**63 - 1
_LARGEST_NUMBER = 2**63  # anything bigger is refused before any arithmetic on it


@dataclass(frozen=True)
class VideoRequest:
    """A request that passed validation; ``plan`` fixes the exact output shape."""

    prompt: str
    negative_prompt: str
    image: bytes | None
    model: str
    plan: RenderPlan
    enhance_prompt: bool = False

    @property
    def size(self) -> str:
        return f"{self.plan.width}x{self.plan.height}"


def validate_request(
    *,
    config: ModelConfig,
    limits: ModelLimits,
    prompt: Any = None,
    seconds: Any = None,
    size: Any = None,
    fps: Any = None,
    seed: Any = None,
    negative_prompt: Any = None,
    image: bytes | None = None,
    model: Any = None,
    enhance_prompt: Any = None,
    num_inference_steps: Any = None,
    guidance_scale: Any = None,
    num_frames: Any = None,
    enhance_default: bool = False,
    rewriter_available: bool = False,
    count_tokens: Callable[[str], int] | None = None,
    field_names: dict[str, str] | None = None,
    photo_checked: bool = False,
) -> VideoRequest:
    """Check every field; raise ``InvalidRequest`` for the first bad one.

    ``field_names`` maps our names to the caller's (e.g. ``image`` ->
    ``input_reference`` for the OpenAI API) so messages name what the client sent.
    ``photo_checked``: the caller decoded the photo already (the ingress, within its memory budget).
    """
    names = {"prompt": "prompt", "seconds": "seconds", "size": "size", "fps": "fps", "seed": "seed",
             "negative_prompt": "negative_prompt", "image": "image", "model": "model",
             "enhance_prompt": "enhance_prompt", "num_inference_steps": "num_inference_steps",
             "guidance_scale": "guidance_scale", "num_frames": "num_frames"}
    names.update(field_names or {})

    model_name = _check_model(model, config, names["model"])
    prompt_text = _check_prompt(prompt, names["prompt"], limits, count_tokens)
    negative = _check_negative_prompt(negative_prompt, config, names["negative_prompt"], limits, count_tokens)
    width, height = _check_size(size, config, limits, names["size"])
    frame_rate = _check_fps(fps, config, names["fps"])
    duration = _check_seconds(seconds, config, names["seconds"])
    if num_frames is not None and num_frames != "":
        duration = _seconds_of_frames(num_frames, seconds, frame_rate, config, names["num_frames"])
    _check_budget(width, height, duration, frame_rate, config, limits, names["size"])
    problem = config.shape_problem(width, height, duration, frame_rate)
    if problem is not None:
        field, why = problem
        raise InvalidRequest(names.get(field, field), why)
    steps = _check_steps(num_inference_steps, config, names["num_inference_steps"])
    _check_guidance(guidance_scale, config, names["guidance_scale"])
    seed_value = _check_seed(seed, names["seed"])
    enhance = _check_enhance(enhance_prompt, enhance_default, rewriter_available, names["enhance_prompt"])
    if image is not None and not photo_checked:
        load_photo(image, field=names["image"])  # refuse unreadable photos before a job exists

    plan = RenderPlan.build(
        width=width,
        height=height,
        fps=frame_rate,
        seconds=duration,
        seed=seed_value,
        num_inference_steps=steps,
        frame_step=limits.frames_step,
        frame_offset=limits.frame_offset,
    )
    return VideoRequest(
        prompt=prompt_text, negative_prompt=negative, image=image, model=model_name, plan=plan, enhance_prompt=enhance
    )


def _check_model(model: Any, config: ModelConfig, field: str) -> str:
    if model is None or model == "":
        return config.name
    if not isinstance(model, str) or model != config.name:
        raise InvalidRequest(field, f"unknown model '{model}'; this deployment serves '{config.name}'")
    return model


def _check_prompt(prompt: Any, field: str, limits: ModelLimits, count_tokens) -> str:
    if prompt is None:
        raise InvalidRequest(field, "is required: a non-empty description of the video")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest(field, "must be a non-empty description of the video")
    text = _valid_text(prompt.strip(), field)
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(field, f"is {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if count_tokens is not None:
        tokens = count_tokens(text)
        if tokens > limits.max_prompt_tokens:
            raise InvalidRequest(
                field, f"is {tokens} tokens long; this model reads at most {limits.max_prompt_tokens} tokens"
            )
    return text


def _valid_text(text: str, field: str) -> str:
    """``text`` if it is valid Unicode (JSON may carry lone surrogates, which no tokenizer or store takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(field, "must be valid Unicode text (it holds a lone surrogate)") from None
    return text


def _check_negative_prompt(negative_prompt: Any, config: ModelConfig, field: str, limits, count_tokens) -> str:
    if negative_prompt is None:
        return config.negative_prompt
    if not isinstance(negative_prompt, str):
        raise InvalidRequest(field, "must be text")
    text = _valid_text(negative_prompt.strip(), field)
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(field, f"is {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if count_tokens is not None and text:
        tokens = count_tokens(text)
        if tokens > limits.max_prompt_tokens:
            raise InvalidRequest(
                field, f"is {tokens} tokens long; this model reads at most {limits.max_prompt_tokens} tokens"
            )
    return text


def _check_size(size: Any, config: ModelConfig, limits: ModelLimits, field: str) -> tuple[int, int]:
    if size is None or size == "":
        size = config.default_size
    try:
        width, height = parse_size(size)
    except ValueError as error:
        raise InvalidRequest(field, str(error)) from None
    step = limits.size_multiple
    if width % step or height % step:
        raise InvalidRequest(
            field, f"{width}x{height} is not allowed; width and height must be multiples of {step} (e.g. 768x512)"
        )
    if width > config.max_width or height > config.max_height:
        raise InvalidRequest(
            field, f"{width}x{height} is too large; at most {config.max_width}x{config.max_height} is allowed"
        )
    return width, height


def _check_budget(width: int, height: int, seconds: float, fps: int, config: ModelConfig, limits, field: str) -> None:
    """The request budget: latent tokens bound a request's memory and GPU time together."""
    spatial = limits.spatial_compression
    tokens = config.latent_tokens(width, height, seconds, fps)
    budget = config.max_latent_tokens
    if tokens <= budget:
        return
    latent_frames = tokens // ((width // spatial) * (height // spatial))
    largest = _largest_size_within(budget // latent_frames, width, height, limits.size_multiple, spatial)
    hint = (
        f"; at {seconds:g} s and {fps} fps the largest size of this shape allowed is {largest[0]}x{largest[1]}"
        if largest else f"; even the smallest frame is over the budget at {seconds:g} s and {fps} fps: shorten the clip"
    )
    raise InvalidRequest(
        field,
        f"{width}x{height} for {seconds:g} s at {fps} fps is {tokens:,} latent tokens; this deployment allows at "
        f"most {budget:,} per request{hint}",
    )


def _largest_size_within(area_tokens: int, width: int, height: int, step: int, spatial: int) -> tuple[int, int] | None:
    """The largest size in multiples of ``step`` with (about) the asked aspect ratio whose latent area (in cells of
    ``spatial`` pixels) fits ``area_tokens``."""
    cells = (step // spatial) ** 2  # latent cells per step x step block
    for columns in range(width // step, 0, -1):
        rows = max(1, round(columns * height / width))
        if columns * rows * cells <= area_tokens:
            return columns * step, rows * step
    return None


def _number(value: Any, field: str, kind: str) -> int | float:
    """Accept numbers and numeric strings (OpenAI's API sends ``seconds`` as a string).

    Whole numbers stay ``int`` so large seeds keep every digit.
    """
    if isinstance(value, bool):
        raise InvalidRequest(field, f"must be a {kind}, not a boolean")
    if isinstance(value, int):
        if abs(value) > _LARGEST_NUMBER:
            raise InvalidRequest(field, f"is out of range; at most {_LARGEST_NUMBER} is accepted")
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            return _number(int(text), field, kind)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise InvalidRequest(field, f"'{value}' is not a {kind}") from None
    else:
        raise InvalidRequest(field, f"must be a {kind}")
    if not math.isfinite(number):
        raise InvalidRequest(field, f"must be a finite {kind}")
    return number


def _check_seconds(seconds: Any, config: ModelConfig, field: str) -> float:
    if seconds is None or seconds == "":
        return config.default_seconds
    value = _number(seconds, field, "number of seconds")
    if value <= 0 or value > config.max_seconds:
        raise InvalidRequest(field, f"{value:g} is out of range; allowed: more than 0 and at most {config.max_seconds:g}")
    return float(value)


def _seconds_of_frames(num_frames: Any, seconds: Any, fps: int, config: ModelConfig, field: str) -> float:
    """The clip length ``num_frames`` asks for at ``fps`` (the MP4 holds exactly that many frames)."""
    value = _number(num_frames, field, "whole number of frames")
    longest = math.floor(config.max_seconds * fps)
    if value != int(value) or not 1 <= value <= longest:
        raise InvalidRequest(field, f"{value:g} is not allowed; use a whole number from 1 to {longest} "
                                    f"({config.max_seconds:g} s at {fps} fps)")
    duration = int(value) / fps
    if seconds is not None and seconds != "" and abs(float(_number(seconds, "seconds", "number")) - duration) > 0.5 / fps:
        raise InvalidRequest(field, f"{int(value)} frames at {fps} fps last {duration:g} s, but seconds says "
                                    f"{seconds}; send one of the two")
    return duration


def _check_steps(steps: Any, config: ModelConfig, field: str) -> int:
    if steps is None or steps == "":
        return config.num_inference_steps
    value = _number(steps, field, "whole number of steps")
    low, high = config.min_inference_steps, config.max_inference_steps
    if value != int(value) or not low <= value <= high:
        raise InvalidRequest(field, f"{value:g} is not allowed; use a whole number from {low} to {high} "
                                    "(model.min_inference_steps, model.max_inference_steps)")
    return int(value)


def _check_guidance(guidance: Any, config: ModelConfig, field: str) -> None:
    """Accepted where it is the deployment's own: guidance is set per deployment (step batching runs requests of one
    guidance together), so another value is refused rather than silently ignored."""
    if guidance is None or guidance == "":
        return
    value = _number(guidance, field, "number")
    if not hasattr(config, "guidance_scale"):  # a guidance-distilled family: one pass a step, no guidance
        if abs(float(value) - 1.0) > 1e-6:
            raise InvalidRequest(field, f"{value:g} is not served; this model is guidance-distilled and runs without "
                                        "guidance (guidance_scale 1): leave it out or send 1")
        return
    served = float(config.guidance_scale)
    if abs(float(value) - served) > 1e-6:
        raise InvalidRequest(field, f"{value:g} is not served; this deployment runs guidance_scale {served:g} "
                                    "(model.guidance_scale) for every request: leave it out or send that value")


def _check_fps(fps: Any, config: ModelConfig, field: str) -> int:
    if fps is None or fps == "":
        return config.default_fps
    value = _number(fps, field, "whole number of frames per second")
    if value != int(value) or not 1 <= value <= config.max_fps:
        raise InvalidRequest(field, f"{value:g} is not allowed; use a whole number from 1 to {config.max_fps}")
    return int(value)


def _check_seed(seed: Any, field: str) -> int:
    if seed is None or seed == "":
        return secrets.randbelow(2**31)
    value = _number(seed, field, "whole number")
    if value != int(value) or not 0 <= value <= MAX_SEED:
        raise InvalidRequest(field, f"{value:g} is not allowed; use a whole number from 0 to {MAX_SEED}")
    return int(value)


def _check_enhance(value: Any, default: bool, available: bool, field: str) -> bool:
    if value is None or value == "":
        return default and available
    if isinstance(value, bool):
        enhance = value
    elif isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        enhance = value.strip().lower() in ("true", "1")
    else:
        raise InvalidRequest(field, "must be true or false")
    if enhance and not available:
        raise InvalidRequest(field, "this deployment has no prompt rewriter; send false or leave it out")
    return enhance
