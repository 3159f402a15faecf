"""LTX-2: joint audio + video diffusion, split into stages that run alone.

Each stage loads only its own components with ``from_pretrained(path,
subfolder=..., device_map=...)`` (straight onto its device: no whole copy in
host memory first; each component timed in ``loaded``) and runs the diffusers
pipeline's own code for its part, so running the stages one after another
gives exactly what the whole ``LTX2Pipeline`` / ``LTX2ImageToVideoPipeline``
gives for the same seed. Each has ``warm_up()``: one request of the default
size, run before its replica takes traffic.

Stage split (diffusers' offload order): text_encoder -> connectors +
transformer -> vae (decode) -> audio_vae + vocoder. The photo goes through the
video VAE's encoder in its own stage.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import AutoTokenizer

from cluster.sizes import parse_size
from serving.devices import resolve_device, resolve_dtype
from serving.families.ltx2.checkpoint import checkpoint_path, component_config
from serving.families.ltx2.config import LTX2ModelConfig
from serving.media import encode_video, load_photo
from serving.protocol import (
    AudioLatents,
    EncodedVideo,
    HostTensor,
    ImageCondition,
    PromptEmbeddings,
    RenderPlan,
    TextEmbeddings,
    VideoFrames,
    VideoLatents,
    Waveform,
)
from serving.weights import LoadLog, device_map

__all__ = [
    "LTX2TextEncoder",
    "LTX2ImageConditioner",
    "LTX2VideoDecoder",
    "LTX2AudioDecoder",
    "center_crop_to_aspect",
]


class _Placement:
    """Device and dtype of one stage, from the model config."""

    def __init__(self, config: LTX2ModelConfig):
        self.path = checkpoint_path(config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.device_map = device_map(self.device)
        width, height = parse_size(config.default_size)
        # The default request: what warm_up runs.
        self.plan = RenderPlan.build(width=width, height=height, fps=config.default_fps, seconds=config.default_seconds,
                                     seed=0, num_inference_steps=config.num_inference_steps,
                                     frame_step=config.FRAME_STEP, frame_offset=config.FRAME_OFFSET)


def _pipeline_class(image_to_video: bool):
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline  # noqa: PLC0415 - diffusers only once a stage loads its model

    return LTX2ImageToVideoPipeline if image_to_video else LTX2Pipeline


def _partial_pipeline(base, **components):
    """A diffusers pipeline object holding only some components (the rest ``None``).

    Lets a stage call the pipeline's own methods for its part of the work.
    """
    names = ["scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder"]
    pipeline = base(**{name: components.get(name) for name in names})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --------------------------------------------------------------------------- text encoding


class LTX2TextEncoder:
    """Prompt (+ negative prompt) -> the text connectors' outputs, ready for the transformer.

    Running the connectors here keeps the hand-off lean: the Gemma hidden states
    of all 49 layers (385 MB per prompt at LTX-2's 1024 tokens) never leave this
    stage, only the connectors' two streams do (about 16 MB per prompt).
    """

    _CACHED_NEGATIVES = 4  # negative prompts are few (usually the configured default)

    def __init__(self, config: LTX2ModelConfig):
        from diffusers import DiffusionPipeline  # noqa: PLC0415 - diffusers only once a stage loads its model
        from diffusers.pipelines.ltx2 import LTX2TextConnectors  # noqa: PLC0415 - diffusers only once a stage loads its model

        self._config = config
        place = _Placement(config)
        self._device = place.device
        self.loaded = LoadLog()
        _, class_name = DiffusionPipeline.load_config(place.path)["text_encoder"]
        encoder_class = getattr(transformers, class_name)
        self.tokenizer = AutoTokenizer.from_pretrained(place.path, subfolder="tokenizer")
        text_encoder = self.loaded.load("text_encoder", lambda: encoder_class.from_pretrained(
            place.path, subfolder="text_encoder", dtype=place.dtype, device_map=place.device_map)).eval()
        self.connectors = self.loaded.load("connectors", lambda: LTX2TextConnectors.from_pretrained(
            place.path, subfolder="connectors", torch_dtype=place.dtype, device_map=place.device_map)).eval()
        self._pipeline = _partial_pipeline(
            _pipeline_class(image_to_video=False), text_encoder=text_encoder, tokenizer=self.tokenizer
        )
        self._negatives: OrderedDict[str, TextEmbeddings] = OrderedDict()

    def warm_up(self) -> None:
        self.encode("a warm-up prompt", self._config.negative_prompt)

    @property
    def guidance_on(self) -> bool:
        return self._config.guidance_scale > 1.0 or self._config.audio_guidance_scale > 1.0

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text.strip(), add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str | None) -> PromptEmbeddings:
        negative = self._negative(negative_prompt or "") if self.guidance_on else None
        return PromptEmbeddings(prompt=self._encode_one(prompt), negative=negative)

    def _negative(self, text: str) -> TextEmbeddings:
        """Negative prompts repeat across jobs (the default above all): encode each once per replica."""
        if text in self._negatives:
            self._negatives.move_to_end(text)
            return self._negatives[text]
        embeddings = self._encode_one(text)
        self._negatives[text] = embeddings
        if len(self._negatives) > self._CACHED_NEGATIVES:
            self._negatives.popitem(last=False)
        return embeddings

    def _encode_one(self, text: str) -> TextEmbeddings:
        # Padded to the full length: LTX-2's connectors fill the padding with learned registers that
        # every token attends to, so trimming it would change the output.
        hidden, mask = self._pipeline._get_gemma_prompt_embeds(
            prompt=text, max_sequence_length=self._config.max_prompt_tokens, device=self._device
        )
        video, audio, connector_mask = self.connectors(hidden, mask, padding_side=self.tokenizer.padding_side)
        return TextEmbeddings(video=HostTensor.of(video), audio=HostTensor.of(audio), mask=HostTensor.of(connector_mask))


# --------------------------------------------------------------------------- image conditioning


def center_crop_to_aspect(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Crop the photo's centre to the target aspect ratio, so resizing never distorts it."""
    source_w, source_h = image.size
    target = width / height
    if abs(source_w / source_h - target) < 1e-6:
        return image
    if source_w / source_h > target:
        new_w = max(1, round(source_h * target))
        left = (source_w - new_w) // 2
        return image.crop((left, 0, left + new_w, source_h))
    new_h = max(1, round(source_w / target))
    top = (source_h - new_h) // 2
    return image.crop((0, top, source_w, top + new_h))


class LTX2ImageConditioner:
    """Photo -> video-VAE latents of the first frame (crop, H.264 re-compression, resize, encode)."""

    def __init__(self, config: LTX2ModelConfig):
        from diffusers import AutoencoderKLLTX2Video  # noqa: PLC0415 - diffusers only once a stage loads its model
        from diffusers.pipelines.ltx2.utils import resolve_default_image_crf  # noqa: PLC0415 - diffusers only once a stage loads its model

        place = _Placement(config)
        self._device, self._dtype, self._plan = place.device, place.dtype, place.plan
        self.loaded = LoadLog()
        self.vae = self.loaded.load("vae", lambda: AutoencoderKLLTX2Video.from_pretrained(
            place.path, subfolder="vae", torch_dtype=place.dtype, device_map=place.device_map))
        self.vae.decoder = None  # this stage only encodes
        self.vae.eval()
        self._pipeline = _partial_pipeline(_pipeline_class(image_to_video=True), vae=self.vae)
        # The re-compression strength the checkpoint was trained with depends on its text
        # encoder generation; the config alone tells which.
        text_encoder_config = component_config(place.path, "text_encoder")
        self._crf = resolve_default_image_crf(_ConfigHolder(text_encoder_config))

    def warm_up(self) -> None:
        self.condition(PIL.Image.new("RGB", (self._plan.width, self._plan.height), (128, 128, 128)),
                       self._plan.width, self._plan.height)

    @torch.no_grad()
    def condition(self, photo: bytes | PIL.Image.Image, width: int, height: int) -> ImageCondition:
        """The photo (its file bytes, as the job stored them, or an image) encoded at ``width`` x ``height``."""
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf  # noqa: PLC0415 - diffusers only once a stage loads its model

        image = load_photo(photo) if isinstance(photo, (bytes, bytearray)) else photo
        image = center_crop_to_aspect(image.convert("RGB"), width, height)
        if self._crf != 0:
            image = PIL.Image.fromarray(apply_image_conditioning_crf(np.array(image), self._crf))
        pixels = self._pipeline.video_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(device=self._device, dtype=self._dtype)
        encoded = self.vae.encode(pixels[0].unsqueeze(0).unsqueeze(2))
        latents = encoded.latent_dist.mode().to(torch.float32)
        return ImageCondition(latents=HostTensor.of(latents), width=width, height=height)


class _ConfigHolder:
    """Something with a ``.config.model_type``, as diffusers' CRF helper expects."""

    def __init__(self, config: dict):
        self.config = type("Config", (), {"model_type": config.get("model_type")})()


# --------------------------------------------------------------------------- decoding


class LTX2VideoDecoder:
    """Video latents -> RGB frames (video VAE decoder)."""

    def __init__(self, config: LTX2ModelConfig):
        from diffusers import AutoencoderKLLTX2Video  # noqa: PLC0415 - diffusers only once a stage loads its model

        place = _Placement(config)
        self._device, self._dtype, self._plan = place.device, place.dtype, place.plan
        self.loaded = LoadLog()
        self.vae = self.loaded.load("vae", lambda: AutoencoderKLLTX2Video.from_pretrained(
            place.path, subfolder="vae", torch_dtype=place.dtype, device_map=place.device_map))
        self.vae.encoder = None  # this stage only decodes
        if config.vae_tiling:
            self.vae.enable_tiling()
        self.vae.eval()
        self._pipeline = _partial_pipeline(_pipeline_class(image_to_video=False), vae=self.vae)

    @torch.no_grad()
    def decode_pixels(self, latents: VideoLatents) -> np.ndarray:
        """Frames as 8-bit RGB ``[F, H, W, 3]``: the pipeline's ``output_type="np"`` frames, rounded to bytes.

        The conversion runs on the device a few frames at a time, so no float32
        copy of the whole clip ever exists (1.3 GB at 1280x704 x 121 frames).
        """
        video_latents = latents.latents.to(self._device, self._dtype)
        timestep = None
        if self.vae.config.timestep_conditioning:
            # The pipeline's default decode timestep (0) leaves the latents unchanged.
            timestep = torch.zeros(video_latents.shape[0], device=self._device, dtype=self._dtype)
        video = self.vae.decode(video_latents, timestep, return_dict=False)[0][0]  # [3, F, H, W]
        frames = np.empty((video.shape[1], video.shape[2], video.shape[3], 3), dtype=np.uint8)
        for start in range(0, video.shape[1], self._FRAMES_PER_CONVERSION):
            chunk = video[:, start : start + self._FRAMES_PER_CONVERSION]
            unit = (chunk / 2 + 0.5).clamp(0, 1)  # as diffusers' postprocessing, in the model's dtype
            pixels = torch.round(unit.float() * 255.0).to(torch.uint8).permute(1, 2, 3, 0)
            frames[start : start + pixels.shape[0]] = pixels.cpu().numpy()
        return frames

    _FRAMES_PER_CONVERSION = 8

    def warm_up(self) -> None:
        plan, ratio = self._plan, int(self.vae.spatial_compression_ratio)
        frames = (plan.generated_frames - 1) // int(self.vae.temporal_compression_ratio) + 1
        shape = (1, int(self.vae.config.latent_channels), frames, plan.height // ratio, plan.width // ratio)
        self.decode(VideoLatents(HostTensor.of(torch.zeros(shape))), plan)

    def decode(self, latents: VideoLatents, plan: RenderPlan) -> EncodedVideo:
        """Decoded and compressed here, so frames (324 MB of bytes at 1280x704 x 121) never leave the stage."""
        frames = VideoFrames(pixels=self.decode_pixels(latents)[: plan.output_frames], fps=plan.fps)
        return encode_video(frames)


class LTX2AudioDecoder:
    """Audio latents -> stereo waveform (audio VAE decoder, then vocoder)."""

    def __init__(self, config: LTX2ModelConfig):
        from diffusers import AutoencoderKLLTX2Audio  # noqa: PLC0415 - diffusers only once a stage loads its model
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder  # noqa: PLC0415 - diffusers only once a stage loads its model

        place = _Placement(config)
        self._device, self._dtype, self._plan = place.device, place.dtype, place.plan
        self.loaded = LoadLog()
        self.audio_vae = self.loaded.load("audio_vae", lambda: AutoencoderKLLTX2Audio.from_pretrained(
            place.path, subfolder="audio_vae", torch_dtype=place.dtype, device_map=place.device_map))
        self.audio_vae.encoder = None
        self.audio_vae.eval()
        self.vocoder = self.loaded.load("vocoder", lambda: LTX2Vocoder.from_pretrained(
            place.path, subfolder="vocoder", torch_dtype=place.dtype, device_map=place.device_map)).eval()

    def warm_up(self) -> None:
        """One decode of the default request's length (the latent frame count as the denoiser computes it)."""
        config = self.audio_vae.config
        per_second = config.sample_rate / config.mel_hop_length / float(self.audio_vae.temporal_compression_ratio)
        frames = round(self._plan.generated_frames / float(self._plan.fps) * per_second)
        bins = config.mel_bins // int(self.audio_vae.mel_compression_ratio)
        self.decode(AudioLatents(HostTensor.of(torch.zeros(1, config.latent_channels, frames, bins))))

    @torch.no_grad()
    def decode_tensor(self, latents: AudioLatents) -> torch.Tensor:
        """Waveform ``[1, channels, samples]``: exactly the pipeline's audio output."""
        audio_latents = latents.latents.to(self._device, self._dtype)
        mel = self.audio_vae.decode(audio_latents, return_dict=False)[0]
        return self.vocoder(mel)

    def decode(self, latents: AudioLatents) -> Waveform:
        samples = self.decode_tensor(latents)[0].float().cpu().numpy()
        return Waveform(samples=samples, sample_rate=int(self.vocoder.config.output_sampling_rate))
