"""Fixtures of the MiniMax-H3 family: its tiny checkpoint (built once a session), its stages, and media files.

Nothing is downloaded: the checkpoint is built from configs in code, the media
are made with Pillow and PyAV (H.264 + AAC MP4s, WAVs, PNGs, JPEGs).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

from serving.families import get_family
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.protocol import RenderPlan

WIDTH, HEIGHT = 64, 32  # the tiny checkpoint's 16:9 canvas (multiples of 32)
SECONDS = 5.0  # H3 generates 5 to 15 s: 124 frames (17n + 5)
STEPS = 3  # three sigmas: two transformer passes
SEED = 7
PROMPT = "a tabby cat looks around and purrs"


@pytest.fixture(scope="session")
def h3_checkpoint(tmp_path_factory) -> Path:
    """The tiny random MiniMax-H3 checkpoint, saved once for the whole session."""
    from serving.families.minimax_h3.tiny import build_tiny_minimax_h3  # noqa: PLC0415 - keeps collection of `make check` fast

    return build_tiny_minimax_h3(tmp_path_factory.mktemp("tiny-minimax-h3"))


@pytest.fixture(scope="session")
def h3_config(h3_checkpoint):
    """``MiniMaxH3ModelConfig.tiny`` on the session's checkpoint, on the CPU in float32."""
    return MiniMaxH3ModelConfig.tiny(path=str(h3_checkpoint), device="cpu", dtype="float32",
                                     num_inference_steps=STEPS)


@pytest.fixture(scope="session")
def h3_family():
    return get_family("minimax_h3")


@pytest.fixture(scope="session")
def h3_stages(h3_family, h3_config):
    """Every model stage of the tiny checkpoint and its diffusion model, each loading its own components."""
    components = {}
    for spec in h3_family.stages:
        if spec.kind == "model":
            components[spec.name] = spec.component(h3_config)
        elif spec.kind == "diffusion":
            components[spec.name] = h3_family.diffusion_model(h3_config)
    return components


@pytest.fixture(scope="session")
def h3_plan():
    return RenderPlan.build(width=WIDTH, height=HEIGHT, fps=24, seconds=SECONDS, seed=SEED, num_inference_steps=STEPS,
                            frame_step=17, frame_offset=5)


# --------------------------------------------------------------------------- media


def encode_image(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def encode_mp4(seconds: float, fps: int, width: int, height: int, audio_rate: int | None = 32000,
               seed: int = 0) -> bytes:
    """An MP4 (H.264, moov first so a truncated file still opens) with a stereo AAC soundtrack when ``audio_rate``."""
    rng = np.random.default_rng(seed)
    handle, path = tempfile.mkstemp(suffix=".mp4")
    os.close(handle)
    try:
        with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as container:
            video = container.add_stream("libx264", rate=fps)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            audio = container.add_stream("aac", rate=audio_rate) if audio_rate else None
            if audio is not None:
                audio.layout = "stereo"
            base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            for index in range(round(seconds * fps)):
                frame = np.roll(base, index, axis=1)  # motion, so frames differ
                container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(video.encode(None))
            if audio is not None:
                _encode_tone(container, audio, seconds, audio_rate)
        return Path(path).read_bytes()
    finally:
        os.remove(path)


def _encode_tone(container, stream, seconds: float, rate: int) -> None:
    times = np.arange(round(seconds * rate)) / rate
    samples = (0.3 * np.stack([np.sin(2 * np.pi * 440 * times), np.sin(2 * np.pi * 660 * times)])).astype(np.float32)
    for start in range(0, samples.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start : start + 1024]), format="fltp",
                                           layout="stereo")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def encode_wav(seconds: float, rate: int = 32000, channels: int = 1, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    samples = (rng.standard_normal((channels, round(seconds * rate))) * 2000).astype(np.int16)
    layout = "mono" if channels == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1) if channels == 1 else samples.T.reshape(1, -1).copy(),
                                           format="s16", layout=layout)
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def encode_m4a(seconds: float, rate: int = 32000) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "stereo"
        _encode_tone(container, stream, seconds, rate)
    return buffer.getvalue()


@dataclass(frozen=True)
class Media:
    """The files the tests send, as bytes."""

    keyframe_png: bytes  # 80x48
    last_keyframe_jpeg: bytes  # 48x80
    reference_png: bytes  # 80x48
    video_mp4: bytes  # 1.5 s at 30 fps, 80x48, stereo AAC at 32 kHz
    audio_wav: bytes  # 1 s mono at 32 kHz
    audio_m4a: bytes  # 2 s stereo AAC at 32 kHz


@pytest.fixture(scope="session")
def media() -> Media:
    rng = np.random.default_rng(1)
    return Media(
        keyframe_png=encode_image(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)),
        last_keyframe_jpeg=encode_image(rng.integers(0, 255, (80, 48, 3), dtype=np.uint8), "JPEG"),
        reference_png=encode_image(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)),
        video_mp4=encode_mp4(1.5, 30, 80, 48),
        audio_wav=encode_wav(1.0),
        audio_m4a=encode_m4a(2.0),
    )


def as_files(tmp_path: Path, **files: bytes) -> SimpleNamespace:
    """Write ``name=bytes`` under ``tmp_path``; their paths by name (diffusers' ``from_file`` reads paths)."""
    paths = {}
    for name, data in files.items():
        path = tmp_path / name.replace("_", ".", 1)
        path.write_bytes(data)
        paths[name] = str(path)
    return SimpleNamespace(**paths)
