"""How a stage replica gets from process start to ready, whatever its family.

1. ``local_weights``: with ``startup.weights_cache_dir``, the checkpoint parts the stage reads are copied to the
   node-local cache once per node, and the stage loads from there.
2. ``cap_memory``: a GPU stage that shares its GPU caps its process at its planned share
   (``torch.cuda.set_per_process_memory_fraction``), so whatever order the sharing stages start in, none takes
   another's room.
3. Loading (the family's component; each component's load time is exported from its ``LoadLog``).
4. ``warm_up``: one request of the default size (diffusion: each shape bucket, compile included), still inside
   the constructor, so Serve routes nothing to the replica before it is ready.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from cluster.config import ModelConfig
from cluster.startup_config import CUDA_CONTEXT_GB, StageRuntime
from serving import metrics
from serving.families.base import StageSpec
from serving.jobs.faults import FaultInjector
from serving.weights import LoadLog, local_copy

__all__ = ["cap_memory", "export_loads", "local_weights", "warm_up"]

logger = logging.getLogger("ray.serve.reelserve.startup")


def local_weights(model: ModelConfig, spec: StageSpec, runtime: StageRuntime) -> ModelConfig:
    """``model`` reading its checkpoint from the node-local cache (filled now if this node has no copy yet)."""
    cache = runtime.startup.weights_cache_dir
    if cache is None or model.path is None:
        return model
    started = time.perf_counter()
    path = local_copy(model.path, cache, spec.weights)
    logger.info("%s reads %s from the node-local copy %s (ready in %.1f s)", spec.name, model.path, path,
                time.perf_counter() - started)
    return model.model_copy(update={"path": path})


def cap_memory(device: torch.device | str, share: float | None) -> float | None:
    """Cap this process's CUDA allocations at its planned ``share`` of the GPU, less the CUDA context (which
    the allocator does not count); the fraction applied, or None (no cap: a whole GPU, or none)."""
    device = torch.device(device)
    if share is None or share >= 1 or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = max(0.01, share - CUDA_CONTEXT_GB * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    logger.info("GPU allocations capped at %.3f of %.1f GB (the planned share %.3f less the CUDA context)",
                fraction, total / 1e9, share)
    return fraction


def export_loads(stage: str, model: str, log: LoadLog | None) -> dict[str, float]:
    """Each component's load time as ``reelserve_component_load_seconds``; returns them."""
    seconds = dict(log.seconds) if log is not None else {}
    for component, value in seconds.items():
        metrics.component_loaded(stage, model, component, value)
    return seconds


def warm_up(stage: str, model: str, run: Callable[[], object] | None, runtime: StageRuntime,
            faults: FaultInjector) -> float | None:
    """Run the stage's warm-up (``run``) before the replica takes traffic; its seconds, exported."""
    if not runtime.startup.warmup or run is None:
        return None
    started = time.perf_counter()
    faults.at_warmup()
    with torch.inference_mode():
        run()
    seconds = time.perf_counter() - started
    metrics.model_warmed_up(stage, model, seconds)
    logger.info("%s warmed up in %.2f s", stage, seconds)
    return seconds
