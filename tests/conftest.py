"""Shared fixtures: the tiny checkpoint (built once per session), its config, and photos.

Nothing here downloads anything: the tiny checkpoint is built from configs in
code and the photos are made from the sample photo shipped in the package.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import av
import pytest
import torch
from PIL import Image

from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig
from tests.helpers import free_port, wait_for_redis

REPO_ROOT = Path(__file__).resolve().parents[1]


def _explicit_ray_auth() -> None:
    """Token auth for every Ray cluster the tests start, set before anything imports Ray.

    Ray reads these once, when it is first imported; set later (e.g. in a fixture) they are
    ignored in a process that already imported Ray, and the cluster refuses the connection.
    """
    token = Path(tempfile.mkdtemp(prefix="reelserve-ray-")) / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


_explicit_ray_auth()
SAMPLE_PHOTO = REPO_ROOT / "serving" / "assets" / "sample_photo.jpg"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny random LTX-2 checkpoint, saved once for the whole session."""
    from serving.families.ltx2.tiny import build_tiny_ltx2  # noqa: PLC0415 - keeps collection of `make check` fast

    return build_tiny_ltx2(tmp_path_factory.mktemp("tiny-ltx2"))


@pytest.fixture(scope="session")
def tiny_config(tiny_checkpoint):
    """``LTX2ModelConfig.tiny`` pointing at the session's tiny checkpoint."""
    return LTX2ModelConfig.tiny(path=str(tiny_checkpoint))


@pytest.fixture(scope="session")
def tiny_limits(tiny_config):
    return get_family(tiny_config.family).read_limits(tiny_config)


@pytest.fixture(scope="session")
def sample_photo() -> Image.Image:
    """The packaged sample photo (451x300 RGB)."""
    with Image.open(SAMPLE_PHOTO) as image:
        return image.convert("RGB")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR is patched to claim ``width`` x ``height`` (with a correct CRC)."""
    data = bytearray(_encode(Image.new("RGB", (4, 4), (200, 30, 30)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@dataclass(frozen=True)
class Photos:
    """A small real photo in a few encodings, plus broken variants of it."""

    image: Image.Image  # the decoded small photo (96x64)
    jpeg: bytes
    png: bytes
    empty: bytes
    truncated_jpeg: bytes
    truncated_png: bytes
    text: bytes
    bomb_png: bytes  # header claims 100000x100000 (PIL's own bomb guard)
    over_cap_png: bytes  # header claims 8000x8000: under PIL's guard, over ours
    too_small_png: bytes  # 1x1

    def bad(self) -> dict[str, bytes]:
        """Every variant that ``load_photo`` must refuse, by name."""
        return {
            "empty": self.empty,
            "truncated_jpeg": self.truncated_jpeg,
            "truncated_png": self.truncated_png,
            "text": self.text,
            "bomb_png": self.bomb_png,
            "over_cap_png": self.over_cap_png,
            "too_small_png": self.too_small_png,
        }


@pytest.fixture(scope="session")
def photos(sample_photo) -> Photos:
    small = sample_photo.resize((96, 64), Image.BICUBIC)
    jpeg = _encode(small, "JPEG", quality=90)
    png = _encode(small, "PNG")
    return Photos(
        image=small,
        jpeg=jpeg,
        png=png,
        empty=b"",
        truncated_jpeg=jpeg[: len(jpeg) // 2],
        truncated_png=png[: len(png) // 2],
        text=b"this is a text file, not a photo\n" * 20,
        bomb_png=png_with_claimed_size(100_000, 100_000),
        over_cap_png=png_with_claimed_size(8000, 8000),
        too_small_png=_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    )


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory, photos) -> dict[str, Path]:
    """The photos written to files (for the CLI), keyed like ``Photos.bad()`` plus ``good``."""
    folder = tmp_path_factory.mktemp("photos")
    files = {"good": folder / "good.jpg"}
    files["good"].write_bytes(photos.jpeg)
    suffixes = {"text": ".txt", "truncated_jpeg": ".jpg", "empty": ".jpg"}
    for name, data in photos.bad().items():
        path = folder / f"{name}{suffixes.get(name, '.png')}"
        path.write_bytes(data)
        files[name] = path
    return files


def _probe_mp4(path) -> dict:
    """What a player sees: codecs, sizes, stream durations and the decoded frame / sample counts."""
    with av.open(str(path)) as container:
        video = [s for s in container.streams if s.type == "video"]
        audio = [s for s in container.streams if s.type == "audio"]
        info = {"num_streams": len(container.streams), "video_streams": len(video), "audio_streams": len(audio)}
        if len(video) == 1 and len(audio) == 1:
            v, a = video[0], audio[0]
            info.update(
                video_codec=v.codec_context.name,
                pix_fmt=v.codec_context.pix_fmt,
                width=v.codec_context.width,
                height=v.codec_context.height,
                video_duration=float(v.duration * v.time_base),
                fps=float(v.average_rate),
                audio_codec=a.codec_context.name,
                sample_rate=a.codec_context.sample_rate,
                channels=a.codec_context.channels,
                audio_duration=float(a.duration * a.time_base),
            )
    if info.get("video_streams") == 1 and info.get("audio_streams") == 1:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        with av.open(str(path)) as container:
            samples = sum(frame.samples for frame in container.decode(audio=0))
        info.update(decoded_frames=len(frames), first_frame=frames[0] if frames else None, decoded_samples=samples)
    return info


@pytest.fixture(scope="session")
def probe_mp4():
    """``probe_mp4(path)``: what a player sees in an MP4 (codecs, sizes, durations, decoded counts)."""
    return _probe_mp4


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free port, for one test module; no persistence."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(process, url)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# The served modules share one cluster and change it as they go (faults take replicas down, health holds diffusion
# at one replica, parallel redeploys it over two GPUs): they run in this order, after every other test.
SERVED_ORDER = ("test_served_app", "test_served_front_doors", "test_served_tenants", "test_served_fuzz", "test_served_faults",
                "test_served_health", "test_served_parallel", "test_served_h3")


def _served_rank(item) -> int:
    module = item.path.stem
    return SERVED_ORDER.index(module) + 1 if module in SERVED_ORDER else 0


def pytest_collection_modifyitems(config, items):
    """Served modules in ``SERVED_ORDER``; ``gpu``-marked tests run where CUDA exists, elsewhere they are reported
    as skipped, with the reason."""
    items.sort(key=_served_rank)  # stable: every other test keeps its place
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
