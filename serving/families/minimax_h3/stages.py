"""MiniMax-H3's model stages: each loads only its own components and runs diffusers' own blocks for its part.

- :class:`MiniMaxH3TextEncoder`: Qwen3-VL over H3's presentation of the request
  (for fl2va and ref2va the keyframes or references are decoded here too,
  because the conditioner reads them as vision blocks).
- :class:`MiniMaxH3ReferenceEncoder`: the video and audio VAEs' encoders over the
  keyframes (fl2va) or references (ref2va).
- :class:`MiniMaxH3VideoDecoder` / :class:`MiniMaxH3AudioDecoder`: the VAEs'
  decoders; the video leaves as an H.264 track, the audio as a waveform.

Inputs arrive as the bytes the client sent (``specs[i]`` describes
``media[i]``); outputs are typed hand-offs of host arrays. Running the stages
one after another with the diffusion engine gives what ``MiniMaxH3Blocks``
gives for the same seed and inputs (``tests/serving/families/minimax_h3``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from serving.devices import resolve_device, resolve_dtype
from serving.families.minimax_h3.blocks import StagePipelines
from serving.families.minimax_h3.checkpoint import checkpoint_path, component_config
from serving.families.minimax_h3.config import WORKFLOWS, MiniMaxH3ModelConfig
from serving.families.minimax_h3.decoding import JobMedia, decode_job_media
from serving.families.minimax_h3.handoffs import ReferenceConditioning, TextConditioning
from serving.families.minimax_h3.references import ReferenceLimits
from serving.media import encode_video
from serving.protocol import (
    AudioLatents,
    EncodedVideo,
    HostTensor,
    InputSpec,
    RenderPlan,
    VideoFrames,
    VideoLatents,
    Waveform,
)

__all__ = [
    "MiniMaxH3AudioDecoder",
    "MiniMaxH3ReferenceEncoder",
    "MiniMaxH3TextEncoder",
    "MiniMaxH3VideoDecoder",
    "block_inputs",
]


class _Placement:
    """Checkpoint, device, dtype and reference limits of one stage, from the model config."""

    def __init__(self, config: MiniMaxH3ModelConfig):
        self.config = config
        self.path = checkpoint_path(config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.limits = ReferenceLimits.of(config)
        self.sample_rate = int(component_config(self.path, "audio_vae")["sampling_rate"])

    def decode(self, plan: RenderPlan, specs: Sequence[InputSpec], media: Sequence[bytes]) -> JobMedia:
        return decode_job_media(specs, media, self.limits, num_frames=plan.generated_frames, fps=plan.fps,
                                sample_rate=self.sample_rate)


def block_inputs(decoded: JobMedia, plan: RenderPlan) -> dict:
    """What diffusers' ``before_encode`` blocks take for this job: the canvas, and the keyframes or references."""
    inputs: dict = {"height": plan.height, "width": plan.width}
    if decoded.workflow == "fl2va":
        inputs.update(image=decoded.first_frame, last_image=decoded.last_frame)
    elif decoded.workflow == "ref2va":
        inputs.update(references=decoded.references, num_frames=plan.generated_frames)
    return inputs


# --------------------------------------------------------------------------- text


