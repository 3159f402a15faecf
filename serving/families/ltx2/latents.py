"""LTX-2 latents for the engine: shapes, statistics, and each phase's starting latents.

Everything here follows what ``LTX2Pipeline`` / ``LTX2ImageToVideoPipeline`` do
before and after their denoising loop, through the pipelines' own static
helpers (packing, normalising, noising), so the engine's latents are the
pipelines' latents for the same seed:

- first phase, text-to-video: video noise then audio noise from the request's generator;
- first phase, image-to-video: the photo's normalised latents in frame 0 (kept clean,
  a per-token timestep of 0) and noise elsewhere;
- a later phase: the previous phase's output, denormalised as the pipeline hands it
  over, upsampled x2, normalised again and re-noised to the phase's first sigma;
- the end: unpacked and denormalised, as ``output_type="latent"`` returns them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2ImageToVideoPipeline, LTX2Pipeline
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from safetensors import safe_open

__all__ = ["LatentSpace", "Geometry", "PhaseLatents", "read_latent_space"]


@dataclass(frozen=True)
class Geometry:
    """Latent shape of one phase of one request."""

    width: int
    height: int
    latent_frames: int
    latent_height: int
    latent_width: int
    audio_frames: int
    video_tokens: int
    audio_tokens: int

    @property
    def tokens(self) -> int:
        """Tokens of one transformer row (video + audio)."""
        return self.video_tokens + self.audio_tokens


@dataclass
class PhaseLatents:
    """A phase's starting point: packed, normalised latents, and the clean-frame mask (image-to-video)."""

    video: torch.Tensor  # [1, video tokens, C * p_t * p * p] float32
    audio: torch.Tensor  # [1, audio frames, C_audio * mel bins] float32
    condition_mask: torch.Tensor | None  # [1, video tokens]: 1 where the photo is kept clean


