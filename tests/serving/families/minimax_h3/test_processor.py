"""The torch/PIL stand-in for Qwen3-VL's video processor (no torchvision on these machines): the real patch order
and outputs, and a processor that loads from the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2VLImageProcessorPil

from serving.families.minimax_h3.processor import (
    StandInQwen3VLProcessor,
    StandInQwen3VLVideoProcessor,
)


def test_patches_come_in_qwen3_vl_order():
    """Rows are grouped by 2x2 merge block, each row holding (channel, temporal pair, 16 x 16) of one patch."""
    processor = StandInQwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32,
                                             max_pixels=4 * 64 * 64, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    out = processor(videos=[frames], do_sample_frames=False, return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # (T, C, H, W), already 64 x 64

    def patch(t, row, column):
        block = pixels[2 * t : 2 * t + 2, :, 16 * row : 16 * row + 16, 16 * column : 16 * column + 16]
        return block.permute(1, 0, 2, 3).reshape(-1)  # (C, T, 16, 16)

    rows = out["pixel_values_videos"]
    assert rows.shape == (2 * 4 * 4, 3 * 2 * 16 * 16)
    expected = [patch(0, 0, 0), patch(0, 0, 1), patch(0, 1, 0), patch(0, 1, 1), patch(0, 0, 2)]  # first merge blocks
    for index, values in enumerate(expected):
        torch.testing.assert_close(rows[index], values, atol=1e-6, rtol=0)
    torch.testing.assert_close(rows[16], patch(1, 0, 0), atol=1e-6, rtol=0)  # the next temporal pair


def test_the_processor_loads_from_the_checkpoint_without_torchvision(h3_checkpoint):
    processor = StandInQwen3VLProcessor.from_pretrained(h3_checkpoint, subfolder="processor")
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert isinstance(processor.video_processor, StandInQwen3VLVideoProcessor)
    ids = processor.tokenizer("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert processor.create_mm_token_type_ids([ids]) == [[0, 1, 0]]
