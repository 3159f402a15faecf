"""MP4 muxing (PyAV), audio fitting, and defensive photo decoding."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from serving.errors import GenerationFailed, InvalidRequest
from serving.media import MAX_PHOTO_BYTES, fit_audio, load_photo, write_mp4
from serving.protocol import VideoFrames, Waveform


def _frames(count: int, width: int, height: int, fps: int) -> VideoFrames:
    """A smooth moving gradient (compresses well, so decoded pixels stay close)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [
            np.stack([(x * 255 // max(width - 1, 1) + 8 * i) % 256, y * 255 // max(height - 1, 1), np.full_like(x, 128)], -1)
            for i in range(count)
        ]
    ).astype(np.uint8)
    return VideoFrames(pixels=pixels, fps=fps)


def _tone(seconds: float, sample_rate: int = 16000, channels: int = 2) -> Waveform:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    samples = np.stack([0.3 * np.sin(2 * np.pi * 440 * (c + 1) * t) for c in range(channels)]).astype(np.float32)
    return Waveform(samples=samples, sample_rate=sample_rate)


@pytest.mark.parametrize(
    ("num_frames", "fps", "audio_seconds", "channels"),
    [
        (24, 24, 1.3, 2),  # audio longer than the video: trimmed
        (12, 24, 0.2, 2),  # audio shorter: padded
        (25, 25, 1.0, 1),  # mono
        (17, 8, 2.125, 2),  # exact length
    ],
)
def test_write_mp4_streams(tmp_path, probe_mp4, num_frames, fps, audio_seconds, channels):
    width, height = 96, 64
    frames = _frames(num_frames, width, height, fps)
    out = write_mp4(tmp_path / "clip.mp4", frames, _tone(audio_seconds, channels=channels))
    assert out == tmp_path / "clip.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no .partial left behind

    info = probe_mp4(out)
    one_frame = 1.0 / fps
    expected = num_frames / fps
    assert (info["num_streams"], info["video_streams"], info["audio_streams"]) == (2, 1, 1)
    assert info["video_codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == (width, height)
    assert info["fps"] == pytest.approx(fps)
    assert info["decoded_frames"] == num_frames
    assert info["first_frame"].shape == (height, width, 3)
    assert np.abs(info["first_frame"].astype(int) - frames.pixels[0].astype(int)).mean() < 6  # really our pixels
    assert abs(info["video_duration"] - expected) <= one_frame
    assert info["audio_codec"] == "aac"
    assert info["sample_rate"] == 16000
    assert info["channels"] == channels
    assert abs(info["audio_duration"] - expected) <= one_frame
    assert abs(info["decoded_samples"] / 16000 - expected) <= one_frame


def test_write_mp4_audio_content_is_kept(tmp_path):
    """The tone survives AAC: decoded audio is loud where the input is, and silent in the padding."""
    fps, num_frames = 24, 48
    wave = _tone(1.0)  # the video lasts 2 s: the second half is padding
    out = write_mp4(tmp_path / "tone.mp4", _frames(num_frames, 64, 64, fps), wave)
    with av.open(str(out)) as container:
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert decoded.shape[0] == 2
    first_half = np.sqrt(np.mean(decoded[:, 2000:14000] ** 2))
    second_half = np.sqrt(np.mean(decoded[:, 18000:30000] ** 2))
    assert first_half == pytest.approx(0.3 / np.sqrt(2), rel=0.2)
    assert second_half < 0.01


def test_write_mp4_replaces_existing_file(tmp_path, probe_mp4):
    target = tmp_path / "again.mp4"
    target.write_bytes(b"old")
    write_mp4(target, _frames(8, 64, 32, 8), _tone(1.0))
    assert probe_mp4(target)["decoded_frames"] == 8


def test_fit_audio_trims():
    wave = Waveform(samples=np.arange(2 * 20, dtype=np.float32).reshape(2, 20), sample_rate=10)
    fitted = fit_audio(wave, 1.2)
    assert fitted.dtype == np.float32
    assert fitted.shape == (2, 12)
    np.testing.assert_array_equal(fitted, wave.samples[:, :12])


def test_fit_audio_pads_with_silence():
    wave = Waveform(samples=np.ones((2, 5), dtype=np.float32), sample_rate=10)
    fitted = fit_audio(wave, 0.8)
    assert fitted.shape == (2, 8)
    np.testing.assert_array_equal(fitted[:, :5], 1.0)
    np.testing.assert_array_equal(fitted[:, 5:], 0.0)


def test_fit_audio_exact_and_mono():
    mono = Waveform(samples=np.linspace(-1, 1, 16, dtype=np.float64), sample_rate=16)
    fitted = fit_audio(mono, 1.0)
    assert fitted.shape == (1, 16)
    assert fitted.dtype == np.float32
    np.testing.assert_allclose(fitted[0], np.linspace(-1, 1, 16), rtol=0, atol=1e-7)


def test_fit_audio_rounds_to_whole_samples():
    wave = Waveform(samples=np.ones((2, 100), dtype=np.float32), sample_rate=16000)
    assert fit_audio(wave, 25 / 24 / 1000).shape == (2, round(16000 * 25 / 24 / 1000))


# --------------------------------------------------------------------------- load_photo


def test_load_photo_reads_jpeg_and_png(photos):
    for data in (photos.jpeg, photos.png):
        image = load_photo(data)
        assert image.mode == "RGB"
        assert image.size == (96, 64)
    np.testing.assert_array_equal(np.asarray(load_photo(photos.png)), np.asarray(photos.image))


def test_load_photo_converts_to_rgb():
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 6), (10, 20, 30, 40)).save(buffer, format="PNG")
    image = load_photo(buffer.getvalue())
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize(
    ("variant", "says"),
    [
        ("empty", "empty"),
        ("truncated_jpeg", "truncated"),
        ("truncated_png", "truncated"),
        ("text", "not an image"),
        ("bomb_png", "too large"),
        ("over_cap_png", "8000x8000"),
        ("too_small_png", "at least 2x2"),
    ],
)
@pytest.mark.parametrize("field", ["image", "input_reference"])
def test_load_photo_refuses(photos, variant, says, field):
    with pytest.raises(InvalidRequest) as caught:
        load_photo(photos.bad()[variant], field=field)
    error = caught.value
    assert error.field == field
    assert says in error.message
    assert str(error).startswith(f"{field}: ")
    # Every refusal says what would be accepted.
    assert any(word in error.message for word in ("JPEG", "at most", "at least"))


def test_load_photo_refuses_oversized_file():
    with pytest.raises(InvalidRequest) as caught:
        load_photo(b"\xff" * (MAX_PHOTO_BYTES + 1), field="image")
    assert caught.value.field == "image"
    assert f"at most {MAX_PHOTO_BYTES} bytes" in caught.value.message


def test_load_photo_refuses_unlisted_format():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PPM")
    with pytest.raises(InvalidRequest) as caught:
        load_photo(buffer.getvalue(), field="photo")
    assert caught.value.field == "photo"
    assert "PPM" in caught.value.message and "JPEG" in caught.value.message


def test_load_photo_applies_the_exif_orientation():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write it
    Image.new("RGB", (120, 80), (10, 200, 30)).save(buffer, format="JPEG", exif=exif)
    assert load_photo(buffer.getvalue()).size == (80, 120)


def test_write_mp4_refuses_non_finite_audio_and_leaves_nothing_behind(tmp_path):
    samples = np.zeros((2, 16000), dtype=np.float32)
    samples[0, 100] = np.nan
    out = tmp_path / "nan.mp4"
    with pytest.raises(GenerationFailed):
        write_mp4(out, _frames(24, 64, 64, 24), Waveform(samples, 16000))
    assert list(tmp_path.iterdir()) == []
