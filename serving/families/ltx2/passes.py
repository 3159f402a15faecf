"""One LTX-2 transformer pass on one rank: what the engine calls for every batch of rows.

``LTX2Passes`` wraps the loaded transformer with the per-row modality switch
(modality-isolation guidance for some rows of a batch) and, on a rank group,
with Ulysses sequence parallelism (``serving.families.ltx2.parallel``). The
engine calls it the same way whether the replica has one GPU or N:
``passes(modality_keep=..., **transformer_forward_kwargs) -> (video, audio)``.

``LTX2RankPasses(config)`` is the family's ``sequence_parallel`` hook: a
picklable recipe every rank of a multi-GPU diffusion replica runs after it
joined the group (``serving.parallel_group``), so all ranks load the same
weights (straight onto their own GPU) with the same speed switches.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from serving.families.ltx2.checkpoint import checkpoint_path
from serving.families.ltx2.config import LTX2ModelConfig
from serving.families.ltx2.parallel import SequenceParallelTransformer
from serving.families.ltx2.reference import build_component
from serving.families.ltx2.speed import AppliedSpeed, apply_speed
from serving.families.ltx2.tiny import tiny_ltx2_components
from serving.weights import LoadLog, device_map

__all__ = [
    "CrossModalSwitch", "LTX2Passes", "LTX2RankPasses", "LoaderPasses", "ReferenceTransformerLoader",
    "TinyTransformerLoader", "load_transformer",
]


def load_transformer(config: LTX2ModelConfig, device: torch.device, dtype: torch.dtype, log: LoadLog):
    """The checkpoint's transformer, read straight onto ``device`` (no whole copy in host memory first)."""
    from diffusers import LTX2VideoTransformer3DModel  # noqa: I001, PLC0415 - diffusers only where a transformer is built

    return log.load("transformer", lambda: LTX2VideoTransformer3DModel.from_pretrained(
        checkpoint_path(config), subfolder="transformer", torch_dtype=dtype, device_map=device_map(device),
    )).eval()


class CrossModalSwitch:
    """Turns audio<->video cross-attention off for chosen rows of a batch (modality isolation).

    A forward hook on each block's ``audio_to_video_attn`` and ``video_to_audio_attn``
    scales the attention output by ``keep`` ([rows]: 0 isolated, 1 not). The
    block then adds ``gate * 0`` for isolated rows: exactly what
    ``isolate_modalities=True`` gives them. Inactive (``keep`` None) it changes nothing.
    """

    def __init__(self, transformer):
        self._keep: torch.Tensor | None = None
        for block in transformer.transformer_blocks:
            block.audio_to_video_attn.register_forward_hook(self._scale)
            block.video_to_audio_attn.register_forward_hook(self._scale)

    @contextmanager
    def keep(self, keep: torch.Tensor | None):
        self._keep = None if keep is None else keep.view(-1, 1, 1)
        try:
            yield
        finally:
            self._keep = None

    def _scale(self, module, args, output):
        if self._keep is None:
            return None
        return output * self._keep


class LTX2Passes:
    """One rank's pass: ``passes(modality_keep=..., **forward kwargs) -> (video, audio)``."""

    def __init__(self, transformer, speed: AppliedSpeed | None = None, sequence_parallel: bool = False):
        self.transformer = transformer
        self.speed = speed
        self.loaded = LoadLog()
        self._switch = CrossModalSwitch(transformer)
        self._sharded = SequenceParallelTransformer(transformer) if sequence_parallel else None

    def __call__(self, modality_keep: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs.pop("return_dict", None)
        with self._switch.keep(modality_keep):
            if self._sharded is not None:
                return self._sharded(**kwargs)
            return self.transformer(**kwargs, return_dict=False)


@dataclass(frozen=True)
class LTX2RankPasses:
    """The family's ``sequence_parallel`` hook: how every rank of a group builds its ``LTX2Passes``."""

    config: LTX2ModelConfig

    def __call__(self, device: torch.device, dtype: torch.dtype) -> LTX2Passes:
        log = LoadLog()
        transformer = load_transformer(self.config, device, dtype, log)
        grouped = dist.is_initialized() and dist.get_world_size() > 1
        # Every rank picks the same attention kernels: the first usable in a fixed order, never the fastest of a
        # timed probe (timings differ between ranks).
        speed = apply_speed(transformer, self.config.speed, device, dtype, probe_attention=not grouped)
        passes = LTX2Passes(transformer, speed, sequence_parallel=grouped)
        passes.loaded = log
        return passes


# --------------------------------------------------------------------------- rank passes from a loader (tests, benchmarks)


@dataclass(frozen=True)
class TinyTransformerLoader:
    """The tiny checkpoint's transformer, built in code (deterministic: identical on every rank)."""

    def __call__(self, device, dtype):
        return tiny_ltx2_components()["transformer"].to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class ReferenceTransformerLoader:
    """The real LTX-2 19B dims with seeded random weights (benchmarks: nothing downloaded)."""

    seed: int = 0
    overrides: dict = field(default_factory=dict)

    def __call__(self, device, dtype):
        return build_component("transformer", device=device, dtype=dtype, seed=self.seed, overrides=self.overrides)


@dataclass(frozen=True)
class LoaderPasses:
    """A rank pass around the transformer ``loader(device, dtype)`` builds, sequence-parallel on a group."""

    loader: Callable[[torch.device, torch.dtype], torch.nn.Module]

    def __call__(self, device: torch.device, dtype: torch.dtype) -> LTX2Passes:
        grouped = dist.is_initialized() and dist.get_world_size() > 1
        return LTX2Passes(self.loader(device, dtype), sequence_parallel=grouped)
