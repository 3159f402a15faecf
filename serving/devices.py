"""Turning the config's device and dtype settings into torch's."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype"]


def resolve_device(setting: str) -> torch.device:
    """``auto``: cuda where present (one process); stages get theirs resolved by ``ReelserveConfig.stage_model``."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs, float32 on the CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)
