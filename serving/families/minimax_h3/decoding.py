"""A job's keyframes and references, from the bytes the client sent to what diffusers' H3 blocks take.

The blocks never open a media file: they take ``MiniMaxH3ImageReference``,
``MiniMaxH3VideoReference`` and ``MiniMaxH3AudioReference`` (decoded media plus
its rate) and PIL keyframes. This module does what those classes' ``from_file``
do (Pillow for images, PyAV for video and audio), from bytes and within bounds:

- images: ``exif_transpose`` then RGB, as diffusers' ``load_image``;
- videos: RGB frames turned upright by the stream's rotation, as
  ``_decode_video_file``; frames are put on H3's 24 fps grid *while decoding*
  (the whole-frame drop/duplicate rule of the setup block, applied one frame at a
  time) and decoding stops once the generated frame count is reached, so a long
  or fast clip never sits in memory whole. The frames the block then sees are
  exactly the ones it would have made from the whole clip;
- audio (a clip, or a video's soundtrack): planar float at the audio VAE's
  sample rate, stopped at the generated duration (the setup block truncates
  there). Clips at another rate are resampled by PyAV here, because the block's
  own resampling needs torchaudio, which these machines do not have.

A file that passed admission's header checks but is corrupt inside (a truncated
MP4, broken AAC) raises ``InvalidReference`` naming the field the client sent.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import av
import numpy as np
import torch
from diffusers.modular_pipelines.minimax_h3 import (
    MiniMaxH3AudioReference,
    MiniMaxH3ImageReference,
    MiniMaxH3VideoReference,
)
from PIL import Image, ImageOps

from serving.errors import InvalidReference
from serving.families.minimax_h3.references import (
    FIRST_FRAME,
    LAST_FRAME,
    REFERENCE_ROLES,
    ReferenceLimits,
    client_field,
    header_seconds,
    reference_order,
)
from serving.protocol import InputSpec

__all__ = ["JobMedia", "decode_audio", "decode_image", "decode_job_media", "decode_video"]

_TRUNCATION_TOLERANCE_S = 0.25  # decoded media may end this much before its header's duration


@dataclass
class JobMedia:
    """A job's decoded inputs: the keyframes (fl2va) or the references in the order the model reads them (ref2va)."""

    first_frame: Image.Image | None = None
    last_frame: Image.Image | None = None
    references: list = field(default_factory=list)

    @property
    def workflow(self) -> str:
        if self.references:
            return "ref2va"
        return "fl2va" if self.first_frame is not None or self.last_frame is not None else "t2va"


def decode_job_media(
    specs: Sequence[InputSpec],
    media: Sequence[bytes],
    limits: ReferenceLimits,
    *,
    num_frames: int,
    fps: int,
    sample_rate: int,
) -> JobMedia:
    """Decode every input (``specs[i]`` describes ``media[i]``) for a clip of ``num_frames`` generated frames."""
    if len(specs) != len(media):
        raise ValueError(f"{len(specs)} input descriptions for {len(media)} inputs")
    decoded = JobMedia()
    references = []
    for spec, data in zip(specs, media):
        name = client_field(spec.name)
        if spec.role == FIRST_FRAME:
            decoded.first_frame = decode_image(data, name, limits)
        elif spec.role == LAST_FRAME:
            decoded.last_frame = decode_image(data, name, limits)
        elif spec.role in REFERENCE_ROLES:
            references.append((reference_order(spec.name), spec, data, name))
        else:
            raise ValueError(f"input {spec.name}: unknown role '{spec.role}'")
    for _, spec, data, name in sorted(references, key=lambda entry: entry[0]):
        decoded.references.append(_decode_reference(spec.role, data, name, limits, num_frames, fps, sample_rate))
    return decoded


def _decode_reference(role: str, data: bytes, name: str, limits: ReferenceLimits, num_frames: int, fps: int,
                      sample_rate: int):
    if role == "reference_image":
        return MiniMaxH3ImageReference(image=decode_image(data, name, limits))
    if role == "reference_video":
        return decode_video(data, name, limits, num_frames=num_frames, fps=fps, sample_rate=sample_rate)
    return decode_audio(data, name, limits, seconds=num_frames / fps, sample_rate=sample_rate)


# --------------------------------------------------------------------------- images


