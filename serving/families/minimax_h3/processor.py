"""A torch + PIL stand-in for Qwen3-VL's video processor, and the processor that carries it (tiny/CPU path only).

transformers builds ``Qwen3VLVideoProcessor`` (and so ``Qwen3VLProcessor.from_pretrained``)
only when torchvision imports, and the only torchvision wheel these CPU machines reach
is a CUDA build that fails under torch+cpu. Every MiniMax-H3 workflow's text-encoder
step needs the processor, so the tiny checkpoint saves this pair instead:

- :class:`StandInQwen3VLVideoProcessor` does what the real one does for the
  blocks' call (``videos=[frames]``, ``do_sample_frames=False``): the same
  ``smart_resize`` target, rescale and normalize, and the real class's own
  ``patchify`` (called unbound: it reads nothing from ``self``), so the outputs
  (``pixel_values_videos``, ``video_grid_thw``) have the real patch order. Frames
  are resized with PIL's bicubic instead of torchvision's.
- :class:`StandInQwen3VLProcessor` is ``Qwen3VLProcessor`` assembled in code:
  ``from_pretrained`` reads the saved tokenizer and processor config and builds the
  image side with ``Qwen2VLImageProcessorPil`` (no torchvision needed) and the video
  side with the stand-in.

A checkpoint saved with these classes names this module in its
``modular_model_index.json``; diffusers resolves such a class from ``sys.modules``,
so this module must be imported before the checkpoint loads (the family's stages
do). Real checkpoints name transformers' own classes and load on GPU machines,
where CUDA torchvision is installed; this module is never in their path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessorPil, Qwen3VLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    Qwen3VLVideoProcessor,
    smart_resize,
)
from transformers.processing_utils import PROCESSOR_NAME
from transformers.video_processing_utils import VideoProcessorMixin

__all__ = ["StandInQwen3VLProcessor", "StandInQwen3VLVideoProcessor"]

_IMAGE_MEAN = (0.5, 0.5, 0.5)  # Qwen3-VL's (IMAGENET_STANDARD_MEAN / _STD)
_IMAGE_STD = (0.5, 0.5, 0.5)


class StandInQwen3VLVideoProcessor(VideoProcessorMixin):
    """Qwen3-VL's video preprocessing for frames already sampled, in torch and PIL."""

    model_input_names: ClassVar[list[str]] = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_pixels: int = 128 * 32 * 32,
        max_pixels: int = 768 * 32 * 32,
        image_mean: tuple[float, ...] = _IMAGE_MEAN,
        image_std: tuple[float, ...] = _IMAGE_STD,
        **kwargs,
    ):
        kwargs.pop("video_processor_type", None)
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def __call__(self, videos, do_sample_frames: bool = False, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if do_sample_frames:
            raise ValueError("the stand-in video processor takes frames already sampled (do_sample_frames=False)")
        patches, grids = [], []
        for frames in videos:
            pixels = self._resized(np.asarray(frames))  # (T, C, H, W) float32, normalized
            flat, grid_t, grid_h, grid_w = Qwen3VLVideoProcessor.patchify(
                self, pixels[None], self.patch_size, self.merge_size, self.temporal_patch_size
            )
            patches.append(flat[0])
            grids.append([grid_t, grid_h, grid_w])
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _resized(self, frames: np.ndarray) -> torch.Tensor:
        num_frames, height, width = frames.shape[:3]
        target_h, target_w = smart_resize(
            num_frames, height, width, temporal_factor=self.temporal_patch_size,
            factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
        )
        resized = np.stack([
            np.asarray(Image.fromarray(frame).convert("RGB").resize((target_w, target_h), Image.Resampling.BICUBIC))
            for frame in frames
        ])
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std


class StandInQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with the PIL image processor and the stand-in video processor, loadable without
    torchvision."""

    def check_argument_for_proper_class(self, argument_name, argument):
        # transformers looks the video processor's base class up in a mapping that only exists with torchvision.
        if argument_name == "video_processor" and isinstance(argument, StandInQwen3VLVideoProcessor):
            return StandInQwen3VLVideoProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        saved = json.loads((folder / PROCESSOR_NAME).read_text())
        image = {k: v for k, v in saved["image_processor"].items() if k != "image_processor_type"}
        video = {k: v for k, v in saved["video_processor"].items() if k != "video_processor_type"}
        return cls(
            image_processor=Qwen2VLImageProcessorPil(**image),
            tokenizer=Qwen2TokenizerFast.from_pretrained(folder),
            video_processor=StandInQwen3VLVideoProcessor(**video),
        )
