"""What MiniMax-H3's encoder stages hand to its diffusion stage, beyond ``serving.protocol``'s types.

Frozen dataclasses of ``HostTensor`` and plain values only: they are kept as
safetensors + JSON (never pickle) and travel between replicas as numpy. The
diffusion stage rebuilds the packed layout from them with diffusers' own
layout blocks, so they carry exactly what those blocks read.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.protocol import HostTensor

__all__ = ["ReferenceConditioning", "TextConditioning"]


@dataclass(frozen=True)
class TextConditioning:
    """The Qwen3-VL conditioner's output for one request: what the transformer's text rows read.

    ``states`` is ``hidden_states[50]`` over the whole presentation (``[1, T, 5120]`` on the released model, in the
    text encoder's dtype): the references' labels and vision blocks, then the prompt. ``token_tags`` ``[T]`` is each
    row's modality tag (1 text, 0 for a vision block's rows).
    """

    states: HostTensor
    token_tags: HostTensor

    @property
    def tokens(self) -> int:
        return int(self.states.shape[1])

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + self.token_tags.nbytes


@dataclass(frozen=True)
class ReferenceConditioning:
    """The keyframes (fl2va) or references (ref2va) encoded by the VAEs, in the order the model reads them.

    - ``workflow``: fl2va or ref2va.
    - ``kinds`` / ``has_audio``: per reference (ref2va) its modality and whether it brings audio rows (a clip, or a
      video with a soundtrack); the layout block reads nothing else of a reference.
    - ``keyframe_anchors``: per keyframe (fl2va) the end of the video it anchors: first or last.
    - ``video_latents``: per image, video or keyframe, its normalized latents ``[1, 24, f, h, w]`` float32.
    - ``audio_rows``: per audio-bearing reference, its clean normalized audio rows ``[2 n, 32]`` float32.
    """

    workflow: str
    kinds: tuple[str, ...]
    has_audio: tuple[bool, ...]
    keyframe_anchors: tuple[str, ...]
    video_latents: tuple[HostTensor, ...]
    audio_rows: tuple[HostTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.video_latents, *self.audio_rows))