def decode_image(data: bytes, name: str, limits: ReferenceLimits) -> Image.Image:
    """An RGB image, upright (as diffusers' ``load_image``), after its size is checked against the limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel cap is lower
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise InvalidReference(name, f"the image is {width}x{height}, over the pixel limit")
                return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidReference(name, f"the image does not decode ({_reason(error)})") from None


# --------------------------------------------------------------------------- videos


def decode_video(data: bytes, name: str, limits: ReferenceLimits, *, num_frames: int, fps: int,
                 sample_rate: int) -> MiniMaxH3VideoReference:
    """The video's frames on the ``fps`` grid (at most ``num_frames``) and its soundtrack, as a diffusers reference."""
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="replace") as container:
            if not container.streams.video:
                raise InvalidReference(name, "the file has no video stream")
            stream = container.streams.video[0]
            frames = _video_frames(container, stream, name, limits, num_frames, fps)
            soundtrack = None
            if container.streams.audio:
                container.seek(0)  # the frames drained the container; the soundtrack is a second pass
                soundtrack = _waveform(container, container.streams.audio[0], name, num_frames / fps, sample_rate)
    except (av.FFmpegError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise InvalidReference(name, f"the video does not decode ({_reason(error)})") from None
    if len(frames) < min(num_frames, 13):
        raise InvalidReference(name, f"only {len(frames)} frames decode; a video reference needs at least 13")
    return MiniMaxH3VideoReference(
        frames=np.stack(frames), fps=float(fps), audio=soundtrack, sample_rate=None if soundtrack is None else sample_rate
    )


def _video_frames(container, stream, name: str, limits: ReferenceLimits, num_frames: int, fps: int):
    """RGB frames resampled onto ``fps`` as they decode, at most ``num_frames``; refuses a stream that ends before
    its header says."""
    source_fps = float(stream.average_rate or stream.guessed_rate or 0)
    if source_fps <= 0:
        raise InvalidReference(name, "the video has no frame rate")
    header_s = header_seconds(container, stream)
    scale = fps / source_fps
    frames: list[np.ndarray] = []
    turns = None
    last_time = 0.0
    for index, frame in enumerate(container.decode(stream)):
        if frame.width * frame.height > limits.max_video_pixels:
            raise InvalidReference(name, f"a frame is {frame.width}x{frame.height}, over the pixel limit")
        if turns is None:
            # The display matrix's counterclockwise rotation, undone as ffmpeg shows it (diffusers' rule).
            turns = round(frame.rotation / 90.0) % 4
        last_time = frame.time if frame.time is not None else index / source_fps
        # The setup block holds frame k for floor((k + 1) s + 0.5) - floor(k s + 0.5) slots of the 24 fps grid.
        repeats = math.floor((index + 1) * scale + 0.5) - math.floor(index * scale + 0.5)
        if repeats <= 0:
            continue
        pixels = frame.to_ndarray(format="rgb24")
        if turns:
            pixels = np.ascontiguousarray(np.rot90(pixels, k=-turns, axes=(0, 1)))
        frames.extend([pixels] * min(repeats, num_frames - len(frames)))
        if len(frames) >= num_frames:
            return frames
    decoded_s = last_time + 1.0 / source_fps
    if header_s is not None and decoded_s < header_s - _TRUNCATION_TOLERANCE_S:
        raise InvalidReference(
            name, f"the video is truncated: its header says {header_s:.2f} s but only {decoded_s:.2f} s decode"
        )
    return frames


# --------------------------------------------------------------------------- audio


def decode_audio(data: bytes, name: str, limits: ReferenceLimits, *, seconds: float,
                 sample_rate: int) -> MiniMaxH3AudioReference:
    """An audio clip (or a video's soundtrack) as a diffusers reference, at ``sample_rate``, at most ``seconds``."""
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="replace") as container:
            if not container.streams.audio:
                raise InvalidReference(name, "the file has no audio stream")
            waveform = _waveform(container, container.streams.audio[0], name, seconds, sample_rate)
    except (av.FFmpegError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise InvalidReference(name, f"the audio does not decode ({_reason(error)})") from None
    return MiniMaxH3AudioReference(audio=waveform, sample_rate=sample_rate)


def _waveform(container, stream, name: str, seconds: float, sample_rate: int) -> torch.Tensor:
    """``(channels, samples)`` float32 at ``sample_rate``, cut where the setup block cuts (``int(seconds * rate)``).

    Mono and stereo keep their layout (the block upmixes mono); more channels are mixed down to stereo.
    """
    layout = stream.layout.name if stream.layout.nb_channels <= 2 else "stereo"
    resampler = av.audio.resampler.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    wanted = int(seconds * sample_rate)
    chunks, count = [], 0
    header_s = header_seconds(container, stream)
    for frame in container.decode(stream):
        for resampled in resampler.resample(frame):
            chunks.append(resampled.to_ndarray())
            count += chunks[-1].shape[-1]
        if count >= wanted:
            break
    else:
        chunks += [resampled.to_ndarray() for resampled in resampler.resample(None)]
        count = sum(chunk.shape[-1] for chunk in chunks)
        decoded_s = count / sample_rate
        if header_s is not None and decoded_s < min(header_s, seconds) - _TRUNCATION_TOLERANCE_S:
            raise InvalidReference(
                name, f"the audio is truncated: its header says {header_s:.2f} s but only {decoded_s:.2f} s decode"
            )
    if not chunks:
        raise InvalidReference(name, "no audio decodes")
    waveform = torch.from_numpy(np.concatenate(chunks, axis=-1)).to(torch.float32)
    return waveform[:, :wanted] if count >= wanted else waveform


def _reason(error: BaseException) -> str:
    """What went wrong, in the decoder's words, without file names or codes."""
    text = getattr(error, "strerror", None) if isinstance(error, av.FFmpegError) else str(error)
    return (text or type(error).__name__).lower()
