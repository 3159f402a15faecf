"""Cold start: weights straight onto their device, optionally from a node-local copy, every component timed.

- ``device_map(device)``: what ``from_pretrained(..., device_map=...)`` takes so
  diffusers and transformers read each safetensors file onto the device itself
  (``safetensors.torch.load_file(device=...)``, one tensor at a time), never
  building the whole model in host memory first. Checked on the CPU for every
  LTX-2 component (transformer, connectors, both VAEs, vocoder, Gemma 3).
- ``local_copy(source, cache_dir, parts)``: a node-local copy of the parts of a
  checkpoint a stage reads, filled once per node (the first replica copies under
  a file lock, the others wait and read the copy). Configs, tokenizers and other
  small files are always copied; weight files only for the named parts.
- ``LoadLog``: seconds per component, read by the stage that exports them
  (``reelserve_component_load_seconds``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

__all__ = ["WEIGHT_SUFFIXES", "LoadLog", "checkpoint_bytes", "device_map", "local_copy"]

T = TypeVar("T")
logger = logging.getLogger("ray.serve.reelserve.weights")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
_SMALL = "_small_files"  # the marker name of "every file that is not a weight file"


def device_map(device: torch.device | str) -> dict[str, str]:
    """``from_pretrained``'s ``device_map`` putting every module on ``device`` (an index on CUDA, as accelerate wants)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": str(device)}


@dataclass
class LoadLog:
    """How long each component of a stage took to load (weights read and placed on the device)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def load(self, component: str, loader: Callable[[], T]) -> T:
        started = time.perf_counter()
        loaded = loader()
        self.seconds[component] = self.seconds.get(component, 0.0) + time.perf_counter() - started
        return loaded


def checkpoint_bytes(source: str | Path, parts: Iterable[str]) -> int:
    """Bytes of the weight files under the named parts of a local checkpoint (0 where it is not local)."""
    root = Path(source)
    total = 0
    for part in parts:
        folder = root / part
        if folder.is_dir():
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return total


def local_copy(source: str, cache_dir: str, parts: Iterable[str]) -> str:
    """The checkpoint ``source`` as read from ``cache_dir``: its small files and the named parts, copied once.

    ``source`` that is not a local directory (a hub id) is returned as it is (the hub cache is node-local
    already). The copy is keyed by the source's path and the time its index was last written, so a new
    checkpoint at the same path gets a new copy.
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        return source
    target = Path(cache_dir).expanduser() / _copy_name(root)
    target.mkdir(parents=True, exist_ok=True)
    for part in (_SMALL, *parts):
        if not (root / part).exists() and part != _SMALL:
            continue  # e.g. an optional latent upsampler this checkpoint lacks
        with _locked(target / f".lock-{part}"):
            done = target / f".complete-{part}"
            if done.exists():
                continue
            started = time.perf_counter()
            copied = _copy_small_files(root, target) if part == _SMALL else _copy_part(root / part, target / part)
            done.write_text(f"{copied}\n")
            logger.info("copied %s of %s to %s: %.2f GB in %.1f s", part, root, target, copied / 1e9,
                        time.perf_counter() - started)
    return str(target)


def _copy_name(root: Path) -> str:
    index = next((root / name for name in ("model_index.json", "modular_model_index.json") if (root / name).exists()), root)
    key = f"{root.resolve()}|{index.stat().st_mtime_ns}"
    return f"{root.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another replica on this node copying the same part: wait for it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_small_files(root: Path, target: Path) -> int:
    return sum(_copy_file(file, target / file.relative_to(root)) for file in root.rglob("*")
               if file.is_file() and file.suffix not in WEIGHT_SUFFIXES)


def _copy_part(source: Path, destination: Path) -> int:
    """A whole subfolder, file by file; the part's completion mark is written only after the last one."""
    return sum(_copy_file(file, destination / file.relative_to(source)) for file in source.rglob("*") if file.is_file())


def _copy_file(file: Path, destination: Path) -> int:
    """One file, written beside its place and renamed into it (a crash leaves no half file under its name)."""
    size = file.stat().st_size
    if destination.exists() and destination.stat().st_size == size:
        return size  # copied by an earlier, interrupted fill
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    shutil.copyfile(file, scratch)
    os.replace(scratch, destination)
    return size