class MiniMaxH3TextEncoder:
    """Prompt (+ keyframes or references) -> Qwen3-VL's ``hidden_states[50]`` and each row's modality tag."""

    def __init__(self, config: MiniMaxH3ModelConfig):
        self._place = _Placement(config)
        self.blocks = StagePipelines(self._place.path, "text_encoder", config.workflows, self._place.device,
                                     self._place.dtype)

    def count_tokens(self, text: str) -> int:
        return len(self.blocks.components["tokenizer"](text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str, plan: RenderPlan, specs: Sequence[InputSpec] = (), *media: bytes) -> TextConditioning:
        decoded = self._place.decode(plan, specs, media)
        inputs = {"prompt": prompt}
        if decoded.workflow != "t2va":
            inputs.update(block_inputs(decoded, plan))
        out = self.blocks.run(decoded.workflow, ["prompt_embeds", "text_token_tags"], **inputs)
        return TextConditioning(states=HostTensor.of(out["prompt_embeds"]), token_tags=HostTensor.of(out["text_token_tags"]))


# --------------------------------------------------------------------------- references


class MiniMaxH3ReferenceEncoder:
    """Keyframes (fl2va) or references (ref2va) -> the VAEs' normalized conditioning latents."""

    def __init__(self, config: MiniMaxH3ModelConfig):
        self._place = _Placement(config)
        workflows = [w for w in config.workflows if w != "t2va"]  # text-only requests encode nothing here
        self.blocks = StagePipelines(self._place.path, "reference_encoder", workflows, self._place.device,
                                     self._place.dtype)
        # This stage only encodes: the decoders (the video VAE's 36-layer ViT above all) are dropped.
        vae, audio_vae = self.blocks.components.get("vae"), self.blocks.components.get("audio_vae")
        if vae is not None:
            vae.decoder = vae.post_quant_conv = None
        if audio_vae is not None:
            audio_vae.decoder = audio_vae.dec_in_proj = None

    def encode(self, plan: RenderPlan, specs: Sequence[InputSpec], *media: bytes) -> ReferenceConditioning:
        decoded = self._place.decode(plan, specs, media)
        if decoded.workflow == "t2va":
            raise ValueError("a text-only request (t2va) has no keyframes or references to encode")
        if decoded.workflow == "fl2va":
            out = self.blocks.run("fl2va", ["condition_latents", "keyframe_anchors"], **block_inputs(decoded, plan))
            return ReferenceConditioning(
                workflow="fl2va", kinds=("image",) * len(out["condition_latents"]),
                has_audio=(False,) * len(out["condition_latents"]), keyframe_anchors=tuple(out["keyframe_anchors"]),
                video_latents=tuple(HostTensor.of(t) for t in out["condition_latents"]), audio_rows=(),
            )
        out = self.blocks.run(
            "ref2va", ["condition_latents", "audio_condition_latents", "normalized_references"],
            **block_inputs(decoded, plan),
        )
        references = out["normalized_references"]
        return ReferenceConditioning(
            workflow="ref2va", kinds=tuple(r.kind for r in references), has_audio=tuple(bool(r.has_audio) for r in references),
            keyframe_anchors=(), video_latents=tuple(HostTensor.of(t) for t in out["condition_latents"]),
            audio_rows=tuple(HostTensor.of(t) for t in out["audio_condition_latents"]),
        )


# --------------------------------------------------------------------------- decoders

# decode.video and decode.audio are the same blocks in every workflow.
_DECODE_WORKFLOW = WORKFLOWS[:1]


class MiniMaxH3VideoDecoder:
    """Video latents -> frames (the video VAE's ViT decoder, tiled as released) -> an H.264 track."""

    _FRAMES_PER_CONVERSION = 16

    def __init__(self, config: MiniMaxH3ModelConfig):
        place = _Placement(config)
        self.blocks = StagePipelines(place.path, "video_decoder", _DECODE_WORKFLOW, place.device, place.dtype)
        vae = self.blocks.components["vae"]
        vae.encoder = vae.quant_conv = None  # this stage only decodes
        self._device = place.device

    def decode_unit_frames(self, latents: VideoLatents) -> torch.Tensor:
        """The blocks' frames, float in [0, 1], ``[F, H, W, 3]`` on the stage's device (``output_type="pt"``)."""
        out = self.blocks.run(_DECODE_WORKFLOW[0], ["videos"], latents=latents.latents.to(self._device),
                              output_type="pt")
        return out["videos"][0].permute(0, 2, 3, 1)

    def decode(self, latents: VideoLatents, plan: RenderPlan) -> EncodedVideo:
        """Decoded and compressed here: the frames (3.6 GB as float at 1344x768 x 345) never leave the stage.
        They become bytes a few at a time, on the device, rounded as ``VideoFrames.from_unit_float`` rounds."""
        unit = self.decode_unit_frames(latents)[: plan.output_frames]
        pixels = np.empty(tuple(unit.shape), dtype=np.uint8)
        for start in range(0, unit.shape[0], self._FRAMES_PER_CONVERSION):
            chunk = unit[start : start + self._FRAMES_PER_CONVERSION].float()
            pixels[start : start + chunk.shape[0]] = torch.round(chunk * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()
        return encode_video(VideoFrames(pixels=pixels, fps=plan.fps))


class MiniMaxH3AudioDecoder:
    """Audio latents -> the stereo waveform (the audio VAE's BigVGAN decoder, 32 kHz)."""

    def __init__(self, config: MiniMaxH3ModelConfig):
        place = _Placement(config)
        self.blocks = StagePipelines(place.path, "audio_decoder", _DECODE_WORKFLOW, place.device, place.dtype)
        audio_vae = self.blocks.components["audio_vae"]
        audio_vae.encoder = audio_vae.pre_block = audio_vae.mean_proj = audio_vae.logs_proj = None  # decodes only
        self._device = place.device

    def decode(self, latents: AudioLatents) -> Waveform:
        out = self.blocks.run(_DECODE_WORKFLOW[0], ["audio", "sampling_rate"],
                              audio_latents=latents.latents.to(self._device))
        return Waveform(samples=out["audio"][0].float().cpu().numpy(), sample_rate=int(out["sampling_rate"]))