class LatentSpace:
    """Shape rules and latent statistics of a checkpoint's VAEs, read without their weights.

    The denoiser needs the VAEs only for compression ratios and the per-channel
    mean and std; the rest of the VAE (about 1 GB at real size) is never loaded.
    """

    def __init__(self, vae, audio_vae, transformer_config, device: torch.device):
        self.spatial_ratio = int(vae.spatial_compression_ratio)
        self.temporal_ratio = int(vae.temporal_compression_ratio)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(transformer_config.in_channels)
        self.patch_size = int(transformer_config.patch_size)
        self.patch_size_t = int(transformer_config.patch_size_t)
        self.video_mean = vae.latents_mean.to(device, torch.float32)
        self.video_std = vae.latents_std.to(device, torch.float32)
        self.audio_mean = audio_vae.latents_mean.to(device, torch.float32)
        self.audio_std = audio_vae.latents_std.to(device, torch.float32)
        self.audio_channels = int(audio_vae.config.latent_channels)
        self.audio_sample_rate = int(audio_vae.config.sample_rate)
        self.audio_hop_length = int(audio_vae.config.mel_hop_length)
        self.audio_temporal_ratio = int(audio_vae.temporal_compression_ratio)
        self.mel_bins = int(audio_vae.config.mel_bins)
        self.latent_mel_bins = self.mel_bins // int(audio_vae.mel_compression_ratio)
        self.device = device

    def geometry(self, width: int, height: int, frames: int, fps: float) -> Geometry:
        latent_frames = (frames - 1) // self.temporal_ratio + 1
        latent_height, latent_width = height // self.spatial_ratio, width // self.spatial_ratio
        video_tokens = (
            (latent_frames // self.patch_size_t) * (latent_height // self.patch_size) * (latent_width // self.patch_size)
        )
        # The pipeline's arithmetic, in its order (the rounding must agree).
        duration_s = frames / float(fps)
        per_second = self.audio_sample_rate / self.audio_hop_length / float(self.audio_temporal_ratio)
        audio_frames = round(duration_s * per_second)
        return Geometry(width, height, latent_frames, latent_height, latent_width, audio_frames, video_tokens, audio_frames)

    # ------------------------------------------------------------------ first phase

    def noise(self, geometry: Geometry, photo: torch.Tensor | None, generator: torch.Generator) -> PhaseLatents:
        """Starting latents from noise (and the photo's latents, for image-to-video)."""
        shape = (1, self.latent_channels, geometry.latent_frames, geometry.latent_height, geometry.latent_width)
        video = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        mask = None
        if photo is not None:
            photo = photo.to(self.device, torch.float32)
            clean = LTX2ImageToVideoPipeline._normalize_latents(photo, self.video_mean, self.video_std)
            clean = clean.repeat(1, 1, geometry.latent_frames, 1, 1)
            frame_mask = self._first_frame_mask(geometry)
            video = clean * frame_mask + video * (1 - frame_mask)
            mask = self._pack(frame_mask).squeeze(-1)
        audio_shape = (1, self.audio_channels, geometry.audio_frames, self.latent_mel_bins)
        audio = randn_tensor(audio_shape, generator=generator, device=self.device, dtype=torch.float32)
        return PhaseLatents(self._pack(video), LTX2Pipeline._pack_audio_latents(audio), mask)

    # ------------------------------------------------------------------ between phases

    def upsample_and_renoise(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        before: Geometry,
        after: Geometry,
        upsampler: torch.nn.Module,
        conditioned: bool,
        noise_scale: float,
        generator: torch.Generator,
    ) -> PhaseLatents:
        """The previous phase's latents, upsampled x2 and re-noised as the pipelines' 5-D-latents input path does."""
        video_5d, audio_4d = self.denormalised(video, audio, before)
        upsampled = upsampler(video_5d.to(cast(torch.dtype, upsampler.dtype))).to(torch.float32)
        expected = (after.latent_frames, after.latent_height, after.latent_width)
        if tuple(upsampled.shape[2:]) != expected:
            made = tuple(upsampled.shape[2:])
            raise ValueError(f"the latent upsampler made {made} latents; the refine phase needs {expected}")
        normalised = LTX2Pipeline._normalize_latents(upsampled, self.video_mean, self.video_std, self.scaling_factor)
        mask = None
        if conditioned:
            # Frame 0 (the photo, upsampled) stays clean; noise only elsewhere, drawn in the 5-D layout.
            frame_mask = self._first_frame_mask(after)
            noised = LTX2Pipeline._create_noised_state(normalised, noise_scale * (1 - frame_mask), generator)
            video_packed = self._pack(noised)
            mask = self._pack(frame_mask).squeeze(-1)
        else:
            video_packed = LTX2Pipeline._create_noised_state(self._pack(normalised), noise_scale, generator)
        audio_packed = LTX2Pipeline._normalize_audio_latents(
            LTX2Pipeline._pack_audio_latents(audio_4d), self.audio_mean, self.audio_std
        )
        audio_packed = LTX2Pipeline._create_noised_state(audio_packed, noise_scale, generator)
        return PhaseLatents(video_packed.to(torch.float32), audio_packed.to(torch.float32), mask)

    def condition_mask(self, geometry: Geometry) -> torch.Tensor:
        """The packed clean-frame mask of an image-to-video request (for a resumed request)."""
        return self._pack(self._first_frame_mask(geometry)).squeeze(-1)

    # ------------------------------------------------------------------ the end

    def denormalised(self, video: torch.Tensor, audio: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
        """Video ``[1, C, F, H, W]`` and audio ``[1, C, L, M]``, as ``output_type="latent"`` returns them."""
        video_5d = self.unpack_video(video, geometry)
        video_5d = LTX2Pipeline._denormalize_latents(video_5d, self.video_mean, self.video_std, self.scaling_factor)
        audio = LTX2Pipeline._denormalize_audio_latents(audio, self.audio_mean, self.audio_std)
        audio_4d = LTX2Pipeline._unpack_audio_latents(audio, geometry.audio_frames, num_mel_bins=self.latent_mel_bins)
        return video_5d, audio_4d

    def unpack_video(self, video: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return LTX2Pipeline._unpack_latents(
            video,
            geometry.latent_frames,
            geometry.latent_height,
            geometry.latent_width,
            self.patch_size,
            self.patch_size_t,
        )

    def pack_video(self, video_5d: torch.Tensor) -> torch.Tensor:
        return self._pack(video_5d)

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        return LTX2Pipeline._pack_latents(latents, self.patch_size, self.patch_size_t)

    def _first_frame_mask(self, geometry: Geometry) -> torch.Tensor:
        mask = torch.zeros(
            (1, 1, geometry.latent_frames, geometry.latent_height, geometry.latent_width),
            device=self.device,
            dtype=torch.float32,
        )
        mask[:, :, 0] = 1.0
        return mask


def read_latent_space(path: str, transformer_config, device: torch.device) -> LatentSpace:
    """The checkpoint's latent space: VAE configs and statistics, no VAE weights in memory."""
    vae, audio_vae = _latent_statistics_only(path)
    return LatentSpace(vae, audio_vae, transformer_config, device)


def _latent_statistics_only(path: str):
    """Video and audio VAEs with real configs and latent statistics but no weights in memory."""
    loaded = []
    for cls, subfolder in ((AutoencoderKLLTX2Video, "vae"), (AutoencoderKLLTX2Audio, "audio_vae")):
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(cls.load_config(path, subfolder=subfolder))
        statistics = _read_tensors(path, subfolder, ["latents_mean", "latents_std"])
        for name, value in statistics.items():
            setattr(model, name, value)
        loaded.append(model.eval())
    return loaded


def _read_tensors(path: str, subfolder: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Read a few named tensors from a component's safetensors shards."""
    root = Path(path)
    if not root.is_dir():
        root = Path(snapshot_download(path, allow_patterns=[f"{subfolder}/*.json", f"{subfolder}/*.safetensors"]))
    folder = root / subfolder
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / weight_map[name] for name in names}
    else:
        files = {name: folder / "diffusion_pytorch_model.safetensors" for name in names}
    found = {}
    for name, file in files.items():
        with safe_open(str(file), framework="pt") as handle:
            found[name] = handle.get_tensor(name)
    return found
