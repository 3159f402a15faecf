"""Photos in, MP4s out.

``load_photo`` decodes untrusted image bytes defensively (size caps checked
from the header before any pixel is decoded). ``encode_video`` compresses
frames to H.264 where they are decoded; ``mux_mp4`` adds the AAC audio, fitted
to the video's duration, without touching the compressed video again.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from serving.errors import GenerationFailed, InvalidRequest
from serving.protocol import EncodedVideo, VideoFrames, Waveform

__all__ = ["load_photo", "encode_video", "mux_mp4", "write_mp4", "fit_audio", "MAX_PHOTO_BYTES", "MAX_PHOTO_PIXELS"]

MAX_PHOTO_BYTES = 25 * 1024 * 1024
MAX_PHOTO_PIXELS = 50_000_000  # ~8K x 6K; larger headers are refused before decoding
_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


def load_photo(data: bytes, field: str = "image") -> Image.Image:
    """Decode a photo from bytes into RGB; raise ``InvalidRequest`` naming ``field`` on anything wrong."""
    if not data:
        raise InvalidRequest(field, "the file is empty; send a JPEG, PNG or WebP photo")
    if len(data) > MAX_PHOTO_BYTES:
        raise InvalidRequest(field, f"the file is {len(data)} bytes; at most {MAX_PHOTO_BYTES} bytes are allowed")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InvalidRequest(field, f"the image is too large; at most {MAX_PHOTO_PIXELS} pixels are allowed") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for a bad file; each is the client's error
        raise InvalidRequest(field, "not an image this server can read; send a JPEG, PNG or WebP photo") from None
    if image.format not in _ALLOWED_FORMATS:
        raise InvalidRequest(field, f"{image.format} images are not accepted; allowed: {', '.join(_ALLOWED_FORMATS)}")
    width, height = image.size
    if width * height > MAX_PHOTO_PIXELS:
        raise InvalidRequest(
            field, f"the image is {width}x{height}; at most {MAX_PHOTO_PIXELS} pixels are allowed"
        )
    if width < 2 or height < 2:
        raise InvalidRequest(field, f"the image is {width}x{height}; it must be at least 2x2 pixels")
    try:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")  # phone photos: honour the orientation tag
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad pixel data; each is the client's error
        raise InvalidRequest(field, "the image data is corrupt or truncated; send a complete JPEG, PNG or WebP photo") from None


def fit_audio(waveform: Waveform, duration_s: float) -> np.ndarray:
    """The waveform trimmed or zero-padded to exactly ``duration_s`` (``float32 [channels, n]``)."""
    target = round(duration_s * waveform.sample_rate)
    samples = np.asarray(waveform.samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None, :]
    if samples.shape[1] >= target:
        return np.ascontiguousarray(samples[:, :target])
    padding = np.zeros((samples.shape[0], target - samples.shape[1]), dtype=np.float32)
    return np.concatenate([samples, padding], axis=1)


def encode_video(frames: VideoFrames, crf: int = 18) -> EncodedVideo:
    """Compress frames to H.264 (yuv420p) in an in-memory MP4 holding only the video track."""
    import av  # noqa: PLC0415 - PyAV only where a video is encoded

    pixels = frames.pixels
    num_frames, height, width, _ = pixels.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=frames.fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(pixels[index], format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return EncodedVideo(data=buffer.getvalue(), num_frames=num_frames, fps=frames.fps, width=width, height=height)


def mux_mp4(path: str | Path, video: EncodedVideo, waveform: Waveform) -> Path:
    """Copy the compressed video track and add the waveform as AAC into an MP4 at ``path``.

    The audio is fitted to the video's duration (frames / fps). The file is
    written atomically (temporary name, then rename) so a reader never sees half a file.
    """
    path = Path(path)
    audio = fit_audio(waveform, video.num_frames / video.fps)
    if not np.isfinite(audio).all():
        raise GenerationFailed("the model produced non-finite audio samples (NaN or infinity)")
    audio = np.clip(audio, -1.0, 1.0)
    layout = "stereo" if audio.shape[0] == 2 else "mono"
    partial = path.with_name(path.name + ".partial")
    try:
        _mux(partial, video, audio, layout, waveform.sample_rate)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path


def write_mp4(path: str | Path, frames: VideoFrames, waveform: Waveform, crf: int = 18) -> Path:
    """Frames and a waveform to an MP4 in one call (H.264 + AAC), for single-process use."""
    return mux_mp4(path, encode_video(frames, crf=crf), waveform)


def _mux(partial: Path, video: EncodedVideo, audio: np.ndarray, layout: str, sample_rate: int) -> None:
    import av  # noqa: PLC0415 - PyAV only where a video is encoded

    with av.open(io.BytesIO(video.data), mode="r") as source, av.open(str(partial), mode="w", format="mp4") as target:
        source_stream = source.streams.video[0]
        video_stream = target.add_stream_from_template(source_stream)
        audio_stream = target.add_stream("aac", rate=sample_rate, layout=layout)
        for packet in source.demux(source_stream):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.stream = video_stream
            target.mux(packet)

        audio_frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=layout)
        audio_frame.sample_rate = sample_rate
        audio_frame.pts = 0
        target.mux(audio_stream.encode(audio_frame))
        target.mux(audio_stream.encode(None))
