"""One transformer pass's inputs, moved from rank 0 to the other ranks of a group (family-free).

Rank 0 ships each worker a ``PassSpec`` (tensor names, shapes and dtypes, and
the plain values: a few hundred bytes); the tensors themselves go out by
``torch.distributed`` broadcast (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

__all__ = ["PassSpec", "broadcast_pass_inputs", "describe_pass_inputs"]


@dataclass(frozen=True)
class PassSpec:
    """A pass's inputs without their data: tensors as (shape, dtype), everything else as values. Small to ship."""

    tensors: tuple[tuple[str, tuple[int, ...], str], ...]
    values: tuple[tuple[str, Any], ...]


def describe_pass_inputs(kwargs: dict) -> PassSpec:
    tensors = tuple(
        (name, tuple(value.shape), str(value.dtype).removeprefix("torch."))
        for name, value in sorted(kwargs.items())
        if isinstance(value, torch.Tensor)
    )
    values = tuple((name, value) for name, value in sorted(kwargs.items()) if not isinstance(value, torch.Tensor))
    return PassSpec(tensors=tensors, values=values)


def broadcast_pass_inputs(
    spec: PassSpec, kwargs: dict | None, device: torch.device, group: dist.ProcessGroup | None = None, src: int = 0
) -> dict:
    """On ``src``: send ``kwargs``' tensors; elsewhere: receive them into new tensors on ``device``. Returns the inputs."""
    is_source = dist.get_rank(group) == src
    received = dict(spec.values)
    for name, shape, dtype in spec.tensors:
        tensor = cast(dict, kwargs)[name].to(device).contiguous() if is_source else torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(tensor, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
        received[name] = tensor
    return received
